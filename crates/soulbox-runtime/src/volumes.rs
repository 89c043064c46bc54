//! Volumes: persistent directories shared by sandboxes, and the host's file operations on them.
//!
//! Each volume is a directory `<volumes dir>/<volume id>` (serve uses `$DATA/sandboxes/volumes`,
//! on the sandboxes' btrfs image: a subvolume with a quota group limit of the volume's size, so
//! writes past it fail with EDQUOT, from sandboxes and from the content API alike). Its root is
//! owned by uid/gid [`VOLUME_OWNER`] (the sandboxes' `user`), mode 0755.
//!
//! Sandboxes see a volume through an idmapped bind mount ([`VolumeMount`], attached by
//! `rootfs.rs`): on-disk ids are sandbox ids, whatever host uid range a sandbox runs in, so
//! several sandboxes share one volume and agree on its owners. The mount is nosuid and nodev.
//!
//! Sandbox code is hostile and can plant symlinks (or swap a directory for one at any moment),
//! so [`VolumeDir`] never resolves a path with the host's rules: every lookup is one `openat2`
//! below the volume's root descriptor with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`, each later step works on single names relative to
//! a directory descriptor with `O_NOFOLLOW`/`AT_SYMLINK_NOFOLLOW`, and only regular files and
//! directories are ever opened for reading or writing (never FIFOs, sockets or devices).

use std::fs::{DirBuilder, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    AtFlags, CWD, FileType, Gid, Mode, OFlags, ResolveFlags, Stat, Uid, fchmod, fchown, fstat,
    mkdirat, openat, openat2, readlinkat, statat, unlinkat,
};
use rustix::io::Errno;

use crate::RuntimeError;
use crate::disk;
use crate::error::Context;

/// uid and gid of a new volume's root and, by default, of what the content API creates:
/// the sandboxes' `user`.
pub const VOLUME_OWNER: u32 = 1000;
/// Largest id a content API request may set as owner: sandboxes map 0..65536.
pub const MAX_ID: u32 = 65535;
/// Longest path the content API accepts (bytes).
pub const MAX_PATH: usize = 4096;
/// Deepest directory nesting the host walks (listings with `depth`, recursive removal).
pub const MAX_DEPTH: usize = 256;
/// Most entries one listing answers.
pub const MAX_LIST_ENTRIES: usize = 100_000;

/// A volume mounted into a sandbox ([`crate::SandboxSpec::volumes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    /// Host directory of the volume (host-made: [`VolumeStore::path`]).
    pub source: PathBuf,
    /// Where it appears inside the sandbox: absolute, checked by [`mount_path_components`].
    pub target: String,
}

/// The components of a sandbox mount path, or why it cannot be one: absolute, no `.`/`..`,
/// no NUL, not `/` itself, not inside the runtime's own mounts (`/proc`, `/sys`, `/dev`,
/// `/.soulbox`).
pub fn mount_path_components(path: &str) -> Result<Vec<&str>, String> {
    if !path.starts_with('/') {
        return Err(format!("mount path {path:?} is not absolute"));
    }
    if path.len() > MAX_PATH || path.contains('\0') {
        return Err("mount path is too long or contains NUL".into());
    }
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    if comps
        .iter()
        .any(|c| *c == "." || *c == ".." || c.len() > 255)
    {
        return Err(format!("mount path {path:?} has a '.' or '..' component"));
    }
    match comps.first() {
        None => Err("a volume cannot be mounted on /".into()),
        Some(&("proc" | "sys" | "dev" | ".soulbox")) => Err(format!(
            "mount path {path:?} is inside a directory the sandbox runtime owns"
        )),
        Some(_) => Ok(comps),
    }
}

