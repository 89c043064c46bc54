//! Bounds on sandbox ports (issue 8): 10 000 idle WebSockets to one sandbox get at most the
//! per-sandbox tunnel cap, the rest a quick 503, and the gateway keeps serving everything else
//! meanwhile. Own test binary: it holds ~10 000 sockets.

mod common;

use std::time::{Duration, Instant};

use common::ports::{Gateway, Mode, start_app, ws_recv, ws_send};
use common::{Server, eventually, new_sandbox};
use http::StatusCode;
use serde_json::json;

/// `soulbox_gateway::Limits::default().max_tunnels_per_sandbox`.
const PER_SANDBOX: usize = 256;
const CONNECTIONS: usize = 10_000;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_idle_websockets_to_one_sandbox_are_bounded() {
    let server = Server::start_with(
        "soulbox-test-cli-ports-limits",
        &[
            "--domain",
            "soulbox-limits.localhost",
            "--tls-addr",
            "127.0.0.1:0",
        ],
    );
    let gw = Gateway::of(&server);
    let api = server.api();
    let (busy, busy_token) = api.create(new_sandbox(600, json!({}))).await;
    let (other, other_token) = api.create(new_sandbox(600, json!({}))).await;
    start_app(&server, &busy, &busy_token, 8000).await;
    start_app(&server, &other, &other_token, 8000).await;
    for id in [&busy, &other] {
        let up = eventually(Duration::from_secs(30), || async {
            gw.get(Mode::Url, id, 8000, "/hello").await.0 == StatusCode::OK
        })
        .await;
        assert!(up, "app in {id}");
    }
    let pid = server.pid();
    let rss_before = rss_kib(pid);

    // A bounded loop on loopback: every connection asks for a WebSocket and keeps it.
    let t0 = Instant::now();
    let mut open = Vec::new();
    // Refused ones stay connected too (idle, kept alive): 10 000 client connections at once.
    let mut refused = Vec::new();
    for _ in 0..CONNECTIONS {
        let (status, ws) = gw.websocket(Mode::Url, &busy, 8000, "").await;
        match status {
            101 => open.push(ws),
            503 => refused.push(ws),
            other => panic!("unexpected status {other}"),
        }
    }
    let elapsed = t0.elapsed();
    eprintln!(
        "{CONNECTIONS} WebSocket requests in {:.1} s: {} open, {} refused (503); \
         server RSS {} -> {} MiB",
        elapsed.as_secs_f64(),
        open.len(),
        refused.len(),
        rss_before / 1024,
        rss_kib(pid) / 1024
    );
    assert_eq!(open.len(), PER_SANDBOX, "the per-sandbox cap");
    assert_eq!(refused.len(), CONNECTIONS - PER_SANDBOX);

    // With the sandbox at its cap, the gateway still serves: that sandbox's envd, the other
    // sandbox's ports, its own health, and the open WebSockets.
    for mode in [Mode::Url, Mode::DomainH2] {
        let (status, _, _) = gw.get(mode, &busy, 49983, "/health").await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _, body) = gw.get(mode, &other, 8000, "/hello").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body.as_ref(), b"hello from the sandbox");
        let (status, _, _) = gw.get(mode, &busy, 8000, "/hello").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{mode:?}");
    }
    for ws in open.iter_mut().step_by(51) {
        ws_send(ws, 0x1, b"still there").await;
        assert_eq!(ws_recv(ws).await, (0x1, b"still there".to_vec()));
    }

    // Closing them gives the slots back.
    drop((open, refused));
    let freed = eventually(Duration::from_secs(30), || async {
        gw.get(Mode::Url, &busy, 8000, "/hello").await.0 == StatusCode::OK
    })
    .await;
    assert!(freed, "tunnel slots were not given back");
}
