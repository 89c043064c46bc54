//! The server's own lxcfs: a FUSE filesystem whose `proc/meminfo`, `proc/cpuinfo`, … answer
//! each reader with the view of the cgroup it is in (memory limit as MemTotal, CPU quota as
//! the CPU count, the age of its pid namespace's init as uptime). LXC and Incus rely on it.
//!
//! SoulBox runs one instance per data dir, never the host's (a system `lxcfs.service` may or
//! may not exist and is left alone): `lxcfs --foreground --enable-cfs --enable-loadavg
//! --enable-pidfd --pidfile <mount>.pid <mount>`, in its own session, so it outlives the server
//! like the sandboxes whose `/proc` files are bind mounts of it do. A restarted server finds it
//! mounted and alive and keeps it; `soulbox down` ([`stop_lxcfs`]) detaches the mount and ends
//! it by its recorded pid. The runtime then bind-mounts its files into each sandbox (see
//! `crate::views`).
//!
//! Failure modes: without the binary, or if it does not come up, sandboxes start with the
//! host's `/proc` files (the caller logs it). A dead lxcfs leaves a mount whose every access
//! fails at once with ENOTCONN; the runtime holds `O_PATH` descriptors of the files and clones
//! its bind mounts from them, which never calls into FUSE, so neither a dead nor a stuck lxcfs
//! can make a create wait on it.

use std::fs;
use std::io::{self, ErrorKind};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::mount::{UnmountFlags, unmount};
use rustix::process::{PidfdFlags, Signal, pidfd_open, pidfd_send_signal};

use crate::error::Context;
use crate::{RuntimeError, proc};

/// How long lxcfs gets to mount itself, or to answer a probe of an existing mount.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long it gets to exit after SIGTERM before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// A running lxcfs of this data dir.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lxcfs {
    pub pid: i32,
    /// It was already mounted and alive (a previous server started it).
    pub reused: bool,
}

/// `<mount>.pid`: lxcfs writes its pid there (and holds a lock on it while it runs).
pub fn lxcfs_pidfile(mount: &Path) -> PathBuf {
    mount.with_extension("pid")
}

fn logfile(mount: &Path) -> PathBuf {
    mount.with_extension("log")
}

