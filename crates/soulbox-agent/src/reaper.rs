//! Child reaping for PID 1: one thread waits for every child (our own processes and orphans
//! re-parented to us) and hands exit statuses of the children we spawned to their owners.
//!
//! The thread blocks in `waitid(P_ALL, WEXITED | WNOWAIT)`, which reports a zombie without
//! reaping it, then takes the registry lock and reaps that pid. Spawning holds the same lock
//! from `fork` until the pid is registered, so a child that dies at once is never reaped as an
//! orphan before its owner has registered it (and std's own `waitpid` after a failed `exec`,
//! which also runs under the lock, still finds its zombie). `tokio::process` is not used:
//! its reaping would race with this loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;
use tokio::sync::oneshot;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled { signal: i32, core_dumped: bool },
}

struct Registry {
    waiters: Mutex<HashMap<i32, oneshot::Sender<ExitStatus>>>,
    /// Signalled after a spawn, to wake the thread when it had no children to wait for.
    spawned: Condvar,
}

/// Spawns so far, counted under the registry lock: tells the reaper a spawn happened between
/// its `waitid` and its sleep.
static SPAWNS: AtomicU64 = AtomicU64::new(0);

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let reg = Registry {
            waiters: Mutex::new(HashMap::new()),
            spawned: Condvar::new(),
        };
        let spawned = std::thread::Builder::new()
            .name("reaper".into())
            .stack_size(64 * 1024)
            .spawn(reap_loop);
        if let Err(e) = spawned {
            tracing::error!("cannot start the reaper thread: {e}");
        }
        reg
    })
}

fn lock() -> MutexGuard<'static, HashMap<i32, oneshot::Sender<ExitStatus>>> {
    // A poisoned lock only means a panic elsewhere; the map itself is always consistent.
    registry().waiters.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `spawn` (which forks) under the registry lock and registers the child's pid; the
/// receiver resolves with its exit status.
pub fn spawn_registered<T>(
    spawn: impl FnOnce() -> std::io::Result<(T, i32)>,
) -> std::io::Result<(T, oneshot::Receiver<ExitStatus>)> {
    let mut waiters = lock();
    let (value, pid) = spawn()?;
    let (tx, rx) = oneshot::channel();
    waiters.insert(pid, tx);
    SPAWNS.fetch_add(1, Ordering::Relaxed);
    drop(waiters);
    registry().spawned.notify_one();
    Ok((value, rx))
}

/// Starts the reaper (idempotent). Called at agent start so orphans are reaped even before
/// the first spawn.
pub fn start() {
    registry();
}

fn reap_loop() {
    loop {
        let spawns_before = SPAWNS.load(Ordering::Relaxed);
        match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    reap(pid);
                }
            }
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => {
                // No children: sleep until a spawn (or, for processes that entered the
                // namespace from outside and were re-parented to us, the next tick). A spawn
                // since `waitid` has already notified (before we waited): look again at once
                // instead of sleeping through its exit (that cost a command up to a second).
                let waiters = lock();
                if SPAWNS.load(Ordering::Relaxed) != spawns_before {
                    continue;
                }
                let _ = registry()
                    .spawned
                    .wait_timeout(waiters, Duration::from_secs(1));
            }
            Err(e) => {
                tracing::error!("waitid failed: {e}");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

fn reap(pid: Pid) {
    let mut waiters = lock();
    let status = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::Exited(_, code)) => ExitStatus::Exited(code),
        Ok(WaitStatus::Signaled(_, sig, core_dumped)) => ExitStatus::Signaled {
            signal: sig as i32,
            core_dumped,
        },
        // Already reaped (std reaps a child whose exec failed) or not yet exited.
        _ => return,
    };
    if let Some(tx) = waiters.remove(&pid.as_raw()) {
        let _ = tx.send(status);
    }
}

/// Go's wording (`os.ProcessState.String`), which upstream envd reports in end events.
pub fn describe(status: ExitStatus) -> String {
    match status {
        ExitStatus::Exited(code) => format!("exit status {code}"),
        ExitStatus::Signaled {
            signal,
            core_dumped,
        } => {
            let name = match signal {
                libc::SIGHUP => "hangup".to_string(),
                libc::SIGINT => "interrupt".to_string(),
                libc::SIGQUIT => "quit".to_string(),
                libc::SIGILL => "illegal instruction".to_string(),
                libc::SIGTRAP => "trace/breakpoint trap".to_string(),
                libc::SIGABRT => "aborted".to_string(),
                libc::SIGBUS => "bus error".to_string(),
                libc::SIGFPE => "floating point exception".to_string(),
                libc::SIGKILL => "killed".to_string(),
                libc::SIGUSR1 => "user defined signal 1".to_string(),
                libc::SIGSEGV => "segmentation fault".to_string(),
                libc::SIGUSR2 => "user defined signal 2".to_string(),
                libc::SIGPIPE => "broken pipe".to_string(),
                libc::SIGALRM => "alarm clock".to_string(),
                libc::SIGTERM => "terminated".to_string(),
                libc::SIGXCPU => "CPU time limit exceeded".to_string(),
                libc::SIGXFSZ => "file size limit exceeded".to_string(),
                libc::SIGSYS => "bad system call".to_string(),
                n => format!("signal {n}"),
            };
            if core_dumped {
                format!("signal: {name} (core dumped)")
            } else {
                format!("signal: {name}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_like_go() {
        assert_eq!(describe(ExitStatus::Exited(0)), "exit status 0");
        assert_eq!(describe(ExitStatus::Exited(3)), "exit status 3");
        assert_eq!(
            describe(ExitStatus::Signaled {
                signal: libc::SIGKILL,
                core_dumped: false
            }),
            "signal: killed"
        );
        assert_eq!(
            describe(ExitStatus::Signaled {
                signal: libc::SIGSEGV,
                core_dumped: true
            }),
            "signal: segmentation fault (core dumped)"
        );
    }
}
