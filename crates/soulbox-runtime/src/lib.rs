//! Linux sandboxes: namespaces, user namespace mapping, overlay root, cgroups v1/v2, spawn/kill/adopt.
//!
//! A sandbox is one process tree: its PID 1 (the agent) runs in fresh pid, mount, uts, ipc, net,
//! cgroup and time namespaces, inside a user namespace that maps sandbox uid/gid 0..65536 onto an
//! unprivileged host range that no other live sandbox uses. The mount, net, uts and ipc
//! namespaces are created by host root *before* the process joins its user namespace, so they
//! are owned by the host user namespace: sandbox root holds no capability over them and cannot
//! mount, change the hostname or reconfigure the network.
//!
//! The root filesystem is an overlay: the template layers (read-only, exposed through idmapped
//! mounts so files owned by host 0/1000 appear as sandbox 0/1000) below a per-sandbox upper
//! directory. The whole tree (overlay, `/dev`, the agent binary) is assembled as a *detached*
//! mount tree by the host and only attached inside the sandbox's private mount namespace, so no
//! sandbox mount ever exists in the host's namespace and a failed create leaves none behind.
//!
//! See `ARCHITECTURE.md` ("Runtime") for the contract and the module docs for each mechanism.

mod cgroup;
mod disk;
mod error;
mod lxcfs;
mod proc;
mod rootfs;
mod seccomp;
mod spawn;
mod sys;
mod userns;
mod views;
mod volumes;

use std::collections::{BTreeSet, HashSet};
use std::ffi::CString;
use std::fs::{self, DirBuilder};
use std::io::{self, ErrorKind};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::fs::{Gid, Uid, chown};
use serde::{Deserialize, Serialize};

use crate::error::Context;
pub use disk::prepare_state_fs;
pub use error::RuntimeError;
pub use lxcfs::{Lxcfs, lxcfs_pidfile, start_lxcfs, stop_lxcfs};
pub use volumes::{
    Attrs, Entry, EntryKind, VOLUME_OWNER, VolumeDir, VolumeFsError, VolumeMount, VolumePath,
    VolumeStore, check_attrs, mount_path_components,
};

/// Where the runtime keeps its state and what it runs inside every sandbox.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// `$DATA/sandboxes`: one host-only (0700) directory per sandbox with `upper/`, `work/` and
    /// `agent.sock`. Created if missing.
    pub state_dir: PathBuf,
    /// Host path of the `soulbox` binary; bind-mounted read-only at `/.soulbox/bin/soulbox`
    /// inside every sandbox and run there as `soulbox agent --fd 3`.
    pub agent_binary: PathBuf,
    /// Name of the parent cgroup (`soulbox`) under the root of every cgroup hierarchy used.
    pub cgroup_name: String,
}

/// Resource limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU quota in whole CPUs (quota = `cpu_count` × period). PID 1's CPU affinity is that
    /// many CPUs too (all of the server's if it has no more), so `nproc` agrees.
    pub cpu_count: u32,
    /// Memory limit in MiB (no swap on top); the kernel OOM-kills inside the sandbox only.
    pub memory_mb: u64,
    /// Maximum number of tasks (processes + threads) in the sandbox.
    pub pids_max: u64,
    /// Size limit of the sandbox's writable layer in MiB (0: none). Enforced when `state_dir`
    /// is on btrfs (see [`prepare_state_fs`]): writes past it fail with EDQUOT inside.
    pub disk_mb: u64,
    /// Hard RLIMIT_NOFILE of every process in the sandbox (the soft limit is 1024, or this
    /// if lower). Kernel memory for open files counts against `memory_mb` too.
    pub open_files: u64,
}

impl Default for Limits {
    /// E2B's defaults: 2 vCPU, 512 MiB.
    fn default() -> Self {
        Limits {
            cpu_count: 2,
            memory_mb: 512,
            pids_max: 4096,
            disk_mb: 10 * 1024,
            open_files: 65536,
        }
    }
}

