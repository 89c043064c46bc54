//! Shared fixtures: a runtime with its own state dir and cgroup parent, the test agent, and a
//! client for it.

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use soulbox_runtime::{Limits, Runtime, RuntimeConfig, SandboxHandle, SandboxSpec};

/// The Debian rootfs the tests use as the bottom layer (`SOULBOX_TEST_ROOTFS` overrides).
pub fn rootfs() -> PathBuf {
    std::env::var_os("SOULBOX_TEST_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/rootfs-trial/root"))
}

/// The tests need root and a rootfs with python3; without them they say so and pass — except
/// where `SOULBOX_TESTS_REQUIRE_HOST=1` (scripts/test sets it): there a test that cannot run
/// fails, so a CI machine without what they need tests nothing silently.
pub fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("runtime tests need root");
    }
    if !rootfs().join("usr/bin/python3").exists() {
        return skip(&format!("no rootfs with python3 at {}", rootfs().display()));
    }
    true
}

/// Says why a test does not run and returns `false`; panics instead where the host is
/// required to run it (`SOULBOX_TESTS_REQUIRE_HOST=1`).
pub fn skip(why: &str) -> bool {
    if std::env::var_os("SOULBOX_TESTS_REQUIRE_HOST").is_some_and(|v| v == "1") {
        panic!("cannot run here ({why}) and SOULBOX_TESTS_REQUIRE_HOST=1");
    }
    eprintln!("SKIPPED: {why}");
    false
}

pub fn agent_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/agent.py")
}

/// A runtime with a private state dir and cgroup parent, removed on drop.
pub struct Env {
    pub rt: Runtime,
    pub cfg: RuntimeConfig,
    _state: Option<tempfile::TempDir>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fresh 20-character id, unique within this test process and across processes.
pub fn new_id() -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("t{:09}x{:09}", std::process::id(), n)
}

impl Env {
    pub fn new(tag: &str) -> Env {
        Env::with_agent(tag, &agent_py())
    }

    pub fn with_agent(tag: &str, agent: &Path) -> Env {
        let state = tempfile::Builder::new()
            .prefix("sbx-")
            .tempdir()
            .expect("tempdir");
        let mut env = Env::at(tag, agent, &state.path().join("sandboxes"));
        env._state = Some(state);
        env
    }

    /// A runtime on `state_dir`, which the caller cleans up.
    pub fn at(tag: &str, agent: &Path, state_dir: &Path) -> Env {
        Env::at_with_lxcfs(tag, agent, state_dir, None)
    }

    /// A runtime whose sandboxes see the lxcfs mounted on `lxcfs`.
    pub fn with_lxcfs(tag: &str, lxcfs: &Path) -> Env {
        let state = tempfile::Builder::new()
            .prefix("sbx-")
            .tempdir()
            .expect("tempdir");
        let mut env = Env::at_with_lxcfs(
            tag,
            &agent_py(),
            &state.path().join("sandboxes"),
            Some(lxcfs),
        );
        env._state = Some(state);
        env
    }

    fn at_with_lxcfs(tag: &str, agent: &Path, state_dir: &Path, lxcfs: Option<&Path>) -> Env {
        let cfg = RuntimeConfig {
            state_dir: state_dir.to_path_buf(),
            agent_binary: agent.to_path_buf(),
            cgroup_name: format!("soulbox-test-{}-{tag}", std::process::id()),
        };
        let rt = Runtime::with_lxcfs(cfg.clone(), lxcfs).expect("Runtime::new");
        Env {
            rt,
            cfg,
            _state: None,
        }
    }

    pub fn spec(&self, limits: Limits) -> SandboxSpec {
        SandboxSpec {
            id: new_id(),
            layers: vec![rootfs()],
            limits,
            volumes: Vec::new(),
        }
    }

    /// The parent cgroup directories of this runtime (one per hierarchy).
    pub fn cgroup_parents(&self) -> Vec<PathBuf> {
        self.rt
            .cgroup_dirs("x")
            .into_iter()
            .filter_map(|d| d.parent().map(Path::to_path_buf))
            .collect()
    }

    /// Names of sandbox cgroups left under this runtime's parents.
    pub fn leftover_cgroups(&self) -> Vec<PathBuf> {
        self.cgroup_parents()
            .iter()
            .filter_map(|p| std::fs::read_dir(p).ok())
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    }

    /// Sandbox directories left in the state dir.
    pub fn leftover_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.cfg.state_dir)
            .expect("state dir")
            .filter_map(|e| e.ok())
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .collect()
    }
}

impl Drop for Env {
    /// Kills whatever sandboxes of this runtime are left (a failed test leaves some), then
    /// removes its cgroup parents.
    fn drop(&mut self) {
        let rt = self.rt.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(tokio) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = tokio.block_on(rt.reap_orphans(&std::collections::HashSet::new()));
            }
        })
        .join();
        for p in self.cgroup_parents() {
            let _ = std::fs::remove_dir(&p);
        }
    }
}

#[derive(Debug, serde::Deserialize)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` with /bin/sh in the sandbox through the test agent, as sandbox root, or as
/// `uid` (with the same gid).
pub fn exec_as(h: &SandboxHandle, cmd: &str, uid: Option<u32>) -> Out {
    let mut s = UnixStream::connect(&h.socket_path).expect("connect agent socket");
    s.set_read_timeout(Some(Duration::from_secs(90)))
        .expect("timeout");
    let req = serde_json::json!({ "cmd": cmd, "uid": uid });
    s.write_all(format!("{req}\n").as_bytes()).expect("send");
    let mut buf = String::new();
    s.read_to_string(&mut buf).expect("agent reply");
    serde_json::from_str(&buf).unwrap_or_else(|e| panic!("bad reply {buf:?}: {e}"))
}

pub fn exec(h: &SandboxHandle, cmd: &str) -> Out {
    exec_as(h, cmd, None)
}

/// `exec`, asserting success; returns trimmed stdout.
pub fn sh(h: &SandboxHandle, cmd: &str) -> String {
    let out = exec(h, cmd);
    assert_eq!(out.code, 0, "{cmd:?} failed: {out:?}");
    out.stdout.trim().to_owned()
}

/// Every mount anywhere on the host whose options mention `needle` (e.g. an upper dir).
pub fn mounts_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(entry.path().join("mountinfo")) {
            found.extend(
                text.lines()
                    .filter(|l| l.contains(needle))
                    .map(|l| format!("{}: {l}", name.to_string_lossy())),
            );
        }
    }
    found
}

/// Whether host process `pid` still exists (zombies included).
pub fn pid_exists(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// `NS_GET_MNTNS_ID` (Linux ≥ 6.8): a mount namespace's 64-bit id, never reused (unlike the
/// nsfs inode number, which a new namespace may get again right away).
const NS_GET_MNTNS_ID: libc::c_ulong = 0x8008_b705;

fn mnt_ns_id_of(path: &Path) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).ok()?;
    let mut id = 0u64;
    // SAFETY: NS_GET_MNTNS_ID writes one u64 through the pointer.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_MNTNS_ID, &mut id as *mut u64) };
    (rc == 0).then_some(id)
}

/// Mount namespace of a process, to check later that nothing still lives in it.
pub fn mnt_ns(pid: i32) -> u64 {
    mnt_ns_id_of(Path::new(&format!("/proc/{pid}/ns/mnt"))).expect("mount namespace id")
}

/// Whether any process on the host is in mount namespace `ns` (its mounts are alive).
pub fn mnt_ns_in_use(ns: u64) -> bool {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .any(|e| mnt_ns_id_of(&e.path().join("ns/mnt")) == Some(ns))
}
