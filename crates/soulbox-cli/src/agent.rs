//! `soulbox agent`: the envd-compatible agent, PID 1 inside every sandbox.

use std::net::SocketAddr;

use anyhow::Context;

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Inherited listening unix socket (how the runtime starts the agent).
    #[arg(long, conflicts_with = "listen", required_unless_present = "listen")]
    pub fd: Option<i32>,
    /// Inherited seccomp user-notification listener of the sandbox's filter: the agent answers
    /// statfs/fstatfs of the root with the disk quota (how the runtime starts the agent).
    #[arg(long, requires = "fd")]
    pub statfs_fd: Option<i32>,
    /// Listen on TCP instead, outside any sandbox (development: not PID 1, touches no
    /// system files, and runs processes as other users only when started as root).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
}

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    crate::init_logging("info");
    let (listener, mode) = match (args.fd, args.listen) {
        (Some(fd), _) => {
            anyhow::ensure!(
                fd > 2,
                "--fd must name an inherited descriptor above 2, got {fd}"
            );
            // SAFETY: the runtime passes the listening socket as this fd and nothing else in
            // this process owns it; from_inherited_fd checks it really is a socket.
            let l = unsafe { soulbox_agent::Listener::from_inherited_fd(fd) }
                .with_context(|| format!("fd {fd} is not a listening unix socket"))?;
            (l, soulbox_agent::Mode::Sandbox)
        }
        (None, Some(addr)) => {
            if !addr.ip().is_loopback() {
                tracing::warn!(
                    %addr,
                    "the agent has no authentication: anyone who can reach {addr} can run commands as any user here"
                );
            }
            let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            (
                soulbox_agent::Listener::Tcp(l),
                soulbox_agent::Mode::Development,
            )
        }
        (None, None) => anyhow::bail!("one of --fd or --listen is required"),
    };
    let statfs = args.statfs_fd.map(inherited_notify_fd).transpose()?;
    soulbox_agent::run(listener, mode, statfs).context("agent stopped")
}

/// Takes ownership of the inherited seccomp listener `fd`, after checking that it is one.
fn inherited_notify_fd(fd: i32) -> anyhow::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    anyhow::ensure!(
        fd > 2,
        "--statfs-fd must name an inherited descriptor above 2, got {fd}"
    );
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .with_context(|| format!("--statfs-fd {fd} is not open"))?;
    anyhow::ensure!(
        link.as_os_str() == "anon_inode:seccomp notify",
        "--statfs-fd {fd} is not a seccomp listener ({})",
        link.display()
    );
    // SAFETY: the descriptor is open (checked above), the runtime passed it for this purpose
    // and nothing else in this process owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}
