//! `soulbox down`: takes what a stopped server left running off the host.
//!
//! `soulbox serve` stops without touching its sandboxes (a restart re-adopts them), so a
//! stopped server can leave sandboxes running, its nftables table, its lxcfs, and the
//! sandboxes' disk image mounted. `down` removes all of that for one data dir, and refuses
//! while a server holds it. Templates, keys and the database stay: the next `serve` starts
//! from them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use nix::errno::Errno;
use nix::mount::{MntFlags, umount2};
use soulbox_runtime::{Runtime, RuntimeConfig};
use soulbox_store::Store;

use crate::serve::{self, DEFAULT_DATA_DIR, LXCFS_DIR, STATE_DIR, net::NETWORK_DIR};

#[derive(clap::Args)]
pub struct DownArgs {
    /// The data dir of the stopped server.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The server's `--cgroup-name`, if it was given one.
    #[arg(long, hide = true)]
    pub cgroup_name: Option<String>,
    /// Leave `net.ipv4.ip_forward` on even if this server turned it on: for hosts where other
    /// servers may be starting at the same moment (they could lose forwarding otherwise).
    #[arg(long)]
    pub keep_forwarding: bool,
}

pub fn run(args: DownArgs) -> anyhow::Result<()> {
    crate::init_logging("warn");
    crate::async_runtime(false)?.block_on(down(args))
}

async fn down(args: DownArgs) -> anyhow::Result<()> {
    let data = args.data_dir.as_path();
    if !data.join(serve::LOCK_FILE).exists() {
        bail!(
            "{} is not a SoulBox data dir (no {})",
            data.display(),
            serve::LOCK_FILE
        );
    }
    let _lock = serve::lock_data_dir(data).context("stop the server first")?;
    let name = match args.cgroup_name {
        Some(name) => name,
        None => serve::cgroup_name(data)?,
    };

    let state_dir = data.join(STATE_DIR);
    let runtime = Runtime::new(RuntimeConfig {
        state_dir: state_dir.clone(),
        // Never run here (nothing is created); the runtime only checks that it is a file.
        agent_binary: PathBuf::from("/proc/self/exe"),
        cgroup_name: name.clone(),
    })
    .context("opening the sandbox runtime")?;
    let killed = runtime
        .reap_orphans(&HashSet::new())
        .await
        .context("killing the sandboxes")?;
    println!("killed {killed} sandboxes");
    runtime.remove_parent_cgroups();
    // The runtime holds the state dir open, which would keep its file system busy.
    drop(runtime);
    if soulbox_runtime::stop_lxcfs(&data.join(LXCFS_DIR)).context("stopping lxcfs")? {
        println!(
            "stopped lxcfs and detached {}",
            data.join(LXCFS_DIR).display()
        );
    }

    let db = data.join("soulbox.db");
    if db.exists() {
        let store = Store::open(&db).await.context("opening the database")?;
        let mut forgotten = 0;
        for s in store.all_sandboxes().await.context("listing sandboxes")? {
            if store
                .delete_sandbox(&s.id)
                .await
                .context("deleting a sandbox")?
            {
                forgotten += 1;
            }
        }
        store.close().await;
        if forgotten > 0 {
            println!("forgot {forgotten} sandboxes in the database");
        }
    }

    let net_dir = data.join(NETWORK_DIR);
    let table = name.clone();
    let restore = !args.keep_forwarding;
    let removed = tokio::task::spawn_blocking(move || {
        soulbox_net::remove_host_state(&table, &net_dir, restore)
    })
    .await
    .context("network teardown task")?
    .context("removing the network objects")?;
    if removed.table {
        println!("deleted the nftables table inet {name}");
    }
    if removed.interfaces > 0 || removed.leases > 0 {
        println!(
            "deleted {} slot interfaces and {} lease records",
            removed.interfaces, removed.leases
        );
    }
    if removed.forwarding_off {
        println!("turned net.ipv4.ip_forward off again (this server had turned it on)");
    } else if !removed.forwarding_kept_for.is_empty() {
        println!(
            "left net.ipv4.ip_forward on: other servers route ({})",
            removed.forwarding_kept_for.join(", ")
        );
    }

    if unmount(&state_dir)? {
        println!(
            "unmounted the sandboxes' disk image from {}",
            state_dir.display()
        );
    }
    println!(
        "{} is down; its templates, keys and database stay",
        data.display()
    );
    Ok(())
}

/// Unmounts `dir` if something is mounted there; a busy mount (a process still has a file open
/// there) is detached lazily and goes when that file is closed.
fn unmount(dir: &Path) -> anyhow::Result<bool> {
    match umount2(dir, MntFlags::empty()) {
        Ok(()) => Ok(true),
        // Not a mount point, or no such dir: nothing mounted.
        Err(Errno::EINVAL | Errno::ENOENT) => Ok(false),
        Err(Errno::EBUSY) => {
            umount2(dir, MntFlags::MNT_DETACH)
                .with_context(|| format!("detaching {}", dir.display()))?;
            Ok(true)
        }
        Err(e) => Err(e).with_context(|| format!("unmounting {}", dir.display())),
    }
}