/// Why a content operation failed. `errno()` tells the API which status to answer.
#[derive(Debug, thiserror::Error)]
pub enum VolumeFsError {
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("{path}: {what}")]
    Refused { path: String, what: &'static str },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl VolumeFsError {
    /// The OS error behind an `Io` failure.
    pub fn errno(&self) -> Option<i32> {
        match self {
            VolumeFsError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

fn io_err(path: &str, e: impl Into<io::Error>) -> VolumeFsError {
    VolumeFsError::Io {
        path: path.to_owned(),
        source: e.into(),
    }
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Directory,
    File,
    Symlink,
    Other,
}

/// One entry, as `lstat` sees it (symlinks are never followed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    /// `/`-rooted path within the volume.
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds and nanoseconds since the epoch.
    pub atime: (i64, u32),
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    /// A symlink's target as stored.
    pub target: Option<String>,
}

/// Owner and mode for what the content API creates or changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attrs {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: Option<u32>,
}

/// The volumes directory.
pub struct VolumeStore {
    dir: PathBuf,
    root: OwnedFd,
    btrfs: bool,
}

impl VolumeStore {
    /// Opens `dir` (created 0700 if missing). On btrfs, volumes become subvolumes with quota
    /// limits (quotas are turned on if they are not yet).
    pub fn open(dir: &Path) -> Result<VolumeStore, RuntimeError> {
        match DirBuilder::new().mode(0o700).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).ctx(|| format!("mkdir {}", dir.display())),
        }
        let root = openat(
            CWD,
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ctx(|| format!("open {}", dir.display()))?;
        fchmod(&root, Mode::from_raw_mode(0o700)).ctx(|| format!("chmod {}", dir.display()))?;
        let btrfs = match disk::on_btrfs(root.as_fd()) {
            Ok(true) => match disk::enable_quotas(root.as_fd()) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "btrfs quotas unavailable: volume sizes are not enforced");
                    false
                }
            },
            Ok(false) => {
                tracing::warn!(dir = %dir.display(), "volumes are not on btrfs: their size limits are enforced for uploads only");
                false
            }
            Err(e) => return Err(e).ctx(|| format!("statfs {}", dir.display())),
        };
        Ok(VolumeStore {
            dir: dir.to_path_buf(),
            root,
            btrfs,
        })
    }

    /// Whether volumes have quota limits (btrfs).
    pub fn limited(&self) -> bool {
        self.btrfs
    }

    /// Host path of volume `id`.
    pub fn path(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Makes volume `id`, limited to `size_mb` MiB on btrfs. `AlreadyExists` if it exists.
    pub fn create(&self, id: &str, size_mb: u64) -> Result<(), RuntimeError> {
        check_id(id)?;
        let made = if self.btrfs {
            disk::create_limited_subvolume(self.root.as_fd(), id, size_mb)
        } else {
            mkdirat(&self.root, id, Mode::from_raw_mode(0o755)).map_err(io::Error::from)
        };
        match made {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::AlreadyExists(id.to_owned()));
            }
            Err(e) => return Err(e).ctx(|| format!("create volume {id}")),
        }
        let owned = (|| {
            let dir = open_dir_nofollow(self.root.as_fd(), id)?;
            let owner = Some(Uid::from_raw(VOLUME_OWNER));
            fchown(&dir, owner, Some(Gid::from_raw(VOLUME_OWNER)))?;
            fchmod(&dir, Mode::from_raw_mode(0o755))
        })();
        if let Err(e) = owned {
            let _ = self.remove(id);
            return Err(e).ctx(|| format!("chown volume {id}"));
        }
        Ok(())
    }

    /// Deletes volume `id` with everything in it. Missing is fine.
    pub fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        check_id(id)?;
        let path = self.path(id);
        if self.btrfs {
            match disk::destroy_subvolume(self.root.as_fd(), id) {
                Ok(true) => return Ok(()),
                // Subvolumes made inside it (btrfs refuses to drop a parent of others), or
                // not a subvolume: empty it by hand first.
                Ok(false) => {}
                Err(e) => return Err(e).ctx(|| format!("delete volume {id}")),
            }
            disk::remove_tree(&path).ctx(|| format!("remove {}", path.display()))?;
            disk::destroy_subvolume(self.root.as_fd(), id).ctx(|| format!("delete volume {id}"))?;
            return Ok(());
        }
        disk::remove_tree(&path).ctx(|| format!("remove {}", path.display()))
    }

    /// The ids of the volumes on disk (names that are valid ids; anything else is ignored).
    pub fn ids(&self) -> Result<Vec<String>, RuntimeError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).ctx(|| format!("list {}", self.dir.display()))? {
            let entry = entry.ctx(|| format!("list {}", self.dir.display()))?;
            if let Some(name) = entry.file_name().to_str()
                && check_id(name).is_ok()
            {
                out.push(name.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Volume `id`'s root, for content operations; `size_mb` bounds uploads.
    pub fn open_volume(&self, id: &str, size_mb: u64) -> Result<VolumeDir, RuntimeError> {
        check_id(id)?;
        let root = open_dir_nofollow(self.root.as_fd(), id).ctx(|| format!("open volume {id}"))?;
        Ok(VolumeDir {
            root,
            max_bytes: size_mb.saturating_mul(1 << 20),
        })
    }
}

fn check_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::InvalidSpec(format!("volume id {id:?}")))
    }
}

