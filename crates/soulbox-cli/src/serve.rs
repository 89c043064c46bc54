//! `soulbox serve`: wires store, runtime, templates, API and gateway together.

pub(crate) mod net;

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use chrono::Utc;
use sha2::{Digest, Sha256};
use soulbox_core::{Manager, ManagerConfig};
use soulbox_runtime::{Runtime, RuntimeConfig};
use soulbox_store::{Store, TemplateRecord};
use soulbox_templates::Templates;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub(crate) const DEFAULT_DATA_DIR: &str = "/var/lib/soulbox";
/// The runtime's state dir inside the data dir: one directory per sandbox.
pub(crate) const STATE_DIR: &str = "sandboxes";
/// Volumes' files, inside the state dir (on its btrfs image); not a sandbox id, so the
/// runtime's orphan reaping leaves it alone.
pub(crate) const VOLUMES_DIR: &str = "volumes";
/// The data dir's lock file (see [`lock_data_dir`]); its presence marks a SoulBox data dir.
pub(crate) const LOCK_FILE: &str = "serve.lock";
/// The btrfs image mounted on [`STATE_DIR`] (see [`prepare_disk_limits`]).
const DISK_IMAGE: &str = "sandboxes.img";
/// Below this, mkfs.btrfs refuses or the image holds too little to be useful.
const MIN_DISK_IMAGE_MB: u64 = 1024;
/// The runtime's empty attach point in the state dir (`soulbox_runtime`'s `.attach`).
const ATTACH_DIR: &str = ".attach";
/// Where this data dir's own lxcfs is mounted (its pid in `lxcfs.pid`, its output in
/// `lxcfs.log`): the sandboxes' views of `/proc` (see [`start_lxcfs`]).
pub(crate) const LXCFS_DIR: &str = "lxcfs";

/// The host's CA bundle on Debian (`ca-certificates`).
const DEFAULT_BUILD_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Environment variable that fixes the admin API key instead of generating one.
const ADMIN_KEY_ENV: &str = "SOULBOX_ADMIN_KEY";

