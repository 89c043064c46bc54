//! The `filesystem.Filesystem` service, plus the `EntryInfo` and ownership helpers `/files`
//! shares. Filesystem work runs on blocking threads so a slow disk never stalls the server.
//! Like upstream envd, operations run as sandbox root and created items are chowned to the
//! requesting user.

use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use soulbox_wire::connect::{Code, ConnectError};
use soulbox_wire::envd::Timestamp;
use soulbox_wire::envd::filesystem::{self as pb, EntryInfo, FileType};

use crate::Agent;
use crate::http::Body;
use crate::rpc;
use crate::users::{Names, User, resolve_path};

/// `ListDir` refuses to build answers larger than this many entries.
const MAX_LIST_ENTRIES: usize = 200_000;
/// Prefix of the xattrs that hold `/files` metadata.
pub const METADATA_XATTR_PREFIX: &str = "user.e2b.";

pub(crate) async fn dispatch(
    agent: Arc<Agent>,
    method: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    match method {
        "Stat" => {
            rpc::handle_unary(req, |h, r: pb::StatRequest| async move {
                let user = agent.rpc_user(&h)?;
                let path = agent.resolve(&user, &r.path);
                let names = agent.users.clone();
                let entry = blocking(move || {
                    let names = names.names();
                    entry_info(&path, &names).map_err(|e| fs_error(&path, &e))
                })
                .await?;
                Ok(pb::StatResponse { entry: Some(entry) })
            })
            .await
        }
        "ListDir" => {
            rpc::handle_unary(req, |h, r: pb::ListDirRequest| async move {
                let user = agent.rpc_user(&h)?;
                let path = agent.resolve(&user, &r.path);
                let names = agent.users.clone();
                let entries =
                    blocking(move || list_dir(&path, r.depth.max(1), &names.names())).await?;
                Ok(pb::ListDirResponse { entries })
            })
            .await
        }
        "MakeDir" => {
            rpc::handle_unary(req, |h, r: pb::MakeDirRequest| async move {
                let user = agent.rpc_user(&h)?;
                let path = agent.resolve(&user, &r.path);
                let names = agent.users.clone();
                let entry = blocking(move || make_dir(&path, &user, &names.names())).await?;
                Ok(pb::MakeDirResponse { entry: Some(entry) })
            })
            .await
        }
        "Move" => {
            rpc::handle_unary(req, |h, r: pb::MoveRequest| async move {
                let user = agent.rpc_user(&h)?;
                let from = agent.resolve(&user, &r.source);
                let to = agent.resolve(&user, &r.destination);
                let names = agent.users.clone();
                let entry = blocking(move || move_path(&from, &to, &user, &names.names())).await?;
                Ok(pb::MoveResponse { entry: Some(entry) })
            })
            .await
        }
        "Remove" => {
            rpc::handle_unary(req, |h, r: pb::RemoveRequest| async move {
                let user = agent.rpc_user(&h)?;
                let path = agent.resolve(&user, &r.path);
                blocking(move || remove(&path)).await?;
                Ok(pb::RemoveResponse {})
            })
            .await
        }
        "WatchDir" => crate::watch::watch_dir(agent, req).await,
        "CreateWatcher" | "GetWatcherEvents" | "RemoveWatcher" => {
            crate::watch::polling(agent, method, req).await
        }
        _ => rpc::unary_error(&ConnectError::new(
            Code::Unimplemented,
            format!("filesystem.Filesystem/{method} is not implemented"),
        )),
    }
}

impl Agent {
    /// A request path resolved for `user` (see [`resolve_path`]).
    pub(crate) fn resolve(&self, user: &User, path: &str) -> PathBuf {
        let default_dir = self
            .config()
            .default_workdir
            .unwrap_or_else(|| user.home.clone());
        resolve_path(path, &user.home, &default_dir)
    }
}

/// Runs filesystem work on a blocking thread.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ConnectError> + Send + 'static,
) -> Result<T, ConnectError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ConnectError::new(
            Code::Internal,
            format!("worker failed: {e}"),
        ))
    })
}

/// Whether an I/O error means the disk (or inode table, or quota) is full.
pub(crate) fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Maps an I/O error on `path` to a Connect error with envd's wording.
pub(crate) fn fs_error(path: &Path, e: &std::io::Error) -> ConnectError {
    let p = path.display();
    match e.kind() {
        ErrorKind::NotFound => {
            ConnectError::new(Code::NotFound, format!("path '{p}' does not exist"))
        }
        ErrorKind::PermissionDenied => ConnectError::new(
            Code::PermissionDenied,
            format!("permission denied for '{p}': {e}"),
        ),
        _ if is_no_space(e) => ConnectError::new(
            Code::ResourceExhausted,
            format!("not enough disk space for '{p}': {e}"),
        ),
        _ if e.raw_os_error() == Some(libc::ENOTDIR) => ConnectError::new(
            Code::InvalidArgument,
            format!("a parent of '{p}' is not a directory"),
        ),
        _ => ConnectError::new(Code::Internal, format!("'{p}': {e}")),
    }
}

