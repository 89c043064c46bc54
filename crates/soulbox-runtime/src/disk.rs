//! Per-sandbox disk limits: every sandbox's state directory (holding its overlay upper and work
//! dirs) is a btrfs subvolume with a quota group limit, so writes past `disk_mb` fail inside the
//! sandbox with EDQUOT ("Disk quota exceeded"), for data and for inodes alike (btrfs inodes are
//! metadata, counted in the same bytes).
//!
//! Why btrfs: project quotas on XFS or ext4 would also do (and XFS answers ENOSPC), but kernels
//! commonly ship without them (the development machine has neither `CONFIG_XFS_QUOTA` nor
//! `CONFIG_QFMT_V2`), while btrfs simple quotas (Linux ≥ 6.7; full qgroups before) come with
//! btrfs itself. Creating a limited subvolume costs two ioctls (≈ 0.1 ms); destroying one hands
//! the file tree to btrfs's background cleaner instead of unlinking it file by file.
//!
//! The limits apply when `state_dir` is on btrfs: [`prepare_state_fs`] puts it on a sparse,
//! loop-mounted btrfs image. Otherwise sandboxes run without a disk limit (logged once).

use std::ffi::c_ulong;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::RuntimeError;
use crate::error::Context;

const BTRFS_SUPER_MAGIC: i64 = 0x9123_683e;
const BTRFS_IOCTL_MAGIC: c_ulong = 0x94;

/// `_IOC(dir, 0x94, nr, size)` as `<asm-generic/ioctl.h>` encodes it.
const fn btrfs_ioc(dir: c_ulong, nr: c_ulong, size: usize) -> c_ulong {
    (dir << 30) | ((size as c_ulong) << 16) | (BTRFS_IOCTL_MAGIC << 8) | nr
}
const IOC_WRITE: c_ulong = 1;
const IOC_READ: c_ulong = 2;

/// `struct btrfs_ioctl_vol_args`.
#[repr(C)]
struct VolArgs {
    fd: i64,
    name: [u8; 4088],
}
/// `struct btrfs_ioctl_qgroup_limit_args` (with its `struct btrfs_qgroup_limit`).
#[repr(C)]
struct QgroupLimitArgs {
    qgroupid: u64,
    flags: u64,
    max_rfer: u64,
    max_excl: u64,
    rsv_rfer: u64,
    rsv_excl: u64,
}
/// `struct btrfs_ioctl_quota_ctl_args`.
#[repr(C)]
struct QuotaCtlArgs {
    cmd: u64,
    status: u64,
}

const SUBVOL_CREATE: c_ulong = btrfs_ioc(IOC_WRITE, 14, size_of::<VolArgs>());
const SNAP_DESTROY: c_ulong = btrfs_ioc(IOC_WRITE, 15, size_of::<VolArgs>());
const QUOTA_CTL: c_ulong = btrfs_ioc(IOC_READ | IOC_WRITE, 40, size_of::<QuotaCtlArgs>());
const QGROUP_LIMIT: c_ulong = btrfs_ioc(IOC_READ, 43, size_of::<QgroupLimitArgs>());
const QUOTA_CTL_ENABLE: u64 = 1;
const QUOTA_CTL_ENABLE_SIMPLE_QUOTA: u64 = 4;
const QGROUP_LIMIT_MAX_RFER: u64 = 1;

/// `struct btrfs_ioctl_fs_info_args` (we read `fsid`).
#[repr(C)]
struct FsInfoArgs {
    max_id: u64,
    num_devices: u64,
    fsid: [u8; 16],
    nodesize: u32,
    sectorsize: u32,
    clone_alignment: u32,
    csum_type: u16,
    csum_size: u16,
    flags: u64,
    generation: u64,
    metadata_uuid: [u8; 16],
    reserved: [u8; 944],
}
/// `struct btrfs_ioctl_ino_lookup_args` (with `objectid` 256 it answers the subvolume id).
#[repr(C)]
struct InoLookupArgs {
    treeid: u64,
    objectid: u64,
    name: [u8; 4080],
}
const _: () = assert!(size_of::<FsInfoArgs>() == 1024 && size_of::<InoLookupArgs>() == 4096);
const FS_INFO: c_ulong = btrfs_ioc(IOC_READ, 31, size_of::<FsInfoArgs>());
const INO_LOOKUP: c_ulong = btrfs_ioc(IOC_READ | IOC_WRITE, 18, size_of::<InoLookupArgs>());
/// The root directory's inode number in every btrfs subvolume.
const FIRST_FREE_OBJECTID: u64 = 256;