/// What to create.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// 20 characters of `[a-z0-9]`; also the hostname.
    pub id: String,
    /// Read-only root filesystem layers (host directories), lowest first.
    pub layers: Vec<PathBuf>,
    pub limits: Limits,
    /// Volumes mounted into the sandbox (idmapped, read-write, nosuid, nodev).
    pub volumes: Vec<VolumeMount>,
}

/// A network made for a sandbox beforehand (a network "slot", see the `soulbox-net` crate),
/// for [`Runtime::create_with_network`].
#[derive(Debug, Clone)]
pub struct NetworkAttach {
    /// The network namespace the sandbox joins instead of getting a fresh loopback-only one.
    /// Made by host root (so owned by the host user namespace: sandbox root cannot reconfigure
    /// it), with its interfaces, addresses and routes already in place.
    pub netns: Arc<OwnedFd>,
    /// Written to `/etc/resolv.conf` in the sandbox's (fresh, empty) writable layer before the
    /// overlay is mounted: a regular file owned by sandbox root, shadowing the template's.
    pub resolv_conf: String,
}

/// Everything needed to find a running sandbox again; persisted by core so that a restarted
/// server can re-adopt it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxHandle {
    pub id: String,
    /// Host pid of the sandbox's PID 1 (the agent).
    pub pid: i32,
    /// `starttime` of `/proc/<pid>/stat`: guards against pid reuse.
    pub start_time: u64,
    /// Host uid/gid that sandbox uid/gid 0 maps to (65536 ids).
    pub uid_base: u32,
    /// Host path of the agent's listening unix socket.
    pub socket_path: PathBuf,
}

/// Makes, kills and re-adopts sandboxes. Cheap to clone; all clones share state.
///
/// Needs root, and a tokio runtime with IO and time drivers for its async methods (the blocking
/// work runs on tokio's blocking pool).
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RuntimeConfig,
    cgroups: cgroup::Cgroups,
    /// The host's `/dev/null`, given to every agent as stdin/stdout/stderr.
    devnull: OwnedFd,
    /// `state_dir/.attach`, see [`spawn::Plan::attach_point`].
    attach_point: CString,
    /// `state_dir/.attach/boot_id`, see [`spawn::Plan::boot_id_path`].
    boot_id_path: CString,
    /// The seccomp filter, built once.
    seccomp: Vec<libc::sock_filter>,
    /// Disk limits, when `state_dir` is on btrfs.
    disk: Option<disk::Disk>,
    /// What sandboxes see of their machine: lxcfs files, cgroups (see `views`).
    views: views::Views,
}

/// The directory inside `state_dir` every sandbox's root is attached on (in its own mount
/// namespace only); not a valid id, so never taken for a sandbox.
const ATTACH_DIR: &str = ".attach";
const AGENT_SOCKET: &str = "agent.sock";
/// How long a sandbox's PID 1 gets to die after SIGKILL before destroy reports a timeout.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent's whole environment: nothing of the server's leaks in.
const AGENT_ENV: [&str; 2] = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
];

/// The kernel's default `fs.nr_open`: the most RLIMIT_NOFILE can be.
const MAX_OPEN_FILES: u64 = 1 << 20;