/// `ls`-style permission string in Go's `FileMode.String()` form, which upstream reports
/// (`-rw-r--r--`, `drwxr-xr-x`, `Lrwxrwxrwx`, `dtrwxrwxrwx`).
pub(crate) fn permissions_string(mode: u32) -> String {
    let fmt = mode & libc::S_IFMT;
    let mut s = String::with_capacity(12);
    let flags = [
        (fmt == libc::S_IFDIR, 'd'),
        (fmt == libc::S_IFLNK, 'L'),
        (fmt == libc::S_IFBLK || fmt == libc::S_IFCHR, 'D'),
        (fmt == libc::S_IFIFO, 'p'),
        (fmt == libc::S_IFSOCK, 'S'),
        (mode & libc::S_ISUID != 0, 'u'),
        (mode & libc::S_ISGID != 0, 'g'),
        (fmt == libc::S_IFCHR, 'c'),
        (mode & libc::S_ISVTX != 0, 't'),
    ];
    for (set, c) in flags {
        if set {
            s.push(c);
        }
    }
    if s.is_empty() {
        s.push('-');
    }
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        s.push(if mode & (1 << (8 - i)) != 0 { c } else { '-' });
    }
    s
}

/// `user.e2b.*` xattrs of `path` (not following symlinks), keys without the prefix.
pub(crate) fn read_metadata(path: &Path) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    let Ok(names) = xattr::list(path) else {
        return out;
    };
    for name in names {
        let Some(key) = name
            .to_str()
            .and_then(|n| n.strip_prefix(METADATA_XATTR_PREFIX))
        else {
            continue;
        };
        if let Ok(Some(value)) = xattr::get(path, &name) {
            out.insert(
                key.to_string(),
                String::from_utf8_lossy(&value).into_owned(),
            );
        }
    }
    out
}

/// The `size` of an entry: `st_size`, except that a directory's is rounded up to whole blocks
/// of `st_blksize` (at least one).
///
/// E2B's sandboxes are ext4, where a directory's size is the blocks it occupies: 4096 for an
/// empty or small one, and SDK users (and E2B's own tests: `size > 0` for a new directory)
/// see that. SoulBox's root is an overlay whose upper layer is on btrfs, which reports a
/// directory's size as the length of its index (0 for an empty directory, 14 for one with a
/// seven-letter name in it). Rounding up to blocks keeps ext4's (and xfs's) values unchanged
/// and gives btrfs and tmpfs directories the figure they would have on ext4 for small
/// directories; files and symlinks keep their exact `st_size`.
fn entry_size(meta: &std::fs::Metadata) -> u64 {
    if !meta.is_dir() {
        return meta.len();
    }
    let block = match meta.blksize() {
        0 => 4096,
        b => b,
    };
    meta.len().div_ceil(block).max(1).saturating_mul(block)
}

/// Describes `path` without following a final symlink.
pub(crate) fn entry_info(path: &Path, names: &Names) -> std::io::Result<EntryInfo> {
    let meta = std::fs::symlink_metadata(path)?;
    let ft = meta.file_type();
    let (ty, symlink_target) = if ft.is_symlink() {
        // The fully resolved target when it exists, else the link text made absolute.
        let target = std::fs::canonicalize(path).ok().or_else(|| {
            let raw = std::fs::read_link(path).ok()?;
            let base = path.parent().unwrap_or(Path::new("/"));
            Some(crate::users::clean(&base.join(raw)))
        });
        (
            FileType::Symlink,
            target.map(|t| t.to_string_lossy().into_owned()),
        )
    } else if ft.is_dir() {
        (FileType::Directory, None)
    } else if ft.is_file() {
        (FileType::File, None)
    } else {
        (FileType::Unspecified, None)
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/".to_string());
    Ok(EntryInfo {
        name,
        r#type: ty as i32,
        path: path.to_string_lossy().into_owned(),
        size: i64::try_from(entry_size(&meta)).unwrap_or(i64::MAX),
        mode: meta.permissions().mode() & 0o777,
        permissions: permissions_string(meta.mode()),
        owner: names.user(meta.uid()),
        group: names.group(meta.gid()),
        modified_time: Some(Timestamp {
            seconds: meta.mtime(),
            nanos: i32::try_from(meta.mtime_nsec()).unwrap_or(0),
        }),
        symlink_target,
        metadata: if ft.is_symlink() {
            Default::default()
        } else {
            read_metadata(path)
        },
        is_symlink: ft.is_symlink(),
    })
}

fn list_dir(path: &Path, depth: u32, names: &Names) -> Result<Vec<EntryInfo>, ConnectError> {
    let meta = std::fs::metadata(path).map_err(|e| fs_error(path, &e))?;
    if !meta.is_dir() {
        return Err(ConnectError::new(
            Code::InvalidArgument,
            format!("path '{}' is not a directory", path.display()),
        ));
    }
    let mut out = Vec::new();
    walk(path, 1, depth, names, &mut out).map_err(|e| fs_error(path, &e))?;
    if out.len() > MAX_LIST_ENTRIES {
        return Err(ConnectError::new(
            Code::ResourceExhausted,
            format!("more than {MAX_LIST_ENTRIES} entries; list with a smaller depth"),
        ));
    }
    Ok(out)
}

/// Depth-first, names sorted; symlinked directories are listed but not descended.
fn walk(
    dir: &Path,
    level: u32,
    depth: u32,
    names: &Names,
    out: &mut Vec<EntryInfo>,
) -> std::io::Result<()> {
    let mut children: Vec<_> = std::fs::read_dir(dir)?.filter_map(Result::ok).collect();
    children.sort_by_key(|e| e.file_name());
    for child in children {
        if out.len() > MAX_LIST_ENTRIES {
            return Ok(());
        }
        let p = child.path();
        let Ok(info) = entry_info(&p, names) else {
            continue;
        };
        let descend = level < depth && child.file_type().is_ok_and(|t| t.is_dir());
        out.push(info);
        if descend {
            // An unreadable subdirectory is listed but not descended.
            let _ = walk(&p, level + 1, depth, names, out);
        }
    }
    Ok(())
}

/// Creates `path` and missing parents (mode 0755), each chowned to `user`. Existing ones are
/// left alone.
pub(crate) fn create_dirs_owned(path: &Path, user: &User) -> std::io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        create_dirs_owned(parent, user)?;
    }
    match std::fs::create_dir(path) {
        Ok(()) => {
            std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))?;
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

