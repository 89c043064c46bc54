//! `soulbox agent`: the envd-compatible agent, PID 1 inside every sandbox.

use std::net::SocketAddr;

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Inherited listening unix socket (how the runtime starts the agent).
    #[arg(long, conflicts_with = "listen")]
    pub fd: Option<i32>,
    /// Listen on TCP instead, outside any sandbox (development).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
}

pub fn run(_args: AgentArgs) -> anyhow::Result<()> {
    anyhow::bail!("soulbox agent is not wired yet")
}
