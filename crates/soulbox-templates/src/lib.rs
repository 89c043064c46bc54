//! Template builds: Debian bootstraps (`FROM debian:*`), the Dockerfile subset, the layer
//! store, the shipped templates, and the legacy layout below.
//!
//! Legacy layout (data dirs made before the layer store, and the test harness's shared base):
//! a template is a directory `<root>/<name>/` whose `rootfs/` is a read-only lower layer for
//! sandboxes, registered by path. Builds happen in `<root>/.build-<name>-<pid>/` and are renamed into place, so a
//! template directory either is complete or does not exist. Leftovers of interrupted builds are
//! unmounted and removed on the next build.
//!
//! What sandboxed code can do with this: a template rootfs is only ever a read-only overlay lower
//! layer, so writes inside a sandbox land in its own upper directory, never here.

#![forbid(unsafe_code)]

pub mod copy;
pub mod dockerfile;
pub mod layers;
pub mod progress;
pub mod shipped;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use indicatif::ProgressBar;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// Name of the default template.
pub const BASE: &str = "base";

/// Debian suite the base template is built from.
pub const BASE_SUITE: &str = "bookworm";

/// Packages on top of `minbase` in the legacy base build; the same as `templates/base/Dockerfile`
/// installs (a test keeps them in step).
pub const BASE_PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "procps",
    "python3",
    "python3-pip",
    "git",
    "curl",
    "sudo",
    "ca-certificates",
];

/// Defaults a sandbox of the base template gets (E2B's base template reports the same).
pub const BASE_CPU_COUNT: u32 = 2;
pub const BASE_MEMORY_MB: u64 = 512;
pub const BASE_DISK_MB: u64 = 10240;
/// The unprivileged user commands run as by default, and its home.
pub const DEFAULT_USER: &str = "user";
pub const DEFAULT_WORKDIR: &str = "/home/user";

/// Lines of mmdebstrap's output kept for the error message of a failed build.
const ERROR_TAIL_LINES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error(
        "mmdebstrap is not installed; install it with `apt-get install -y mmdebstrap` \
         (the README's install step does this)"
    )]
    MmdebstrapMissing,
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mmdebstrap failed ({status}); last output:\n{tail}")]
    BuildFailed { status: String, tail: String },
    #[error("unmounting leftover {path}: {source}")]
    Unmount { path: PathBuf, source: nix::Error },
}

/// The template directory tree (`$DATA/templates`).
#[derive(Debug, Clone)]
pub struct Templates {
    root: PathBuf,
}

impl Templates {
    pub fn new(root: impl Into<PathBuf>) -> Templates {
        Templates { root: root.into() }
    }

    /// Host path of a template's root filesystem (the read-only lower layer).
    pub fn rootfs(&self, name: &str) -> PathBuf {
        self.root.join(name).join("rootfs")
    }

    /// Whether the template has been built.
    pub fn is_built(&self, name: &str) -> bool {
        self.rootfs(name).is_dir()
    }

    /// Builds the base template unless it exists; returns its rootfs.
    pub async fn ensure_base(&self, bar: &ProgressBar) -> Result<PathBuf, TemplateError> {
        if self.is_built(BASE) {
            return Ok(self.rootfs(BASE));
        }
        self.build_base(bar).await
    }

    /// Builds the base template with mmdebstrap (Debian bookworm minbase + [`BASE_PACKAGES`],
    /// user `user` uid 1000 with passwordless sudo), reporting progress on `bar`.
    pub async fn build_base(&self, bar: &ProgressBar) -> Result<PathBuf, TemplateError> {
        let mmdebstrap = find_in_path("mmdebstrap").ok_or(TemplateError::MmdebstrapMissing)?;
        std::fs::create_dir_all(&self.root).map_err(|source| TemplateError::Io {
            what: "creating",
            path: self.root.clone(),
            source,
        })?;
        self.remove_stale_builds(BASE)?;

        let build_dir = self
            .root
            .join(format!(".build-{BASE}-{}", std::process::id()));
        let target = build_dir.join("rootfs");
        std::fs::create_dir_all(&build_dir).map_err(|source| TemplateError::Io {
            what: "creating",
            path: build_dir.clone(),
            source,
        })?;

        let extra = [
            format!("--include={}", BASE_PACKAGES.join(",")),
            format!(
                "--customize-hook=chroot \"$1\" useradd --create-home --uid 1000 --user-group \
                 --shell /bin/bash {DEFAULT_USER}"
            ),
            format!(
                "--customize-hook=printf '%s ALL=(ALL:ALL) NOPASSWD: ALL\\n' {DEFAULT_USER} \
                 > \"$1/etc/sudoers.d/{DEFAULT_USER}\" && chmod 0440 \"$1/etc/sudoers.d/{DEFAULT_USER}\""
            ),
        ];
        let result = run_mmdebstrap(&mmdebstrap, &extra, BASE_SUITE, &target, bar).await;
        if let Err(e) = result {
            // Best effort: the next build cleans up whatever this leaves.
            if let Err(clean) = remove_build_dir(&build_dir) {
                tracing::warn!(error = %clean, "removing failed build");
            }
            return Err(e);
        }

        let final_dir = self.root.join(BASE);
        std::fs::rename(&build_dir, &final_dir).map_err(|source| TemplateError::Io {
            what: "moving the finished build to",
            path: final_dir.clone(),
            source,
        })?;
        Ok(final_dir.join("rootfs"))
    }

