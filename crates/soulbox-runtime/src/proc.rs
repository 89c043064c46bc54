//! Identity and liveness of host processes: a pid plus its start time names one process for
//! good, and a pidfd holds on to it without any pid-reuse race.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::process::{
    Pid, PidfdFlags, Signal, WaitId, WaitIdOptions, pidfd_open, pidfd_send_signal, waitid,
};

/// A positive pid, or `None` (0 and negatives name process groups or everything to kill(2);
/// rustix also refuses them).
pub(crate) fn pid(raw: i32) -> Option<Pid> {
    if raw > 0 { Pid::from_raw(raw) } else { None }
}

/// What `/proc/<pid>/stat` says about a process.
pub(crate) struct Stat {
    /// One of `R S D Z T t X I …`.
    pub(crate) state: char,
    /// Clock ticks after boot at which the process started.
    pub(crate) start_time: u64,
}

impl Stat {
    /// Zombies and dead tasks still have a stat file but run nothing.
    pub(crate) fn is_alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

pub(crate) fn stat(pid: i32) -> io::Result<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| io::Error::other(format!("unparsable /proc/{pid}/stat")))
}

/// The command name (field 2) may contain spaces and parentheses, so fields are counted from
/// the last `)`: field 3 is the state and field 22 the start time.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(Stat { state, start_time })
}

/// A pidfd for `pid`, but only if that pid is still the process that started at `start_time`
/// (possibly a zombie: see [`Stat::is_alive`]). Checking after opening makes the answer exact:
/// the pidfd pins one process.
pub(crate) fn pidfd_if_same(pid: i32, start_time: u64) -> Option<(OwnedFd, Stat)> {
    let fd = pidfd_open(self::pid(pid)?, PidfdFlags::empty()).ok()?;
    let st = stat(pid).ok()?;
    (st.start_time == start_time).then_some((fd, st))
}

pub(crate) fn kill(pidfd: BorrowedFd<'_>) {
    // ESRCH: already gone, which is what we want.
    let _ = pidfd_send_signal(pidfd, Signal::KILL);
}

/// Waits until the process exits (its pidfd turns readable); `false` on timeout.
pub(crate) fn wait_exit(pidfd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    let timeout = timeout.map(|t| Timespec {
        tv_sec: t.as_secs() as i64,
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
    loop {
        match poll(&mut fds, timeout.as_ref()) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Collects the exit status if the process is our child, so it does not stay a zombie; a no-op
/// (ECHILD) for processes we did not start, which their new parent reaps.
pub(crate) fn reap(pidfd: impl AsFd) {
    let _ = waitid(
        WaitId::PidFd(pidfd.as_fd()),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "4242 (a) b (c)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 100 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0";
        let st = parse_stat(line).expect("parses");
        assert_eq!(st.state, 'S');
        assert_eq!(st.start_time, 987654);
        assert!(parse_stat("12 (x").is_none());
        assert!(parse_stat("12 (x) S 1 2").is_none());
    }

    #[test]
    fn own_process_is_alive_and_stable() {
        let me = std::process::id() as i32;
        let st = stat(me).expect("own stat");
        assert!(st.is_alive());
        assert!(pidfd_if_same(me, st.start_time).is_some_and(|(_, st)| st.is_alive()));
        assert!(pidfd_if_same(me, st.start_time + 1).is_none());
        assert!(pidfd_if_same(0, st.start_time).is_none());
        assert!(pidfd_if_same(-1, st.start_time).is_none());
    }
}
