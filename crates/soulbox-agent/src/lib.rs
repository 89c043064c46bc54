//! The in-sandbox agent (PID 1): envd HTTP + Connect RPC over the host-passed unix socket.
//!
//! One current-thread tokio runtime serves HTTP/1.1 (hyper) on the inherited listener: `/health`,
//! `/files`, `/envs`, the Connect services `process.Process` and `filesystem.Filesystem`, and
//! the host-only `/_soulbox/init` and `/_soulbox/tunnel/<port>` (the gateway's way to the
//! sandbox's TCP ports). The Connect layer is our own (`rpc`), not the `connectrpc`
//! crate: envd's streams have semantics a generic framework fights (`Connect-Timeout-Ms` is a
//! process lifetime, not a request deadline; a client disconnect must not cancel the work;
//! keepalive events; size limits enforced before buffering), and a few hundred lines keep the
//! per-sandbox footprint small.
//!
//! Threat model: the agent runs as sandbox root inside the sandbox, so sandbox code that is
//! root can ptrace it, read its memory or replace it. It therefore holds nothing that is not
//! the sandbox's own (no access tokens: the gateway authenticates), and the host treats all its
//! answers as untrusted. What it must not do is let one *client* request hurt the sandbox's
//! availability: bodies are size-limited before they are buffered, files are streamed, FIFOs
//! and devices are never opened for reading or writing through `/files`, and nothing on the
//! request path panics.

mod files;
mod fs;
mod http;
mod process;
mod pty;
mod reaper;
mod rpc;
mod server;
mod statfs;
mod tunnel;
mod users;
mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

pub use server::Listener;

/// How the agent was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of a sandbox, serving the host-passed socket: writes `/run/e2b/*` on init.
    Sandbox,
    /// Development server on TCP outside any sandbox: touches no system files.
    Development,
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the agent until the listener fails. Builds its own current-thread runtime.
///
/// `statfs` is the seccomp user-notification listener the runtime passes with the sandbox's
/// filter: the agent answers `statfs`/`fstatfs` on the root from the disk quota (see
/// `statfs.rs`). It is served before anything else, since a notified call waits for it.
pub fn run(
    listener: Listener,
    mode: Mode,
    statfs: Option<std::os::fd::OwnedFd>,
) -> Result<(), AgentError> {
    if let Some(fd) = statfs {
        statfs::start(fd)?;
    }
    if mode == Mode::Development {
        // Outside a sandbox we are not PID 1: become the subreaper of our descendants so
        // orphans are reaped here, exactly as they would be inside a sandbox.
        nix::sys::prctl::set_child_subreaper(true).map_err(std::io::Error::from)?;
    }
    cloexec_inherited_fds();
    // glibc gives every thread that allocates its own arena; transfer threads come and go, and
    // their arenas would keep freed memory. One shared arena keeps the idle footprint small.
    // SAFETY: mallopt only changes allocator tuning and takes glibc's own locks.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    reaper::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        // File I/O runs on blocking threads (one per transfer in flight); idle ones exit.
        .max_blocking_threads(128)
        .thread_stack_size(256 * 1024)
        .build()?;
    rt.block_on(server::serve(listener, Arc::new(Agent::new(mode))))?;
    Ok(())
}

/// Marks every descriptor above stderr close-on-exec, so nothing the agent inherited (the
/// listening socket, anything the runtime or a parent left open) reaches sandbox processes.
fn cloexec_inherited_fds() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets a flag on descriptors; it closes
    // nothing and touches no memory.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc == 0 {
        return;
    }
    // Kernels before 5.11: walk /proc/self/fd.
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for fd in dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        if fd > 2 {
            // SAFETY: F_SETFD only changes the descriptor's flags; a stale number fails harmlessly.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
    }
}

/// Shared state of one agent.
pub(crate) struct Agent {
    pub mode: Mode,
    pub users: users::UserDb,
    pub config: RwLock<Config>,
    pub processes: process::Table,
    pub watchers: watch::Watchers,
    /// Whether we may switch to other users (effective uid 0).
    pub privileged: bool,
    pub our_uid: u32,
    /// `PATH` handed to processes.
    pub path_env: String,
}

/// What `/_soulbox/init` configures.
#[derive(Debug, Clone, Default)]
pub(crate) struct Config {
    pub env_vars: BTreeMap<String, String>,
    pub default_user: Option<String>,
    pub default_workdir: Option<PathBuf>,
}

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Agent {
    fn new(mode: Mode) -> Agent {
        let our_uid = nix::unistd::geteuid().as_raw();
        let privileged = our_uid == 0;
        if !privileged {
            tracing::warn!(
                uid = our_uid,
                "agent is not running as root: processes and files are served only as uid {our_uid}"
            );
        }
        let mut env_vars = BTreeMap::new();
        env_vars.insert("E2B_SANDBOX".to_string(), "true".to_string());
        Agent {
            mode,
            users: users::UserDb::default(),
            config: RwLock::new(Config {
                env_vars,
                ..Config::default()
            }),
            processes: process::Table::default(),
            watchers: watch::Watchers::default(),
            privileged,
            our_uid,
            path_env: std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_string()),
        }
    }

    pub fn config(&self) -> Config {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
