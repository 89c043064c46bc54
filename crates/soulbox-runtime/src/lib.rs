//! Linux sandboxes: namespaces, user namespace mapping, overlay root, cgroups v1/v2, spawn/kill/adopt.
//!
//! A sandbox is one process tree: its PID 1 (the agent) runs in fresh pid, mount, uts, ipc, net
//! and cgroup namespaces, inside a user namespace that maps sandbox uid/gid 0..65536 onto an
//! unprivileged host range that no other live sandbox uses. The mount, net, uts and ipc
//! namespaces are created by host root *before* the process joins its user namespace, so they
//! are owned by the host user namespace: sandbox root holds no capability over them and cannot
//! mount, change the hostname or reconfigure the network.
//!
//! The root filesystem is an overlay: the template layers (read-only, exposed through idmapped
//! mounts so files owned by host 0/1000 appear as sandbox 0/1000) below a per-sandbox upper
//! directory. The whole tree (overlay, `/dev`, the agent binary) is assembled as a *detached*
//! mount tree by the host and only attached inside the sandbox's private mount namespace, so no
//! sandbox mount ever exists in the host's namespace and a failed create leaves none behind.
//!
//! See `ARCHITECTURE.md` ("Runtime") for the contract and the module docs for each mechanism.

mod error;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use error::RuntimeError;

/// Where the runtime keeps its state and what it runs inside every sandbox.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// `$DATA/sandboxes`: one host-only (0700) directory per sandbox with `upper/`, `work/` and
    /// `agent.sock`. Created if missing.
    pub state_dir: PathBuf,
    /// Host path of the `soulbox` binary; bind-mounted read-only at `/.soulbox/bin/soulbox`
    /// inside every sandbox and run there as `soulbox agent --fd 3`.
    pub agent_binary: PathBuf,
    /// Name of the parent cgroup (`soulbox`) under the root of every cgroup hierarchy used.
    pub cgroup_name: String,
}

/// Resource limits of one sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU quota in whole CPUs (quota = `cpu_count` × period).
    pub cpu_count: u32,
    /// Memory limit in MiB (no swap on top); the kernel OOM-kills inside the sandbox only.
    pub memory_mb: u64,
    /// Maximum number of tasks (processes + threads) in the sandbox.
    pub pids_max: u64,
    /// Size limit of the sandbox's writable layer in MiB. Not enforced yet (issue 4).
    pub disk_mb: u64,
}

impl Default for Limits {
    /// E2B's defaults: 2 vCPU, 512 MiB.
    fn default() -> Self {
        Limits {
            cpu_count: 2,
            memory_mb: 512,
            pids_max: 4096,
            disk_mb: 10 * 1024,
        }
    }
}

/// What to create.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// 20 characters of `[a-z0-9]`; also the hostname.
    pub id: String,
    /// Read-only root filesystem layers (host directories), lowest first.
    pub layers: Vec<PathBuf>,
    pub limits: Limits,
}

/// Everything needed to find a running sandbox again; persisted by core so that a restarted
/// server can re-adopt it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxHandle {
    pub id: String,
    /// Host pid of the sandbox's PID 1 (the agent).
    pub pid: i32,
    /// `starttime` of `/proc/<pid>/stat`: guards against pid reuse.
    pub start_time: u64,
    /// Host uid/gid that sandbox uid/gid 0 maps to (65536 ids).
    pub uid_base: u32,
    /// Host path of the agent's listening unix socket.
    pub socket_path: PathBuf,
}

/// Makes, kills and re-adopts sandboxes. Cheap to clone; all clones share state.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RuntimeConfig,
}

impl Runtime {
    /// Checks the host (root, cgroup layout, agent binary), creates `state_dir` and the parent
    /// cgroups, and reserves the uid ranges of sandboxes whose state directories still exist.
    pub fn new(cfg: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let _ = Inner { cfg };
        Err(RuntimeError::Unsupported(
            "runtime not implemented yet".into(),
        ))
    }

    /// Creates and starts a sandbox; returns once its PID 1 has exec'd the agent (the agent
    /// may not be accepting yet: connecting to `socket_path` queues until it does).
    /// A failure leaves nothing behind.
    pub async fn create(&self, spec: &SandboxSpec) -> Result<SandboxHandle, RuntimeError> {
        let _ = (&self.inner.cfg, spec);
        Err(RuntimeError::Unsupported(
            "runtime not implemented yet".into(),
        ))
    }

    /// Kills every process of the sandbox, waits until they are gone, and removes its cgroups,
    /// directories and socket, and frees its uid range. Idempotent.
    pub async fn destroy(&self, h: &SandboxHandle) -> Result<(), RuntimeError> {
        let _ = h;
        Err(RuntimeError::Unsupported(
            "runtime not implemented yet".into(),
        ))
    }

    /// After a restart: is the sandbox's PID 1 still the same live process? If so its uid range
    /// is marked as used.
    pub fn adopt(&self, h: &SandboxHandle) -> bool {
        let _ = h;
        false
    }

    /// Resolves when the sandbox's PID 1 is gone (immediately if it already is).
    pub async fn exited(&self, h: &SandboxHandle) {
        let _ = h;
    }

    /// Destroys every sandbox the runtime finds traces of (state directories, cgroups and
    /// their processes) whose id is not in `keep`; returns how many it removed. Meant for
    /// server start, before any `create`.
    pub async fn reap_orphans(&self, keep: &HashSet<String>) -> Result<usize, RuntimeError> {
        let _ = keep;
        Ok(0)
    }
}
