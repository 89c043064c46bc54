//! Volume rows and mount rows against a real SQLite file.

use chrono::{DateTime, Utc};
use soulbox_store::{Store, VolumeMountRecord, VolumeRecord};

async fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("soulbox.db"))
        .await
        .expect("open store");
    (dir, store)
}

fn volume(id: &str, name: &str, ms: i64) -> VolumeRecord {
    VolumeRecord {
        id: id.to_owned(),
        name: name.to_owned(),
        token: format!("tok-{id}"),
        size_mb: 64,
        created_at: DateTime::<Utc>::from_timestamp_millis(ms).expect("time"),
    }
}

#[tokio::test]
async fn volumes_insert_get_list_delete() {
    let (_dir, store) = open().await;
    assert!(
        store
            .insert_volume(&volume("v1", "data", 1))
            .await
            .expect("insert")
    );
    assert!(
        store
            .insert_volume(&volume("v2", "more", 2))
            .await
            .expect("insert")
    );
    // A taken name (or id) is refused, the first row kept.
    assert!(
        !store
            .insert_volume(&volume("v3", "data", 3))
            .await
            .expect("insert")
    );
    assert!(
        !store
            .insert_volume(&volume("v1", "other", 3))
            .await
            .expect("insert")
    );
    assert_eq!(
        store.get_volume("v1").await.expect("get"),
        Some(volume("v1", "data", 1))
    );
    assert_eq!(
        store
            .get_volume_by_name("more")
            .await
            .expect("get")
            .map(|v| v.id),
        Some("v2".to_owned())
    );
    assert_eq!(store.get_volume("nope").await.expect("get"), None);
    let names: Vec<String> = store
        .list_volumes()
        .await
        .expect("list")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["data", "more"]);
    assert_eq!(store.delete_volume("v2").await.expect("delete"), Ok(true));
    assert_eq!(store.delete_volume("v2").await.expect("delete"), Ok(false));
}

#[tokio::test]
async fn mounted_volumes_are_not_deleted_and_stale_mounts_are_pruned() {
    let (dir, store) = open().await;
    store
        .insert_volume(&volume("v1", "data", 1))
        .await
        .expect("insert");
    let mounts = [VolumeMountRecord {
        sandbox_id: "sbx1".into(),
        volume_id: "v1".into(),
        path: "/data".into(),
    }];
    store.insert_volume_mounts(&mounts).await.expect("mounts");
    assert_eq!(
        store.sandbox_volume_mounts("sbx1").await.expect("mounts"),
        mounts.to_vec()
    );
    // The sandbox has no row: its mount is stale and does not keep the volume.
    assert_eq!(store.prune_volume_mounts().await.expect("prune"), 1);
    assert!(
        store
            .sandbox_volume_mounts("sbx1")
            .await
            .expect("mounts")
            .is_empty()
    );
    assert_eq!(store.delete_volume("v1").await.expect("delete"), Ok(true));
    // Rows survive a reopen.
    store
        .insert_volume(&volume("v4", "kept", 4))
        .await
        .expect("insert");
    drop(store);
    let again = Store::open(&dir.path().join("soulbox.db"))
        .await
        .expect("reopen");
    assert_eq!(
        again.get_volume("v4").await.expect("get").map(|v| v.name),
        Some("kept".into())
    );
}