    /// Removes `.build-<name>-*` directories of interrupted builds, unmounting anything
    /// mmdebstrap left mounted inside them first (so the removal never reaches host files).
    fn remove_stale_builds(&self, name: &str) -> Result<(), TemplateError> {
        let prefix = format!(".build-{name}-");
        let entries = std::fs::read_dir(&self.root).map_err(|source| TemplateError::Io {
            what: "reading",
            path: self.root.clone(),
            source,
        })?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                tracing::info!(path = %entry.path().display(), "removing an interrupted template build");
                remove_build_dir(&entry.path())?;
            }
        }
        Ok(())
    }
}

/// Bootstraps Debian `suite` (`minbase` variant: apt, dpkg, coreutils, bash) into `target`, a
/// directory that must not exist yet, for `FROM debian:<suite>`. Progress goes to `bar`.
pub async fn bootstrap_debian(
    suite: &str,
    target: &Path,
    bar: &ProgressBar,
) -> Result<(), TemplateError> {
    let mmdebstrap = find_in_path("mmdebstrap").ok_or(TemplateError::MmdebstrapMissing)?;
    run_mmdebstrap(&mmdebstrap, &[], suite, target, bar).await
}

async fn run_mmdebstrap(
    mmdebstrap: &Path,
    extra: &[String],
    suite: &str,
    target: &Path,
    bar: &ProgressBar,
) -> Result<(), TemplateError> {
    bar.set_length(progress::TOTAL);
    bar.set_position(0);
    bar.set_message("starting mmdebstrap");
    let mut child = Command::new(mmdebstrap)
        .arg("--verbose")
        .arg("--mode=root")
        .arg("--format=directory")
        .arg("--variant=minbase")
        .args(extra)
        .arg(suite)
        .arg(target)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| TemplateError::Io {
            what: "running",
            path: mmdebstrap.to_owned(),
            source,
        })?;

    let mut tail: VecDeque<String> = VecDeque::with_capacity(ERROR_TAIL_LINES);
    let mut tracker = progress::Tracker::default();
    if let Some(stderr) = child.stderr.take() {
        let mut lines = BufReader::new(stderr).lines();
        let mut last_message = "";
        loop {
            let line = match lines.next_line().await {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "reading mmdebstrap output");
                    break;
                }
            };
            if let Some(update) = tracker.feed(&line) {
                bar.set_position(update.position);
                if update.message != last_message {
                    last_message = update.message;
                    bar.set_message(update.message);
                }
            }
            if tail.len() == ERROR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
    let status = child.wait().await.map_err(|source| TemplateError::Io {
        what: "waiting for",
        path: mmdebstrap.to_owned(),
        source,
    })?;
    if !status.success() {
        return Err(TemplateError::BuildFailed {
            status: status.to_string(),
            tail: Vec::from(tail).join("\n"),
        });
    }
    bar.set_position(progress::TOTAL);
    Ok(())
}

/// Unmounts everything below `dir` (deepest first), then removes it.
fn remove_build_dir(dir: &Path) -> Result<(), TemplateError> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| TemplateError::Io {
            what: "reading",
            path: PathBuf::from("/proc/self/mountinfo"),
            source,
        })?;
    let mut mounts: Vec<PathBuf> = mount_points(&mountinfo)
        .into_iter()
        .filter(|m| m.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in mounts {
        nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|source| TemplateError::Unmount { path: m, source })?;
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(TemplateError::Io {
            what: "removing",
            path: dir.to_owned(),
            source,
        }),
    }
}

/// Mount points (field 5) of a `/proc/<pid>/mountinfo` text, with octal escapes decoded.
fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|escaped| PathBuf::from(unescape_octal(escaped)))
        .collect()
}

/// Decodes the `\040`-style escapes the kernel uses for spaces, tabs, newlines and backslashes.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_unescaped() {
        let info = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 98:0 / /data/.build-base-1/rootfs/proc rw - proc proc rw";
        assert_eq!(
            mount_points(info),
            vec![
                PathBuf::from("/mnt/with space"),
                PathBuf::from("/data/.build-base-1/rootfs/proc")
            ]
        );
    }

    #[test]
    fn stale_build_dirs_are_removed_but_others_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = Templates::new(dir.path());
        let stale = dir.path().join(".build-base-123/rootfs/etc");
        std::fs::create_dir_all(&stale).expect("mkdir");
        let other = dir.path().join("other/rootfs");
        std::fs::create_dir_all(&other).expect("mkdir");
        t.remove_stale_builds(BASE).expect("clean");
        assert!(!dir.path().join(".build-base-123").exists());
        assert!(other.exists());
        assert!(t.is_built("other"));
        assert!(!t.is_built(BASE));
    }
}