/// Sandbox ids: 20 characters of `[a-z0-9]` (they name directories, cgroups and the hostname).
pub(crate) fn valid_id(id: &str) -> bool {
    id.len() == 20
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn check_spec(spec: &SandboxSpec) -> Result<(), RuntimeError> {
    if !valid_id(&spec.id) {
        return Err(RuntimeError::InvalidId(spec.id.clone()));
    }
    if spec.layers.is_empty() {
        return Err(RuntimeError::InvalidSpec("no layers".into()));
    }
    for layer in &spec.layers {
        if !layer.is_absolute() || !layer.is_dir() {
            return Err(RuntimeError::InvalidSpec(format!(
                "layer {} is not an absolute path to a directory",
                layer.display()
            )));
        }
    }
    let l = &spec.limits;
    if l.cpu_count == 0
        || l.memory_mb < 16
        || l.memory_mb > (u64::MAX >> 20)
        || l.pids_max == 0
        || !(64..=MAX_OPEN_FILES).contains(&l.open_files)
    {
        return Err(RuntimeError::InvalidSpec(format!(
            "limits out of range (cpu_count ≥ 1, memory_mb ≥ 16, pids_max ≥ 1, \
             64 ≤ open_files ≤ {MAX_OPEN_FILES}): {l:?}"
        )));
    }
    Ok(())
}

/// `/etc/resolv.conf` in a fresh upper directory (made by the host a moment ago, empty, not
/// mounted yet, so no path here is under the sandbox's control): `etc/` as a plain directory
/// (merged with the template's `/etc` by overlayfs) and the file, both owned by sandbox root.
fn write_resolv_conf(upper: &Path, text: &str, uid: Uid, gid: Gid) -> Result<(), RuntimeError> {
    let etc = upper.join("etc");
    DirBuilder::new()
        .mode(0o755)
        .create(&etc)
        .ctx(|| "mkdir upper/etc")?;
    chown(&etc, Some(uid), Some(gid)).ctx(|| "chown upper/etc")?;
    let file = etc.join("resolv.conf");
    fs::write(&file, text).ctx(|| "write upper/etc/resolv.conf")?;
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644))
        .ctx(|| "chmod upper/etc/resolv.conf")?;
    chown(&file, Some(uid), Some(gid)).ctx(|| "chown upper/etc/resolv.conf")
}

/// Moves `fd` to a number ≥ 4 if it is below, so that setting up descriptors 0–3 in the child
/// cannot clobber it.
fn above_stdio(fd: OwnedFd) -> Result<OwnedFd, RuntimeError> {
    if fd.as_raw_fd() > spawn::AGENT_FD {
        return Ok(fd);
    }
    rustix::io::fcntl_dupfd_cloexec(&fd, spawn::AGENT_FD + 1).ctx(|| "dup descriptor")
}

/// A pidfd of the handle's PID 1 if that process is still the sandbox's (not a reused pid).
fn pid1_of(h: &SandboxHandle) -> Option<OwnedFd> {
    proc::pidfd_if_same(h.pid, h.start_time).map(|(fd, _)| fd)
}

fn join_error(e: tokio::task::JoinError) -> RuntimeError {
    RuntimeError::Io {
        context: "runtime task".into(),
        source: io::Error::other(e.to_string()),
    }
}

impl Runtime {
    /// Checks the host (root, cgroup layout, agent binary), creates `state_dir` and the parent
    /// cgroups, and reserves the uid ranges of sandboxes whose state directories still exist.
    /// Sandboxes see the host's `/proc/meminfo`, `cpuinfo`, … (see [`Runtime::with_lxcfs`]).
    pub fn new(cfg: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        Runtime::with_lxcfs(cfg, None)
    }