#[derive(clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub net: net::NetArgs,
    /// Where state lives: database, templates, per-sandbox directories.
    #[arg(long, default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// Control-plane listener (E2B_API_URL).
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub api_addr: SocketAddr,
    /// Sandbox-traffic listener (E2B_SANDBOX_URL).
    #[arg(long, default_value = "127.0.0.1:3001")]
    pub sandbox_addr: SocketAddr,
    #[command(flatten)]
    pub domain: crate::domain::DomainArgs,
    /// Parent cgroup of this server's sandboxes. The default is `soulbox` for the default data
    /// dir and `soulbox-<hash of the data dir>` otherwise, so that servers on different data
    /// dirs never reap each other's sandboxes.
    #[arg(long, hide = true)]
    pub cgroup_name: Option<String>,
    /// Size in MiB of the sparse btrfs image (`$DATA/sandboxes.img`) that holds every
    /// sandbox's writable layer and enforces its disk limit (`diskSizeMB`); 0 runs without
    /// disk limits. Used when the image is made (first start); the default is half the free
    /// space of the data dir's filesystem.
    #[arg(long, value_name = "MIB")]
    pub disk_image_mb: Option<u64>,
    /// CA bundle (PEM) that template build steps trust, so `RUN pip/npm/curl` work behind a
    /// TLS-intercepting proxy the host trusts; `none` gives them only the template's own.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BUILD_CA_BUNDLE)]
    pub build_ca_bundle: String,
    /// Keep a template warm: `TEMPLATE=MIN[..MAX]` idle sandboxes made ahead, growing from MIN
    /// to MAX with the recent create rate (repeatable; `TEMPLATE=0` turns a default off).
    /// Pools of templates that are not built yet start when they are.
    #[arg(
        long = "pool",
        value_name = "TEMPLATE=MIN[..MAX]",
        default_values = ["base=2..64", "code-interpreter-v1=1..4"]
    )]
    pub pools: Vec<soulbox_core::PoolSize>,
    /// Largest warm pool of any other template a client creates from (made after its first
    /// create, gone after a minute without one); 0 makes them cold every time.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub pool_others: usize,
    /// Memory (MiB of MemAvailable) the host keeps: below it creates fail with 503 before
    /// anything is made, below twice it pools stop making sandboxes. Default: the larger of
    /// 256 MiB and 1/32 of the host's memory.
    #[arg(long, value_name = "MIB")]
    pub reserve_memory_mb: Option<u64>,
    /// Free process slots (pid_max / threads-max minus tasks) the host keeps, likewise.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub reserve_tasks: u64,
    /// Size limit in MiB of each new volume (`$DATA/sandboxes/volumes/<id>`, docs/volumes.md);
    /// enforced on the btrfs disk image.
    #[arg(long, value_name = "MIB", default_value_t = soulbox_core::DEFAULT_VOLUME_SIZE_MB)]
    pub volume_size_mb: u64,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    crate::init_logging("info");
    crate::async_runtime(true)?.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let data = args.data_dir.as_path();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data)
        .with_context(|| format!("creating the data dir {}", data.display()))?;
    let lock = lock_data_dir(data)?;

    let admin_key = admin_key(data)?;
    let store = Store::open(&data.join("soulbox.db"))
        .await
        .context("opening the database")?;
    store
        .add_api_key(&admin_key, "admin")
        .await
        .context("storing the admin key")?;

    // A data dir from before the layer store keeps its mmdebstrap-built base, registered by
    // path (docs/templates.md, "Upgrading"); a new one builds base from its Dockerfile below.
    let legacy = Templates::new(data.join("templates"));
    if legacy.is_built(soulbox_templates::BASE) {
        store
            .upsert_template(&TemplateRecord {
                name: soulbox_templates::BASE.to_owned(),
                layers: vec![legacy.rootfs(soulbox_templates::BASE)],
                cpu_count: soulbox_templates::BASE_CPU_COUNT,
                memory_mb: soulbox_templates::BASE_MEMORY_MB,
                disk_mb: soulbox_templates::BASE_DISK_MB,
                default_user: soulbox_templates::DEFAULT_USER.to_owned(),
                default_workdir: soulbox_templates::DEFAULT_WORKDIR.to_owned(),
                created_at: Utc::now(),
            })
            .await
            .context("registering the base template")?;
    }

    let state_dir = data.join(STATE_DIR);
    prepare_disk_limits(&state_dir, &data.join(DISK_IMAGE), args.disk_image_mb)?;
    let lxcfs = start_lxcfs(data);
    let runtime = Runtime::with_lxcfs(
        RuntimeConfig {
            state_dir,
            agent_binary: install_agent_binary(data)?,
            cgroup_name: match &args.cgroup_name {
                Some(name) => name.clone(),
                None => cgroup_name(data)?,
            },
        },
        lxcfs.as_deref(),
    )
    .context("starting the sandbox runtime")?;
    let domain_mode = args.domain.prepare(data).await?;
    let net_name = match &args.cgroup_name {
        Some(name) => name.clone(),
        None => cgroup_name(data)?,
    };
    let network = net::start(&args.net, data, &net_name).await?;
    let manager = Manager::start(
        ManagerConfig {
            domain: domain_mode.as_ref().map(|d| d.advertised.clone()),
            data_dir: Some(data.to_owned()),
            network,
            build_ca_bundle: build_ca_bundle(&args.build_ca_bundle),
            pool: soulbox_core::PoolConfig {
                templates: args.pools.clone(),
                others_max: args.pool_others,
                reserve: soulbox_core::HostReserve {
                    memory_mb: args.reserve_memory_mb,
                    tasks: args.reserve_tasks,
                },
                ..soulbox_core::PoolConfig::default()
            },
            volumes_dir: Some(data.join(STATE_DIR).join(VOLUMES_DIR)),
            volume_size_mb: args.volume_size_mb,
            ..ManagerConfig::default()
        },
        store.clone(),
        runtime,
    )
    .await
    .context("re-adopting sandboxes")?;
    tracing::info!(sandboxes = manager.live_count(), "sandbox manager ready");
    ensure_base_template(&manager).await?;

    let api = TcpListener::bind(args.api_addr)
        .await
        .with_context(|| format!("binding the API to {}", args.api_addr))?;
    let gateway = TcpListener::bind(args.sandbox_addr)
        .await
        .with_context(|| format!("binding the sandbox gateway to {}", args.sandbox_addr))?;
    let api_url = url_of(api.local_addr()?);
    let sandbox_url = url_of(gateway.local_addr()?);
    tracing::info!(%api_url, %sandbox_url, "listening");
    // For the person or script that started us; a server whose stdout is gone (a closed
    // pipe) serves on.
    let printed = (|| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "export E2B_API_URL={api_url}")?;
        writeln!(out, "export E2B_SANDBOX_URL={sandbox_url}")?;
        writeln!(out, "export E2B_API_KEY={admin_key}")?;
        // The volume content API is served on the control plane's listener.
        writeln!(out, "export E2B_VOLUME_API_URL={api_url}")?;
        if let Some(mode) = &domain_mode {
            write!(out, "{}", mode.exports())?;
        }
        out.flush()
    })();
    if let Err(e) = printed {
        tracing::warn!(error = %e, "printing the export lines");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        match shutdown_signal().await {
            Ok(name) => tracing::info!("{name}: shutting down (sandboxes keep running)"),
            Err(e) => tracing::error!(error = %e, "waiting for signals; shutting down"),
        }
        stop_tx.send_replace(true);
    });
    let sandboxes = soulbox_gateway::Gateway::new(
        manager.clone(),
        crate::domain::gateway_config(domain_mode.as_ref(), &manager),
    );
    let tls = {
        let (sandboxes, stop_rx) = (sandboxes.clone(), stop_rx.clone());
        async move {
            match domain_mode {
                Some(mode) => mode.serve(sandboxes, || stopped(stop_rx.clone())).await,
                None => Ok(()),
            }
        }
    };
    let (api_result, gateway_result, tls_result) = tokio::join!(
        soulbox_api::serve(api, manager.clone(), stopped(stop_rx.clone())),
        sandboxes.serve(gateway, stopped(stop_rx)),
        tls,
    );
    manager.shutdown_pools().await;
    store.close().await;
    api_result.context("control-plane server")?;
    gateway_result.context("sandbox gateway")?;
    tls_result.context("domain-mode TLS listener")?;
    drop(lock);
    Ok(())
}