fn open_dir_nofollow(dir: BorrowedFd<'_>, name: &str) -> rustix::io::Result<OwnedFd> {
    openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The resolve flags of every lookup below a volume's root.
const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::NO_XDEV);

/// A client's path within a volume, checked: its components (none `.`/`..`/empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePath {
    comps: Vec<String>,
}

impl VolumePath {
    /// `/a/b`, `a/b` and `/a//b/` are the same; `/` and `` are the root. `..`, NUL and paths
    /// longer than [`MAX_PATH`] are refused.
    pub fn parse(path: &str) -> Result<VolumePath, VolumeFsError> {
        let bad = |reason| VolumeFsError::InvalidPath {
            path: path.chars().take(256).collect(),
            reason,
        };
        if path.len() > MAX_PATH {
            return Err(bad("longer than 4096 bytes"));
        }
        if path.contains('\0') {
            return Err(bad("contains NUL"));
        }
        let mut comps = Vec::new();
        for c in path.split('/') {
            match c {
                "" | "." => {}
                ".." => return Err(bad("'..' is not allowed")),
                c if c.len() > 255 => return Err(bad("a name is longer than 255 bytes")),
                c => comps.push(c.to_owned()),
            }
        }
        Ok(VolumePath { comps })
    }

    pub fn is_root(&self) -> bool {
        self.comps.is_empty()
    }

    /// `/a/b`.
    pub fn display(&self) -> String {
        format!("/{}", self.comps.join("/"))
    }

    fn relative(&self) -> String {
        if self.comps.is_empty() {
            ".".to_owned()
        } else {
            self.comps.join("/")
        }
    }

    fn parent(&self) -> VolumePath {
        VolumePath {
            comps: self.comps[..self.comps.len().saturating_sub(1)].to_vec(),
        }
    }

    fn name(&self) -> Option<&str> {
        self.comps.last().map(String::as_str)
    }

    fn child(&self, name: &str) -> VolumePath {
        let mut comps = self.comps.clone();
        comps.push(name.to_owned());
        VolumePath { comps }
    }
}

/// One volume's root, open: the content API's operations (module doc for how paths resolve).
pub struct VolumeDir {
    root: OwnedFd,
    max_bytes: u64,
}

impl VolumeDir {
    /// The most bytes one upload may write (the volume's size).
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Opens `p` (relative to the root) with `flags`; never through a symlink, `..` or a mount.
    fn open(&self, p: &VolumePath, flags: OFlags, mode: Mode) -> Result<OwnedFd, VolumeFsError> {
        openat2(
            &self.root,
            p.relative(),
            flags | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            mode,
            BENEATH,
        )
        .map_err(|e| io_err(&p.display(), e))
    }

    fn open_dir(&self, p: &VolumePath) -> Result<OwnedFd, VolumeFsError> {
        self.open(p, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())
    }

    /// `lstat` of `p`.
    pub fn stat(&self, p: &VolumePath) -> Result<Entry, VolumeFsError> {
        match p.name() {
            None => {
                let st = fstat(&self.root).map_err(|e| io_err("/", e))?;
                Ok(entry(String::new(), p.display(), &st, None))
            }
            Some(name) => {
                let dir = self.open_dir(&p.parent())?;
                stat_in(dir.as_fd(), name, p)
            }
        }
    }