fn make_dir(path: &Path, user: &User, names: &Names) -> Result<EntryInfo, ConnectError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {
            return Err(ConnectError::new(
                Code::AlreadyExists,
                format!("directory '{}' already exists", path.display()),
            ));
        }
        Ok(_) => {
            return Err(ConnectError::new(
                Code::InvalidArgument,
                format!(
                    "path '{}' already exists and is not a directory",
                    path.display()
                ),
            ));
        }
        Err(_) => {}
    }
    create_dirs_owned(path, user).map_err(|e| fs_error(path, &e))?;
    entry_info(path, names).map_err(|e| fs_error(path, &e))
}

fn move_path(
    from: &Path,
    to: &Path,
    user: &User,
    names: &Names,
) -> Result<EntryInfo, ConnectError> {
    std::fs::symlink_metadata(from).map_err(|e| fs_error(from, &e))?;
    if let Some(parent) = to.parent() {
        create_dirs_owned(parent, user).map_err(|e| fs_error(parent, &e))?;
    }
    match std::fs::rename(from, to) {
        Ok(()) => {}
        // overlayfs refuses to rename directories that come from a lower layer.
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            copy_tree(from, to).map_err(|e| fs_error(to, &e))?;
            remove(from)?;
        }
        Err(e) => return Err(fs_error(from, &e)),
    }
    entry_info(to, names).map_err(|e| fs_error(to, &e))
}

/// Copies a tree preserving type, mode, owner and symlinks (the `EXDEV` fallback of Move).
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(from)?, to)?;
    } else if ft.is_dir() {
        std::fs::create_dir(to)?;
        for child in std::fs::read_dir(from)? {
            let child = child?;
            copy_tree(&child.path(), &to.join(child.file_name()))?;
        }
        std::fs::set_permissions(to, meta.permissions())?;
    } else if ft.is_file() {
        std::fs::copy(from, to)?;
    } else {
        return Err(std::io::Error::new(
            ErrorKind::Unsupported,
            "cannot move special files across layers",
        ));
    }
    std::os::unix::fs::lchown(to, Some(meta.uid()), Some(meta.gid()))?;
    Ok(())
}

/// Recursive; a missing path is not an error.
fn remove(path: &Path) -> Result<(), ConnectError> {
    let result = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
    };
    match result {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(fs_error(path, &e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::permissions_string;

    #[test]
    fn permission_strings_match_go() {
        assert_eq!(permissions_string(libc::S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(permissions_string(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(
            permissions_string(libc::S_IFDIR | libc::S_ISVTX | 0o777),
            "dtrwxrwxrwx"
        );
        assert_eq!(permissions_string(libc::S_IFLNK | 0o777), "Lrwxrwxrwx");
        assert_eq!(permissions_string(libc::S_IFCHR | 0o666), "Dcrw-rw-rw-");
        assert_eq!(
            permissions_string(libc::S_IFREG | libc::S_ISUID | 0o755),
            "urwxr-xr-x"
        );
        assert_eq!(permissions_string(libc::S_IFIFO | 0o600), "prw-------");
    }
}