/// Takes the data dir's lock, held for as long as the file is open: two servers on one data
/// dir would reap each other's sandboxes, and `soulbox down` must not pull a running server's
/// sandboxes from under it.
pub(crate) fn lock_data_dir(data: &Path) -> anyhow::Result<std::fs::File> {
    let lock_path = data.join(LOCK_FILE);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "a `soulbox serve` is using {} (lock {})",
            data.display(),
            lock_path.display()
        );
    }
    Ok(lock)
}

/// The admin key: `SOULBOX_ADMIN_KEY`, else `$DATA/admin.key`, else a new one written there
/// (0600).
fn admin_key(data: &Path) -> anyhow::Result<String> {
    if let Ok(key) = std::env::var(ADMIN_KEY_ENV) {
        if !soulbox_store::is_api_key_format(&key) {
            bail!("{ADMIN_KEY_ENV} must be e2b_ followed by 40 lowercase hex characters");
        }
        return Ok(key);
    }
    let path = data.join("admin.key");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let key = text.trim().to_owned();
            if !soulbox_store::is_api_key_format(&key) {
                bail!(
                    "{} does not hold an API key (e2b_ + 40 lowercase hex); remove it to generate a new one",
                    path.display()
                );
            }
            return Ok(key);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let key = soulbox_store::generate_api_key();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{key}").with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()?;
    tracing::info!(path = %path.display(), "generated the admin API key");
    Ok(key)
}

