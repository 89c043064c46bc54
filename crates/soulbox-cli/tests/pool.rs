//! Warm pools end to end: members made ahead and handed out by create, refilled, replaced when
//! they die idle, drained when their template changes, never listed, cold creates when the
//! pool runs dry, the host reserve refusing creates, and restarts.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Server, alive, eventually, new_sandbox, run};
use http::{Method, StatusCode};
use serde_json::json;

/// Waits until the pools hold `n` idle members and make none; returns their ids.
async fn settled(server: &Server, n: usize) -> HashSet<String> {
    let api = server.api();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (idle, starting) = api.pool_members().await;
        if idle.len() == n && starting == 0 {
            return idle;
        }
        assert!(
            Instant::now() < deadline,
            "pool never settled at {n}: {:?}",
            api.pools().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Host pid of the PID 1 of sandbox `id` (found by its cgroup, v1 or v2).
fn pid1_of(id: &str) -> i32 {
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|c| c.lines().any(|l| l.ends_with(&format!("/{id}"))))
        })
        .collect();
    pids.sort_unstable();
    *pids.first().expect("a process of the member")
}

fn state_entries(server: &Server) -> HashSet<String> {
    std::fs::read_dir(server.data.join("sandboxes"))
        .expect("sandboxes dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        // `volumes` is the volume store beside the sandboxes (serve.rs VOLUMES_DIR).
        .filter(|n| !n.starts_with('.') && n != "volumes")
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_members_are_handed_out_refilled_and_replaced() {
    let server = Server::start_with(
        "soulbox-test-cli-pool",
        &["--pool", "base=2", "--pool-others", "0"],
    );
    let api = server.api();
    let members = settled(&server, 2).await;
    // Members are not sandboxes of anyone's yet.
    let listed = api.call(Method::GET, "/v2/sandboxes", None).await;
    assert_eq!(listed.body, json!([]));
    for m in &members {
        assert_eq!(api.get(m).await.status, StatusCode::NOT_FOUND);
    }

    // A create hands one out, personalised: its env vars, metadata and access token.
    let (id, token) = api
        .create(json!({"templateID": "base", "timeout": 300, "secure": true,
                       "metadata": {"who": "pool"}, "envVars": {"FROM_CREATE": "yes"}}))
        .await;
    assert!(members.contains(&id), "{id} is not one of {members:?}");
    let info = api.get(&id).await;
    assert_eq!(info.body["metadata"]["who"], "pool");
    let ran = run(
        &server.envd(&id, Some(&token)),
        "echo $FROM_CREATE $E2B_SANDBOX_ID $(hostname) $(cat /run/e2b/.E2B_SANDBOX_ID); whoami",
        None,
    )
    .await;
    assert_eq!(ran.exit_code, 0, "{ran:?}");
    assert_eq!(ran.stdout, format!("yes {id} {id} {id}\nuser\n"));
    let pool = &api.pools().await[0];
    assert_eq!((pool.hits, pool.misses), (1, 0), "{pool:?}");

    // It is refilled, with fresh ids.
    let refilled = settled(&server, 2).await;
    assert!(!refilled.contains(&id));

    // A create without env vars is handed a member as it was made (no second init): its own
    // id and user, nothing of another create's environment.
    let (plain, plain_token) = api
        .create(json!({"templateID": "base", "timeout": 300, "secure": true}))
        .await;
    assert!(
        refilled.contains(&plain),
        "{plain} is not one of {refilled:?}"
    );
    let ran = run(
        &server.envd(&plain, Some(&plain_token)),
        "echo $E2B_SANDBOX_ID $(hostname) $(cat /run/e2b/.E2B_SANDBOX_ID) ${FROM_CREATE:-unset}; whoami",
        None,
    )
    .await;
    assert_eq!(ran.stdout, format!("{plain} {plain} {plain} unset\nuser\n"));
    let refilled = settled(&server, 2).await;
    assert!(!refilled.contains(&plain));

    // A member that dies while idle is replaced and never handed out.
    let victim = refilled.iter().next().expect("a member").clone();
    let pid = pid1_of(&victim);
    // SAFETY: kill(2) on the PID 1 of a pool member of this test's server.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    assert!(
        eventually(Duration::from_secs(20), || async {
            let (idle, _) = api.pool_members().await;
            !idle.contains(&victim) && !alive(pid)
        })
        .await,
        "the dead member stayed in the pool"
    );
    let replaced = settled(&server, 2).await;
    assert!(!replaced.contains(&victim));
    assert!(!server.data.join("sandboxes").join(&victim).exists());
    assert!(api.pools().await[0].lost >= 1);

    // A burst larger than the pool: every create succeeds, the rest made cold.
    let mut creates = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let api = server.api();
        creates.spawn(async move { api.create(new_sandbox(300, json!({"burst": "1"}))).await });
    }
    let made = creates.join_all().await;
    let ids: HashSet<String> = made.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), 6);
    assert!(!ids.contains(&victim));
    let pool = &api.pools().await[0];
    assert_eq!(pool.hits + pool.misses, 8, "{pool:?}");
    for (id, token) in &made {
        let ran = run(&server.envd(id, Some(token)), "echo $FROM_CREATE", None).await;
        assert_eq!(ran.stdout, "yes\n");
    }
    for id in ids.iter().chain([&id, &plain]) {
        assert_eq!(
            api.call(Method::DELETE, &format!("/sandboxes/{id}"), None)
                .await
                .status,
            StatusCode::NO_CONTENT
        );
    }
    // What is left on disk is the pool's, nothing else.
    let members = settled(&server, 2).await;
    assert_eq!(state_entries(&server), members);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_template_drains_its_members_and_restarts_reap_them() {
    let mut server = Server::start_with(
        "soulbox-test-cli-pool-drain",
        &["--pool", "base=2", "--pool-others", "0"],
    );
    let old = settled(&server, 2).await;
    // Re-registering `base` with other layers makes it another build (as a rebuild does):
    // its members go.
    let store = soulbox_store::Store::open(&server.data.join("soulbox.db"))
        .await
        .expect("store");
    let mut base = store
        .get_template("base")
        .await
        .expect("query")
        .expect("base");
    let moved = server.data.join("base-moved");
    std::os::unix::fs::symlink(&base.layers[0], &moved).expect("link the rootfs");
    base.layers = vec![moved];
    store
        .upsert_template(&base)
        .await
        .expect("re-register base");
    store.close().await;
    let api = server.api();
    assert!(
        eventually(Duration::from_secs(30), || async {
            let (idle, starting) = api.pool_members().await;
            idle.len() == 2 && starting == 0 && idle.is_disjoint(&old)
        })
        .await,
        "stale members were not drained: {:?}",
        api.pools().await
    );
    let fresh = settled(&server, 2).await;
    assert!(
        old.iter()
            .all(|m| !server.data.join("sandboxes").join(m).exists())
    );

    // A graceful stop takes the idle members with it.
    let pids: Vec<i32> = fresh.iter().map(|m| pid1_of(m)).collect();
    assert!(server.stop(libc::SIGTERM).success());
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "members outlived a graceful stop"
    );
    assert!(
        state_entries(&server).is_empty(),
        "{:?}",
        state_entries(&server)
    );

    // After a crash, the next start reaps the old members and makes new ones.
    server.restart();
    let crashed = settled(&server, 2).await;
    let pids: Vec<i32> = crashed.iter().map(|m| pid1_of(m)).collect();
    server.stop(libc::SIGKILL);
    assert!(pids.iter().all(|p| alive(*p)));
    server.restart();
    let after = settled(&server, 2).await;
    assert!(after.is_disjoint(&crashed));
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "crashed members were not reaped"
    );
    assert_eq!(state_entries(&server), after);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_short_of_memory_refuses_creates_cleanly() {
    // A reserve no host has: creates fail with 503 before anything is made; no members.
    let server = Server::start_with(
        "soulbox-test-cli-pool-reserve",
        &["--reserve-memory-mb", "100000000", "--pool-others", "2"],
    );
    let api = server.api();
    let r = api
        .call(
            Method::POST,
            "/v2/sandboxes",
            Some(new_sandbox(60, json!({}))),
        )
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    let message = r.body["message"].as_str().unwrap_or_default();
    assert!(message.contains("memory"), "{message}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(state_entries(&server).is_empty());
    let (idle, starting) = api.pool_members().await;
    assert!(idle.is_empty() && starting == 0);
    let listed = api.call(Method::GET, "/v2/sandboxes", None).await;
    assert_eq!(listed.body, json!([]));
}
