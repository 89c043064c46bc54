//! The layer store: content-addressed, read-only root filesystem layers under
//! `$DATA/layers/<sha256>/`, used by sandboxes directly as overlay lower layers (never copied).
//!
//! A layer is made from a directory (a build sandbox's overlay upper, or a tree made on the
//! host such as a Debian bootstrap) by [`LayerStore::ingest`]:
//!
//! * ownership is shifted from the build sandbox's host uid range back to sandbox ids (host
//!   id `uid_base` plus n becomes n), because sandboxes see layers through idmapped mounts that
//!   map on-disk n to their own n; set-id bits and file capabilities, which `chown` drops, are
//!   restored (v3 namespaced capabilities are stored as v2, which the idmapped mount maps to
//!   each sandbox's root);
//! * overlayfs whiteouts (0/0 character devices) and opaque-directory xattrs are kept: they are
//!   what makes a file deleted by a `RUN` stay deleted when the layer is stacked on its parents.
//!   Overlay's other bookkeeping xattrs (`origin`, `impure`, …) are dropped; a `redirect` or
//!   `metacopy` xattr (features this host's overlay does not enable) fails the ingest, since such
//!   a layer would depend on the layers below it;
//! * the digest is the sha256 of a canonical listing (path, type, mode, owner, xattrs, symlink
//!   target, device number, sha256 of the contents), so equal trees get one directory;
//! * the tree is moved into place with one rename (a copy only across filesystems), so a layer
//!   directory is either complete or absent; `.tmp-*` leftovers of an interrupted ingest are
//!   removed on open.
//!
//! What sandboxed code can do with this: a build's `RUN` fills the upper directory with any
//! tree it likes (symlinks to host paths, device nodes, huge files, deep nesting). The walk never
//! follows a symlink (it uses `lstat` and `O_NOFOLLOW`), runs only after every process of the
//! build sandbox is dead (nothing changes under it), keeps its own stack instead of recursing,
//! and the result is only ever mounted read-only, `nodev`, idmapped. Ids outside the sandbox's
//! range (only host root's mount points) are kept as they are.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Sandbox uid/gid range size (one user namespace).
const ID_RANGE: u32 = 65536;
const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";
const OPAQUE: &str = "trusted.overlay.opaque";
const CAPS_XATTR: &str = "security.capability";
/// `VFS_CAP_REVISION_*` (in the top byte of `magic_etc`).
const VFS_CAP_REVISION_MASK: u32 = 0xFF00_0000;
const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
const VFS_CAP_REVISION_3: u32 = 0x0300_0000;
const VFS_CAP_V2_SIZE: usize = 20;
/// Mount points the runtime adds to every sandbox root; never part of a layer.
const RUNTIME_DIR: &str = ".soulbox";

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{path} carries overlay xattr {name}: layers must not depend on the layers below")]
    Unsupported { path: PathBuf, name: String },
    #[error("copying {from} to {to} failed: {detail}")]
    Copy {
        from: PathBuf,
        to: PathBuf,
        detail: String,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> LayerError + 'a {
    move |source| LayerError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A stored layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// 64 lowercase hex characters.
    pub digest: String,
    /// Bytes of disk the layer takes (allocated blocks).
    pub disk_bytes: u64,
}

/// `$DATA/layers`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LayerStore {
    root: PathBuf,
}

