//! `soulbox serve`: wires store, runtime, templates, API and gateway together.

use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Where state lives: database, templates, per-sandbox directories.
    #[arg(long, default_value = "/var/lib/soulbox")]
    pub data_dir: PathBuf,
    /// Control-plane listener (E2B_API_URL).
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub api_addr: SocketAddr,
    /// Sandbox-traffic listener (E2B_SANDBOX_URL).
    #[arg(long, default_value = "127.0.0.1:3001")]
    pub sandbox_addr: SocketAddr,
    /// Domain for host-based routing (`<port>-<id>.<domain>`).
    #[arg(long)]
    pub domain: Option<String>,
}

pub fn run(_args: ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("soulbox serve is not wired yet")
}
