//! `COPY`/`ADD`: the build context on the client side, the uploaded archive on the server,
//! and the copy itself, which runs *inside* the build sandbox.
//!
//! 1. The client (`soulbox template build`, or the E2B SDK) selects the files a `COPY` names
//!    from its context directory ([`collect`]), refuses sources outside the context, and uploads
//!    them as one tar.gz identified by a hash of their contents ([`archive`]).
//! 2. The server unpacks the archive into a staging directory ([`unpack`]) that the build
//!    sandbox gets as its topmost lower layer, mounted at [`STAGING_DIR`].
//! 3. Inside the sandbox, `soulbox template copy-in` ([`apply`]) copies the matching files to
//!    the destination as sandbox root: symlinks on the destination path resolve inside the
//!    sandbox, `--chown` names resolve with the template's own `/etc/passwd`, and overlayfs
//!    copies up the parent directories with their attributes. The changed files land in the
//!    sandbox's upper directory, which becomes the step's layer.
//!
//! What sandboxed code can do with this: nothing else runs in a copy step's sandbox, and the
//! host only unpacks archives into its own staging directory (the tar crate refuses entries
//! that would land outside it) and never resolves a path of the template.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

/// Where the staged files appear inside a copy step's sandbox.
pub const STAGING_DIR: &str = "/.soulbox-copy";

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("COPY source '{0}' is outside the build context")]
    OutsideContext(String),
    #[error("COPY source '{0}' not found in the build context")]
    NotFound(String),
    #[error("invalid pattern '{pattern}': {message}")]
    Pattern { pattern: String, message: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CopyError + 'a {
    move |source| CopyError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A source pattern as a path relative to the context: a leading `/` means the context root,
/// `.` components are dropped, and `..` is refused (it could leave the context).
pub fn relative_source(pattern: &str) -> Result<PathBuf, CopyError> {
    let mut out = PathBuf::new();
    for c in Path::new(pattern).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(CopyError::OutsideContext(pattern.to_owned()));
            }
        }
    }
    Ok(out)
}

/// Paths (relative to `context`) matching one `COPY` source; an error if none does.
pub fn collect(context: &Path, pattern: &str) -> Result<Vec<PathBuf>, CopyError> {
    let rel = relative_source(pattern)?;
    let matches = matches_in(context, &rel, pattern)?;
    let context_real = fs::canonicalize(context).map_err(io_err("resolving", context))?;
    for m in &matches {
        // A symlinked directory on the way would let the source leave the context.
        if let Some(parent) = context.join(m).parent() {
            let real = fs::canonicalize(parent).map_err(io_err("resolving", parent))?;
            if !real.starts_with(&context_real) {
                return Err(CopyError::OutsideContext(pattern.to_owned()));
            }
        }
    }
    Ok(matches)
}

fn matches_in(root: &Path, rel: &Path, pattern: &str) -> Result<Vec<PathBuf>, CopyError> {
    if rel.as_os_str().is_empty() {
        return Ok(vec![PathBuf::new()]);
    }
    let (Some(root_str), Some(rel_str)) = (root.to_str(), rel.to_str()) else {
        return Err(CopyError::Pattern {
            pattern: pattern.to_owned(),
            message: "not UTF-8".into(),
        });
    };
    let joined = format!("{}/{rel_str}", glob::Pattern::escape(root_str));
    let paths = glob::glob_with(
        &joined,
        glob::MatchOptions {
            case_sensitive: true,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        },
    )
    .map_err(|e| CopyError::Pattern {
        pattern: pattern.to_owned(),
        message: e.msg.to_owned(),
    })?;
    let mut out = Vec::new();
    for p in paths {
        let p = p.map_err(|e| CopyError::Io {
            what: "reading",
            path: e.path().to_owned(),
            source: io::Error::other(e.to_string()),
        })?;
        if let Ok(r) = p.strip_prefix(root) {
            out.push(r.to_owned());
        }
    }
    if out.is_empty() {
        return Err(CopyError::NotFound(pattern.to_owned()));
    }
    out.sort();
    Ok(out)
}

