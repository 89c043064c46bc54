//! `soulbox serve` end to end: real sandboxes (namespaces, cgroups, overlay, the agent as PID 1)
//! driven through the control plane, the gateway and the CLI.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Server, alive, eventually, new_sandbox, run, start_request, stored_pid};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use soulbox_client::envd::CallOptions;
use soulbox_wire::connect::Code;
use soulbox_wire::envd::process::process_event;

/// A plain HTTP request to the gateway; returns status and body.
async fn gateway(
    url: &str,
    method: Method,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: &'static [u8],
) -> (StatusCode, Bytes) {
    let http: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut req = Request::builder()
        .method(method)
        .uri(format!("{url}{path_and_query}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = http
        .request(
            req.body(Full::new(Bytes::from_static(body)))
                .expect("request"),
        )
        .await
        .expect("response");
    let status = resp.status();
    (
        status,
        resp.into_body().collect().await.expect("body").to_bytes(),
    )
}

fn routing<'a>(id: &'a str, port: &'a str) -> [(&'static str, &'a str); 2] {
    [("E2b-Sandbox-Id", id), ("E2b-Sandbox-Port", port)]
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_lifecycle_through_api_gateway_and_cli() {
    let server = Server::start("soulbox-test-cli-lifecycle");
    let api = server.api();
    for url in [&server.api_url, &server.sandbox_url] {
        let (status, _) = gateway(url, Method::GET, "/health", &[], b"").await;
        assert_eq!(status, StatusCode::OK, "{url}/health");
    }

    let (id, token) = api
        .create(new_sandbox(300, json!({"suite": "lifecycle"})))
        .await;
    assert_eq!(id.len(), 20);
    let envd = server.envd(&id, Some(&token));

    // Commands, as the default user and as root, with the create-time environment.
    let r = run(
        &envd,
        "echo hi; whoami; echo $FROM_CREATE $E2B_SANDBOX_ID; hostname; pwd",
        None,
    )
    .await;
    assert_eq!(
        r.stdout,
        format!("hi\nuser\nyes {id}\n{id}\n/home/user\n"),
        "{r:?}"
    );
    assert_eq!(r.exit_code, 0);
    let r = run(&envd, "whoami; echo oops >&2; exit 3", Some("root")).await;
    assert_eq!(
        (r.stdout.as_str(), r.stderr.as_str(), r.exit_code),
        ("root\n", "oops\n", 3)
    );

    // Output is streamed, not buffered: the first line arrives while the process still runs
    // (it waits for a file that only a second command creates).
    let opts = CallOptions {
        timeout: Some(Duration::from_secs(60)),
        ..CallOptions::default()
    };
    let mut stream = envd
        .start(
            &start_request("echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second"),
            &opts,
        )
        .await
        .expect("start");
    let mut seen = String::new();
    while !seen.contains("first") {
        let event = stream
            .next()
            .await
            .expect("an event before the end")
            .expect("event")
            .event
            .and_then(|e| e.event);
        match event {
            Some(process_event::Event::Data(d)) => {
                if let Some(process_event::data_event::Output::Stdout(b)) = d.output {
                    seen.push_str(&String::from_utf8_lossy(&b));
                }
            }
            Some(process_event::Event::End(end)) => panic!("ended before /tmp/go: {end:?}"),
            _ => {}
        }
    }
    assert_eq!(run(&envd, "touch /tmp/go", None).await.exit_code, 0);
    while let Some(msg) = stream.next().await {
        if let Some(process_event::Event::Data(d)) = msg.expect("event").event.and_then(|e| e.event)
            && let Some(process_event::data_event::Output::Stdout(b)) = d.output
        {
            seen.push_str(&String::from_utf8_lossy(&b));
        }
    }
    assert_eq!(seen, "first\nsecond\n");

    // Access tokens: required, and only this sandbox's own.
    let (other_id, other_token) = api
        .create(new_sandbox(300, json!({"suite": "lifecycle"})))
        .await;
    for client in [
        server.envd(&id, None),
        server.envd(&id, Some("wrong")),
        server.envd(&id, Some(&other_token)),
    ] {
        let err = client
            .start(&start_request("true"), &opts)
            .await
            .err()
            .expect("refused");
        assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    }
    server
        .envd(&id, None)
        .health()
        .await
        .expect("health needs no token");
    assert_ne!(other_id, id);

    // Files: upload with the token, download with a signed URL that names no sandbox.
    let (status, body) = gateway(
        &server.sandbox_url,
        Method::POST,
        "/files?path=%2Fhome%2Fuser%2Fsigned.txt",
        &[
            routing(&id, "49983")[0],
            routing(&id, "49983")[1],
            ("X-Access-Token", token.as_str()),
            ("Content-Type", "application/octet-stream"),
        ],
        b"signed content",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let sig = soulbox_gateway::signature("/home/user/signed.txt", "read", "", &token, None);
    let signed = format!(
        "/files?path=%2Fhome%2Fuser%2Fsigned.txt&signature={}",
        enc(&sig)
    );
    let (status, body) = gateway(&server.sandbox_url, Method::GET, &signed, &[], b"").await;
    assert_eq!(
        (status, &body[..]),
        (StatusCode::OK, &b"signed content"[..])
    );
    let (status, _) = gateway(
        &server.sandbox_url,
        Method::GET,
        &signed,
        &routing(&id, "49983"),
        b"",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "signature with routing headers");
    let expired_at = (chrono::Utc::now().timestamp() - 5).to_string();
    let expired_sig = soulbox_gateway::signature(
        "/home/user/signed.txt",
        "read",
        "",
        &token,
        Some(&expired_at),
    );
    let expired = format!(
        "/files?path=%2Fhome%2Fuser%2Fsigned.txt&signature={}&signature_expiration={expired_at}",
        enc(&expired_sig)
    );
    for path in [
        expired.as_str(),
        "/files?path=%2Fhome%2Fuser%2Fsigned.txt&signature=v1_bogus",
    ] {
        let (status, _) = gateway(
            &server.sandbox_url,
            Method::GET,
            path,
            &routing(&id, "49983"),
            b"",
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    // A write signature does not allow reading.
    let write_sig = soulbox_gateway::signature("/home/user/signed.txt", "write", "", &token, None);
    let (status, _) = gateway(
        &server.sandbox_url,
        Method::GET,
        &format!(
            "/files?path=%2Fhome%2Fuser%2Fsigned.txt&signature={}",
            enc(&write_sig)
        ),
        &routing(&id, "49983"),
        b"",
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Ports other than envd's are not open (yet).
    let (status, body) = gateway(
        &server.sandbox_url,
        Method::GET,
        "/",
        &routing(&id, "49999"),
        b"",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    let body: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(body["port"], 49999);
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("port is not open")
    );

    // Info and list through the CLI.
    let out = server.cli(&["info", &id]);
    assert!(out.status.success(), "{out:?}");
    let info: Value = serde_json::from_slice(&out.stdout).expect("info json");
    assert_eq!(
        (info["sandboxID"].as_str(), info["state"].as_str()),
        (Some(id.as_str()), Some("running"))
    );
    assert_eq!(
        (info["cpuCount"].as_u64(), info["memoryMB"].as_u64()),
        (Some(2), Some(512))
    );
    let out = server.cli(&["list", "--json", "--metadata", "suite=lifecycle"]);
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).expect("list json");
    assert_eq!(listed.len(), 2);

    // Kill through the CLI reclaims the sandbox.
    let pid = stored_pid(&server.data, &id).await;
    let out = server.cli(&["kill", &id]);
    assert!(out.status.success(), "{out:?}");
    assert!(!alive(pid), "PID 1 still alive after kill");
    assert_eq!(api.get(&id).await.status, StatusCode::NOT_FOUND);
    assert!(!server.data.join("sandboxes").join(&id).exists());
    let (status, body) = gateway(
        &server.sandbox_url,
        Method::GET,
        "/health",
        &routing(&id, "49983"),
        b"",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(String::from_utf8_lossy(&body).contains("was not found"));
    let out = server.cli(&["kill", &id]);
    assert!(!out.status.success(), "killing twice must fail");

    // The CLI creates too.
    let out = server.cli(&["create", "--timeout", "60", "--metadata", "suite=cli"]);
    assert!(out.status.success(), "{out:?}");
    let cli_id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(api.get(&cli_id).await.body["metadata"]["suite"], "cli");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_creates_leave_nothing_behind() {
    let server = Server::start("soulbox-test-cli-failed");
    let api = server.api();
    // A template whose layer does not exist makes the runtime fail after its checks started.
    let store = soulbox_store::Store::open(&server.data.join("soulbox.db"))
        .await
        .expect("store");
    store
        .upsert_template(&soulbox_store::TemplateRecord {
            name: "broken".into(),
            layers: vec![server.data.join("no-such-layer")],
            cpu_count: 1,
            memory_mb: 256,
            disk_mb: 1024,
            default_user: "user".into(),
            default_workdir: "/home/user".into(),
            created_at: chrono::Utc::now(),
        })
        .await
        .expect("template");
    let bodies = [
        (
            json!({"templateID": "broken"}),
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
        (json!({"templateID": "nope"}), StatusCode::NOT_FOUND),
        (
            json!({"templateID": "base", "timeout": -1}),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (body, status) in bodies {
        let r = api
            .call(Method::POST, "/v2/sandboxes", Some(body.clone()))
            .await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        assert_eq!(r.body["code"], status.as_u16());
    }
    // Idle pool members are the server's own, not leftovers; members being made are waited
    // for (the adaptive pool of `broken` keeps failing, and must leave nothing either).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let leftovers = loop {
        let (members, starting) = api.pool_members().await;
        let leftovers: Vec<String> = std::fs::read_dir(server.data.join("sandboxes"))
            .expect("sandboxes dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            // `volumes` is the volume store beside the sandboxes (serve.rs VOLUMES_DIR).
            .filter(|n| !n.starts_with('.') && n != "volumes" && !members.contains(n))
            .collect();
        if (starting == 0 && leftovers.is_empty()) || std::time::Instant::now() > deadline {
            break leftovers;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(store.all_sandboxes().await.expect("rows").is_empty());
    store.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sandboxes_survive_restarts_and_dead_ones_are_reaped() {
    let mut server = Server::start("soulbox-test-cli-restart");
    let api = server.api();
    let (keep, keep_token) = api.create(new_sandbox(300, json!({}))).await;
    let (short, _) = api.create(new_sandbox(8, json!({}))).await;
    let (doomed, _) = api.create(new_sandbox(300, json!({}))).await;
    let keep_end = api.get(&keep).await.body["endAt"].clone();
    let marker = run(
        &server.envd(&keep, Some(&keep_token)),
        "echo kept > /tmp/marker; sleep 600 &",
        None,
    )
    .await;
    assert_eq!(marker.exit_code, 0);
    let pids: Vec<i32> = [
        stored_pid(&server.data, &keep).await,
        stored_pid(&server.data, &short).await,
        stored_pid(&server.data, &doomed).await,
    ]
    .to_vec();

    // A graceful stop leaves every sandbox running.
    let status = server.stop(libc::SIGINT);
    assert!(status.success(), "{status:?}");
    assert!(
        pids.iter().all(|p| alive(*p)),
        "a sandbox died with the server"
    );
    // One dies while the server is down.
    // SAFETY: kill(2) on the PID 1 of a sandbox this test created.
    assert_eq!(unsafe { libc::kill(pids[2], libc::SIGKILL) }, 0);
    assert!(eventually(Duration::from_secs(10), || async { !alive(pids[2]) }).await);

    server.restart();
    let api = server.api();
    // The survivor is adopted: same files, same expiry, reachable with its old token.
    let envd = server.envd(&keep, Some(&keep_token));
    assert_eq!(run(&envd, "cat /tmp/marker", None).await.stdout, "kept\n");
    assert_eq!(api.get(&keep).await.body["endAt"], keep_end);
    // The dead one was reaped at start.
    assert_eq!(api.get(&doomed).await.status, StatusCode::NOT_FOUND);
    assert!(!server.data.join("sandboxes").join(&doomed).exists());
    // The short one's expiry was re-armed.
    assert!(
        eventually(Duration::from_secs(40), || async {
            api.get(&short).await.status == StatusCode::NOT_FOUND
        })
        .await,
        "adopted sandbox never expired"
    );
    assert!(!alive(pids[1]));

    // Death while the server runs is noticed too.
    // SAFETY: kill(2) on the PID 1 of a sandbox this test created.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGKILL) }, 0);
    assert!(
        eventually(Duration::from_secs(20), || async {
            api.get(&keep).await.status == StatusCode::NOT_FOUND
        })
        .await,
        "dead sandbox was not reaped"
    );
    assert!(!server.data.join("sandboxes").join(&keep).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn timeouts_expire_sandboxes() {
    let server = Server::start("soulbox-test-cli-expiry");
    let api = server.api();
    let (a, _) = api.create(new_sandbox(2, json!({}))).await;
    let (b, _) = api.create(new_sandbox(300, json!({}))).await;
    // Shortening works (E2B allows it), and so does the v1 route's default.
    let r = api
        .call(
            Method::POST,
            &format!("/sandboxes/{b}/timeout"),
            Some(json!({"timeout": 1})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = api
        .call(
            Method::POST,
            "/sandboxes",
            Some(json!({"templateID": "base"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert!(
        r.body.get("envdAccessToken").is_none(),
        "v1 without secure has no token"
    );
    let c = r.body["sandboxID"].as_str().expect("id").to_owned();
    let started = std::time::Instant::now();
    for id in [&a, &b, &c] {
        assert!(
            eventually(Duration::from_secs(60), || async {
                api.get(id).await.status == StatusCode::NOT_FOUND
            })
            .await,
            "{id} did not expire"
        );
        assert!(!server.data.join("sandboxes").join(id).exists());
    }
    // c had the v1 default of 15 s: it cannot have gone much earlier.
    assert!(started.elapsed() >= Duration::from_secs(10));
}

/// Whether the host has the nftables table `inet <name>`.
fn nft_table(name: &str) -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", "inet", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn mounted(dir: &std::path::Path) -> bool {
    let dir = dir.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*dir))
}

#[tokio::test(flavor = "multi_thread")]
async fn down_takes_a_stopped_servers_sandboxes_network_and_mount_off_the_host() {
    const CGROUP: &str = "soulbox-test-cli-down";
    let mut server = Server::start(CGROUP);
    let api = server.api();
    let (id, _) = api.create(new_sandbox(300, json!({}))).await;
    let pid = stored_pid(&server.data, &id).await;
    let sandboxes = server.data.join("sandboxes");

    let refused = server.down();
    assert!(!refused.status.success(), "down ran beside a live server");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("stop the server first"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(alive(pid));

    assert!(server.stop(libc::SIGTERM).success());
    assert!(alive(pid), "the sandbox died with the server");
    assert!(nft_table(CGROUP) && mounted(&sandboxes));

    let out = server.down();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("deleted the nftables table"), "{stdout}");
    assert!(
        eventually(Duration::from_secs(10), || async { !alive(pid) }).await,
        "sandbox still running after down"
    );
    assert!(!nft_table(CGROUP), "table left");
    assert!(!mounted(&sandboxes), "disk image still mounted");
    assert!(
        !std::path::Path::new("/sys/fs/cgroup/pids")
            .join(CGROUP)
            .exists(),
        "parent cgroup left"
    );
    // Nothing left: a second run finds nothing to do.
    let again = server.down();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("killed 0 sandboxes"));

    // The next start has forgotten the sandbox and works.
    server.restart();
    let api = server.api();
    assert_eq!(api.get(&id).await.status, StatusCode::NOT_FOUND);
    let (fresh, token) = api.create(new_sandbox(60, json!({}))).await;
    let ran = run(&server.envd(&fresh, Some(&token)), "echo ok", None).await;
    assert_eq!(ran.stdout, "ok\n");
}
