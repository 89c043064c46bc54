//! `/_soulbox/init` sets the global environment and defaults (own binary: it changes the
//! agent's defaults for everything after it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{bash, raw, run};
use soulbox_client::envd::CallOptions;

#[tokio::test]
async fn init_sets_env_and_defaults() {
    let body = r#"{"sandboxId":"sbx123","templateId":"base","envVars":{"GLOBAL":"g","E2B_SANDBOX":"false"},"defaultUser":"nobody","defaultWorkdir":"/tmp"}"#;
    let (status, _, _) = raw(
        "POST",
        "/_soulbox/init",
        &[("content-type", "application/json")],
        body,
    )
    .await;
    assert_eq!(status, 204);
    let (_, _, envs) = raw("GET", "/envs", &[], "").await;
    let envs = common::json(&envs);
    assert_eq!(envs["GLOBAL"], "g");
    assert_eq!(envs["E2B_SANDBOX"], "true");
    assert_eq!(envs["E2B_SANDBOX_ID"], "sbx123");
    assert_eq!(envs["E2B_TEMPLATE_ID"], "base");

    let o = run(
        bash("echo $(id -un):$PWD:$GLOBAL:$E2B_SANDBOX_ID:$E2B_TEMPLATE_ID"),
        &CallOptions::default(),
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "nobody:/tmp:g:sbx123:base\n"
    );
    // A per-command env overrides the global one.
    let mut req = bash("echo $GLOBAL");
    req.process
        .as_mut()
        .unwrap()
        .envs
        .insert("GLOBAL".into(), "local".into());
    assert_eq!(run(req, &CallOptions::default()).await.stdout, b"local\n");
    // Development mode writes no /run/e2b files.
    let o = run(
        bash("cat /run/e2b/.E2B_SANDBOX_ID 2>/dev/null || echo none"),
        &CallOptions {
            user: Some("root".into()),
            ..Default::default()
        },
    )
    .await;
    assert_ne!(String::from_utf8_lossy(&o.stdout), "sbx123");
}
