//! The sandbox's root filesystem, assembled by the host as a detached mount tree.
//!
//! ```text
//! /               overlay: template layers (idmapped, read-only) + per-sandbox upper; nodev
//! /dev            tmpfs (64 KiB, owned by sandbox root): null zero full random urandom tty
//!                 bind-mounted from the host; fd stdin stdout stderr ptmx symlinks
//! /dev/pts        devpts, a private instance: ptmxmode=0666, tty group = sandbox gid 5
//! /dev/shm        tmpfs 1777, as big as the memory limit (its pages count against it anyway)
//! /proc           mounted by the sandbox's PID 1 (it must be inside the new pid namespace),
//!                 with lxcfs's views and the boot id bound over some files (`crate::views`)
//! /sys            a read-only sysfs mounted by PID 1, masked, with the sandbox's own cgroups
//!                 at /sys/fs/cgroup (`crate::views`)
//! /.soulbox/bin/soulbox   the agent binary, bind-mounted read-only, nosuid
//! /.soulbox/disk          the sandbox's btrfs quota group in sysfs (`referenced`,
//!                         `max_referenced`), read-only: the agent answers `df` from it
//! <volume mount paths>    the volumes the create asked for (`crate::volumes`): bind mounts,
//!                         idmapped with the sandbox's user namespace, nosuid, nodev
//! ```
//!
//! `/tmp` and `/run` are plain overlay directories.
//!
//! Template layers are built from user Dockerfiles, so their contents are not trusted either:
//! every path the host resolves inside the tree goes through `openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV`, and mounts are attached to the
//! resulting file descriptors, never to path strings. A symlink planted at `/dev` or
//! `/.soulbox` makes the create fail instead of pointing a host mount somewhere else.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{CWD, Mode, OFlags, ResolveFlags, mkdirat, openat2, symlinkat};
use rustix::io::Errno;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags, OpenTreeFlags, fsconfig_create,
    fsconfig_set_fd, fsconfig_set_flag, fsconfig_set_string, fsmount, fsopen, move_mount,
    open_tree,
};

use crate::RuntimeError;
use crate::error::Context;
use crate::sys::mount_setattr;

/// What the tree is made of.
pub(crate) struct TreeSpec<'a> {
    pub(crate) layers: &'a [PathBuf],
    /// The sandbox's state directory, holding [`UPPER`] and [`WORK`].
    pub(crate) state_dir: &'a Path,
    pub(crate) userns: BorrowedFd<'a>,
    pub(crate) uid_base: u32,
    pub(crate) agent_binary: &'a Path,
    pub(crate) shm_mb: u64,
    /// The sysfs directory of the sandbox's quota group, when it has one.
    pub(crate) quota_dir: Option<&'a Path>,
    /// Volumes to mount, each on a directory of the tree (made where missing).
    pub(crate) volumes: &'a [crate::VolumeMount],
}

/// A built tree: not attached anywhere yet; dropping it unmounts everything.
pub(crate) struct Tree {
    pub(crate) root: OwnedFd,
    /// The `/proc` directory inside `root`, where PID 1 attaches its proc mount.
    pub(crate) proc_dir: OwnedFd,
    /// The `/sys` directory inside `root`, where PID 1 attaches its sysfs mount.
    pub(crate) sys_dir: OwnedFd,
}

/// The overlay's upper and work directories inside the sandbox's state directory.
pub(crate) const UPPER: &str = "upper";
pub(crate) const WORK: &str = "work";

/// Host device nodes visible in the sandbox (all harmless, all world-usable).
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
const DEV_LINKS: [(&str, &str); 5] = [
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];
/// The sandbox's tty group (Debian's `tty`, gid 5).
const TTY_GID: u32 = 5;

pub(crate) fn build(s: &TreeSpec<'_>) -> Result<Tree, RuntimeError> {
    let root = overlay(s)?;
    attach_agent(&root, s.agent_binary)?;
    if let Some(quota) = s.quota_dir {
        attach_quota(&root, quota)?;
    }
    for v in s.volumes {
        attach_volume(&root, v, s.userns)?;
    }
    let dev = dev_tree(s)?;
    let dev_dir = ensure_dir(root.as_fd(), "dev").ctx(|| "rootfs: /dev")?;
    attach(&dev, &dev_dir).ctx(|| "attach /dev")?;
    let proc_dir = ensure_dir(root.as_fd(), "proc").ctx(|| "rootfs: /proc")?;
    let sys_dir = ensure_dir(root.as_fd(), "sys").ctx(|| "rootfs: /sys")?;
    Ok(Tree {
        root,
        proc_dir,
        sys_dir,
    })
}

