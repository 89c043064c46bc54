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
//!
//! # Returning freed space to the host
//!
//! The image is sparse: blocks a sandbox writes become allocated in the host's file, and they
//! only go back when btrfs discards them (the loop device punches holes for discards). The
//! `discard=async` mount option alone does not get there: it waits up to two minutes before
//! discarding free space in block groups still in use, and never discards free extents smaller
//! than 32 KiB — which is what deleting many small files leaves in metadata block groups (16 KiB
//! nodes). Measured on this host (Linux 6.18, 8 GiB image, one subvolume with two million empty
//! files, 1418 MiB allocated on the host): 200 s after the subvolume was deleted the image still
//! held 907 MiB (btrfs: 144 KiB of metadata used in 512 MiB of DUP block groups); one `FITRIM`
//! brought it to 1.3 MiB in 0.26 s.
//!
//! So a thread ([`Trimmer`]) runs a trim round after subvolume deletions, once at start (for
//! space freed while no server ran) and every [`TRIM_PERIOD`] (for files that live sandboxes
//! delete, whose small extents `discard=async` leaves too): it commits the transaction
//! (`BTRFS_IOC_SYNC`, which also starts btrfs's background cleaner on the deleted subvolumes
//! instead of at the next periodic commit, up to 30 s later), waits until the cleaner has
//! dropped the subvolumes that were deleted when the round began (their orphan items in the root
//! tree are gone, what `btrfs subvolume sync` waits for), commits again so the freed extents are
//! free, and trims the whole filesystem (`FITRIM`). A round starts a second after the deletion
//! that makes it due and at most once per [`SPACING`], so a burst of kills costs one round (two
//! if it outlasts the spacing) and a steady stream one per spacing. A round takes 0.3–2 s after
//! one kill, most of it the kernel trimming, and longer while the cleaner works through a burst
//! (12 s for eight sandboxes of 100 000 files each). Through a real server, the two million
//! files' image was back at 1.4 MiB 2.5 s after the kill (`docs/benchmarks.md`).

use std::ffi::c_ulong;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// `struct btrfs_ioctl_search_key`.
#[repr(C)]
struct SearchKey {
    tree_id: u64,
    min_objectid: u64,
    max_objectid: u64,
    min_offset: u64,
    max_offset: u64,
    min_transid: u64,
    max_transid: u64,
    min_type: u32,
    max_type: u32,
    nr_items: u32,
    unused: u32,
    unused1: [u64; 4],
}
const SEARCH_BUF: usize = 4096 - size_of::<SearchKey>();
/// `struct btrfs_ioctl_search_args`.
#[repr(C)]
struct SearchArgs {
    key: SearchKey,
    buf: [u8; SEARCH_BUF],
}
/// `struct btrfs_ioctl_search_header`, which precedes each item in `SearchArgs::buf`:
/// transid, objectid, offset (u64 each), type, len (u32 each).
const SEARCH_HEADER: usize = 32;
/// `struct fstrim_range`.
#[repr(C)]
struct FstrimRange {
    start: u64,
    len: u64,
    minlen: u64,
}
const _: () = assert!(size_of::<SearchKey>() == 104 && size_of::<SearchArgs>() == 4096);

const SYNC: c_ulong = btrfs_ioc(0, 8, 0);
const TREE_SEARCH: c_ulong = btrfs_ioc(IOC_READ | IOC_WRITE, 17, size_of::<SearchArgs>());
/// `FITRIM`: `_IOWR('X', 121, struct fstrim_range)`.
const FITRIM: c_ulong = ((IOC_READ | IOC_WRITE) << 30)
    | ((size_of::<FstrimRange>() as c_ulong) << 16)
    | ((b'X' as c_ulong) << 8)
    | 121;