/// Every file below the matches (directories expanded, symlinks not followed), sorted.
fn expand_tree(context: &Path, roots: &[PathBuf]) -> Result<Vec<PathBuf>, CopyError> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = roots.iter().rev().cloned().collect();
    while let Some(rel) = stack.pop() {
        let abs = context.join(&rel);
        let meta = fs::symlink_metadata(&abs).map_err(io_err("stat", &abs))?;
        if !rel.as_os_str().is_empty() {
            out.push(rel.clone());
        }
        if meta.is_dir() {
            let mut names: Vec<_> = fs::read_dir(&abs)
                .map_err(io_err("reading", &abs))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<Result<_, _>>()
                .map_err(io_err("reading", &abs))?;
            names.sort();
            for n in names.into_iter().rev() {
                stack.push(rel.join(n));
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The files of one `COPY`: their content hash (the step's cache input) and a tar.gz of them
/// with paths relative to the context.
pub struct Archive {
    pub hash: String,
    pub tar_gz: Vec<u8>,
}

/// Packs the sources of one `COPY` (already checked by [`collect`]).
pub fn archive(context: &Path, sources: &[String]) -> Result<Archive, CopyError> {
    let mut roots = Vec::new();
    for s in sources {
        roots.extend(collect(context, s)?);
    }
    let files = expand_tree(context, &roots)?;
    let mut hash = Sha256::new();
    for s in sources {
        hash.update(s.as_bytes());
        hash.update([0]);
    }
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    for rel in &files {
        let abs = context.join(rel);
        let meta = fs::symlink_metadata(&abs).map_err(io_err("stat", &abs))?;
        hash.update(rel.as_os_str().as_encoded_bytes());
        hash.update(format!("\0{:o}\0", meta.mode()).as_bytes());
        if meta.is_file() {
            let mut f = fs::File::open(&abs).map_err(io_err("opening", &abs))?;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = f.read(&mut buf).map_err(io_err("reading", &abs))?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
            }
        } else if meta.file_type().is_symlink() {
            let target = fs::read_link(&abs).map_err(io_err("readlink", &abs))?;
            hash.update(target.as_os_str().as_encoded_bytes());
        }
        tar.append_path_with_name(&abs, rel)
            .map_err(io_err("archiving", &abs))?;
    }
    let gz = tar.into_inner().map_err(io_err("archiving", context))?;
    let tar_gz = gz.finish().map_err(io_err("compressing", context))?;
    Ok(Archive {
        hash: hex::encode(hash.finalize()),
        tar_gz,
    })
}

/// Unpacks an uploaded tar.gz (or plain tar) into `dest`, which must exist. Entries that would
/// land outside `dest` are refused by the tar crate; ownership is not restored (everything
/// belongs to host root, which sandboxes see as their root).
pub fn unpack(archive: &Path, dest: &Path) -> Result<(), CopyError> {
    let mut file = fs::File::open(archive).map_err(io_err("opening", archive))?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).map_err(io_err("reading", archive))?;
    let file = fs::File::open(archive).map_err(io_err("opening", archive))?;
    let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut tar = tar::Archive::new(reader);
    tar.set_preserve_permissions(true);
    tar.set_preserve_ownerships(false);
    tar.set_unpack_xattrs(false);
    tar.set_overwrite(true);
    tar.unpack(dest).map_err(io_err("unpacking into", dest))
}

/// Owner of copied files: numeric or names resolved with the template's `/etc/passwd` and
/// `/etc/group` (read inside the sandbox, where `/` is the template).
fn resolve_owner(spec: &str, etc: &Path) -> Result<(u32, u32), CopyError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let passwd = fs::read_to_string(etc.join("passwd")).unwrap_or_default();
    let groups = fs::read_to_string(etc.join("group")).unwrap_or_default();
    let lookup = |db: &str, name: &str, field: usize| -> Option<u32> {
        db.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name)).then(|| f.get(field)?.parse().ok())?
        })
    };
    let uid = match user.parse::<u32>() {
        Ok(n) => n,
        Err(_) => lookup(&passwd, user, 2).ok_or_else(|| {
            CopyError::Invalid(format!("--chown: no user '{user}' in the template"))
        })?,
    };
    let gid = match group {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup(&groups, g, 2).ok_or_else(|| {
                CopyError::Invalid(format!("--chown: no group '{g}' in the template"))
            })?,
        },
        // Docker: the user's primary group, or the same number.
        None => lookup(&passwd, user, 3).unwrap_or(uid),
    };
    Ok((uid, gid))
}

/// `--chmod` value: octal digits.
pub fn parse_mode(s: &str) -> Result<u32, CopyError> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| CopyError::Invalid(format!("--chmod '{s}' is not an octal mode")))
}

/// What one `copy-in` does.
#[derive(Debug, Clone)]
pub struct CopyIn {
    /// The staging directory (the unpacked context subset).
    pub staged: PathBuf,
    /// Source patterns, relative to the context.
    pub sources: Vec<String>,
    /// Absolute destination (already resolved against the working directory).
    pub dest: String,
    pub chown: Option<String>,
    pub chmod: Option<String>,
}