fn overlay(s: &TreeSpec<'_>) -> Result<OwnedFd, RuntimeError> {
    let mut lowers = Vec::with_capacity(s.layers.len());
    for layer in s.layers {
        let fd = open_tree(
            CWD,
            layer,
            OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
        )
        .ctx(|| format!("open layer {}", layer.display()))?;
        mount_setattr(
            fd.as_fd(),
            MountAttrFlags::MOUNT_ATTR_RDONLY | MountAttrFlags::MOUNT_ATTR_NODEV,
            Some(s.userns),
        )
        .ctx(|| format!("idmap layer {}", layer.display()))?;
        lowers.push(fd);
    }
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).ctx(|| "fsopen overlay")?;
    let configured = (|| {
        // `lowerdir+` appends below the layers given so far: topmost first.
        for fd in lowers.iter().rev() {
            fsconfig_set_fd(&fs, "lowerdir+", fd)?;
        }
        // Given as descriptors inside a detached clone of the state directory, the upper and
        // work dirs show as `/upper` and `/work` in the sandbox's mountinfo, not as host paths
        // (both must be on the same mount, hence one clone).
        let state = open_tree(
            CWD,
            s.state_dir,
            OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
        )?;
        let upper = open_beneath(state.as_fd(), UPPER, OFlags::DIRECTORY)?;
        let work = open_beneath(state.as_fd(), WORK, OFlags::DIRECTORY)?;
        fsconfig_set_fd(&fs, "upperdir", &upper)?;
        fsconfig_set_fd(&fs, "workdir", &work)?;
        // The upper dies with the sandbox, so syncing it is wasted work; skipping it also
        // keeps an fsync storm inside one sandbox from loading the host's disk.
        fsconfig_set_flag(&fs, "volatile")?;
        fsconfig_create(&fs)
    })();
    if let Err(e) = configured {
        return Err(RuntimeError::Io {
            context: format!("create overlay{}", fs_log(&fs)),
            source: e.into(),
        });
    }
    // nodev: a device node that slipped into a template must not open a host device.
    fsmount(
        &fs,
        FsMountFlags::FSMOUNT_CLOEXEC,
        MountAttrFlags::MOUNT_ATTR_NODEV,
    )
    .ctx(|| "fsmount overlay")
}

/// The messages the kernel queued on a filesystem context (why a mount was refused).
fn fs_log(fs: &OwnedFd) -> String {
    let mut out = String::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = rustix::io::read(fs, &mut buf) {
        if n == 0 {
            break;
        }
        out.push_str(" (");
        out.push_str(&String::from_utf8_lossy(&buf[..n]));
        out.push(')');
    }
    out
}

fn attach_agent(root: &OwnedFd, agent_binary: &Path) -> Result<(), RuntimeError> {
    let target = (|| {
        let dir = ensure_dir(root.as_fd(), ".soulbox")?;
        let bin = ensure_dir(dir.as_fd(), "bin")?;
        ensure_file(bin.as_fd(), "soulbox")
    })()
    .ctx(|| "rootfs: /.soulbox/bin/soulbox")?;
    attach_host_path(agent_binary, &target, MountAttrFlags::empty())
}

fn attach_quota(root: &OwnedFd, quota_dir: &Path) -> Result<(), RuntimeError> {
    let target = (|| {
        let dir = ensure_dir(root.as_fd(), ".soulbox")?;
        ensure_dir(dir.as_fd(), "disk")
    })()
    .ctx(|| "rootfs: /.soulbox/disk")?;
    attach_host_path(quota_dir, &target, MountAttrFlags::MOUNT_ATTR_NOEXEC)
}

/// Bind-mounts volume `v` on its path in the tree, idmapped like the template layers (on-disk
/// ids are sandbox ids, so sandboxes in different uid ranges share its files and owners),
/// read-write, nosuid, nodev. The mount point's directories are made in the upper layer where
/// missing; a symlink or a file on the way (from the template) fails the create.
fn attach_volume(
    root: &OwnedFd,
    v: &crate::VolumeMount,
    userns: BorrowedFd<'_>,
) -> Result<(), RuntimeError> {
    let comps =
        crate::volumes::mount_path_components(&v.target).map_err(RuntimeError::InvalidSpec)?;
    let target = (|| {
        let mut dir = ensure_dir(root.as_fd(), comps[0])?;
        for name in &comps[1..] {
            dir = ensure_dir(dir.as_fd(), name)?;
        }
        Ok::<_, Errno>(dir)
    })()
    .ctx(|| format!("rootfs: volume mount point {}", v.target))?;
    let tree = open_tree(
        CWD,
        &v.source,
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_SYMLINK_NOFOLLOW,
    )
    .ctx(|| format!("open volume {}", v.source.display()))?;
    mount_setattr(
        tree.as_fd(),
        MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NODEV,
        Some(userns),
    )
    .ctx(|| format!("idmap volume {}", v.source.display()))?;
    attach(&tree, &target).ctx(|| format!("attach volume on {}", v.target))
}

/// Bind-mounts the host's `source` on `target` read-only, nosuid, nodev (plus `extra`).
fn attach_host_path(
    source: &Path,
    target: &OwnedFd,
    extra: MountAttrFlags,
) -> Result<(), RuntimeError> {
    let tree = open_tree(
        CWD,
        source,
        OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
    )
    .ctx(|| format!("open {}", source.display()))?;
    mount_setattr(
        tree.as_fd(),
        MountAttrFlags::MOUNT_ATTR_RDONLY
            | MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV
            | extra,
        None,
    )
    .ctx(|| format!("mount flags of {}", source.display()))?;
    attach(&tree, target).ctx(|| format!("attach {}", source.display()))
}