    /// The entries of directory `p`, `depth` levels deep (1: its children), sorted by path.
    pub fn list(&self, p: &VolumePath, depth: usize) -> Result<Vec<Entry>, VolumeFsError> {
        let depth = depth.clamp(1, MAX_DEPTH);
        let dir = self.open_dir(p)?;
        let mut out = Vec::new();
        list_into(dir, p, depth, &mut out)?;
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Makes directory `p` (with its parents if `parents`); an existing directory is fine
    /// only with `parents`.
    pub fn make_dir(
        &self,
        p: &VolumePath,
        attrs: Attrs,
        parents: bool,
    ) -> Result<Entry, VolumeFsError> {
        let Some(name) = p.name() else {
            return Err(VolumeFsError::Refused {
                path: "/".into(),
                what: "the volume root already exists",
            });
        };
        let parent = if parents {
            self.make_parents(p, attrs)?
        } else {
            self.open_dir(&p.parent())?
        };
        match mkdirat(&parent, name, Mode::from_raw_mode(0o700)) {
            Ok(()) => {
                let dir =
                    open_dir_nofollow(parent.as_fd(), name).map_err(|e| io_err(&p.display(), e))?;
                set_new_attrs(dir.as_fd(), attrs, 0o755).map_err(|e| io_err(&p.display(), e))?;
            }
            Err(Errno::EXIST) if parents => {
                // Must be a directory (never a symlink to one).
                open_dir_nofollow(parent.as_fd(), name).map_err(|e| io_err(&p.display(), e))?;
            }
            Err(e) => return Err(io_err(&p.display(), e)),
        }
        stat_in(parent.as_fd(), name, p)
    }

    /// The parent directory of `p`, made (with its own parents) where missing.
    fn make_parents(&self, p: &VolumePath, attrs: Attrs) -> Result<OwnedFd, VolumeFsError> {
        let mut dir = self.open_dir(&VolumePath { comps: Vec::new() })?;
        let comps = &p.comps[..p.comps.len().saturating_sub(1)];
        for (i, name) in comps.iter().enumerate() {
            let shown = || VolumePath {
                comps: comps[..=i].to_vec(),
            };
            match mkdirat(&dir, name.as_str(), Mode::from_raw_mode(0o700)) {
                Ok(()) => {
                    let made = open_dir_nofollow(dir.as_fd(), name)
                        .map_err(|e| io_err(&shown().display(), e))?;
                    set_new_attrs(
                        made.as_fd(),
                        Attrs {
                            mode: None,
                            ..attrs
                        },
                        0o755,
                    )
                    .map_err(|e| io_err(&shown().display(), e))?;
                    dir = made;
                }
                Err(Errno::EXIST) => {
                    dir = open_dir_nofollow(dir.as_fd(), name)
                        .map_err(|e| io_err(&shown().display(), e))?;
                }
                Err(e) => return Err(io_err(&shown().display(), e)),
            }
        }
        Ok(dir)
    }

    /// Opens regular file `p` for reading.
    pub fn open_read(&self, p: &VolumePath) -> Result<File, VolumeFsError> {
        if p.is_root() {
            return Err(is_a_directory(p));
        }
        let fd = self.open(
            p,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
            Mode::empty(),
        )?;
        let st = fstat(&fd).map_err(|e| io_err(&p.display(), e))?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => Ok(File::from(fd)),
            FileType::Directory => Err(is_a_directory(p)),
            _ => Err(VolumeFsError::Refused {
                path: p.display(),
                what: "not a regular file",
            }),
        }
    }