/// Mounts the sandboxes' btrfs disk image on `state_dir` (made on first use) so that every
/// sandbox's `diskSizeMB` is enforced: writes past it fail inside with EDQUOT and uploads get
/// 507. The mount outlives the server on purpose (running sandboxes keep their writable
/// layers across a restart); a later start finds it in place.
///
/// A state dir that a server without disk limits filled is not mounted over (that would hide
/// its sandboxes' files): such a start runs without limits, says so, and the first start that
/// finds the dir empty again (its sandboxes killed or reaped) turns them on.
/// Starts (or re-uses) this data dir's lxcfs and returns its mount point; `None`, with a
/// warning, when it is not installed or does not come up: sandboxes then see the host's
/// `/proc/meminfo`, `/proc/cpuinfo`, … (everything else of their view stays).
fn start_lxcfs(data: &Path) -> Option<PathBuf> {
    let mount = data.join(LXCFS_DIR);
    match soulbox_runtime::start_lxcfs(&mount) {
        Ok(Some(l)) => {
            tracing::info!(pid = l.pid, reused = l.reused, mount = %mount.display(), "lxcfs ready");
            Some(mount)
        }
        Ok(None) => {
            tracing::warn!(
                "lxcfs is not installed (scripts/install-deps): sandboxes see the host's \
                 memory, CPUs and uptime in /proc"
            );
            None
        }
        Err(e) => {
            tracing::warn!(
                error = %e,
                "lxcfs did not start: sandboxes see the host's memory, CPUs and uptime in /proc"
            );
            None
        }
    }
}

fn prepare_disk_limits(state_dir: &Path, image: &Path, size_mb: Option<u64>) -> anyhow::Result<()> {
    if size_mb == Some(0) {
        tracing::warn!("--disk-image-mb 0: sandbox disk limits are off");
        return Ok(());
    }
    let on_btrfs = nix::sys::statfs::statfs(state_dir)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BTRFS_SUPER_MAGIC);
    if !on_btrfs && state_dir.is_dir() {
        let mut left = Vec::new();
        for entry in std::fs::read_dir(state_dir)
            .with_context(|| format!("listing {}", state_dir.display()))?
        {
            let name = entry?.file_name();
            // The runtime's attach point, empty unless a sandbox lives here (then it has a
            // directory too): remade by the runtime, so it need not stop the migration.
            if name != ATTACH_DIR {
                left.push(name.to_string_lossy().into_owned());
            }
        }
        if !left.is_empty() {
            tracing::warn!(
                state_dir = %state_dir.display(),
                entries = left.len(),
                first = %left[0],
                "sandbox disk limits are off for this run: the state dir holds sandboxes of a \
                 server that ran without them; they turn on at the first start that finds it \
                 empty (kill those sandboxes, or let them expire, then restart)"
            );
            return Ok(());
        }
        let attach = state_dir.join(ATTACH_DIR);
        if let Err(e) = std::fs::remove_dir(&attach)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(e).with_context(|| format!("removing {}", attach.display()));
        }
    }
    let size_mb = match size_mb {
        Some(mb) if mb < MIN_DISK_IMAGE_MB => bail!(
            "--disk-image-mb {mb} is too small: use at least {MIN_DISK_IMAGE_MB}, \
             or 0 to run without disk limits"
        ),
        Some(mb) => mb,
        // An image from an earlier start keeps its size (the size only matters to make one).
        None if image.exists() => 0,
        None => default_disk_image_mb(state_dir.parent().unwrap_or(state_dir))?,
    };
    let mounted =
        soulbox_runtime::prepare_state_fs(state_dir, image, size_mb).with_context(|| {
            format!(
                "putting {} on the btrfs image {} for sandbox disk limits \
             (--disk-image-mb 0 runs without them)",
                state_dir.display(),
                image.display()
            )
        })?;
    if mounted {
        tracing::info!(
            image = %image.display(),
            state_dir = %state_dir.display(),
            "mounted the sandboxes' disk image: disk limits are enforced"
        );
    }
    Ok(())
}

/// The image's default size: half the free space of `dir`'s filesystem. The image is sparse,
/// so it takes only what sandboxes write, but were it larger than the host's free space, a full
/// host disk would turn into I/O errors inside sandboxes; half leaves the host room to grow.
fn default_disk_image_mb(dir: &Path) -> anyhow::Result<u64> {
    let fs =
        nix::sys::statvfs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    let free_mb = fs.blocks_available().saturating_mul(fs.fragment_size()) >> 20;
    if free_mb / 2 < MIN_DISK_IMAGE_MB {
        bail!(
            "only {free_mb} MiB free on the filesystem of {}: not enough for the sandboxes' disk \
             image (half of it, at least {MIN_DISK_IMAGE_MB} MiB); free some space, pass \
             --disk-image-mb, or 0 to run without disk limits",
            dir.display()
        );
    }
    Ok(free_mb / 2)
}