/// Copies the staged sources to the destination with Docker's rules: a directory's contents
/// are copied (not the directory itself); the destination is a directory when it ends with
/// `/` or there are several sources; missing directories are created (new ones get the
/// `--chown` owner below the destination, root above it). Runs inside the build sandbox.
pub fn apply(req: &CopyIn) -> Result<(), CopyError> {
    apply_in(Path::new("/"), req)
}

fn apply_in(root: &Path, req: &CopyIn) -> Result<(), CopyError> {
    let owner = match &req.chown {
        Some(spec) => resolve_owner(spec, &root.join("etc"))?,
        None => (0, 0),
    };
    let mode = req.chmod.as_deref().map(parse_mode).transpose()?;
    let mut matches = Vec::new();
    for s in &req.sources {
        let rel = relative_source(s)?;
        matches.extend(matches_in(&req.staged, &rel, s)?);
    }
    let dest_rel = relative_source(&req.dest)?;
    let dest = root.join(&dest_rel);
    let into_dir = req.dest.ends_with('/')
        || matches.len() > 1
        || fs::metadata(&dest).is_ok_and(|m| m.is_dir())
        || matches
            .first()
            .is_some_and(|m| fs::symlink_metadata(req.staged.join(m)).is_ok_and(|m| m.is_dir()));
    let ctx = Ctx { owner, mode };
    if into_dir {
        ctx.mkdirs(&dest)?;
    } else if let Some(parent) = dest.parent() {
        make_parents(parent)?;
    }
    for m in &matches {
        let src = req.staged.join(m);
        let meta = fs::symlink_metadata(&src).map_err(io_err("stat", &src))?;
        if meta.is_dir() {
            ctx.copy_dir_contents(&src, &dest)?;
        } else if into_dir {
            let name = m
                .file_name()
                .ok_or_else(|| CopyError::Invalid(format!("bad source {}", m.display())))?;
            ctx.copy_entry(&src, &dest.join(name))?;
        } else {
            ctx.copy_entry(&src, &dest)?;
        }
    }
    Ok(())
}

/// Creates missing parents as root, 0755 (Docker's rule above the destination).
fn make_parents(dir: &Path) -> Result<(), CopyError> {
    fs::create_dir_all(dir).map_err(io_err("creating", dir))
}

struct Ctx {
    owner: (u32, u32),
    mode: Option<u32>,
}

