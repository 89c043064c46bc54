//! The server the control-plane tests talk to: a real SQLite file with an API key and a
//! `base` template registered by path, a real runtime, `soulbox_api::serve` on an ephemeral
//! port. No sandbox is ever created (that needs the agent binary; see soulbox-cli's tests).

use std::path::Path;

use soulbox_core::{Manager, ManagerConfig};
use soulbox_runtime::{Runtime, RuntimeConfig};
use soulbox_store::{Store, TemplateRecord, generate_api_key};

pub struct Booted {
    pub url: String,
    pub key: String,
    /// Read by the tests that insert rows directly (not every test binary does).
    #[allow(dead_code)]
    pub store: Store,
    pub dir: tempfile::TempDir,
}

/// Boots a server in a new temporary dir; `cfg` makes its manager's settings from that dir.
/// `cgroup_name` is the runtime's parent cgroup, distinct per test binary.
pub async fn boot(cgroup_name: &str, cfg: impl FnOnce(&Path) -> ManagerConfig) -> Booted {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("soulbox.db"))
        .await
        .expect("store");
    let key = generate_api_key();
    store.add_api_key(&key, "test").await.expect("key");
    store
        .upsert_template(&TemplateRecord {
            name: "base".into(),
            layers: vec![dir.path().join("no-rootfs")],
            cpu_count: 2,
            memory_mb: 512,
            disk_mb: 1024,
            default_user: "user".into(),
            default_workdir: "/home/user".into(),
            created_at: chrono::Utc::now(),
        })
        .await
        .expect("template");
    let runtime = Runtime::new(RuntimeConfig {
        state_dir: dir.path().join("sandboxes"),
        agent_binary: std::env::current_exe().expect("test binary"),
        // No sandbox is ever created under it, so tests running in parallel cannot clash.
        cgroup_name: cgroup_name.into(),
    })
    .expect("runtime (needs root)");
    let manager = Manager::start(cfg(dir.path()), store.clone(), runtime)
        .await
        .expect("manager");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(soulbox_api::serve(
        listener,
        manager,
        std::future::pending(),
    ));
    Booted {
        url,
        key,
        store,
        dir,
    }
}