    /// Creates or truncates regular file `p` for writing (parents made if `parents`). A new
    /// file gets `attrs` (default owner [`VOLUME_OWNER`], mode 0644); an existing one keeps
    /// its owner and mode unless `attrs` names them.
    pub fn open_write(
        &self,
        p: &VolumePath,
        attrs: Attrs,
        parents: bool,
    ) -> Result<File, VolumeFsError> {
        let Some(name) = p.name() else {
            return Err(is_a_directory(p));
        };
        let parent = if parents {
            self.make_parents(p, attrs)?
        } else {
            self.open_dir(&p.parent())?
        };
        let flags = OFlags::WRONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
        let (fd, created) = match openat2(
            &parent,
            name,
            flags | OFlags::CREATE | OFlags::EXCL,
            Mode::from_raw_mode(0o600),
            BENEATH,
        ) {
            Ok(fd) => (fd, true),
            Err(Errno::EXIST) => {
                let fd = openat2(
                    &parent,
                    name,
                    flags | OFlags::NOFOLLOW,
                    Mode::empty(),
                    BENEATH,
                )
                .map_err(|e| io_err(&p.display(), e))?;
                (fd, false)
            }
            Err(e) => return Err(io_err(&p.display(), e)),
        };
        let st = fstat(&fd).map_err(|e| io_err(&p.display(), e))?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(VolumeFsError::Refused {
                path: p.display(),
                what: "not a regular file",
            });
        }
        if created {
            set_new_attrs(fd.as_fd(), attrs, 0o644)
        } else {
            set_attrs(fd.as_fd(), attrs).and_then(|()| rustix::fs::ftruncate(&fd, 0))
        }
        .map_err(|e| io_err(&p.display(), e))?;
        Ok(File::from(fd))
    }

    /// `lstat` of `p` after a write through a descriptor of it.
    pub fn stat_file(&self, p: &VolumePath, file: &File) -> Result<Entry, VolumeFsError> {
        let st = fstat(file).map_err(|e| io_err(&p.display(), e))?;
        Ok(entry(
            p.name().unwrap_or_default().to_owned(),
            p.display(),
            &st,
            None,
        ))
    }

    /// Changes owner and mode of `p`: files and directories only (a symlink is refused, not
    /// followed, and not changed itself either).
    pub fn set_metadata(&self, p: &VolumePath, attrs: Attrs) -> Result<Entry, VolumeFsError> {
        check_attrs(p, attrs)?;
        let fd = self.open(p, OFlags::PATH, Mode::empty())?;
        let st = fstat(&fd).map_err(|e| io_err(&p.display(), e))?;
        if !matches!(
            FileType::from_raw_mode(st.st_mode),
            FileType::RegularFile | FileType::Directory
        ) {
            return Err(VolumeFsError::Refused {
                path: p.display(),
                what: "owner and mode can only be set on files and directories",
            });
        }
        if attrs.uid.is_some() || attrs.gid.is_some() {
            rustix::fs::chownat(
                &fd,
                "",
                attrs.uid.map(Uid::from_raw),
                attrs.gid.map(Gid::from_raw),
                AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io_err(&p.display(), e))?;
        }
        if let Some(mode) = attrs.mode {
            let flags = match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => OFlags::RDONLY | OFlags::DIRECTORY,
                FileType::RegularFile => OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
                _ => {
                    return Err(VolumeFsError::Refused {
                        path: p.display(),
                        what: "mode can only be set on files and directories",
                    });
                }
            };
            let fd = self.open(p, flags, Mode::empty())?;
            let again = fstat(&fd).map_err(|e| io_err(&p.display(), e))?;
            if FileType::from_raw_mode(again.st_mode) != FileType::from_raw_mode(st.st_mode) {
                return Err(VolumeFsError::Refused {
                    path: p.display(),
                    what: "changed while being updated",
                });
            }
            fchmod(&fd, Mode::from_raw_mode(mode & 0o1777)).map_err(|e| io_err(&p.display(), e))?;
        }
        self.stat(p)
    }

    /// Removes `p`: a file, a symlink (not what it points to) or a directory with everything
    /// in it.
    pub fn remove(&self, p: &VolumePath) -> Result<(), VolumeFsError> {
        let Some(name) = p.name() else {
            return Err(VolumeFsError::Refused {
                path: "/".into(),
                what: "the volume root cannot be removed",
            });
        };
        let parent = self.open_dir(&p.parent())?;
        let st = statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err(&p.display(), e))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            remove_dir_in(parent.as_fd(), name, 0).map_err(|e| io_err(&p.display(), e))
        } else {
            unlinkat(&parent, name, AtFlags::empty()).map_err(|e| io_err(&p.display(), e))
        }
    }
}

fn is_a_directory(p: &VolumePath) -> VolumeFsError {
    io_err(&p.display(), Errno::ISDIR)
}

/// Refuses ids outside the sandboxes' range.
pub fn check_attrs(p: &VolumePath, attrs: Attrs) -> Result<(), VolumeFsError> {
    let too_big = |v: Option<u32>| v.is_some_and(|v| v > MAX_ID);
    if too_big(attrs.uid) || too_big(attrs.gid) {
        return Err(VolumeFsError::Refused {
            path: p.display(),
            what: "uid and gid must be below 65536",
        });
    }
    if attrs.mode.is_some_and(|m| m > 0o7777) {
        return Err(VolumeFsError::Refused {
            path: p.display(),
            what: "mode must be at most 0o7777",
        });
    }
    Ok(())
}

