//! Sandbox ports (issue 8) end to end: a real `soulbox serve` in domain mode, a real sandbox
//! running a web server bound to its loopback, reached through the gateway's tunnels in URL
//! mode (routing headers) and domain mode (TLS, `<port>-<id>.<domain>`, HTTP/1.1 and HTTP/2).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::ports::{Gateway, Mode, start_app, ws_recv, ws_send};
use common::{Server, eventually, new_sandbox, run};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

const DOMAIN: &str = "soulbox-test.localhost";
const APP_PORT: u16 = 8000;

fn domain_server(cgroup: &str) -> Server {
    Server::start_with(cgroup, &["--domain", DOMAIN, "--tls-addr", "127.0.0.1:0"])
}

fn json_of(b: &Bytes) -> Value {
    serde_json::from_slice(b).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread")]
async fn user_ports_through_url_and_domain_mode() {
    let server = domain_server("soulbox-test-cli-ports");
    let gw = Gateway::of(&server);
    assert!(
        gw.domain.starts_with(&format!("{DOMAIN}:")),
        "{}",
        gw.domain
    );
    let api = server.api();
    let (id, token) = api.create(new_sandbox(300, json!({}))).await;
    start_app(&server, &id, &token, APP_PORT).await;
    let up = eventually(Duration::from_secs(30), || async {
        gw.get(Mode::Url, &id, APP_PORT, "/hello").await.0 == StatusCode::OK
    })
    .await;
    assert!(up, "the app never answered through the tunnel");

    for mode in [Mode::Url, Mode::Domain, Mode::DomainH2] {
        let (status, _, body) = gw.get(mode, &id, APP_PORT, "/hello").await;
        assert_eq!(
            (status, body.as_ref()),
            (StatusCode::OK, &b"hello from the sandbox"[..]),
            "{mode:?}"
        );
        // What the server in the sandbox sees.
        let (_, _, body) = gw.get(mode, &id, APP_PORT, "/headers").await;
        let seen = json_of(&body);
        let proto = if mode == Mode::Url { "http" } else { "https" };
        assert_eq!(seen["x-forwarded-proto"], proto, "{mode:?}");
        assert!(seen["x-forwarded-for"].as_str().is_some(), "{seen}");
        if mode != Mode::Url {
            assert_eq!(
                seen["host"],
                gw.host(&id, APP_PORT),
                "the client's host is kept"
            );
        }
        // A body of some size both ways.
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let req = Request::builder()
            .method(Method::POST)
            .uri("/echo")
            .body(Full::new(Bytes::from(payload.clone())))
            .expect("request");
        let r = gw.send(mode, &id, APP_PORT, req).await;
        assert_eq!(r.status(), StatusCode::OK);
        let echoed = r.into_body().collect().await.expect("echo").to_bytes();
        assert!(echoed == payload, "{mode:?}: echo differs");
        let (status, _, big) = gw.get(mode, &id, APP_PORT, "/big?n=5000000").await;
        assert_eq!((status, big.len()), (StatusCode::OK, 5_000_000), "{mode:?}");
        assert!(big.iter().enumerate().all(|(i, b)| *b == (i % 256) as u8));
    }

    // Server-sent events are streamed: the first event arrives while the server still waits
    // for the gate file, which only appears after the test has read that event.
    let envd = server.envd(&id, Some(&token));
    for (i, mode) in [Mode::Url, Mode::Domain, Mode::DomainH2]
        .into_iter()
        .enumerate()
    {
        let gate = format!("/tmp/sse-gate-{i}");
        let req = Request::get(format!("/sse?gate={gate}"))
            .body(Full::default())
            .expect("request");
        let r = gw.send(mode, &id, APP_PORT, req).await;
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let mut body = r.into_body();
        let mut seen = String::new();
        while !seen.contains("data: 0") {
            let frame = tokio::time::timeout(Duration::from_secs(30), body.frame())
                .await
                .expect("first event streamed before the gate opens")
                .expect("stream open")
                .expect("frame");
            if let Ok(data) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
        }
        assert!(!seen.contains("data: 1"), "{seen}");
        let opened = run(&envd, &format!("touch {gate}"), Some("user")).await;
        assert_eq!(opened.exit_code, 0);
        let rest = tokio::time::timeout(Duration::from_secs(30), body.collect())
            .await
            .expect("rest in time")
            .expect("rest")
            .to_bytes();
        seen.push_str(&String::from_utf8_lossy(&rest));
        assert_eq!(seen, "data: 0\n\ndata: 1\n\ndata: 2\n\n", "{mode:?}");
    }

    // WebSockets (HTTP/1.1 upgrades) both ways, in both modes.
    for mode in [Mode::Url, Mode::Domain] {
        let (status, mut ws) = gw.websocket(mode, &id, APP_PORT, "").await;
        assert_eq!(status, 101, "{mode:?}");
        for msg in [&b"hello"[..], &vec![7u8; 100_000][..]] {
            ws_send(&mut ws, 0x2, msg).await;
            assert_eq!(ws_recv(&mut ws).await, (0x2, msg.to_vec()), "{mode:?}");
        }
        ws_send(&mut ws, 0x9, b"ping").await;
        assert_eq!(ws_recv(&mut ws).await, (0xA, b"ping".to_vec()));
        ws_send(&mut ws, 0x8, &1000u16.to_be_bytes()).await;
        assert_eq!(ws_recv(&mut ws).await.0, 0x8);
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(30), ws.read_to_end(&mut rest))
            .await
            .expect("closed after the close frame")
            .expect("read");
        assert_eq!(n, 0);
    }

    // A port nobody listens on, and the server's own ports (a tunnel only reaches the
    // sandbox's loopback).
    let api_port: u16 = server
        .api_url
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("api port");
    for port in [8001, api_port, gw.tls_port] {
        for mode in [Mode::Url, Mode::DomainH2] {
            let (status, _, body) = gw.get(mode, &id, port, "/health").await;
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{port} {mode:?}");
            let body = json_of(&body);
            assert_eq!(body["port"], port);
            assert_eq!(body["sandboxId"], id);
            assert_eq!(
                body["message"],
                "The sandbox is running but port is not open"
            );
        }
    }

    // envd (49983) through domain mode: its own health, and never the agent's internals.
    for mode in [Mode::Domain, Mode::DomainH2] {
        let (status, _, _) = gw.get(mode, &id, 49983, "/health").await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{mode:?}");
        let (status, _, _) = gw
            .get(mode, &id, 49983, &format!("/_soulbox/tunnel/{APP_PORT}"))
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{mode:?}");
    }

    // The control plane on api.<domain>, over the same TLS listener.
    let api_host = format!("api.{}", gw.domain);
    let io = gw.connect(Mode::DomainH2, &api_host).await;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .expect("h2");
    tokio::spawn(conn);
    let req = Request::get(format!("https://{api_host}/sandboxes/{id}"))
        .header("x-api-key", &server.api_key)
        .body(Full::<Bytes>::default())
        .expect("request");
    let r = send.send_request(req).await.expect("response");
    assert_eq!(r.status(), StatusCode::OK);
    let detail = json_of(&r.into_body().collect().await.expect("body").to_bytes());
    assert_eq!(detail["sandboxID"], id);
    assert_eq!(detail["domain"], gw.domain);

    // The CLI prints the URL.
    let out = server.cli(&["url", &id, &APP_PORT.to_string()]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("https://{}", gw.host(&id, APP_PORT))
    );
    for bad in ["0", "65536", "http"] {
        let out = server.cli(&["url", &id, bad]);
        assert!(!out.status.success(), "port {bad}: {out:?}");
    }

    // A dead sandbox is "not found", whichever way it is addressed.
    let killed = api
        .call(Method::DELETE, &format!("/sandboxes/{id}"), None)
        .await;
    assert_eq!(killed.status, StatusCode::NO_CONTENT);
    for mode in [Mode::Url, Mode::Domain, Mode::DomainH2] {
        let (status, _, body) = gw.get(mode, &id, APP_PORT, "/hello").await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(
            json_of(&body)["message"]
                .as_str()
                .unwrap_or("")
                .contains("was not found"),
            "{mode:?}"
        );
    }
}