const ROOT_TREE_OBJECTID: u64 = 1;
/// `BTRFS_ORPHAN_OBJECTID` (-5): in the root tree, one orphan item per deleted subvolume
/// (offset: its id) until the cleaner has dropped it.
const ORPHAN_OBJECTID: u64 = -5i64 as u64;
const ORPHAN_ITEM_KEY: u32 = 48;

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
    trimmer: Trimmer,
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
                    let trimmer = Trimmer::start(root.try_clone().ctx(|| "dup state_dir")?)
                        .ctx(|| "start the disk trim thread")?;
                    return Ok(Some(Disk {
                        dir: state_dir.to_path_buf(),
                        root,
                        trimmer,
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
            let subvol = self.open(id)?;
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

    /// `state_dir/<id>`, opened as a directory (never through a symlink).
    fn open(&self, id: &str) -> io::Result<OwnedFd> {
        Ok(rustix::fs::openat(
            &self.root,
            id,
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?)
    }

    /// The sysfs directory of `state_dir/<id>`'s quota group, whose `referenced` and
    /// `max_referenced` are the sandbox's disk use and limit, live (the agent answers `df`
    /// from them); `None` when the kernel does not list it.
    pub(crate) fn quota_dir(&self, id: &str) -> io::Result<Option<PathBuf>> {
        let subvol = self.open(id)?;
        let dir = qgroup_sysfs_dir(subvol.as_fd())?;
        Ok(dir.join("max_referenced").exists().then_some(dir))
    }

    /// Deletes the subvolume `state_dir/<id>` with everything in it (btrfs frees the space in
    /// the background, and the trim thread then returns it to the host); a plain directory
    /// there is removed file by file. Missing is fine.
    pub(crate) fn remove(&self, id: &str) -> io::Result<()> {
        let mut args = vol_args(id)?;
        // SAFETY: SNAP_DESTROY takes a btrfs_ioctl_vol_args.
        match unsafe { ioctl(self.root.as_fd(), SNAP_DESTROY, &mut *args) } {
            Ok(()) => {
                self.trimmer.wake();
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            // Not a subvolume (EINVAL): e.g. made before the state dir moved to btrfs.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => remove_tree(&self.dir.join(id)),
            Err(e) => Err(e),
        }
    }
}

/// The thread that returns space freed inside the image to the host (module doc). Dropping it
/// lets a round that is due or running finish (bounded by [`CLEANER_WAIT`]), so that `soulbox
/// down`, which kills every sandbox and then unmounts, leaves a trimmed image.
struct Trimmer {
    wake: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// A round runs at least this often, deletions or not.
const TRIM_PERIOD: Duration = Duration::from_secs(600);
/// How long a round lets a burst of deletions land before it starts.
const COALESCE: Duration = Duration::from_secs(1);
/// Rounds start at most this often: a stream of kills costs one round per spacing.
const SPACING: Duration = Duration::from_secs(10);
/// How often a round checks whether the cleaner is done.
const CLEANER_POLL: Duration = Duration::from_millis(250);
/// The longest a round waits for the cleaner before it trims what is free by then.
const CLEANER_WAIT: Duration = Duration::from_secs(120);

impl Trimmer {
    /// Starts the thread on `root` (the filesystem's state dir), with a first round due.
    fn start(root: OwnedFd) -> io::Result<Trimmer> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let _ = tx.try_send(());
        let thread = std::thread::Builder::new()
            .name("soulbox-trim".into())
            .spawn(move || trim_rounds(&root, &rx))?;
        Ok(Trimmer {
            wake: Some(tx),
            thread: Some(thread),
        })
    }

    /// Makes a round due (one already due covers this call too).
    fn wake(&self) {
        if let Some(tx) = &self.wake {
            let _ = tx.try_send(());
        }
    }
}

impl Drop for Trimmer {
    fn drop(&mut self) {
        self.wake = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn trim_rounds(root: &OwnedFd, wake: &Receiver<()>) {
    let mut last: Option<Instant> = None;
    while let Ok(()) | Err(RecvTimeoutError::Timeout) = wake.recv_timeout(TRIM_PERIOD) {
        // Let the rest of a burst of deletions land, so that it costs this one round; once the
        // server is going away (disconnected), start at once.
        let start_at =
            (Instant::now() + COALESCE).max(last.map_or(Instant::now(), |l| l + SPACING));
        loop {
            let left = start_at.saturating_duration_since(Instant::now());
            match wake.recv_timeout(left) {
                Ok(()) if !left.is_zero() => continue,
                _ => break,
            }
        }
        let started = Instant::now();
        last = Some(started);
        match trim_round(root.as_fd()) {
            Ok(trimmed) => tracing::debug!(
                trimmed,
                took = ?started.elapsed(),
                "returned the sandboxes' freed disk space to the host"
            ),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                tracing::info!(
                    "the sandboxes' disk does not support discard: space freed inside it stays \
                     allocated on the host"
                );
                return;
            }
            Err(e) => tracing::warn!(error = %e, "returning freed disk space to the host"),
        }
    }
}

/// Commits, waits for the cleaner to drop the subvolumes deleted so far, commits again and
/// trims the filesystem's free space. Returns the bytes the kernel trimmed.
fn trim_round(root: BorrowedFd<'_>) -> io::Result<u64> {
    let mut none = 0u64;
    // SAFETY: SYNC takes no argument; the kernel ignores the pointer.
    unsafe { ioctl(root, SYNC, &mut none) }?;
    let deleted = deleted_subvolumes(root)?;
    let deadline = Instant::now() + CLEANER_WAIT;
    while !deleted.is_empty() {
        let pending = deleted_subvolumes(root)?;
        if !deleted.iter().any(|id| pending.contains(id)) {
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                pending = pending.len(),
                "btrfs is still dropping deleted sandboxes' files; trimming what is free now"
            );
            break;
        }
        std::thread::sleep(CLEANER_POLL);
    }
    // SAFETY: as above.
    unsafe { ioctl(root, SYNC, &mut none) }?;
    let mut range = FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen: 0,
    };
    // SAFETY: FITRIM takes a struct fstrim_range.
    unsafe { ioctl(root, FITRIM, &mut range) }?;
    Ok(range.len)
}

/// Ids of the deleted subvolumes whose files btrfs's cleaner has not dropped yet.
fn deleted_subvolumes(root: BorrowedFd<'_>) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    let mut min_offset = 0;
    loop {
        let mut args = Box::new(SearchArgs {
            key: SearchKey {
                tree_id: ROOT_TREE_OBJECTID,
                min_objectid: ORPHAN_OBJECTID,
                max_objectid: ORPHAN_OBJECTID,
                min_offset,
                max_offset: u64::MAX,
                min_transid: 0,
                max_transid: u64::MAX,
                min_type: ORPHAN_ITEM_KEY,
                max_type: ORPHAN_ITEM_KEY,
                nr_items: 4096,
                unused: 0,
                unused1: [0; 4],
            },
            buf: [0; SEARCH_BUF],
        });
        // SAFETY: TREE_SEARCH takes a btrfs_ioctl_search_args.
        unsafe { ioctl(root, TREE_SEARCH, &mut *args) }?;
        let found = item_offsets(&args.buf, args.key.nr_items);
        match found.last().and_then(|last| last.checked_add(1)) {
            Some(next) => min_offset = next,
            None => {
                ids.extend(found);
                return Ok(ids);
            }
        }
        ids.extend(found);
    }
}

/// The key offsets of the first `count` items in a tree search's result buffer.
fn item_offsets(buf: &[u8], count: u32) -> Vec<u64> {
    let field = |at: usize| -> Option<[u8; 8]> { buf.get(at..at + 8)?.try_into().ok() };
    let mut out = Vec::new();
    let mut at = 0;
    for _ in 0..count {
        let (Some(offset), Some(len)) = (
            field(at + 16),
            buf.get(at + 28..at + 32)
                .and_then(|b| <[u8; 4]>::try_from(b).ok()),
        ) else {
            break;
        };
        out.push(u64::from_ne_bytes(offset));
        at += SEARCH_HEADER + u32::from_ne_bytes(len) as usize;
    }
    out
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
/// `size_mb` MiB and formatted if missing), loop-mounted with `discard=async` so that large
/// extents freed inside go back to the host as they are freed (the runtime's trim rounds return
/// the rest: module doc). Does nothing if `state_dir` already is on btrfs; refuses
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

/// Whether `dir` is on btrfs.
pub(crate) fn on_btrfs(dir: BorrowedFd<'_>) -> io::Result<bool> {
    let fs = rustix::fs::fstatfs(dir)?;
    Ok(fs.f_type as i64 == BTRFS_SUPER_MAGIC)
}

/// Turns quotas on for the btrfs filesystem of `dir` (simple quotas where the kernel has
/// them); a no-op where they are on.
pub(crate) fn enable_quotas(dir: BorrowedFd<'_>) -> io::Result<()> {
    for cmd in [QUOTA_CTL_ENABLE_SIMPLE_QUOTA, QUOTA_CTL_ENABLE] {
        let mut args = QuotaCtlArgs { cmd, status: 0 };
        // SAFETY: QUOTA_CTL takes a btrfs_ioctl_quota_ctl_args.
        match unsafe { ioctl(dir, QUOTA_CTL, &mut args) } {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

/// Creates subvolume `parent/name` (mode 0700) limited to `limit_mb` MiB (0: no limit), as
/// [`Disk::create`] does for sandboxes (the volumes of `crate::volumes`).
pub(crate) fn create_limited_subvolume(
    parent: BorrowedFd<'_>,
    name: &str,
    limit_mb: u64,
) -> io::Result<()> {
    let mut args = vol_args(name)?;
    // SAFETY: SUBVOL_CREATE takes a btrfs_ioctl_vol_args.
    unsafe { ioctl(parent, SUBVOL_CREATE, &mut *args) }?;
    if limit_mb == 0 {
        return Ok(());
    }
    let limited = (|| {
        let subvol: OwnedFd = rustix::fs::openat(
            parent,
            name,
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        let mut limit = QgroupLimitArgs {
            qgroupid: 0,
            flags: QGROUP_LIMIT_MAX_RFER,
            max_rfer: limit_mb.saturating_mul(1 << 20),
            max_excl: 0,
            rsv_rfer: 0,
            rsv_excl: 0,
        };
        // SAFETY: QGROUP_LIMIT takes a btrfs_ioctl_qgroup_limit_args.
        unsafe { ioctl(subvol.as_fd(), QGROUP_LIMIT, &mut limit) }
    })();
    if let Err(e) = limited {
        let _ = destroy_subvolume(parent, name);
        return Err(e);
    }
    Ok(())
}

/// Deletes subvolume `parent/name`: `Ok(true)` when it is gone (or was missing), `Ok(false)`
/// when btrfs refuses because it is not a subvolume or holds other subvolumes (the caller
/// empties it first).
pub(crate) fn destroy_subvolume(parent: BorrowedFd<'_>, name: &str) -> io::Result<bool> {
    let mut args = vol_args(name)?;
    // SAFETY: SNAP_DESTROY takes a btrfs_ioctl_vol_args.
    match unsafe { ioctl(parent, SNAP_DESTROY, &mut *args) } {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTEMPTY)) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(offset: u64, len: u32) -> Vec<u8> {
        let mut h = Vec::new();
        h.extend(7u64.to_ne_bytes()); // transid
        h.extend(ORPHAN_OBJECTID.to_ne_bytes());
        h.extend(offset.to_ne_bytes());
        h.extend(ORPHAN_ITEM_KEY.to_ne_bytes());
        h.extend(len.to_ne_bytes());
        h
    }

    #[test]
    fn search_results_are_parsed_item_by_item() {
        let mut buf = header(256, 0);
        buf.extend(header(300, 3));
        buf.extend([1, 2, 3]); // the second item's data
        buf.extend(header(301, 0));
        buf.resize(SEARCH_BUF, 0);
        assert_eq!(item_offsets(&buf, 3), [256, 300, 301]);
        assert_eq!(item_offsets(&buf, 1), [256]);
        assert!(item_offsets(&buf, 0).is_empty());
        // A count past the buffer stops at its end instead of reading beyond it.
        assert_eq!(item_offsets(&buf[..SEARCH_HEADER + 10], 5), [256]);
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(SYNC, 0x9408);
        assert_eq!(TREE_SEARCH, 0xd000_9411);
        assert_eq!(FITRIM, 0xc018_5879);
    }
}