/// A new detached tmpfs with `options`, mounted with `attrs`.
pub(crate) fn tmpfs(
    options: &[(&str, &str)],
    attrs: MountAttrFlags,
) -> rustix::io::Result<OwnedFd> {
    let fs = fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    for (k, v) in options {
        fsconfig_set_string(&fs, *k, *v)?;
    }
    fsconfig_create(&fs)?;
    fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)
}

fn dev_tree(s: &TreeSpec<'_>) -> Result<OwnedFd, RuntimeError> {
    let owner = s.uid_base.to_string();
    let dev = tmpfs(
        &[
            ("mode", "0755"),
            ("size", "64k"),
            ("nr_inodes", "64"),
            ("uid", &owner),
            ("gid", &owner),
        ],
        MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV
            | MountAttrFlags::MOUNT_ATTR_NOEXEC,
    )
    .ctx(|| "mount /dev tmpfs")?;
    for name in DEVICES {
        let target = ensure_file(dev.as_fd(), name).ctx(|| format!("create /dev/{name}"))?;
        let host = format!("/dev/{name}");
        let node = open_tree(
            CWD,
            host.as_str(),
            OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
        )
        .ctx(|| format!("open {host}"))?;
        mount_setattr(
            node.as_fd(),
            MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NOEXEC,
            None,
        )
        .ctx(|| format!("{host} mount flags"))?;
        attach(&node, &target).ctx(|| format!("bind {host}"))?;
    }
    for (name, to) in DEV_LINKS {
        symlinkat(to, &dev, name).ctx(|| format!("symlink /dev/{name}"))?;
    }
    let pts = (|| {
        let fs = fsopen("devpts", FsOpenFlags::FSOPEN_CLOEXEC)?;
        fsconfig_set_flag(&fs, "newinstance")?;
        fsconfig_set_string(&fs, "ptmxmode", "0666")?;
        fsconfig_set_string(&fs, "mode", "0620")?;
        fsconfig_set_string(&fs, "gid", (s.uid_base + TTY_GID).to_string())?;
        fsconfig_create(&fs)?;
        fsmount(
            &fs,
            FsMountFlags::FSMOUNT_CLOEXEC,
            MountAttrFlags::MOUNT_ATTR_NOSUID | MountAttrFlags::MOUNT_ATTR_NOEXEC,
        )
    })()
    .ctx(|| "mount devpts")?;
    let pts_dir = ensure_dir(dev.as_fd(), "pts").ctx(|| "mkdir /dev/pts")?;
    attach(&pts, &pts_dir).ctx(|| "attach /dev/pts")?;
    let shm = tmpfs(
        &[
            ("mode", "1777"),
            ("size", &format!("{}m", s.shm_mb)),
            ("uid", &owner),
            ("gid", &owner),
        ],
        MountAttrFlags::MOUNT_ATTR_NOSUID
            | MountAttrFlags::MOUNT_ATTR_NODEV
            | MountAttrFlags::MOUNT_ATTR_NOEXEC,
    )
    .ctx(|| "mount /dev/shm")?;
    let shm_dir = ensure_dir(dev.as_fd(), "shm").ctx(|| "mkdir /dev/shm")?;
    attach(&shm, &shm_dir).ctx(|| "attach /dev/shm")?;
    Ok(dev)
}

/// Mounts the detached tree `mnt` on `target` (an `O_PATH` descriptor).
pub(crate) fn attach(mnt: &OwnedFd, target: &OwnedFd) -> rustix::io::Result<()> {
    move_mount(
        mnt,
        c"",
        target,
        c"",
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
    )
}

/// Opens `name` below `dir` as an `O_PATH` descriptor without following any symlink or
/// leaving `dir`'s mount.
fn open_beneath(dir: BorrowedFd<'_>, name: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
    openat2(
        dir,
        name,
        flags | OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::BENEATH
            | ResolveFlags::NO_SYMLINKS
            | ResolveFlags::NO_MAGICLINKS
            | ResolveFlags::NO_XDEV,
    )
}

/// The directory `name` in `dir`, created (0755, host root) if missing.
fn ensure_dir(dir: BorrowedFd<'_>, name: &str) -> rustix::io::Result<OwnedFd> {
    match open_beneath(dir, name, OFlags::DIRECTORY) {
        Err(Errno::NOENT) => {
            match mkdirat(dir, name, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e),
            }
            open_beneath(dir, name, OFlags::DIRECTORY)
        }
        other => other,
    }
}

/// The regular file `name` in `dir` (a mount point for a file), created empty if missing.
fn ensure_file(dir: BorrowedFd<'_>, name: &str) -> rustix::io::Result<OwnedFd> {
    match open_beneath(dir, name, OFlags::empty()) {
        Err(Errno::NOENT) => {
            // O_EXCL never follows a symlink; a racing creator just makes us reopen.
            match openat2(
                dir,
                name,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o644),
                ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_XDEV,
            ) {
                Ok(_) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e),
            }
            open_beneath(dir, name, OFlags::empty())
        }
        other => other,
    }
}
