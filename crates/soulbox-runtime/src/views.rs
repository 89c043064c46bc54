//! What a sandbox sees of "its machine": its own memory, CPUs, uptime, boot id and cgroup,
//! instead of the host's.
//!
//! * `/proc/{meminfo,cpuinfo,stat,loadavg,uptime,diskstats,swaps}` and
//!   `/sys/devices/system/cpu/online`: read-only bind mounts of the server's lxcfs
//!   (`crate::lxcfs`), as LXC and Incus mount them. The runtime opens each lxcfs file once
//!   (`O_PATH`) and clones its bind mounts from those descriptors, so a create never waits on
//!   FUSE; without lxcfs the sandbox sees the host's files.
//! * `/proc/sys/kernel/random/boot_id`: a fresh random UUID written at create to `boot_id` in
//!   the sandbox's state directory, which lives as long as the sandbox's state (so a resume
//!   from that state keeps it, a new boot gets a new one). PID 1 shows it read-only from a
//!   tiny tmpfs of its own (a bind of the state file would name a host path in mountinfo).
//! * `/sys`: a fresh sysfs, mounted read-only by the sandbox's PID 1 while still host root in
//!   its network namespace (so `/sys/class/net` lists its own interfaces), with
//!   [`SYS_MASKS`] covered by empty read-only tmpfs; no submounts of the host's `/sys`
//!   (debugfs, securityfs, bpf, fusectl, the host's cgroup trees) are there.
//! * `/sys/fs/cgroup`: the sandbox's own groups, read-only, mounted from inside its cgroup
//!   namespace (a cgroup2 mount, or on v1/hybrid hosts a read-only tmpfs with one directory per
//!   hierarchy the sandbox has a group in, named as on the host).
//! * CPU count: the sandbox's PID 1 gets an affinity of `cpu_count` CPUs ([`affinity`]), so
//!   `nproc` and `sched_getaffinity` agree with the quota; lxcfs's `cpuinfo`, `stat` and
//!   `cpu/online` (`--enable-cfs`) give `os.cpu_count()` and `/proc` readers the same number.
//! * Clocks: PID 1 enters a new time namespace whose monotonic and boot-time clocks start at
//!   0 when it starts (see `spawn`), so `uptime` agrees with lxcfs's `/proc/uptime` (the age
//!   of the sandbox's init).

use std::ffi::CStr;
use std::fs;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rustix::fs::{Mode, OFlags, mkdirat, open, symlinkat};
use rustix::mount::{MountAttrFlags, OpenTreeFlags, open_tree};
use rustix::thread::{CpuSet, sched_getaffinity};

use crate::RuntimeError;
use crate::cgroup::CgroupView;
use crate::error::Context;
use crate::sys::mount_setattr;

/// lxcfs files and where they go, relative to the sandbox's `/proc`.
const LXCFS_PROC: [(&str, &CStr); 7] = [
    ("proc/meminfo", c"meminfo"),
    ("proc/cpuinfo", c"cpuinfo"),
    ("proc/stat", c"stat"),
    ("proc/loadavg", c"loadavg"),
    ("proc/uptime", c"uptime"),
    ("proc/diskstats", c"diskstats"),
    ("proc/swaps", c"swaps"),
];
/// … and relative to its `/sys`.
const LXCFS_SYS: [(&str, &CStr); 1] = [(
    "sys/devices/system/cpu/online",
    c"devices/system/cpu/online",
)];
/// The boot id file in the sandbox's state directory.
pub(crate) const BOOT_ID: &str = "boot_id";
/// A boot id as the kernel prints it: a UUID and a newline.
pub(crate) type BootId = [u8; 37];

/// Parts of sysfs hidden under an empty read-only tmpfs, as runc and crun mask them:
/// firmware tables and the power-capping energy counters (a side channel). Paths the host's
/// sysfs lacks are skipped.
pub(crate) const SYS_MASKS: [&CStr; 2] = [c"firmware", c"devices/virtual/powercap"];

const RO: MountAttrFlags = MountAttrFlags::MOUNT_ATTR_RDONLY
    .union(MountAttrFlags::MOUNT_ATTR_NOSUID)
    .union(MountAttrFlags::MOUNT_ATTR_NODEV)
    .union(MountAttrFlags::MOUNT_ATTR_NOEXEC);