/// Makes sure this data dir's lxcfs is mounted on `mount` and answering: re-uses a live one,
/// replaces a dead one, else starts it (its output goes to `<mount>.log`). `Ok(None)` when the
/// `lxcfs` binary is not installed.
pub fn start_lxcfs(mount: &Path) -> Result<Option<Lxcfs>, RuntimeError> {
    let Some(binary) = find_binary() else {
        return Ok(None);
    };
    let mount = &resolve(mount)?;
    let pidfile = lxcfs_pidfile(mount);
    if is_mounted(mount)?
        && let Some(pid) = recorded_pid(mount).filter(|&p| is_ours(p, mount))
        && probe(mount)
    {
        return Ok(Some(Lxcfs { pid, reused: true }));
    }
    // Whatever is left of an earlier one (a dead mount, a stuck process, one whose mount was
    // detached) goes first: a second lxcfs could not take the pid file's lock.
    if stop_lxcfs(mount)? {
        tracing::warn!(mount = %mount.display(), "replaced a dead or stuck lxcfs");
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(mount)
        .ctx(|| format!("mkdir {}", mount.display()))?;
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(logfile(mount))
        .ctx(|| format!("open {}", logfile(mount).display()))?;
    let mut cmd = Command::new(&binary);
    cmd.args([
        "--foreground",
        "--enable-cfs",
        "--enable-loadavg",
        "--enable-pidfd",
        "--pidfile",
    ])
    .arg(&pidfile)
    .arg(mount)
    .stdin(Stdio::null())
    .stdout(log.try_clone().ctx(|| "dup lxcfs log")?)
    .stderr(log);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent; its own
    // session keeps lxcfs out of the server's process group and terminal.
    unsafe {
        cmd.pre_exec(|| rustix::process::setsid().map(drop).map_err(io::Error::from));
    }
    let mut child = cmd.spawn().ctx(|| format!("start {}", binary.display()))?;
    let pid = child.id() as i32;
    let deadline = Instant::now() + READY_TIMEOUT;
    while !is_mounted(mount)? {
        if let Some(status) = child.try_wait().ctx(|| "wait for lxcfs")? {
            return Err(RuntimeError::Unsupported(format!(
                "lxcfs exited ({status}) before mounting {}; see {}",
                mount.display(),
                logfile(mount).display()
            )));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(RuntimeError::Timeout(format!(
                "waiting for lxcfs to mount {}",
                mount.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Like the distribution's unit: the OOM killer must not pick the views' server.
    if let Err(e) = fs::write(format!("/proc/{pid}/oom_score_adj"), "-1000") {
        tracing::warn!(error = %e, "cannot protect lxcfs from the OOM killer");
    }
    // Our child until this server exits: collect it if it dies, so it leaves no zombie.
    std::thread::Builder::new()
        .name("lxcfs-wait".into())
        .spawn(move || {
            if let Ok(status) = child.wait() {
                tracing::warn!(%status, pid, "lxcfs exited: sandbox /proc views now fail");
            }
        })
        .ctx(|| "spawn the lxcfs waiter")?;
    Ok(Some(Lxcfs { pid, reused: false }))
}

/// Takes this data dir's lxcfs off the host: detaches the mount (sandboxes still holding bind
/// mounts of it keep them until they go) and ends the process by its recorded pid. Returns
/// whether there was anything to stop.
pub fn stop_lxcfs(mount: &Path) -> Result<bool, RuntimeError> {
    let mount = &resolve(mount)?;
    let mut stopped = match unmount(mount, UnmountFlags::DETACH) {
        Ok(()) => true,
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => false,
        Err(e) => return Err(e).ctx(|| format!("detach {}", mount.display())),
    };
    if let Some(pid) = recorded_pid(mount).filter(|&p| is_ours(p, mount))
        && let Some(fd) = proc::pid(pid).and_then(|p| pidfd_open(p, PidfdFlags::empty()).ok())
        // The pidfd pins the process: check again that it is still the same one.
        && is_ours(pid, mount)
    {
        let _ = pidfd_send_signal(&fd, Signal::TERM);
        if !proc::wait_exit(fd.as_fd(), Some(STOP_TIMEOUT)).ctx(|| "wait for lxcfs")? {
            proc::kill(fd.as_fd());
            proc::wait_exit(fd.as_fd(), Some(STOP_TIMEOUT)).ctx(|| "wait for lxcfs")?;
        }
        proc::reap(&fd);
        stopped = true;
    }
    match fs::remove_file(lxcfs_pidfile(mount)) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).ctx(|| "remove the lxcfs pid file"),
    }
    Ok(stopped)
}

/// `mount` as mountinfo and lxcfs's command line name it: absolute, with its parent's symlinks
/// resolved (the mount point itself is not touched: a dead FUSE mount answers ENOTCONN).
fn resolve(mount: &Path) -> Result<PathBuf, RuntimeError> {
    let (Some(parent), Some(name)) = (mount.parent(), mount.file_name()) else {
        return Err(RuntimeError::InvalidSpec(format!(
            "lxcfs mount point {}",
            mount.display()
        )));
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    Ok(fs::canonicalize(parent)
        .ctx(|| format!("resolve {}", parent.display()))?
        .join(name))
}

fn find_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|dir| dir.join("lxcfs"))
        .find(|p| p.is_file())
}

/// Whether an lxcfs is mounted exactly on `mount` in our mount namespace.
fn is_mounted(mount: &Path) -> Result<bool, RuntimeError> {
    let text = fs::read_to_string("/proc/self/mountinfo").ctx(|| "read /proc/self/mountinfo")?;
    Ok(text.lines().any(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let fstype = fields
            .iter()
            .position(|f| *f == "-")
            .and_then(|sep| fields.get(sep + 1));
        fstype == Some(&"fuse.lxcfs")
            && fields
                .get(4)
                .is_some_and(|m| Path::new(&crate::cgroup::unescape(m)) == mount)
    }))
}

fn recorded_pid(mount: &Path) -> Option<i32> {
    fs::read_to_string(lxcfs_pidfile(mount))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` is an lxcfs serving `mount` (not a reused pid, not the host's lxcfs).
fn is_ours(pid: i32, mount: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|&b| b == 0);
    let is_lxcfs = args.next().is_some_and(|argv0| argv0.ends_with(b"lxcfs"));
    is_lxcfs
        && args.any(|a| a == mount.as_os_str().as_encoded_bytes())
        && proc::stat(pid).is_ok_and(|st| st.is_alive() && st.state != 'T')
}

/// Whether the mount answers within [`READY_TIMEOUT`]. The probe runs on its own thread: a
/// stuck lxcfs would block it for good, and then only that thread stays behind.
fn probe(mount: &Path) -> bool {
    let (tx, rx) = mpsc::channel();
    let file = mount.join("proc/meminfo");
    let spawned = std::thread::Builder::new()
        .name("lxcfs-probe".into())
        .spawn(move || {
            let _ = tx.send(fs::metadata(&file).is_ok());
        });
    spawned.is_ok() && rx.recv_timeout(READY_TIMEOUT).unwrap_or(false)
}
