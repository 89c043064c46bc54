//! A real manager (SQLite store, runtime) with no sandboxes, and gateways serving it.
#![allow(dead_code)] // each test binary uses a different part

use soulbox_core::{Manager, ManagerConfig};
use soulbox_gateway::{Gateway, GatewayConfig};
use soulbox_runtime::{Runtime, RuntimeConfig};
use soulbox_store::Store;

pub struct Env {
    pub manager: Manager,
    pub dir: tempfile::TempDir,
}

/// A manager on a fresh data dir. `cgroup` names a parent cgroup no sandbox is ever created
/// under, so tests running in parallel cannot clash.
pub async fn env(cgroup: &str) -> Env {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("soulbox.db"))
        .await
        .expect("store");
    let runtime = Runtime::new(RuntimeConfig {
        state_dir: dir.path().join("sandboxes"),
        agent_binary: std::env::current_exe().expect("test binary"),
        cgroup_name: cgroup.into(),
    })
    .expect("runtime (needs root)");
    let manager = Manager::start(ManagerConfig::default(), store, runtime)
        .await
        .expect("manager");
    Env { manager, dir }
}

/// Serves plain HTTP on an ephemeral port; returns `http://127.0.0.1:<port>`.
pub async fn serve_plain(gateway: Gateway) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { gateway.serve(listener, std::future::pending()).await });
    url
}

/// A gateway with `config` on `env`'s manager.
pub fn gateway(env: &Env, config: GatewayConfig) -> Gateway {
    Gateway::new(env.manager.clone(), config)
}