/// Owner (default [`VOLUME_OWNER`]) and mode (default `default_mode`; never setuid/setgid)
/// of something just made.
fn set_new_attrs(fd: BorrowedFd<'_>, attrs: Attrs, default_mode: u32) -> rustix::io::Result<()> {
    fchown(
        fd,
        Some(Uid::from_raw(attrs.uid.unwrap_or(VOLUME_OWNER))),
        Some(Gid::from_raw(attrs.gid.unwrap_or(VOLUME_OWNER))),
    )?;
    fchmod(
        fd,
        Mode::from_raw_mode(attrs.mode.unwrap_or(default_mode) & 0o1777),
    )
}

fn set_attrs(fd: BorrowedFd<'_>, attrs: Attrs) -> rustix::io::Result<()> {
    if attrs.uid.is_some() || attrs.gid.is_some() {
        fchown(
            fd,
            attrs.uid.map(Uid::from_raw),
            attrs.gid.map(Gid::from_raw),
        )?;
    }
    if let Some(mode) = attrs.mode {
        fchmod(fd, Mode::from_raw_mode(mode & 0o1777))?;
    }
    Ok(())
}

fn stat_in(dir: BorrowedFd<'_>, name: &str, p: &VolumePath) -> Result<Entry, VolumeFsError> {
    let st = statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io_err(&p.display(), e))?;
    let target = link_target(dir, name, &st);
    Ok(entry(name.to_owned(), p.display(), &st, target))
}

fn link_target(dir: BorrowedFd<'_>, name: &str, st: &Stat) -> Option<String> {
    if FileType::from_raw_mode(st.st_mode) != FileType::Symlink {
        return None;
    }
    readlinkat(dir, name, Vec::new())
        .ok()
        .map(|t| String::from_utf8_lossy(t.as_bytes()).into_owned())
}

// The stat fields' integer types differ between architectures.
#[allow(clippy::unnecessary_cast)]
fn entry(name: String, path: String, st: &Stat, target: Option<String>) -> Entry {
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => EntryKind::Directory,
        FileType::RegularFile => EntryKind::File,
        FileType::Symlink => EntryKind::Symlink,
        _ => EntryKind::Other,
    };
    let ts = |s: i64, ns: i64| (s, u32::try_from(ns).unwrap_or(0));
    Entry {
        name,
        path,
        kind,
        size: u64::try_from(st.st_size).unwrap_or(0),
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        atime: ts(st.st_atime as i64, st.st_atime_nsec as i64),
        mtime: ts(st.st_mtime as i64, st.st_mtime_nsec as i64),
        ctime: ts(st.st_ctime as i64, st.st_ctime_nsec as i64),
        target,
    }
}

/// The names in directory `dir` (not `.`/`..`), as UTF-8 (others are skipped: the API's
/// paths are strings).
fn names(dir: BorrowedFd<'_>) -> rustix::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for e in rustix::fs::Dir::read_from(dir)? {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        if let Ok(s) = std::str::from_utf8(name) {
            out.push(s.to_owned());
        }
    }
    Ok(out)
}