/// The ioctls all take a pointer to their argument struct.
///
/// # Safety
/// `arg` must be the struct the request expects, and live for the call.
unsafe fn ioctl<T>(fd: BorrowedFd<'_>, request: c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: forwarded to the caller.
    if unsafe { libc::ioctl(fd.as_raw_fd(), request, arg as *mut T) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn vol_args(name: &str) -> io::Result<Box<VolArgs>> {
    let mut args = Box::new(VolArgs {
        fd: 0,
        name: [0; 4088],
    });
    let bytes = name.as_bytes();
    if bytes.len() >= args.name.len() || bytes.contains(&0) || bytes.contains(&b'/') {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    args.name[..bytes.len()].copy_from_slice(bytes);
    Ok(args)
}

/// Sandbox state directories as limited btrfs subvolumes.
pub(crate) struct Disk {
    dir: PathBuf,
    /// `dir`, open.
    root: OwnedFd,
}

impl Disk {
    /// Some if `state_dir` is on btrfs; turns quotas on (simple quotas where the kernel has
    /// them) if they are not yet.
    pub(crate) fn new(state_dir: &Path) -> Result<Option<Disk>, RuntimeError> {
        let root: OwnedFd = File::open(state_dir)
            .ctx(|| format!("open {}", state_dir.display()))?
            .into();
        let fs = rustix::fs::fstatfs(&root).ctx(|| "statfs state_dir")?;
        if fs.f_type as i64 != BTRFS_SUPER_MAGIC {
            return Ok(None);
        }
        for cmd in [QUOTA_CTL_ENABLE_SIMPLE_QUOTA, QUOTA_CTL_ENABLE] {
            let mut args = QuotaCtlArgs { cmd, status: 0 };
            // SAFETY: QUOTA_CTL takes a btrfs_ioctl_quota_ctl_args.
            match unsafe { ioctl(root.as_fd(), QUOTA_CTL, &mut args) } {
                Ok(()) => {
                    return Ok(Some(Disk {
                        dir: state_dir.to_path_buf(),
                        root,
                    }));
                }
                // Older kernels do not know simple quotas: fall back to full qgroups.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
                Err(e) => return Err(e).ctx(|| "enable btrfs quotas on state_dir"),
            }
        }
        Err(RuntimeError::Unsupported(
            "btrfs refuses to enable quotas on state_dir".into(),
        ))
    }

    /// Creates `state_dir/<id>` as a subvolume (mode 0700) limited to `disk_mb` MiB (0: no
    /// limit). `AlreadyExists` if it exists.
    pub(crate) fn create(&self, id: &str, disk_mb: u64) -> io::Result<()> {
        let mut args = vol_args(id)?;
        // SAFETY: SUBVOL_CREATE takes a btrfs_ioctl_vol_args.
        unsafe { ioctl(self.root.as_fd(), SUBVOL_CREATE, &mut *args) }?;
        let limited = (|| {
            let subvol = rustix::fs::openat(
                &self.root,
                id,
                rustix::fs::OFlags::RDONLY
                    | rustix::fs::OFlags::DIRECTORY
                    | rustix::fs::OFlags::NOFOLLOW
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )?;
            rustix::fs::fchmod(&subvol, rustix::fs::Mode::from_raw_mode(0o700))?;
            if disk_mb == 0 {
                return Ok(());
            }
            let mut limit = QgroupLimitArgs {
                // 0: the qgroup of the subvolume the descriptor is in.
                qgroupid: 0,
                flags: QGROUP_LIMIT_MAX_RFER,
                max_rfer: disk_mb.saturating_mul(1 << 20),
                max_excl: 0,
                rsv_rfer: 0,
                rsv_excl: 0,
            };
            // SAFETY: QGROUP_LIMIT takes a btrfs_ioctl_qgroup_limit_args.
            unsafe { ioctl(subvol.as_fd(), QGROUP_LIMIT, &mut limit) }
        })();
        if let Err(e) = limited {
            let _ = self.remove(id);
            return Err(e);
        }
        Ok(())
    }

    /// The sysfs directory of `state_dir/<id>`'s quota group, whose `referenced` and
    /// `max_referenced` are the sandbox's disk use and limit, live (the agent answers `df`
    /// from them); `None` when the kernel does not list it.
    pub(crate) fn quota_dir(&self, id: &str) -> io::Result<Option<PathBuf>> {
        let subvol = rustix::fs::openat(
            &self.root,
            id,
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        let dir = qgroup_sysfs_dir(subvol.as_fd())?;
        Ok(dir.join("max_referenced").exists().then_some(dir))
    }

    /// Deletes the subvolume `state_dir/<id>` with everything in it (btrfs frees the space in
    /// the background); a plain directory there is removed file by file. Missing is fine.
    pub(crate) fn remove(&self, id: &str) -> io::Result<()> {
        let mut args = vol_args(id)?;
        // SAFETY: SNAP_DESTROY takes a btrfs_ioctl_vol_args.
        match unsafe { ioctl(self.root.as_fd(), SNAP_DESTROY, &mut *args) } {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            // Not a subvolume (EINVAL): e.g. made before the state dir moved to btrfs.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => remove_tree(&self.dir.join(id)),
            Err(e) => Err(e),
        }
    }
}

/// The sysfs directory of the quota group of the subvolume whose root `dir` is:
/// `/sys/fs/btrfs/<fsid>/qgroups/0_<subvolume id>`, whose `referenced` and `max_referenced`
/// are the sandbox's disk use and limit (the agent answers `df` from them).
fn qgroup_sysfs_dir(dir: BorrowedFd<'_>) -> io::Result<PathBuf> {
    let mut info = Box::new(FsInfoArgs {
        max_id: 0,
        num_devices: 0,
        fsid: [0; 16],
        nodesize: 0,
        sectorsize: 0,
        clone_alignment: 0,
        csum_type: 0,
        csum_size: 0,
        flags: 0,
        generation: 0,
        metadata_uuid: [0; 16],
        reserved: [0; 944],
    });
    // SAFETY: FS_INFO fills a btrfs_ioctl_fs_info_args.
    unsafe { ioctl(dir, FS_INFO, &mut *info)? };
    let mut lookup = Box::new(InoLookupArgs {
        treeid: 0,
        objectid: FIRST_FREE_OBJECTID,
        name: [0; 4080],
    });
    // SAFETY: INO_LOOKUP reads and fills a btrfs_ioctl_ino_lookup_args.
    unsafe { ioctl(dir, INO_LOOKUP, &mut *lookup)? };
    let f = info.fsid;
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        hex(&f[0..4]),
        hex(&f[4..6]),
        hex(&f[6..8]),
        hex(&f[8..10]),
        hex(&f[10..16])
    );
    Ok(PathBuf::from(format!(
        "/sys/fs/btrfs/{uuid}/qgroups/0_{}",
        lookup.treeid
    )))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `rm -rf`; missing is fine.
pub(crate) fn remove_tree(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Puts `state_dir` on a btrfs filesystem in the sparse image file `image` (created with
/// `size_mb` MiB and formatted if missing), loop-mounted with `discard=async` so that space
/// freed inside returns to the host. Does nothing if `state_dir` already is on btrfs; refuses
/// if `state_dir` has contents (mounting over them would hide live sandboxes' state).
/// Returns whether it mounted something. Needs `mkfs.btrfs` (btrfs-progs) and `mount`.
///
/// Sandboxes share the image: its size caps their total disk use, and it should stay below the
/// host filesystem's free space, or writes inside can fail with EIO when the host fills up.
pub fn prepare_state_fs(
    state_dir: &Path,
    image: &Path,
    size_mb: u64,
) -> Result<bool, RuntimeError> {
    std::fs::create_dir_all(state_dir).ctx(|| format!("create {}", state_dir.display()))?;
    let fs = rustix::fs::statfs(state_dir).ctx(|| format!("statfs {}", state_dir.display()))?;
    if fs.f_type as i64 == BTRFS_SUPER_MAGIC {
        return Ok(false);
    }
    if std::fs::read_dir(state_dir)
        .ctx(|| format!("list {}", state_dir.display()))?
        .next()
        .is_some()
    {
        return Err(RuntimeError::InvalidSpec(format!(
            "{} is not empty; not mounting a disk image over it",
            state_dir.display()
        )));
    }
    if !image.exists() {
        // 0600: the image holds every sandbox's files.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(image)
            .ctx(|| format!("create {}", image.display()))?;
        file.set_len(size_mb.saturating_mul(1 << 20))
            .ctx(|| format!("size {}", image.display()))?;
        drop(file);
        run(Command::new("mkfs.btrfs").arg("-q").arg(image)).inspect_err(|_| {
            let _ = std::fs::remove_file(image);
        })?;
    }
    run(Command::new("mount")
        .args(["-t", "btrfs", "-o", "loop,discard=async,nodev"])
        .arg(image)
        .arg(state_dir))?;
    Ok(true)
}

fn run(cmd: &mut Command) -> Result<(), RuntimeError> {
    let what = format!("{cmd:?}");
    let out = cmd.output().ctx(|| format!("run {what}"))?;
    if !out.status.success() {
        return Err(RuntimeError::Io {
            context: format!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim()),
            source: io::Error::other(out.status.to_string()),
        });
    }
    Ok(())
}
