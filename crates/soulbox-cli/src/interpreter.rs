//! `soulbox interpreter`: the code interpreter service (`/execute`, `/contexts`) that the
//! `code-interpreter-v1` template starts inside each sandbox on port 49999.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

#[derive(clap::Args)]
pub struct InterpreterArgs {
    /// Address to serve on.
    #[arg(long, default_value = "0.0.0.0:49999")]
    pub listen: SocketAddr,
    /// Working directory of contexts created without one.
    #[arg(long, default_value = "/home/user")]
    pub cwd: PathBuf,
}

pub fn run(args: InterpreterArgs) -> anyhow::Result<()> {
    crate::init_logging("info,zeromq=warn");
    // Current-thread on purpose: kernels get a parent-death signal, which Linux ties to the
    // thread that spawned them (see soulbox-interpreter).
    crate::async_runtime(false)?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        tracing::info!(addr = %args.listen, "code interpreter listening");
        let config = soulbox_interpreter::Config {
            default_cwd: args.cwd,
        };
        soulbox_interpreter::serve(listener, config, shutdown_signal())
            .await
            .context("code interpreter")
    })
}

/// SIGTERM or SIGINT; if the handlers cannot be installed, run until killed.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutting down; killing kernels");
        }
        _ => std::future::pending().await,
    }
}