fn list_into(
    dir: OwnedFd,
    p: &VolumePath,
    depth: usize,
    out: &mut Vec<Entry>,
) -> Result<(), VolumeFsError> {
    for name in names(dir.as_fd()).map_err(|e| io_err(&p.display(), e))? {
        if out.len() >= MAX_LIST_ENTRIES {
            return Err(VolumeFsError::Refused {
                path: p.display(),
                what: "more than 100000 entries: list a smaller depth",
            });
        }
        let child = p.child(&name);
        // Gone since the directory was read: skip it.
        let Ok(st) = statat(&dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        let target = link_target(dir.as_fd(), &name, &st);
        out.push(entry(name.clone(), child.display(), &st, target));
        if depth > 1
            && FileType::from_raw_mode(st.st_mode) == FileType::Directory
            && let Ok(sub) = open_dir_nofollow(dir.as_fd(), &name)
        {
            list_into(sub, &child, depth - 1, out)?;
        }
    }
    Ok(())
}

/// Removes directory `name` in `parent` and everything below it, never leaving the tree
/// through a symlink (each level is opened with `O_NOFOLLOW`, entries are unlinked by name).
fn remove_dir_in(parent: BorrowedFd<'_>, name: &str, level: usize) -> rustix::io::Result<()> {
    if level >= MAX_DEPTH {
        return Err(Errno::LOOP);
    }
    let dir = open_dir_nofollow(parent, name)?;
    for child in names(dir.as_fd())? {
        match unlinkat(&dir, child.as_str(), AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(Errno::ISDIR) => remove_dir_in(dir.as_fd(), &child, level + 1)?,
            Err(e) => return Err(e),
        }
    }
    match unlinkat(parent, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::symlink;

    fn store() -> (tempfile::TempDir, VolumeStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = VolumeStore::open(&dir.path().join("volumes")).expect("open");
        (dir, store)
    }

    fn path(s: &str) -> VolumePath {
        VolumePath::parse(s).expect("valid path")
    }

    fn errno(e: VolumeFsError) -> i32 {
        e.errno().unwrap_or_else(|| panic!("not an OS error: {e}"))
    }

    #[test]
    fn paths_are_checked() {
        assert!(VolumePath::parse("/").expect("root").is_root());
        assert!(VolumePath::parse("").expect("root").is_root());
        assert_eq!(path("/a//b/./c/").display(), "/a/b/c");
        assert_eq!(path("a/b").display(), "/a/b");
        for bad in ["/a/../b", "..", "/a/..", "a\0b"] {
            assert!(VolumePath::parse(bad).is_err(), "{bad:?}");
        }
        assert!(VolumePath::parse(&"a/".repeat(3000)).is_err());
        assert!(VolumePath::parse(&"x".repeat(256)).is_err());
    }

    #[test]
    fn mount_paths_are_checked() {
        assert_eq!(
            mount_path_components("/data/x/").expect("ok"),
            ["data", "x"]
        );
        for bad in [
            "data",
            "/",
            "//",
            "/a/../b",
            "/proc/x",
            "/dev",
            "/.soulbox/bin",
            "/a\0",
        ] {
            assert!(mount_path_components(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn write_read_list_remove() {
        let (_t, s) = store();
        s.create("vol1", 10).expect("create");
        let v = s.open_volume("vol1", 10).expect("open");
        let mut f = v
            .open_write(&path("/d/e/f.txt"), Attrs::default(), true)
            .expect("write");
        f.write_all(b"hello").expect("write");
        let st = v.stat_file(&path("/d/e/f.txt"), &f).expect("stat");
        assert_eq!((st.size, st.kind, st.mode), (5, EntryKind::File, 0o644));
        let mut text = String::new();
        v.open_read(&path("d/e/f.txt"))
            .expect("read")
            .read_to_string(&mut text)
            .expect("read");
        assert_eq!(text, "hello");
        // Without `parents`, a missing parent is ENOENT.
        let e = v
            .open_write(&path("/x/y"), Attrs::default(), false)
            .expect_err("no parent");
        assert_eq!(errno(e), libc::ENOENT);
        let all = v.list(&path("/"), 3).expect("list");
        let names: Vec<&str> = all.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names, ["/d", "/d/e", "/d/e/f.txt"]);
        assert_eq!(v.list(&path("/"), 1).expect("list").len(), 1);
        let made = v
            .make_dir(
                &path("/m"),
                Attrs {
                    mode: Some(0o4750),
                    ..Attrs::default()
                },
                false,
            )
            .expect("mkdir");
        // setuid/setgid bits are never set through the API.
        assert_eq!((made.kind, made.mode), (EntryKind::Directory, 0o750));
        let e = v
            .make_dir(&path("/m"), Attrs::default(), false)
            .expect_err("exists");
        assert_eq!(errno(e), libc::EEXIST);
        v.make_dir(&path("/m"), Attrs::default(), true)
            .expect("exists ok with force");
        v.remove(&path("/d")).expect("remove");
        assert_eq!(errno(v.stat(&path("/d")).expect_err("gone")), libc::ENOENT);
        assert!(v.remove(&path("/")).is_err());
        std::fs::create_dir(s.path("not-an-id")).expect("mkdir");
        assert_eq!(s.ids().expect("ids"), ["vol1"]);
        s.remove("vol1").expect("remove volume");
        assert!(!s.path("vol1").exists());
        assert!(s.ids().expect("ids").is_empty());
    }

    /// A planted symlink, anywhere in a path, is never followed: not to reach outside the
    /// volume (a host directory, another volume), not even to reach inside it.
    #[test]
    fn symlinks_are_never_followed() {
        let (t, s) = store();
        s.create("vola", 10).expect("create");
        s.create("volb", 10).expect("create");
        let a = s.path("vola");
        let outside = t.path().join("secret");
        std::fs::write(&outside, "host secret").expect("write");
        std::fs::write(s.path("volb").join("b.txt"), "other volume").expect("write");
        std::fs::create_dir(a.join("real")).expect("mkdir");
        symlink(&outside, a.join("leak")).expect("symlink");
        symlink(s.path("volb"), a.join("other")).expect("symlink");
        symlink("/etc", a.join("etc")).expect("symlink");
        symlink("real", a.join("inside")).expect("symlink");
        symlink("../volb", a.join("rel")).expect("symlink");
        let v = s.open_volume("vola", 10).expect("open");
        for p in ["/leak", "/inside"] {
            assert_eq!(
                errno(v.open_read(&path(p)).expect_err(p)),
                libc::ELOOP,
                "{p}"
            );
        }
        for p in ["/other/b.txt", "/etc/passwd", "/rel/b.txt", "/inside/x"] {
            assert_eq!(
                errno(v.open_read(&path(p)).expect_err(p)),
                libc::ELOOP,
                "{p}"
            );
            assert!(
                v.open_write(&path(p), Attrs::default(), true).is_err(),
                "{p}"
            );
            assert!(v.list(&path(p), 1).is_err(), "{p}");
            assert!(v.stat(&path(p)).is_err(), "{p}");
            assert!(v.remove(&path(p)).is_err(), "{p}");
            assert!(v.make_dir(&path(p), Attrs::default(), true).is_err(), "{p}");
        }
        // Writing over a symlink fails and leaves its target alone.
        assert!(
            v.open_write(&path("/leak"), Attrs::default(), false)
                .is_err()
        );
        assert!(
            v.set_metadata(
                &path("/leak"),
                Attrs {
                    mode: Some(0o777),
                    ..Attrs::default()
                }
            )
            .is_err()
        );
        let chown = Attrs {
            uid: Some(0),
            ..Attrs::default()
        };
        assert!(v.set_metadata(&path("/leak"), chown).is_err());
        assert!(v.set_metadata(&path("/other/b.txt"), chown).is_err());
        assert_eq!(
            std::fs::read_to_string(&outside).expect("read"),
            "host secret"
        );
        // lstat shows the link itself, with its target, and removing it removes the link.
        let st = v.stat(&path("/etc")).expect("stat");
        assert_eq!(
            (st.kind, st.target.as_deref()),
            (EntryKind::Symlink, Some("/etc"))
        );
        v.remove(&path("/other")).expect("remove link");
        assert!(s.path("volb").join("b.txt").exists());
        // A listing shows links as links and does not descend into them.
        let listed = v.list(&path("/"), 5).expect("list");
        assert!(listed.iter().all(|e| !e.path.starts_with("/etc/")));
        // Removing a directory holding a link to a host directory removes only the link.
        symlink(t.path(), a.join("real").join("up")).expect("symlink");
        v.remove(&path("/real")).expect("remove");
        assert!(outside.exists());
    }

    #[test]
    fn ids_are_bounded() {
        let (_t, s) = store();
        let v = {
            s.create("volc", 10).expect("create");
            s.open_volume("volc", 10).expect("open")
        };
        let too_big = Attrs {
            uid: Some(70000),
            ..Attrs::default()
        };
        assert!(v.open_write(&path("/f"), Attrs::default(), false).is_ok());
        assert!(v.set_metadata(&path("/f"), too_big).is_err());
        for bad in ["../x", "a/b", "", "UP"] {
            assert!(s.create(bad, 1).is_err(), "{bad:?}");
        }
    }
}
