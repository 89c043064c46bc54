//! `filesystem.Filesystem` against a real agent and real inotify.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{client, scratch};
use soulbox_client::envd::{CallOptions, EnvdError};
use soulbox_wire::connect::Code;
use soulbox_wire::envd::filesystem::{self as pb, EventType, FileType, watch_dir_response};

fn opts() -> CallOptions {
    CallOptions::default()
}

async fn call<Req, Resp>(method: &str, req: Req) -> Result<Resp, EnvdError>
where
    Req: prost::Message + serde::Serialize,
    Resp: prost::Message + Default + serde::de::DeserializeOwned,
{
    client()
        .unary(&format!("/filesystem.Filesystem/{method}"), &req, &opts())
        .await
}

async fn stat(path: &str) -> Result<pb::EntryInfo, EnvdError> {
    let r: pb::StatResponse = call("Stat", pb::StatRequest { path: path.into() }).await?;
    Ok(r.entry.unwrap())
}

#[tokio::test]
async fn stat_reports_type_owner_mode_and_symlinks() {
    let d = scratch();
    let f = d.join("a.txt");
    std::fs::write(&f, "hello").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink(&f, d.join("link")).unwrap();
    std::os::unix::fs::symlink("/nowhere/at/all", d.join("dangling")).unwrap();

    let e = stat(f.to_str().unwrap()).await.unwrap();
    assert_eq!(e.name, "a.txt");
    assert_eq!(e.path, f.to_str().unwrap());
    assert_eq!(e.r#type(), FileType::File);
    assert_eq!(
        (e.size, e.mode, e.permissions.as_str()),
        (5, 0o640, "-rw-r-----")
    );
    assert_eq!((e.owner.as_str(), e.group.as_str()), ("root", "root"));
    assert!(e.modified_time.unwrap().seconds > 1_600_000_000);
    assert!(!e.is_symlink && e.symlink_target.is_none());

    let l = stat(d.join("link").to_str().unwrap()).await.unwrap();
    assert_eq!(l.r#type(), FileType::Symlink);
    assert!(l.is_symlink);
    assert_eq!(l.symlink_target.as_deref(), f.to_str());
    let dl = stat(d.join("dangling").to_str().unwrap()).await.unwrap();
    assert_eq!(dl.symlink_target.as_deref(), Some("/nowhere/at/all"));

    let dir = stat(d.to_str().unwrap()).await.unwrap();
    assert_eq!(dir.r#type(), FileType::Directory);
    assert!(dir.permissions.starts_with('d'));

    let e = stat(d.join("missing").to_str().unwrap()).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound));
    // `..` is resolved lexically, inside the sandbox.
    let up = stat(&format!("{}/x/../a.txt", d.display())).await.unwrap();
    assert_eq!(up.path, f.to_str().unwrap());
    // Relative paths are against the user's home (root: /root).
    let home = stat(".").await.unwrap();
    assert_eq!(home.path, "/root");
    std::fs::remove_dir_all(d).unwrap();
}

/// A directory's size is whole blocks, as on E2B's ext4, whatever the filesystem says (btrfs,
/// under SoulBox's overlay, and tmpfs report 0 or a few bytes). Here on tmpfs (/dev/shm): an
/// empty directory is 40 bytes there, one with 300 entries 6040.
#[tokio::test]
async fn directory_sizes_are_whole_blocks() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("SKIPPED: no /dev/shm");
        return;
    }
    let d = shm.join(format!("soulbox-agent-dirsize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("empty")).unwrap();
    std::fs::create_dir(d.join("full")).unwrap();
    for i in 0..300 {
        std::fs::write(d.join(format!("full/f{i}")), "").unwrap();
    }
    std::fs::write(d.join("file"), "12345").unwrap();
    let fs_size = |p: &str| std::fs::metadata(d.join(p)).unwrap().len();
    assert!(fs_size("empty") < 4096 && fs_size("full") > 4096);

    let e = stat(d.join("empty").to_str().unwrap()).await.unwrap();
    assert_eq!(e.size, 4096);
    let r: pb::ListDirResponse = call(
        "ListDir",
        pb::ListDirRequest {
            path: d.to_str().unwrap().into(),
            depth: 1,
        },
    )
    .await
    .unwrap();
    let sizes: std::collections::BTreeMap<String, i64> =
        r.entries.into_iter().map(|e| (e.name, e.size)).collect();
    assert_eq!(sizes["empty"], 4096);
    assert_eq!(sizes["full"], 8192);
    assert_eq!(sizes["file"], 5);
    std::fs::remove_dir_all(&d).unwrap();
}

#[tokio::test]
async fn list_dir_depth_and_symlinked_dirs() {
    let d = scratch();
    std::fs::create_dir_all(d.join("a/b/c")).unwrap();
    std::fs::write(d.join("a/f1"), "1").unwrap();
    std::fs::write(d.join("a/b/f2"), "2").unwrap();
    std::fs::write(d.join("a/b/c/f3"), "3").unwrap();
    std::os::unix::fs::symlink(d.join("a"), d.join("la")).unwrap();

    let list = |depth: u32| {
        let path = d.to_str().unwrap().to_string();
        async move {
            let r: pb::ListDirResponse = call("ListDir", pb::ListDirRequest { path, depth })
                .await
                .unwrap();
            let mut v: Vec<String> = r.entries.into_iter().map(|e| e.path).collect();
            v.sort();
            v
        }
    };
    let base = d.to_str().unwrap();
    assert_eq!(
        list(0).await,
        vec![format!("{base}/a"), format!("{base}/la")]
    );
    assert_eq!(list(1).await, list(0).await);
    assert_eq!(
        list(2).await,
        vec![
            format!("{base}/a"),
            format!("{base}/a/b"),
            format!("{base}/a/f1"),
            format!("{base}/la")
        ]
    );
    let deep = list(10).await;
    assert!(deep.contains(&format!("{base}/a/b/c/f3")));
    assert!(
        !deep.iter().any(|p| p.starts_with(&format!("{base}/la/"))),
        "symlinked dir descended: {deep:?}"
    );

    // Listing through a symlink to a directory lists the target's entries.
    let r: pb::ListDirResponse = call(
        "ListDir",
        pb::ListDirRequest {
            path: format!("{base}/la"),
            depth: 1,
        },
    )
    .await
    .unwrap();
    assert_eq!(r.entries.len(), 2);

    let e = call::<_, pb::ListDirResponse>(
        "ListDir",
        pb::ListDirRequest {
            path: format!("{base}/a/f1"),
            depth: 1,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));
    let e = call::<_, pb::ListDirResponse>(
        "ListDir",
        pb::ListDirRequest {
            path: format!("{base}/zz"),
            depth: 1,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound));
    std::fs::remove_dir_all(d).unwrap();
}

#[tokio::test]
async fn make_dir_move_remove() {
    let d = scratch();
    let base = d.to_str().unwrap();
    let r: pb::MakeDirResponse = call(
        "MakeDir",
        pb::MakeDirRequest {
            path: format!("{base}/x/y/z"),
        },
    )
    .await
    .unwrap();
    assert_eq!(r.entry.unwrap().r#type(), FileType::Directory);
    let e = call::<_, pb::MakeDirResponse>(
        "MakeDir",
        pb::MakeDirRequest {
            path: format!("{base}/x/y/z"),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(Code::AlreadyExists));
    std::fs::write(d.join("file"), "f").unwrap();
    let e = call::<_, pb::MakeDirResponse>(
        "MakeDir",
        pb::MakeDirRequest {
            path: format!("{base}/file"),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidArgument));

    // Ownership of created directories follows the user.
    let nobody = CallOptions {
        user: Some("nobody".into()),
        ..opts()
    };
    let _: pb::MakeDirResponse = client()
        .unary(
            "/filesystem.Filesystem/MakeDir",
            &pb::MakeDirRequest {
                path: format!("{base}/owned/sub"),
            },
            &nobody,
        )
        .await
        .unwrap();
    assert_eq!(
        stat(&format!("{base}/owned")).await.unwrap().owner,
        "nobody"
    );
    assert_eq!(
        stat(&format!("{base}/owned/sub")).await.unwrap().owner,
        "nobody"
    );

    let r: pb::MoveResponse = call(
        "Move",
        pb::MoveRequest {
            source: format!("{base}/file"),
            destination: format!("{base}/new/parent/moved"),
        },
    )
    .await
    .unwrap();
    let moved = r.entry.unwrap();
    assert_eq!(moved.path, format!("{base}/new/parent/moved"));
    assert_eq!(
        std::fs::read_to_string(d.join("new/parent/moved")).unwrap(),
        "f"
    );
    let e = call::<_, pb::MoveResponse>(
        "Move",
        pb::MoveRequest {
            source: format!("{base}/file"),
            destination: format!("{base}/again"),
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound));

    let _: pb::RemoveResponse = call(
        "Remove",
        pb::RemoveRequest {
            path: format!("{base}/x"),
        },
    )
    .await
    .unwrap();
    assert!(!d.join("x").exists());
    let _: pb::RemoveResponse = call(
        "Remove",
        pb::RemoveRequest {
            path: format!("{base}/x"),
        },
    )
    .await
    .unwrap();
    std::fs::remove_dir_all(d).unwrap();
}

#[tokio::test]
async fn watch_dir_streams_start_then_events() {
    let d = scratch();
    let base = d.to_str().unwrap().to_string();
    let req = pb::WatchDirRequest {
        path: base.clone(),
        recursive: true,
        include_entry: true,
        allow_network_mounts: false,
    };
    let mut s = client()
        .server_stream::<_, pb::WatchDirResponse>("/filesystem.Filesystem/WatchDir", &req, &opts())
        .await
        .unwrap();
    let first = s.next().await.unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(watch_dir_response::Event::Start(_))
    ));

    std::fs::write(d.join("f"), "1").unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::write(d.join("sub/g"), "2").unwrap();
    std::fs::rename(d.join("f"), d.join("h")).unwrap();
    std::fs::remove_file(d.join("h")).unwrap();
    std::fs::set_permissions(d.join("sub/g"), std::fs::Permissions::from_mode(0o600)).unwrap();

    let want = [
        ("f", EventType::Create),
        ("f", EventType::Write),
        ("sub", EventType::Create),
        ("sub/g", EventType::Create),
        ("sub/g", EventType::Write),
        ("f", EventType::Rename),
        ("h", EventType::Create),
        ("h", EventType::Remove),
        ("sub/g", EventType::Chmod),
    ];
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !want.iter().all(|w| {
        got.iter()
            .any(|(n, t, _): &(String, EventType, bool)| n == w.0 && *t == w.1)
    }) {
        let msg = tokio::time::timeout_at(deadline, s.next())
            .await
            .expect("events in time")
            .unwrap()
            .unwrap();
        if let Some(watch_dir_response::Event::Filesystem(ev)) = msg.event {
            got.push((ev.name.clone(), ev.r#type(), ev.entry.is_some()));
        }
    }
    // include_entry: creations carry the entry, removals do not.
    assert!(
        got.iter()
            .any(|(n, t, e)| n == "sub/g" && *t == EventType::Create && *e)
    );
    assert!(got.iter().all(|(_, t, e)| !(*t == EventType::Remove && *e)));
    drop(s);

    let missing = pb::WatchDirRequest {
        path: format!("{base}/nope"),
        ..req
    };
    let e = client()
        .server_stream::<_, pb::WatchDirResponse>(
            "/filesystem.Filesystem/WatchDir",
            &missing,
            &opts(),
        )
        .await
        .unwrap()
        .next()
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound));
    std::fs::remove_dir_all(d).unwrap();
}

#[tokio::test]
async fn polling_watchers() {
    let d = scratch();
    let base = d.to_str().unwrap().to_string();
    let r: pb::CreateWatcherResponse = call(
        "CreateWatcher",
        pb::CreateWatcherRequest {
            path: base.clone(),
            recursive: false,
            include_entry: false,
            allow_network_mounts: false,
        },
    )
    .await
    .unwrap();
    let id = r.watcher_id;
    assert_eq!(id.len(), 20);
    std::fs::write(d.join("a"), "x").unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    std::fs::write(d.join("sub/not-recursive"), "x").unwrap();
    let mut names = Vec::new();
    for _ in 0..50 {
        let r: pb::GetWatcherEventsResponse = call(
            "GetWatcherEvents",
            pb::GetWatcherEventsRequest {
                watcher_id: id.clone(),
            },
        )
        .await
        .unwrap();
        names.extend(r.events.into_iter().map(|e| (e.name, e.r#type)));
        if names.iter().any(|(n, _)| n == "sub") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        names.contains(&("a".to_string(), EventType::Create as i32)),
        "{names:?}"
    );
    assert!(!names.iter().any(|(n, _)| n.contains("not-recursive")));
    let r: pb::GetWatcherEventsResponse = call(
        "GetWatcherEvents",
        pb::GetWatcherEventsRequest {
            watcher_id: id.clone(),
        },
    )
    .await
    .unwrap();
    assert!(r.events.is_empty(), "drained: {:?}", r.events);

    let _: pb::RemoveWatcherResponse = call(
        "RemoveWatcher",
        pb::RemoveWatcherRequest {
            watcher_id: id.clone(),
        },
    )
    .await
    .unwrap();
    for method in ["GetWatcherEvents", "RemoveWatcher"] {
        let e = call::<_, pb::RemoveWatcherResponse>(
            method,
            pb::RemoveWatcherRequest {
                watcher_id: id.clone(),
            },
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Some(Code::NotFound), "{method}");
    }
    let e = call::<_, pb::CreateWatcherResponse>(
        "CreateWatcher",
        pb::CreateWatcherRequest {
            path: format!("{base}/nope"),
            recursive: false,
            include_entry: false,
            allow_network_mounts: false,
        },
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(Code::NotFound));
    std::fs::remove_dir_all(d).unwrap();
}