    /// [`Runtime::new`], with sandboxes seeing their own memory, CPUs, uptime and load in
    /// `/proc` through the lxcfs mounted on `lxcfs` (see [`start_lxcfs`]). If its files
    /// cannot be opened, this warns and goes on as [`Runtime::new`].
    pub fn with_lxcfs(cfg: RuntimeConfig, lxcfs: Option<&Path>) -> Result<Runtime, RuntimeError> {
        if !rustix::process::geteuid().is_root() {
            return Err(RuntimeError::Unsupported(
                "sandboxes need root (namespaces, cgroups, mounts)".into(),
            ));
        }
        let name = &cfg.cgroup_name;
        if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
            return Err(RuntimeError::InvalidSpec(format!(
                "bad cgroup name {name:?}"
            )));
        }
        let agent = fs::metadata(&cfg.agent_binary)
            .ctx(|| format!("agent binary {}", cfg.agent_binary.display()))?;
        if !agent.is_file() {
            return Err(RuntimeError::InvalidSpec(format!(
                "agent binary {} is not a file",
                cfg.agent_binary.display()
            )));
        }
        let host_only = |dir: &Path| -> Result<(), RuntimeError> {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(0o700)))
                .ctx(|| format!("create {}", dir.display()))
        };
        host_only(&cfg.state_dir)?;
        // Absolute and canonical: the uid-slot registry names sandboxes by this path.
        let state_dir = fs::canonicalize(&cfg.state_dir)
            .ctx(|| format!("resolve {}", cfg.state_dir.display()))?;
        let cfg = RuntimeConfig { state_dir, ..cfg };
        let name = &cfg.cgroup_name;
        let attach = cfg.state_dir.join(ATTACH_DIR);
        host_only(&attach)?;
        let attach_point = CString::new(attach.as_os_str().as_bytes())
            .map_err(|_| RuntimeError::InvalidSpec("state_dir contains NUL".into()))?;
        let boot_id_path = CString::new(attach.join(views::BOOT_ID).as_os_str().as_bytes())
            .map_err(|_| RuntimeError::InvalidSpec("state_dir contains NUL".into()))?;
        let cgroups = cgroup::Cgroups::new(name)?;
        let views = views::Views::new(lxcfs, cgroups.views()?);
        let seccomp = seccomp::program()?;
        let disk = disk::Disk::new(&cfg.state_dir)?;
        if disk.is_none() {
            tracing::warn!(
                state_dir = %cfg.state_dir.display(),
                "state_dir is not on btrfs: sandbox disk limits are not enforced \
                 (see soulbox_runtime::prepare_state_fs)"
            );
        }
        let devnull = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
            .ctx(|| "open /dev/null")?;
        let devnull = above_stdio(devnull.into())?;
        for entry in fs::read_dir(&cfg.state_dir).ctx(|| "list state_dir")? {
            let entry = entry.ctx(|| "list state_dir")?;
            if entry.file_name().to_str().is_some_and(valid_id)
                && let Ok(meta) = entry.metadata()
            {
                userns::mark_used(meta.gid(), &entry.path());
            }
        }
        Ok(Runtime {
            inner: Arc::new(Inner {
                cfg,
                cgroups,
                devnull,
                attach_point,
                boot_id_path,
                seccomp,
                disk,
                views,
            }),
        })
    }

    /// Creates and starts a sandbox; returns once its PID 1 has exec'd the agent (the agent
    /// may not be accepting yet: connecting to `socket_path` queues until it does).
    /// A failure leaves nothing behind.
    pub async fn create(&self, spec: &SandboxSpec) -> Result<SandboxHandle, RuntimeError> {
        self.create_with_network(spec, None).await
    }

    /// [`Runtime::create`], with the sandbox joining a pre-made network namespace (`Some`)
    /// instead of a fresh loopback-only one (`None`). The runtime does not own the namespace:
    /// it lives as long as the sandbox's processes or the caller's descriptor.
    pub async fn create_with_network(
        &self,
        spec: &SandboxSpec,
        net: Option<NetworkAttach>,
    ) -> Result<SandboxHandle, RuntimeError> {
        check_spec(spec)?;
        let inner = self.inner.clone();
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || inner.create(&spec, net.as_ref()))
            .await
            .map_err(join_error)?
    }

    /// Kills every process of the sandbox, waits until they are gone, and removes its cgroups,
    /// directories and socket, and frees its uid range. Idempotent.
    pub async fn destroy(&self, h: &SandboxHandle) -> Result<(), RuntimeError> {
        self.blocking(h, |inner, h| inner.teardown(&h.id, pid1_of(h)))
            .await
    }

    /// Freezes (`true`) or thaws (`false`) every process of the sandbox through its cgroup
    /// freezer; returns once all of them are (and, frozen, its files are on disk). A frozen
    /// sandbox keeps its memory, uid range, network and state directory and can be destroyed
    /// as it is.
    pub async fn freeze(&self, h: &SandboxHandle, frozen: bool) -> Result<(), RuntimeError> {
        self.blocking(h, move |inner, h| {
            inner.cgroups.freeze(&h.id, frozen)?;
            if frozen { inner.sync(&h.id) } else { Ok(()) }
        })
        .await
    }

    /// Ends every process of the sandbox and removes its cgroups, but keeps its state
    /// directory (upper layer, uid range, synced to disk) for
    /// [`Runtime::resume_with_network`]. Idempotent.
    pub async fn stop(&self, h: &SandboxHandle) -> Result<(), RuntimeError> {
        self.blocking(h, |inner, h| {
            inner.end_processes(&h.id, pid1_of(h))?;
            inner.sync(&h.id)
        })
        .await
    }

    /// Runs `f` on a blocking thread for the sandbox of a handle whose id is valid.
    async fn blocking<F>(&self, h: &SandboxHandle, f: F) -> Result<(), RuntimeError>
    where
        F: FnOnce(&Inner, &SandboxHandle) -> Result<(), RuntimeError> + Send + 'static,
    {
        if !valid_id(&h.id) {
            return Err(RuntimeError::InvalidId(h.id.clone()));
        }
        let inner = self.inner.clone();
        let h = h.clone();
        tokio::task::spawn_blocking(move || f(&inner, &h))
            .await
            .map_err(join_error)?
    }

    /// Starts a sandbox that [`Runtime::stop`] stopped (or whose processes a host restart
    /// ended) again: a new PID 1 in new namespaces and cgroups over the upper layer its state
    /// directory kept, with `spec`'s layers and limits. Unlike a create, it does not write
    /// `resolv_conf` into the tree (the sandbox owns its files now; its agent writes it). A
    /// failure keeps the state directory. [`RuntimeError::NotFound`] when nothing was kept.
    pub async fn resume_with_network(
        &self,
        spec: &SandboxSpec,
        net: Option<NetworkAttach>,
    ) -> Result<SandboxHandle, RuntimeError> {
        check_spec(spec)?;
        let inner = self.inner.clone();
        let spec = spec.clone();
        tokio::task::spawn_blocking(move || inner.resume(&spec, net.as_ref()))
            .await
            .map_err(join_error)?
    }

    /// Whether the sandbox has a state directory (a running or stopped sandbox's).
    pub fn has_state(&self, id: &str) -> bool {
        valid_id(id) && self.inner.dir(id).is_dir()
    }

    /// After a restart: is the sandbox's PID 1 still the same live process? If so its uid range
    /// is marked as used.
    pub fn adopt(&self, h: &SandboxHandle) -> bool {
        let alive = valid_id(&h.id)
            && self.inner.dir(&h.id).is_dir()
            && proc::pidfd_if_same(h.pid, h.start_time).is_some_and(|(_, st)| st.is_alive());
        alive && userns::mark_used(h.uid_base, &self.inner.dir(&h.id))
    }

    /// Resolves when the sandbox's PID 1 is gone (immediately if it already is), and reaps it
    /// if it is our child.
    pub async fn exited(&self, h: &SandboxHandle) {
        let Some((pidfd, _)) = proc::pidfd_if_same(h.pid, h.start_time) else {
            return;
        };
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and unchanged until dropped.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
        };
        match registered {
            Ok(fd) => {
                // A pidfd turns readable exactly when the process exits; errors mean the same.
                let _ = fd.readable().await;
                proc::reap(fd.get_ref());
            }
            Err(e) => {
                let (pidfd, e) = e.into_parts();
                tracing::warn!(error = %e, "cannot watch a sandbox pidfd; waiting on a thread");
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = proc::wait_exit(pidfd.as_fd(), None);
                    proc::reap(&pidfd);
                })
                .await;
            }
        }
    }

    /// Destroys every sandbox the runtime finds traces of (state directories, cgroups and
    /// their processes) whose id is not in `keep`; returns how many it removed. Meant for
    /// server start, before any `create`. Tries every one; reports the first failure.
    pub async fn reap_orphans(&self, keep: &HashSet<String>) -> Result<usize, RuntimeError> {
        let inner = self.inner.clone();
        let keep = keep.clone();
        tokio::task::spawn_blocking(move || {
            let mut ids: BTreeSet<String> = inner.cgroups.ids().into_iter().collect();
            for entry in fs::read_dir(&inner.cfg.state_dir).ctx(|| "list state_dir")? {
                let name = entry.ctx(|| "list state_dir")?.file_name();
                if let Some(id) = name.to_str().filter(|n| valid_id(n)) {
                    ids.insert(id.to_owned());
                }
            }
            let mut reaped = 0;
            let mut first_error = None;
            for id in ids.iter().filter(|id| !keep.contains(*id)) {
                match inner.teardown(id, None) {
                    Ok(()) => reaped += 1,
                    Err(e) => {
                        tracing::warn!(sandbox = %id, error = %e, "reaping orphan failed");
                        first_error.get_or_insert(e);
                    }
                }
            }
            first_error.map_or(Ok(reaped), Err)
        })
        .await
        .map_err(join_error)?
    }

    /// Host paths of the sandbox's cgroup directories (one per hierarchy), whether or not they
    /// exist. For diagnostics and leak checks.
    pub fn cgroup_dirs(&self, id: &str) -> Vec<PathBuf> {
        self.inner.cgroups.dirs(id)
    }

    /// Removes the parent cgroups [`Runtime::new`] made, where no sandbox is left in them: for
    /// a runtime that is done for good (`soulbox down`, benchmarks), not for a server stop.
    pub fn remove_parent_cgroups(&self) {
        self.inner.cgroups.remove_parents();
    }
}