/// Copies the running binary to `$DATA/bin/soulbox`, the agent every new sandbox runs.
///
/// A copy, not the build's own path: rebuilding or upgrading the binary on disk then never
/// breaks the server that is running (the old file may be gone) and new sandboxes run the
/// agent of the server that made them. Running sandboxes keep the file they had (it is
/// replaced by rename).
fn install_agent_binary(data: &Path) -> anyhow::Result<PathBuf> {
    let dir = data.join("bin");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let target = dir.join("soulbox");
    let partial = dir.join(format!(".soulbox.{}", std::process::id()));
    // /proc/self/exe opens the running binary even if its path was replaced since.
    std::fs::copy("/proc/self/exe", &partial)
        .with_context(|| format!("copying the soulbox binary to {}", partial.display()))?;
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&partial, &target)
        .with_context(|| format!("installing {}", target.display()))?;
    Ok(target)
}

/// Builds `base` from its shipped Dockerfile unless it exists (first start), with a progress
/// bar of its steps.
async fn ensure_base_template(manager: &Manager) -> anyhow::Result<()> {
    let name = soulbox_templates::BASE;
    if manager.template_exists(name).await {
        return Ok(());
    }
    let steps = soulbox_templates::shipped::shipped(name)
        .and_then(|s| soulbox_templates::dockerfile::parse(s.dockerfile).ok())
        .map_or(0, |d| d.instructions.len());
    tracing::info!(
        "building the {name} template from templates/{name}/Dockerfile (first start only, a \
         few minutes: Debian's archive, then the packages)"
    );
    let progress = crate::template::BuildProgress::new(name, steps, true);
    let result = manager
        .ensure_shipped_template(name, |l| progress.line(l.step.as_deref(), &l.message))
        .await;
    match result {
        Ok(()) => {
            progress.finish();
            tracing::info!("{name} template ready");
            Ok(())
        }
        Err(e) => {
            progress.abandon();
            Err(e).with_context(|| format!("building the {name} template"))
        }
    }
}

/// `--build-ca-bundle`: `none`, or a file that exists (a missing default is no error: hosts
/// without `ca-certificates` simply give build steps nothing).
fn build_ca_bundle(arg: &str) -> Option<PathBuf> {
    if arg == "none" {
        return None;
    }
    let path = PathBuf::from(arg);
    if path.is_file() {
        Some(path)
    } else {
        tracing::warn!(path = %path.display(), "no CA bundle for template build steps: not a file");
        None
    }
}

/// `soulbox` for the default data dir, else `soulbox-` + 12 hex digits of the sha256 of the
/// data dir's canonical path (stable across restarts and upgrades).
pub(crate) fn cgroup_name(data: &Path) -> anyhow::Result<String> {
    let canonical = data
        .canonicalize()
        .with_context(|| format!("resolving {}", data.display()))?;
    if canonical == Path::new(DEFAULT_DATA_DIR) {
        return Ok("soulbox".to_owned());
    }
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    Ok(format!("soulbox-{}", &hex::encode(digest)[..12]))
}

fn url_of(addr: SocketAddr) -> String {
    let host = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "[::1]".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        std::net::IpAddr::V4(ip) => ip.to_string(),
    };
    format!("http://{host}:{}", addr.port())
}

async fn shutdown_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = rx.wait_for(|stop| *stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_names_differ_per_data_dir() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let na = cgroup_name(a.path()).expect("name");
        assert_eq!(na.len(), "soulbox-".len() + 12);
        assert!(na.starts_with("soulbox-"));
        assert_ne!(na, cgroup_name(b.path()).expect("name"));
        assert_eq!(na, cgroup_name(&a.path().join(".")).expect("name"));
    }

    #[test]
    fn export_urls() {
        let a: SocketAddr = "0.0.0.0:3000".parse().expect("addr");
        assert_eq!(url_of(a), "http://127.0.0.1:3000");
        let a: SocketAddr = "127.0.0.1:3001".parse().expect("addr");
        assert_eq!(url_of(a), "http://127.0.0.1:3001");
        let a: SocketAddr = "[::1]:3001".parse().expect("addr");
        assert_eq!(url_of(a), "http://[::1]:3001");
    }
}
