//! The store against a real SQLite file in a temporary directory.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use chrono::{DateTime, Utc};
use soulbox_store::{
    Cursor, Order, SandboxQuery, SandboxRecord, Store, TemplateRecord, generate_api_key,
};
use soulbox_wire::rest::SandboxState;

async fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("soulbox.db"))
        .await
        .expect("open store");
    (dir, store)
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).expect("valid time")
}

fn sandbox(id: &str, started_ms: i64, meta: &[(&str, &str)]) -> SandboxRecord {
    SandboxRecord {
        id: id.to_owned(),
        template_id: "base".to_owned(),
        alias: Some("base".to_owned()),
        metadata: meta
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        env_vars: BTreeMap::from([("A".to_owned(), "1".to_owned())]),
        access_token: Some("tok".to_owned()),
        started_at: at(started_ms),
        end_at: at(started_ms + 300_000),
        cpu_count: 2,
        memory_mb: 512,
        disk_mb: 1024,
        handle: r#"{"pid":1}"#.to_owned(),
        state: SandboxState::Running,
        lifecycle: "{}".into(),
        pause: None,
    }
}

#[tokio::test]
async fn database_file_is_private_and_wal() {
    let (dir, store) = open().await;
    store
        .add_api_key(&generate_api_key(), "x")
        .await
        .expect("write");
    let mode = std::fs::metadata(dir.path().join("soulbox.db"))
        .expect("db exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(dir.path().join("soulbox.db-wal").exists(), "WAL mode");
}

#[tokio::test]
async fn api_keys_are_checked_by_hash() {
    let (_dir, store) = open().await;
    let key = generate_api_key();
    store.add_api_key(&key, "admin").await.expect("add");
    store.add_api_key(&key, "admin").await.expect("idempotent");
    assert!(store.api_key_valid(&key).await.expect("query"));
    assert!(
        !store
            .api_key_valid(&generate_api_key())
            .await
            .expect("query")
    );
}

#[tokio::test]
async fn templates_roundtrip_and_upsert() {
    let (_dir, store) = open().await;
    let mut t = TemplateRecord {
        name: "base".to_owned(),
        layers: vec![PathBuf::from("/data/templates/base/rootfs")],
        cpu_count: 2,
        memory_mb: 512,
        disk_mb: 1024,
        default_user: "user".to_owned(),
        default_workdir: "/home/user".to_owned(),
        created_at: at(1_000),
    };
    store.upsert_template(&t).await.expect("insert");
    assert_eq!(
        store.get_template("base").await.expect("get"),
        Some(t.clone())
    );
    t.memory_mb = 1024;
    store.upsert_template(&t).await.expect("update");
    assert_eq!(
        store
            .get_template("base")
            .await
            .expect("get")
            .map(|t| t.memory_mb),
        Some(1024)
    );
    assert_eq!(store.get_template("nope").await.expect("get"), None);
}

#[tokio::test]
async fn sandbox_rows_roundtrip_update_delete() {
    let (_dir, store) = open().await;
    let s = sandbox("aaaaaaaaaaaaaaaaaaaa", 5_000, &[("k", "v")]);
    store.insert_sandbox(&s).await.expect("insert");
    assert!(store.insert_sandbox(&s).await.is_err(), "duplicate id");
    assert_eq!(
        store.get_sandbox(&s.id).await.expect("get"),
        Some(s.clone())
    );
    assert!(store.set_end_at(&s.id, at(99_000)).await.expect("update"));
    assert!(!store.set_end_at("missing", at(1)).await.expect("update"));
    assert_eq!(
        store
            .get_sandbox(&s.id)
            .await
            .expect("get")
            .map(|r| r.end_at),
        Some(at(99_000))
    );
    assert!(store.delete_sandbox(&s.id).await.expect("delete"));
    assert!(!store.delete_sandbox(&s.id).await.expect("delete again"));
    assert_eq!(store.get_sandbox(&s.id).await.expect("get"), None);
}

#[tokio::test]
async fn list_filters_by_metadata_state_template_and_time() {
    let (_dir, store) = open().await;
    for (i, meta) in [
        vec![("team", "a"), ("note", "x y/z%=é")],
        vec![("team", "a")],
        vec![("team", "b")],
    ]
    .iter()
    .enumerate()
    {
        let id = format!("{i}{}", "s".repeat(19));
        store
            .insert_sandbox(&sandbox(&id, 1_000 * (i as i64 + 1), meta))
            .await
            .expect("insert");
    }
    let ids = |rows: Vec<SandboxRecord>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();

    let q = SandboxQuery {
        metadata: vec![("team".into(), "a".into())],
        ..Default::default()
    };
    assert_eq!(
        ids(store.list_sandboxes(&q).await.expect("list")),
        vec!["1sssssssssssssssssss", "0sssssssssssssssssss"]
    );

    let q = SandboxQuery {
        metadata: vec![
            ("team".into(), "a".into()),
            ("note".into(), "x y/z%=é".into()),
        ],
        ..Default::default()
    };
    assert_eq!(
        ids(store.list_sandboxes(&q).await.expect("list")),
        vec!["0sssssssssssssssssss"]
    );

    let q = SandboxQuery {
        states: vec![SandboxState::Paused],
        ..Default::default()
    };
    assert!(store.list_sandboxes(&q).await.expect("list").is_empty());

    let q = SandboxQuery {
        template: Some("other".into()),
        ..Default::default()
    };
    assert!(store.list_sandboxes(&q).await.expect("list").is_empty());

    let q = SandboxQuery {
        started_after: Some(at(1_500)),
        order: Order::Asc,
        ..Default::default()
    };
    assert_eq!(
        ids(store.list_sandboxes(&q).await.expect("list")),
        vec!["1sssssssssssssssssss", "2sssssssssssssssssss"]
    );
}

#[tokio::test]
async fn cursor_pages_through_equal_start_times_without_gaps() {
    let (_dir, store) = open().await;
    // Five sandboxes, three sharing a start time: the id breaks ties.
    let starts = [10, 20, 20, 20, 30];
    for (i, ms) in starts.iter().enumerate() {
        store
            .insert_sandbox(&sandbox(&format!("{i}{}", "p".repeat(19)), *ms, &[]))
            .await
            .expect("insert");
    }
    for order in [Order::Asc, Order::Desc] {
        let mut seen = Vec::new();
        let mut after: Option<Cursor> = None;
        loop {
            let page = store
                .list_sandboxes(&SandboxQuery {
                    order,
                    after: after.clone(),
                    limit: Some(2),
                    ..Default::default()
                })
                .await
                .expect("page");
            let Some(last) = page.last() else { break };
            after = Some(Cursor {
                started_at: last.started_at,
                id: last.id.clone(),
            });
            seen.extend(page.into_iter().map(|r| r.id));
        }
        let mut expected: Vec<String> = (0..5).map(|i| format!("{i}{}", "p".repeat(19))).collect();
        if order == Order::Desc {
            expected.reverse();
        }
        assert_eq!(seen, expected, "{order:?}");
    }
}

/// Pause and resume are compare-and-set on the state: a second pause or resume changes
/// nothing, and what the pause kept goes away on resume.
#[tokio::test]
async fn pause_and_resume_are_state_transitions() {
    let (_dir, store) = open().await;
    let mut rec = sandbox("p1", 1_000, &[]);
    rec.lifecycle = r#"{"autoPause":true}"#.to_owned();
    store.insert_sandbox(&rec).await.expect("insert");
    assert!(!store.update_pause("p1", "{}").await.expect("update"));
    assert!(
        store
            .set_paused("p1", r#"{"mode":"full"}"#)
            .await
            .expect("pause")
    );
    assert!(!store.set_paused("p1", "{}").await.expect("pause twice"));
    assert!(!store.set_paused("nope", "{}").await.expect("pause unknown"));
    let paused = store.get_sandbox("p1").await.expect("get").expect("row");
    assert_eq!(paused.state, SandboxState::Paused);
    assert_eq!(paused.pause.as_deref(), Some(r#"{"mode":"full"}"#));
    assert_eq!(paused.lifecycle, r#"{"autoPause":true}"#);
    assert!(
        store
            .update_pause("p1", r#"{"mode":"filesystem"}"#)
            .await
            .expect("update")
    );
    assert!(
        store
            .set_resumed("p1", r#"{"pid":2}"#, at(9_000))
            .await
            .expect("resume")
    );
    assert!(
        !store
            .set_resumed("p1", "{}", at(1))
            .await
            .expect("resume twice")
    );
    let running = store.get_sandbox("p1").await.expect("get").expect("row");
    assert_eq!(running.state, SandboxState::Running);
    assert_eq!(running.pause, None);
    assert_eq!(running.handle, r#"{"pid":2}"#);
    assert_eq!(running.end_at, at(9_000));
}