impl Inner {
    fn dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join(id)
    }

    fn create(
        &self,
        spec: &SandboxSpec,
        net: Option<&NetworkAttach>,
    ) -> Result<SandboxHandle, RuntimeError> {
        let dir = self.dir(&spec.id);
        let made = match &self.disk {
            Some(disk) => disk.create(&spec.id, spec.limits.disk_mb),
            None => DirBuilder::new().mode(0o700).create(&dir),
        };
        match made {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                return Err(RuntimeError::AlreadyExists(spec.id.clone()));
            }
            Err(e) => return Err(e).ctx(|| format!("mkdir {}", dir.display())),
        }
        self.start(spec, &dir, net).inspect_err(|_| {
            if let Err(e) = self.teardown(&spec.id, None) {
                tracing::error!(sandbox = %spec.id, error = %e, "cleaning up a failed create");
            }
        })
    }

    /// A new sandbox's state directory: a fresh uid range, an empty upper layer, then
    /// [`Inner::launch`].
    fn start(
        &self,
        spec: &SandboxSpec,
        dir: &Path,
        net: Option<&NetworkAttach>,
    ) -> Result<SandboxHandle, RuntimeError> {
        let uid_base = userns::reserve(dir)
            .ctx(|| "reserve a uid range")?
            .ok_or(RuntimeError::NoUidRange)?;
        // The state directory's group records the uid range (mode 0700: the group gets no
        // access), so teardown knows which range to free and a restarted server which are taken.
        // Not the upper directory's owner: sandbox root can chown its `/`, which is that dir.
        let range_gid = Gid::from_raw(uid_base);
        if let Err(e) = chown(dir, None, Some(range_gid)) {
            userns::release(uid_base, dir);
            return Err(e).ctx(|| format!("chown {}", dir.display()));
        }
        let upper = dir.join(rootfs::UPPER);
        let work = dir.join(rootfs::WORK);
        DirBuilder::new()
            .mode(0o755)
            .create(&upper)
            .ctx(|| "mkdir upper")?;
        let root_uid = Uid::from_raw(uid_base);
        chown(&upper, Some(root_uid), Some(range_gid)).ctx(|| "chown upper")?;
        DirBuilder::new()
            .mode(0o700)
            .create(&work)
            .ctx(|| "mkdir work")?;
        if let Some(net) = net {
            write_resolv_conf(&upper, &net.resolv_conf, root_uid, range_gid)?;
        }
        self.launch(spec, dir, uid_base, net)
    }

    /// Starts a stopped sandbox again over the upper layer and uid range its state
    /// directory kept. A failure ends what it started and keeps the directory.
    fn resume(
        &self,
        spec: &SandboxSpec,
        net: Option<&NetworkAttach>,
    ) -> Result<SandboxHandle, RuntimeError> {
        let dir = self.dir(&spec.id);
        let meta = match fs::metadata(&dir) {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(RuntimeError::NotFound(spec.id.clone()));
            }
            Err(e) => return Err(e).ctx(|| format!("stat {}", dir.display())),
        };
        let uid_base = meta.gid();
        if !userns::mark_used(uid_base, &dir) {
            return Err(RuntimeError::InvalidSpec(format!(
                "the uid range of stopped sandbox {} is not its own",
                spec.id
            )));
        }
        if !dir.join(rootfs::UPPER).is_dir() {
            return Err(RuntimeError::NotFound(spec.id.clone()));
        }
        // What the previous run left: overlayfs's work directory, which a `volatile` mount
        // marks as unusable on purpose (the upper layer may have lost writes in a crash). The
        // stop synced the layer before the processes' mount went away, so it is whole.
        let work = dir.join(rootfs::WORK);
        disk::remove_tree(&work).ctx(|| format!("remove {}", work.display()))?;
        DirBuilder::new()
            .mode(0o700)
            .create(&work)
            .ctx(|| "mkdir work")?;
        // A socket nobody listens on, and the last boot's id (a boot gets a new one).
        for stale in [AGENT_SOCKET, views::BOOT_ID] {
            match fs::remove_file(dir.join(stale)) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    return Err(e).ctx(|| format!("remove the old {stale}"));
                }
                _ => {}
            }
        }
        self.launch(spec, &dir, uid_base, net).inspect_err(|_| {
            if let Err(e) = self.end_processes(&spec.id, None) {
                tracing::error!(sandbox = %spec.id, error = %e, "cleaning up a failed resume");
            }
        })
    }

    /// Builds the sandbox's tree over `dir`'s upper layer and starts its PID 1 (the agent)
    /// in fresh namespaces and cgroups.
    fn launch(
        &self,
        spec: &SandboxSpec,
        dir: &Path,
        uid_base: u32,
        net: Option<&NetworkAttach>,
    ) -> Result<SandboxHandle, RuntimeError> {
        let quota_dir = match &self.disk {
            Some(disk) if spec.limits.disk_mb > 0 => disk
                .quota_dir(&spec.id)
                .ctx(|| "find the sandbox's quota group")?,
            _ => None,
        };
        let (userns, _helper) = userns::create(uid_base).ctx(|| "create user namespace")?;
        let tree = rootfs::build(&rootfs::TreeSpec {
            layers: &spec.layers,
            state_dir: dir,
            userns: userns.as_fd(),
            uid_base,
            agent_binary: &self.cfg.agent_binary,
            shm_mb: spec.limits.memory_mb,
            quota_dir: quota_dir.as_deref(),
            volumes: &spec.volumes,
        })?;
        let socket_path = dir.join(AGENT_SOCKET);
        let listener =
            UnixListener::bind(&socket_path).ctx(|| format!("bind {}", socket_path.display()))?;
        let listener = above_stdio(listener.into())?;
        let mounts = self.views.prepare(dir, uid_base)?;
        let cgroup_procs = self.cgroups.create(&spec.id, &spec.limits)?;
        let cstr = |s: &str| CString::new(s).map_err(|_| RuntimeError::InvalidSpec(s.into()));
        let plan = spawn::Plan {
            cgroup_procs,
            hostname: spec.id.clone(),
            tree,
            attach_point: self.attach_point.clone(),
            boot_id_path: self.boot_id_path.clone(),
            userns,
            listener,
            devnull: self.devnull.as_fd(),
            argv: vec![
                spawn::AGENT_PATH.to_owned(),
                cstr("agent")?,
                cstr("--fd")?,
                cstr(&spawn::AGENT_FD.to_string())?,
                cstr("--statfs-fd")?,
                cstr(&spawn::STATFS_FD.to_string())?,
            ],
            env: AGENT_ENV
                .iter()
                .map(|e| cstr(e))
                .collect::<Result<_, _>>()?,
            nofile: spec.limits.open_files,
            seccomp: &self.seccomp,
            netns: net.map(|n| n.netns.as_fd()),
            mounts,
            cgroups: &self.views.cgroups,
            cpus: views::affinity(spec.limits.cpu_count),
        };
        let pid = spawn::spawn(&plan)?;
        drop(plan);
        match proc::stat(pid) {
            Ok(st) => Ok(SandboxHandle {
                id: spec.id.clone(),
                pid,
                start_time: st.start_time,
                uid_base,
                socket_path,
            }),
            Err(e) => {
                // It died right after exec: collect it before the pid can be reused.
                if let Some(fd) = proc::pid(pid).and_then(|p| {
                    rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
                }) {
                    proc::kill(fd.as_fd());
                    let _ = proc::wait_exit(fd.as_fd(), Some(EXIT_TIMEOUT));
                    proc::reap(&fd);
                }
                Err(e).ctx(|| "read sandbox init's /proc stat")
            }
        }
    }

    /// Kills the sandbox's processes (and waits for them), then removes its cgroups and
    /// directories and frees its uid range, in that order: the range is only reused once
    /// nothing can run with it. Idempotent: missing pieces are skipped.
    fn teardown(&self, id: &str, pid1: Option<OwnedFd>) -> Result<(), RuntimeError> {
        self.end_processes(id, pid1)?;
        let dir = self.dir(id);
        let range = fs::metadata(&dir).ok().map(|m| m.gid());
        match &self.disk {
            Some(disk) => disk.remove(id),
            None => disk::remove_tree(&dir),
        }
        .ctx(|| format!("remove {}", dir.display()))?;
        if let Some(range) = range {
            userns::release(range, &dir);
        }
        Ok(())
    }

    /// Writes the sandbox's files through to disk (`syncfs` of the filesystem its state
    /// directory is on): its overlay is mounted `volatile`, so nothing else does before a
    /// crash.
    fn sync(&self, id: &str) -> Result<(), RuntimeError> {
        let dir = self.dir(id);
        let fd = rustix::fs::open(
            &dir,
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .ctx(|| format!("open {}", dir.display()))?;
        rustix::fs::syncfs(&fd).ctx(|| format!("syncfs {}", dir.display()))
    }

    /// Kills every process of the sandbox (waiting until they are gone) and removes its
    /// cgroups; its state directory stays. Idempotent.
    fn end_processes(&self, id: &str, pid1: Option<OwnedFd>) -> Result<(), RuntimeError> {
        self.cgroups.kill(id)?;
        if let Some(fd) = pid1 {
            proc::kill(fd.as_fd());
            if !proc::wait_exit(fd.as_fd(), Some(EXIT_TIMEOUT)).ctx(|| "wait for sandbox init")? {
                return Err(RuntimeError::Timeout(format!(
                    "waiting for sandbox {id} to exit"
                )));
            }
            proc::reap(&fd);
        }
        self.cgroups.remove(id)
    }
}