/// Whether `s` looks like a layer digest (so it can name a directory safely).
pub fn is_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl LayerStore {
    /// Opens (creating, 0700) the store and removes leftovers of interrupted ingests.
    pub fn open(root: impl Into<PathBuf>) -> Result<LayerStore, LayerError> {
        let root = root.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&root)
            .map_err(io_err("creating", &root))?;
        let store = LayerStore { root };
        for entry in fs::read_dir(&store.root).map_err(io_err("reading", &store.root))? {
            let entry = entry.map_err(io_err("reading", &store.root))?;
            if entry.file_name().as_bytes().starts_with(b".tmp-") {
                remove_tree(&entry.path())?;
            }
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Host path of a layer (what sandboxes get as a lower layer).
    pub fn path(&self, digest: &str) -> PathBuf {
        self.root.join(digest)
    }

    pub fn exists(&self, digest: &str) -> bool {
        is_digest(digest) && self.path(digest).is_dir()
    }

    /// A fresh empty directory inside the store (same filesystem, so [`LayerStore::ingest`]
    /// renames it); removed on the next open if never ingested.
    pub fn temp_dir(&self) -> Result<PathBuf, LayerError> {
        let path = self.root.join(format!(".tmp-{}", random_suffix()));
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&path)
            .map_err(io_err("creating", &path))?;
        Ok(path)
    }

    /// Turns the tree at `dir` into a layer (see the module docs), consuming `dir`. `uid_base`
    /// is the host id the tree's sandbox root had (0 for trees made on the host); `exclude`
    /// lists relative paths that are dropped (with their parents, when that leaves them
    /// empty): files the sandbox's own setup wrote, such as `etc/hosts`. Returns `None` when
    /// the tree is empty (a step that changed nothing adds no layer).
    pub fn ingest(
        &self,
        dir: &Path,
        uid_base: u32,
        exclude: &[&str],
    ) -> Result<Option<Layer>, LayerError> {
        let work = if dir.parent() == Some(self.root.as_path()) {
            dir.to_owned()
        } else {
            let work = self.root.join(format!(".tmp-{}", random_suffix()));
            move_tree(dir, &work)?;
            work
        };
        let result = (|| {
            for rel in std::iter::once(RUNTIME_DIR).chain(exclude.iter().copied()) {
                let path = work.join(rel);
                if fs::symlink_metadata(&path).is_err() {
                    continue;
                }
                remove_tree(&path)?;
                // Parents left empty were only copied up for it (removing fails otherwise).
                let mut parent = path.parent();
                while let Some(p) = parent.filter(|p| *p != work) {
                    if xattr::get(p, OPAQUE).ok().flatten().is_some() || fs::remove_dir(p).is_err()
                    {
                        break;
                    }
                    parent = p.parent();
                }
            }
            let (digest, disk_bytes, entries) = normalise_and_hash(&work, uid_base)?;
            if entries == 0 {
                remove_tree(&work)?;
                return Ok(None);
            }
            let target = self.path(&digest);
            if target.is_dir() {
                remove_tree(&work)?;
            } else {
                fs::rename(&work, &target).map_err(io_err("moving a layer to", &target))?;
            }
            Ok(Some(Layer { digest, disk_bytes }))
        })();
        if result.is_err() && work.exists() {
            // Best effort; the next open removes it otherwise.
            let _ = remove_tree(&work);
        }
        result
    }

    /// Copies the tree at `dir` (left as it is) into a new temporary directory of the store,
    /// for [`LayerStore::ingest`]: a snapshot of a live sandbox's upper layer, copied while the
    /// sandbox is frozen and hashed after it runs again.
    pub fn copy_in(&self, dir: &Path) -> Result<PathBuf, LayerError> {
        let to = self.root.join(format!(".tmp-{}", random_suffix()));
        copy_tree(dir, &to)?;
        Ok(to)
    }

    /// Digests of every stored layer.
    pub fn list(&self) -> Result<Vec<String>, LayerError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(io_err("reading", &self.root))? {
            let entry = entry.map_err(io_err("reading", &self.root))?;
            if let Some(name) = entry.file_name().to_str().filter(|n| is_digest(n)) {
                out.push(name.to_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Removes every layer not in `keep`; returns (layers removed, bytes freed).
    pub fn gc(&self, keep: &HashSet<String>) -> Result<(usize, u64), LayerError> {
        let mut removed = 0;
        let mut freed = 0;
        for digest in self.list()? {
            if keep.contains(&digest) {
                continue;
            }
            let path = self.path(&digest);
            freed += disk_usage(&path)?;
            remove_tree(&path)?;
            removed += 1;
        }
        Ok((removed, freed))
    }
}

/// Allocated bytes of a tree (no symlinks followed, hard links counted once per path).
pub fn disk_usage(dir: &Path) -> Result<u64, LayerError> {
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
        total += meta.blocks() * 512;
        if meta.is_dir() {
            for entry in fs::read_dir(&path).map_err(io_err("reading", &path))? {
                stack.push(entry.map_err(io_err("reading", &path))?.path());
            }
        }
    }
    Ok(total)
}

/// Removes a tree without following symlinks (`remove_dir_all` does not follow them either).
pub fn remove_tree(path: &Path) -> Result<(), LayerError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            fs::remove_file(path).map_err(io_err("removing", path))
        }
        Err(source) => Err(LayerError::Io {
            what: "removing",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Renames `from` to `to`, or copies it (preserving everything: `cp -a`) when they are on
/// different filesystems or btrfs subvolumes.
fn move_tree(from: &Path, to: &Path) -> Result<(), LayerError> {
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::EXDEV) => copy_tree(from, to),
        Err(source) => Err(LayerError::Io {
            what: "moving",
            path: from.to_owned(),
            source,
        }),
    }
}

/// Copies the tree at `from` to the new path `to` as it is (owners, modes, xattrs such as
/// overlayfs's opaque marks, whiteouts, hard links; symlinks are copied, never followed),
/// sharing extents where the filesystem can. A failure removes what it copied.
fn copy_tree(from: &Path, to: &Path) -> Result<(), LayerError> {
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg("--reflink=auto")
        .arg("--no-target-directory")
        .arg(from)
        .arg(to)
        .output()
        .map_err(io_err("running cp for", from))?;
    if !out.status.success() {
        let _ = remove_tree(to);
        return Err(LayerError::Copy {
            from: from.to_owned(),
            to: to.to_owned(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

fn random_suffix() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut h = Sha256::new();
    h.update(nanos.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(format!("{:?}", std::thread::current().id()).as_bytes());
    hex::encode(&h.finalize()[..8])
}

/// Shifts ownership, cleans xattrs and hashes the tree; returns (digest, disk bytes, number of
/// entries below the root).
fn normalise_and_hash(root: &Path, uid_base: u32) -> Result<(String, u64, u64), LayerError> {
    let mut digest = Sha256::new();
    let mut disk = 0u64;
    let mut entries = 0u64;
    // (path relative to root, absolute path); directories are expanded in sorted order.
    let mut stack: Vec<(PathBuf, PathBuf)> = vec![(PathBuf::from("."), root.to_owned())];
    while let Some((rel, abs)) = stack.pop() {
        let meta = fs::symlink_metadata(&abs).map_err(io_err("stat", &abs))?;
        normalise(&abs, &meta, uid_base)?;
        // Re-read: ownership and mode may have changed.
        let meta = fs::symlink_metadata(&abs).map_err(io_err("stat", &abs))?;
        disk += meta.blocks() * 512;
        if rel != Path::new(".") {
            entries += 1;
        }
        hash_entry(&mut digest, &rel, &abs, &meta)?;
        if meta.is_dir() {
            let mut names: Vec<OsString> = fs::read_dir(&abs)
                .map_err(io_err("reading", &abs))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(io_err("reading", &abs))?;
            // Reverse order on the stack = sorted order when popped.
            names.sort();
            for name in names.into_iter().rev() {
                stack.push((rel.join(&name), abs.join(&name)));
            }
        }
    }
    Ok((hex::encode(digest.finalize()), disk, entries))
}

/// Maps an id of the build sandbox's range back to the sandbox's own id.
fn shift(id: u32, uid_base: u32) -> u32 {
    if uid_base != 0 && id >= uid_base && id - uid_base < ID_RANGE {
        id - uid_base
    } else {
        id
    }
}

fn normalise(path: &Path, meta: &fs::Metadata, uid_base: u32) -> Result<(), LayerError> {
    for name in xattr::list(path).map_err(io_err("listing xattrs of", path))? {
        let Some(name) = name.to_str() else { continue };
        if let Some(kind) = name.strip_prefix(OVERLAY_XATTR_PREFIX) {
            match kind {
                // Opaque directories are what a layer means; keep them.
                "opaque" => {}
                "redirect" | "metacopy" => {
                    return Err(LayerError::Unsupported {
                        path: path.to_owned(),
                        name: name.to_owned(),
                    });
                }
                _ => xattr::remove(path, name).map_err(io_err("removing an xattr of", path))?,
            }
        }
    }
    let (uid, gid) = (shift(meta.uid(), uid_base), shift(meta.gid(), uid_base));
    if (uid, gid) == (meta.uid(), meta.gid()) {
        return Ok(());
    }
    let caps = if meta.is_file() {
        xattr::get(path, CAPS_XATTR).map_err(io_err("reading capabilities of", path))?
    } else {
        None
    };
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(io_err("chown", path))?;
    // chown drops set-id bits and file capabilities: put them back.
    if meta.is_file() && meta.mode() & 0o6000 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(io_err("chmod", path))?;
    }
    if let Some(caps) = caps.and_then(|c| caps_v2(&c)) {
        xattr::set(path, CAPS_XATTR, &caps).map_err(io_err("restoring capabilities of", path))?;
    }
    Ok(())
}

/// A `security.capability` value as v2 (no namespace root id); `None` if unreadable.
fn caps_v2(value: &[u8]) -> Option<Vec<u8>> {
    let magic = u32::from_le_bytes(value.get(..4)?.try_into().ok()?);
    match magic & VFS_CAP_REVISION_MASK {
        VFS_CAP_REVISION_2 if value.len() == VFS_CAP_V2_SIZE => Some(value.to_vec()),
        VFS_CAP_REVISION_3 if value.len() >= VFS_CAP_V2_SIZE => {
            let mut out = value[..VFS_CAP_V2_SIZE].to_vec();
            let v2 = (magic & !VFS_CAP_REVISION_MASK) | VFS_CAP_REVISION_2;
            out[..4].copy_from_slice(&v2.to_le_bytes());
            Some(out)
        }
        _ => None,
    }
}

fn hash_entry(
    h: &mut Sha256,
    rel: &Path,
    abs: &Path,
    meta: &fs::Metadata,
) -> Result<(), LayerError> {
    let ft = meta.file_type();
    let kind = if ft.is_dir() {
        "d"
    } else if ft.is_file() {
        "f"
    } else if ft.is_symlink() {
        "l"
    } else if ft.is_char_device() {
        "c"
    } else if ft.is_block_device() {
        "b"
    } else if ft.is_fifo() {
        "p"
    } else {
        "s"
    };
    let mut record = Vec::new();
    record.extend_from_slice(rel.as_os_str().as_bytes());
    record.push(0);
    record.extend_from_slice(
        format!(
            "{kind} {:o} {} {} {}",
            meta.mode() & 0o7777,
            meta.uid(),
            meta.gid(),
            meta.rdev()
        )
        .as_bytes(),
    );
    if ft.is_symlink() {
        let target = fs::read_link(abs).map_err(io_err("readlink", abs))?;
        record.push(0);
        record.extend_from_slice(target.as_os_str().as_bytes());
    }
    if ft.is_file() {
        record.push(0);
        record.extend_from_slice(&file_sha256(abs)?);
    }
    let mut names: Vec<OsString> = xattr::list(abs)
        .map_err(io_err("listing xattrs of", abs))?
        .collect();
    names.sort();
    for name in names {
        if let Some(value) = xattr::get(abs, &name).map_err(io_err("reading an xattr of", abs))? {
            record.push(0);
            record.extend_from_slice(name.as_bytes());
            record.push(b'=');
            record.extend_from_slice(hex::encode(value).as_bytes());
        }
    }
    h.update((record.len() as u64).to_le_bytes());
    h.update(&record);
    Ok(())
}

fn file_sha256(path: &Path) -> Result<[u8; 32], LayerError> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err("opening", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io_err("reading", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const OPAQUE_XATTR: &str = OPAQUE;

    #[test]
    fn ingest_dedups_and_shifts_ids() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LayerStore::open(dir.path().join("layers")).expect("open");
        let make = |name: &str, owner: u32| {
            let tree = dir.path().join(name);
            fs::create_dir_all(tree.join("etc")).expect("mkdir");
            fs::create_dir_all(tree.join(".soulbox/bin")).expect("mkdir");
            fs::write(tree.join("etc/hello"), "hi").expect("write");
            symlink("/etc/shadow", tree.join("etc/link")).expect("symlink");
            std::os::unix::fs::lchown(tree.join("etc/hello"), Some(owner + 1000), Some(owner))
                .expect("chown");
            fs::set_permissions(tree.join("etc/hello"), fs::Permissions::from_mode(0o4755))
                .expect("chmod");
            tree
        };
        let base = 300_000;
        let a = store
            .ingest(&make("a", base), base, &[])
            .expect("ingest")
            .expect("layer");
        let b_tree = make("b", 0);
        fs::create_dir_all(b_tree.join("run/e2b")).expect("mkdir");
        fs::write(b_tree.join("run/e2b/.E2B_SANDBOX_ID"), "x").expect("write");
        let b = store
            .ingest(&b_tree, 0, &["run/e2b/.E2B_SANDBOX_ID"])
            .expect("ingest")
            .expect("layer");
        assert_eq!(a.digest, b.digest, "same content, same layer");
        assert!(
            !store.path(&b.digest).join("run").exists(),
            "emptied parents dropped"
        );
        let hello = store.path(&a.digest).join("etc/hello");
        let meta = fs::symlink_metadata(&hello).expect("stat");
        assert_eq!((meta.uid(), meta.gid()), (1000, 0));
        assert_eq!(meta.mode() & 0o7777, 0o4755, "setuid bit kept across chown");
        assert!(!store.path(&a.digest).join(".soulbox").exists());
        assert_eq!(store.list().expect("list"), vec![a.digest.clone()]);

        let empty = dir.path().join("empty");
        fs::create_dir_all(empty.join(".soulbox")).expect("mkdir");
        assert_eq!(store.ingest(&empty, 0, &[]).expect("ingest"), None);

        let (removed, _) = store.gc(&HashSet::new()).expect("gc");
        assert_eq!(removed, 1);
        assert!(store.list().expect("list").is_empty());
    }

    #[test]
    fn overlay_xattrs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LayerStore::open(dir.path().join("layers")).expect("open");
        let tree = dir.path().join("t");
        fs::create_dir_all(tree.join("opaque")).expect("mkdir");
        fs::write(tree.join("f"), "x").expect("write");
        // trusted.* needs root, which these tests have (like the runtime's).
        xattr::set(tree.join("opaque"), OPAQUE_XATTR, b"y").expect("set opaque");
        xattr::set(tree.join("f"), "trusted.overlay.origin", b"junk").expect("set origin");
        let layer = store.ingest(&tree, 0, &[]).expect("ingest").expect("layer");
        let p = store.path(&layer.digest);
        assert_eq!(
            xattr::get(p.join("opaque"), OPAQUE_XATTR).expect("get"),
            Some(b"y".to_vec())
        );
        assert_eq!(
            xattr::get(p.join("f"), "trusted.overlay.origin").expect("get"),
            None
        );

        let bad = dir.path().join("bad");
        fs::create_dir_all(bad.join("d")).expect("mkdir");
        xattr::set(bad.join("d"), "trusted.overlay.redirect", b"/x").expect("set");
        assert!(matches!(
            store.ingest(&bad, 0, &[]),
            Err(LayerError::Unsupported { .. })
        ));
        assert_eq!(
            store.list().expect("list").len(),
            1,
            "failed ingest leaves nothing"
        );
    }

    #[test]
    fn v3_caps_become_v2() {
        let mut v3 = vec![0u8; 24];
        v3[..4].copy_from_slice(&(VFS_CAP_REVISION_3 | 1).to_le_bytes());
        v3[4] = 0x20;
        let v2 = caps_v2(&v3).expect("v2");
        assert_eq!(v2.len(), 20);
        assert_eq!(
            u32::from_le_bytes(v2[..4].try_into().expect("4 bytes")),
            VFS_CAP_REVISION_2 | 1
        );
        assert_eq!(v2[4], 0x20);
        assert_eq!(caps_v2(&[1, 2]), None);
    }
}
