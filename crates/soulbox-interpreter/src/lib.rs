//! The code interpreter that runs inside a sandbox on port 49999: E2B's `/execute` and
//! `/contexts` API (protocol doc §6) served on real Jupyter kernels spoken to over ZeroMQ,
//! without Jupyter Server.
//!
//! Each context is one kernel process (ipykernel for Python; bash, JavaScript, TypeScript or
//! any other language for which a kernelspec is installed). The default Python context is
//! started with the service, and `/health` answers 200 only once it is ready, so a sandbox
//! that passed its ready check never makes the first `run_code` wait for a kernel boot.
//!
//! Must run on a current-thread Tokio runtime: kernels are spawned with a parent-death
//! signal, which Linux ties to the spawning thread (see `kernel.rs`).
//!
//! Everything here runs inside the sandbox as the sandbox user; the code it executes is the
//! sandbox's own, so it grants nothing that the sandbox could not already do. Resource use is
//! bounded by the sandbox's cgroup, not by this service.

mod context;
mod kernel;
mod kernelspec;
mod output;
mod server;
mod snippets;
pub mod wire;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::net::TcpListener;
use tokio::sync::watch;

use context::Registry;
use kernelspec::KernelCatalog;
use server::{AppState, Health};

/// Service settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Working directory of contexts created without `cwd` (E2B: `/home/user`).
    pub default_cwd: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum InterpreterError {
    #[error("cannot create the kernel runtime directory: {0}")]
    RuntimeDir(std::io::Error),
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// A running interpreter service (without its listener).
pub struct Interpreter {
    registry: Arc<Registry>,
    health: watch::Receiver<Health>,
}

impl Interpreter {
    /// Discovers the installed kernels and starts the default contexts in the background:
    /// Python first (it gates `/health`), then JavaScript when a kernel for it exists.
    pub fn start(config: Config) -> Result<Interpreter, InterpreterError> {
        let catalog = KernelCatalog::discover();
        tracing::info!(languages = ?catalog.languages(), "kernels found");
        let registry = Arc::new(
            Registry::new(catalog, config.default_cwd).map_err(InterpreterError::RuntimeDir)?,
        );
        let (health_tx, health) = watch::channel(Health::Starting);
        let defaults = registry.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let health = match defaults.default_for(Some("python")).await {
                Ok(_) => {
                    tracing::info!(elapsed = ?started.elapsed(), "default Python context ready");
                    Health::Ready
                }
                Err(err) => {
                    tracing::error!(%err, "default Python context failed to start");
                    Health::Failed(format!("the default Python context failed to start: {err}"))
                }
            };
            let _ = health_tx.send(health);
            if defaults.supports("javascript")
                && let Err(err) = defaults.default_for(Some("javascript")).await
            {
                tracing::warn!(%err, "default JavaScript context failed to start");
            }
        });
        Ok(Interpreter { registry, health })
    }

    /// The HTTP routes.
    pub fn router(&self) -> axum::Router {
        server::router(AppState {
            registry: self.registry.clone(),
            health: self.health.clone(),
        })
    }

    /// Resolves once the default Python context is up (true) or failed to start (false).
    pub async fn ready(&self) -> bool {
        let mut health = self.health.clone();
        match health.wait_for(|h| *h != Health::Starting).await {
            Ok(h) => *h == Health::Ready,
            Err(_) => false,
        }
    }

    /// Kills every kernel.
    pub async fn shut_down(&self) {
        self.registry.shut_down().await;
    }
}

/// Serves the interpreter on `listener` until `shutdown` resolves, then kills all kernels.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), InterpreterError> {
    use axum::serve::ListenerExt as _;

    let interpreter = Interpreter::start(config)?;
    let listener = listener.tap_io(|tcp| {
        // Small request/response pairs otherwise wait on delayed ACKs.
        let _ = tcp.set_nodelay(true);
    });
    let result = tokio::select! {
        result = axum::serve(listener, interpreter.router()) => result.map_err(InterpreterError::Serve),
        () = shutdown => Ok(()),
    };
    interpreter.shut_down().await;
    result
}

/// Poisoning only means another task panicked mid-update of plain data; the data stays usable.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
