//! Users and groups from the sandbox's own `/etc/passwd` and `/etc/group`, read per request
//! (sandbox code may add users at any time). Parsed here rather than through NSS so PID 1
//! never loads modules named by the sandbox's `nsswitch.conf`.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// A resolved account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, including the primary one.
    pub groups: Vec<u32>,
    pub home: PathBuf,
    pub shell: String,
}

/// The files are sandbox-controlled: never read more than this of them.
const MAX_DB_BYTES: u64 = 8 << 20;

fn read_db(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(MAX_DB_BYTES).read_to_string(&mut s);
    }
    s
}

/// Where the account databases live (`/etc` inside a sandbox).
#[derive(Debug, Clone)]
pub struct UserDb {
    passwd: PathBuf,
    group: PathBuf,
}

impl Default for UserDb {
    fn default() -> Self {
        UserDb {
            passwd: PathBuf::from("/etc/passwd"),
            group: PathBuf::from("/etc/group"),
        }
    }
}

impl UserDb {
    #[cfg(test)]
    pub fn at(dir: &Path) -> Self {
        UserDb {
            passwd: dir.join("passwd"),
            group: dir.join("group"),
        }
    }

    /// Looks a user up by name.
    pub fn lookup(&self, name: &str) -> Option<User> {
        if name.is_empty() {
            return None;
        }
        let passwd = read_db(&self.passwd);
        let (uid, gid, home, shell) = passwd.lines().find_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 7 || f[0] != name {
                return None;
            }
            Some((
                f[2].parse::<u32>().ok()?,
                f[3].parse::<u32>().ok()?,
                f[5].to_string(),
                f[6].to_string(),
            ))
        })?;
        let mut groups = vec![gid];
        for line in read_db(&self.group).lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() < 4 {
                continue;
            }
            let Ok(g) = f[2].parse::<u32>() else { continue };
            if f[3].split(',').any(|m| m == name) && !groups.contains(&g) {
                groups.push(g);
            }
        }
        Some(User {
            name: name.to_string(),
            uid,
            gid,
            groups,
            home: PathBuf::from(if home.is_empty() { "/" } else { &home }),
            shell,
        })
    }

    /// Name of a uid, or the number when unknown (as `ls` shows it).
    pub fn user_name(&self, uid: u32) -> String {
        name_by_id(&read_db(&self.passwd), uid)
    }

    /// A cache for listing many entries without re-reading the files for each.
    pub fn names(&self) -> Names {
        Names {
            passwd: read_db(&self.passwd),
            group: read_db(&self.group),
        }
    }
}

fn name_by_id(db: &str, id: u32) -> String {
    db.lines()
        .find_map(|line| {
            let mut f = line.split(':');
            let name = f.next()?;
            let _ = f.next()?;
            (f.next()?.parse::<u32>().ok()? == id).then(|| name.to_string())
        })
        .unwrap_or_else(|| id.to_string())
}

/// Both databases read once.
pub struct Names {
    passwd: String,
    group: String,
}

impl Names {
    pub fn user(&self, uid: u32) -> String {
        name_by_id(&self.passwd, uid)
    }
    pub fn group(&self, gid: u32) -> String {
        name_by_id(&self.group, gid)
    }
}

/// Resolves a request path the way envd does: `~` and `~/…` against the user's home, relative
/// paths against the home, empty against `default_dir`; the result is absolute and lexically
/// clean (`..` removed). Symlinks are left to the kernel: the agent runs inside the sandbox,
/// so they can only ever point inside it.
pub fn resolve_path(path: &str, home: &Path, default_dir: &Path) -> PathBuf {
    let joined = if path.is_empty() {
        default_dir.to_path_buf()
    } else if path == "~" {
        home.to_path_buf()
    } else if let Some(rest) = path.strip_prefix("~/") {
        home.join(rest)
    } else if path.starts_with('/') {
        PathBuf::from(path)
    } else {
        home.join(path)
    };
    clean(&joined)
}

/// Lexical cleaning like Go's `filepath.Clean` for absolute paths.
pub fn clean(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_users_and_groups() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/bash\nbroken\nuser:x:1000:1000::/home/user:/bin/bash\nweird:x:abc:1::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("group"),
            "root:x:0:\nsudo:x:27:user,other\nuser:x:1000:\ndocker:x:999:other,user\n",
        )
        .unwrap();
        let db = UserDb::at(dir.path());
        let u = db.lookup("user").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.groups, vec![1000, 27, 999]);
        assert_eq!(u.home, PathBuf::from("/home/user"));
        assert_eq!(db.lookup("root").unwrap().groups, vec![0]);
        assert!(db.lookup("weird").is_none());
        assert!(db.lookup("nobody").is_none());
        assert!(db.lookup("").is_none());
        assert_eq!(db.user_name(1000), "user");
        assert_eq!(db.user_name(4242), "4242");
        assert_eq!(db.names().group(27), "sudo");
    }

    #[test]
    fn resolves_paths_like_envd() {
        let home = Path::new("/home/user");
        let wd = Path::new("/work");
        assert_eq!(
            resolve_path("a.txt", home, wd),
            Path::new("/home/user/a.txt")
        );
        assert_eq!(
            resolve_path("~/x/../y", home, wd),
            Path::new("/home/user/y")
        );
        assert_eq!(resolve_path("~", home, wd), Path::new("/home/user"));
        assert_eq!(resolve_path("", home, wd), Path::new("/work"));
        assert_eq!(resolve_path("/a/./b/../../..", home, wd), Path::new("/"));
        assert_eq!(resolve_path("../../etc", home, wd), Path::new("/etc"));
        assert_eq!(resolve_path("//tmp//x/", home, wd), Path::new("/tmp/x"));
    }
}