/// A detached mount and the path, relative to `/proc` or `/sys`, it goes on.
pub(crate) type Bind = (&'static CStr, OwnedFd);

/// What every sandbox of a runtime gets, prepared once.
pub(crate) struct Views {
    /// lxcfs files (`O_PATH`), with their target below `/proc` or `/sys`.
    lxcfs_proc: Vec<Bind>,
    lxcfs_sys: Vec<Bind>,
    pub(crate) cgroups: Vec<CgroupView>,
    /// Whether the cgroup mounts go into a tmpfs (several hierarchies) or one cgroup2 mount is
    /// `/sys/fs/cgroup` itself.
    cgroup_tmpfs: bool,
}

/// Detached mounts for one sandbox, attached by its PID 1.
pub(crate) struct Mounts {
    /// Onto files of its fresh `/proc`: (path relative to it, mount).
    pub(crate) proc: Vec<Bind>,
    /// Onto files of its fresh `/sys`.
    pub(crate) sys: Vec<Bind>,
    /// The (read-only) tmpfs for `/sys/fs/cgroup` with a directory per hierarchy, or `None`
    /// when the one cgroup2 hierarchy is mounted there directly.
    pub(crate) cgroup_tmpfs: Option<OwnedFd>,
    pub(crate) boot_id: BootId,
}

/// A failed lxcfs clone is reported once per runtime, not per create.
static CLONE_WARNED: AtomicBool = AtomicBool::new(false);
/// Where the next sandbox's CPUs start, so that pinned sandboxes spread over the host.
static NEXT_CPU: AtomicUsize = AtomicUsize::new(0);

impl Views {
    /// Opens the lxcfs files under `lxcfs` (the mount point of [`crate::start_lxcfs`]); when
    /// that fails, warns once and goes on without them.
    pub(crate) fn new(lxcfs: Option<&Path>, cgroups: Vec<CgroupView>) -> Views {
        let open_all = |mount: &Path, files: &[(&str, &'static CStr)]| {
            files
                .iter()
                .map(|(file, target)| {
                    let path = mount.join(file);
                    open(&path, OFlags::PATH | OFlags::CLOEXEC, Mode::empty())
                        .map(|fd| (*target, fd))
                        .ctx(|| format!("open {}", path.display()))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        let (lxcfs_proc, lxcfs_sys) = match lxcfs {
            None => (Vec::new(), Vec::new()),
            Some(mount) => {
                match open_all(mount, &LXCFS_PROC)
                    .and_then(|p| Ok((p, open_all(mount, &LXCFS_SYS)?)))
                {
                    Ok(files) => files,
                    Err(e) => {
                        tracing::warn!(
                            error = %e,
                            "lxcfs unusable: sandboxes see the host's /proc files"
                        );
                        (Vec::new(), Vec::new())
                    }
                }
            }
        };
        let cgroup_tmpfs = !(cgroups.len() == 1 && cgroups[0].v2);
        Views {
            lxcfs_proc,
            lxcfs_sys,
            cgroups,
            cgroup_tmpfs,
        }
    }

    /// Writes the sandbox's boot id into `dir` and makes its detached mounts.
    pub(crate) fn prepare(&self, dir: &Path, uid_base: u32) -> Result<Mounts, RuntimeError> {
        let boot_id = write_boot_id(&dir.join(BOOT_ID))?;
        let (proc, sys) = match self.clone_lxcfs() {
            Ok(mounts) => mounts,
            Err(e) => {
                if !CLONE_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        "lxcfs views unavailable: sandboxes see the host's /proc files"
                    );
                }
                (Vec::new(), Vec::new())
            }
        };
        let cgroup_tmpfs = if self.cgroup_tmpfs {
            Some(self.cgroup_tmpfs(uid_base)?)
        } else {
            None
        };
        Ok(Mounts {
            proc,
            sys,
            cgroup_tmpfs,
            boot_id,
        })
    }

    /// Read-only bind mounts of the lxcfs files, cloned from the descriptors opened at start
    /// (no FUSE request: a dead or stuck lxcfs cannot hold a create up).
    fn clone_lxcfs(&self) -> Result<(Vec<Bind>, Vec<Bind>), RuntimeError> {
        let clone = |files: &[Bind]| {
            files
                .iter()
                .map(|(target, fd)| {
                    let mnt = open_tree(
                        fd,
                        c"",
                        OpenTreeFlags::AT_EMPTY_PATH
                            | OpenTreeFlags::OPEN_TREE_CLONE
                            | OpenTreeFlags::OPEN_TREE_CLOEXEC,
                    )
                    .ctx(|| format!("clone lxcfs {target:?}"))?;
                    mount_setattr(mnt.as_fd(), RO, None)
                        .ctx(|| format!("lxcfs {target:?} mount flags"))?;
                    Ok((*target, mnt))
                })
                .collect::<Result<Vec<_>, RuntimeError>>()
        };
        Ok((clone(&self.lxcfs_proc)?, clone(&self.lxcfs_sys)?))
    }

    /// An empty tmpfs owned by sandbox root with a directory per hierarchy (and, for
    /// co-mounted v1 controllers such as `cpu,cpuacct`, a symlink per controller), read-only.
    fn cgroup_tmpfs(&self, uid_base: u32) -> Result<OwnedFd, RuntimeError> {
        let owner = uid_base.to_string();
        let mnt = crate::rootfs::tmpfs(
            &[
                ("mode", "0755"),
                ("size", "4k"),
                ("nr_inodes", "64"),
                ("uid", &owner),
                ("gid", &owner),
            ],
            MountAttrFlags::empty(),
        )
        .ctx(|| "mount /sys/fs/cgroup tmpfs")?;
        for view in &self.cgroups {
            mkdirat(&mnt, view.dir.as_c_str(), Mode::from_raw_mode(0o755))
                .ctx(|| format!("mkdir /sys/fs/cgroup/{:?}", view.dir))?;
            for flag in &view.flags {
                if flag != &view.dir {
                    symlinkat(view.dir.as_c_str(), &mnt, flag.as_c_str())
                        .ctx(|| format!("symlink /sys/fs/cgroup/{flag:?}"))?;
                }
            }
        }
        mount_setattr(mnt.as_fd(), RO, None).ctx(|| "/sys/fs/cgroup mount flags")?;
        Ok(mnt)
    }
}

/// A fresh random boot id (a version 4 UUID, as the kernel makes them), written to `path`
/// (read-only for all).
fn write_boot_id(path: &Path) -> Result<BootId, RuntimeError> {
    let mut b = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .ctx(|| "read /dev/urandom")?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let uuid = format!(
        "{}-{}-{}-{}-{}\n",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(path)
        .and_then(|mut f| f.write_all(uuid.as_bytes()))
        .ctx(|| format!("write {}", path.display()))?;
    let mut id = [0u8; 37];
    id.copy_from_slice(uuid.as_bytes());
    Ok(id)
}

/// The CPUs a sandbox limited to `cpu_count` CPUs runs on, or `None` (all the server may use)
/// when that is no more than `cpu_count`.
///
/// Affinity rather than a cpuset cgroup: it needs no further hierarchy (v1 cpuset wants
/// `cpus` and `mems` set at every level) and makes `nproc`/`sched_getaffinity` (what Go,
/// the JVM, Node and `os.process_cpu_count()` read) agree with the quota, which remains the
/// real limit: sandbox code may widen its own affinity and still gets no more CPU time.
/// Successive sandboxes start at successive CPUs, so pinned sandboxes spread over the host.
pub(crate) fn affinity(cpu_count: u32) -> Option<CpuSet> {
    let allowed = sched_getaffinity(None).ok()?;
    let cpus: Vec<usize> = (0..CpuSet::MAX_CPU)
        .filter(|&c| allowed.is_set(c))
        .collect();
    let want = cpu_count as usize;
    if want >= cpus.len() {
        return None;
    }
    let start = NEXT_CPU.fetch_add(want, Ordering::Relaxed);
    let mut set = CpuSet::new();
    for i in 0..want {
        set.set(cpus[(start + i) % cpus.len()]);
    }
    Some(set)
}