impl Ctx {
    /// Creates `dir` and missing parents; the ones created get the owner.
    fn mkdirs(&self, dir: &Path) -> Result<(), CopyError> {
        if fs::metadata(dir).is_ok_and(|m| m.is_dir()) {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            self.mkdirs(parent)?;
        }
        match fs::create_dir(dir) {
            Ok(()) => self.own(dir, 0o755, true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(io_err("creating", dir)(e)),
        }
    }

    fn own(&self, path: &Path, mode: u32, is_dir: bool) -> Result<(), CopyError> {
        std::os::unix::fs::lchown(path, Some(self.owner.0), Some(self.owner.1))
            .map_err(io_err("chown", path))?;
        let mode = match self.mode {
            Some(m) if !is_dir => m,
            Some(m) => m | ((m & 0o444) >> 2), // directories stay searchable where readable
            None => mode,
        };
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", path))
    }

    fn copy_dir_contents(&self, src: &Path, dest: &Path) -> Result<(), CopyError> {
        self.mkdirs(dest)?;
        let mut names: Vec<_> = fs::read_dir(src)
            .map_err(io_err("reading", src))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(io_err("reading", src))?;
        names.sort();
        for name in names {
            self.copy_entry(&src.join(&name), &dest.join(&name))?;
        }
        Ok(())
    }

    fn copy_entry(&self, src: &Path, dest: &Path) -> Result<(), CopyError> {
        let meta = fs::symlink_metadata(src).map_err(io_err("stat", src))?;
        let existing = fs::symlink_metadata(dest).ok();
        if meta.is_dir() {
            if existing.as_ref().is_some_and(|e| !e.is_dir()) {
                fs::remove_file(dest).map_err(io_err("replacing", dest))?;
            }
            if fs::symlink_metadata(dest).is_err() {
                fs::create_dir(dest).map_err(io_err("creating", dest))?;
                self.own(dest, meta.mode() & 0o7777, true)?;
            }
            return self.copy_dir_contents(src, dest);
        }
        if let Some(e) = existing {
            if e.is_dir() {
                return Err(CopyError::Invalid(format!(
                    "cannot copy file {} over directory {}",
                    src.display(),
                    dest.display()
                )));
            }
            fs::remove_file(dest).map_err(io_err("replacing", dest))?;
        }
        if meta.file_type().is_symlink() {
            let target = fs::read_link(src).map_err(io_err("readlink", src))?;
            symlink(&target, dest).map_err(io_err("symlink", dest))?;
            return std::os::unix::fs::lchown(dest, Some(self.owner.0), Some(self.owner.1))
                .map_err(io_err("chown", dest));
        }
        if !meta.is_file() {
            return Err(CopyError::Invalid(format!(
                "{} is not a regular file, directory or symlink",
                src.display()
            )));
        }
        let mut from = fs::File::open(src).map_err(io_err("opening", src))?;
        let mut to = fs::File::create(dest).map_err(io_err("creating", dest))?;
        io::copy(&mut from, &mut to).map_err(io_err("writing", dest))?;
        to.flush().map_err(io_err("writing", dest))?;
        self.own(dest, meta.mode() & 0o7777, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path, files: &[(&str, &str)]) {
        for (p, content) in files {
            let path = root.join(p);
            fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs::write(path, content).expect("write");
        }
    }

    #[test]
    fn sources_stay_in_the_context() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = dir.path().join("ctx");
        tree(
            &ctx,
            &[("a.txt", "a"), ("sub/b.py", "b"), ("sub/c.py", "c")],
        );
        fs::write(dir.path().join("secret"), "s").expect("write");
        symlink(dir.path(), ctx.join("up")).expect("symlink");
        assert!(matches!(
            collect(&ctx, "../secret"),
            Err(CopyError::OutsideContext(_))
        ));
        assert!(matches!(
            collect(&ctx, "up/secret"),
            Err(CopyError::OutsideContext(_))
        ));
        assert!(matches!(
            collect(&ctx, "missing"),
            Err(CopyError::NotFound(_))
        ));
        assert_eq!(
            collect(&ctx, "sub/*.py").expect("glob"),
            vec![PathBuf::from("sub/b.py"), PathBuf::from("sub/c.py")]
        );
        assert_eq!(
            collect(&ctx, "/a.txt").expect("abs"),
            vec![PathBuf::from("a.txt")]
        );
    }

    #[test]
    fn archive_hash_follows_content_and_copy_follows_docker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = dir.path().join("ctx");
        tree(
            &ctx,
            &[
                ("app/main.py", "print(1)"),
                ("app/lib/x.py", "x"),
                ("run.sh", "#!/bin/sh"),
            ],
        );
        fs::set_permissions(ctx.join("run.sh"), fs::Permissions::from_mode(0o755)).expect("chmod");
        let srcs = vec!["app".to_owned(), "run.sh".to_owned()];
        let a = archive(&ctx, &srcs).expect("archive");
        assert_eq!(a.hash, archive(&ctx, &srcs).expect("archive").hash);
        fs::write(ctx.join("app/lib/x.py"), "y").expect("write");
        let b = archive(&ctx, &srcs).expect("archive");
        assert_ne!(a.hash, b.hash, "content change, new hash");

        let tgz = dir.path().join("up.tar.gz");
        fs::write(&tgz, &b.tar_gz).expect("write");
        let staged = dir.path().join("staged");
        fs::create_dir(&staged).expect("mkdir");
        unpack(&tgz, &staged).expect("unpack");

        let root = dir.path().join("root");
        tree(
            &root,
            &[
                (
                    "etc/passwd",
                    "root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n",
                ),
                ("etc/group", "user:x:1000:\n"),
            ],
        );
        apply_in(
            &root,
            &CopyIn {
                staged: staged.clone(),
                sources: srcs.clone(),
                dest: "/opt/app/".into(),
                chown: Some("user".into()),
                chmod: None,
            },
        )
        .expect("copy");
        assert_eq!(
            fs::read_to_string(root.join("opt/app/main.py")).expect("read"),
            "print(1)"
        );
        assert_eq!(
            fs::read_to_string(root.join("opt/app/lib/x.py")).expect("read"),
            "y"
        );
        let run = fs::metadata(root.join("opt/app/run.sh")).expect("stat");
        assert_eq!(run.mode() & 0o777, 0o755);
        assert_eq!((run.uid(), run.gid()), (1000, 1000));
        assert_eq!(fs::metadata(root.join("opt")).expect("stat").uid(), 1000);

        apply_in(
            &root,
            &CopyIn {
                staged,
                sources: vec!["run.sh".into()],
                dest: "/usr/local/bin/start".into(),
                chown: Some("0:0".into()),
                chmod: Some("700".into()),
            },
        )
        .expect("copy file");
        let start = fs::metadata(root.join("usr/local/bin/start")).expect("stat");
        assert_eq!(start.mode() & 0o777, 0o700);
        assert_eq!(start.uid(), 0);
        assert!(parse_mode("9").is_err());
    }
}
