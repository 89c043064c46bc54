//! One development agent per test binary, on an ephemeral port, in this process (a second
//! agent would start a second reaper), plus raw-HTTP helpers for what the envd client does
//! not cover. Tests must not spawn processes themselves (the agent's reaper would take their
//! exit statuses): they run everything through the agent.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use soulbox_client::envd::{CallOptions, EnvdClient, MessageStream};
use soulbox_wire::envd::process::{self as pb, process_event};

pub fn addr() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            soulbox_agent::run(
                soulbox_agent::Listener::Tcp(l),
                soulbox_agent::Mode::Development,
                None,
            )
            .expect("agent");
        });
        addr
    })
}

pub fn client() -> EnvdClient {
    EnvdClient::new(&format!("http://{}", addr())).expect("client")
}

pub fn scratch() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "soulbox-agent-test-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}", N.fetch_add(1, Ordering::Relaxed))
}

pub fn bash(cmd: &str) -> pb::StartRequest {
    pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-c".into(), cmd.into()],
            envs: Default::default(),
            cwd: None,
        }),
        pty: None,
        tag: None,
        stdin: Some(false),
    }
}

/// Everything a finished process stream carried.
#[derive(Debug, Default)]
pub struct Outcome {
    pub pid: u32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub pty: Vec<u8>,
    pub keepalives: usize,
    pub end: Option<process_event::EndEvent>,
    pub events: Vec<&'static str>,
}

pub async fn collect<M>(
    mut s: MessageStream<M>,
    event: fn(M) -> Option<pb::ProcessEvent>,
) -> Outcome
where
    M: prost::Message + Default + serde::de::DeserializeOwned,
{
    let mut o = Outcome::default();
    while let Some(msg) = s.next().await {
        let msg = msg.expect("stream message");
        let Some(ev) = event(msg).and_then(|e| e.event) else {
            continue;
        };
        match ev {
            process_event::Event::Start(s) => {
                o.pid = s.pid;
                o.events.push("start");
            }
            process_event::Event::Data(d) => {
                o.events.push("data");
                match d.output {
                    Some(process_event::data_event::Output::Stdout(b)) => o.stdout.extend(b),
                    Some(process_event::data_event::Output::Stderr(b)) => o.stderr.extend(b),
                    Some(process_event::data_event::Output::Pty(b)) => o.pty.extend(b),
                    None => {}
                }
            }
            process_event::Event::End(e) => {
                o.events.push("end");
                o.end = Some(e);
            }
            process_event::Event::Keepalive(_) => {
                o.events.push("keepalive");
                o.keepalives += 1;
            }
        }
    }
    o
}

pub async fn run(req: pb::StartRequest, opts: &CallOptions) -> Outcome {
    let s = client().start(&req, opts).await.expect("start");
    collect(s, |m: pb::StartResponse| m.event).await
}

/// Reads the first (start) event of a process stream and returns the pid.
pub async fn first_pid<M>(s: &mut MessageStream<M>, event: fn(M) -> Option<pb::ProcessEvent>) -> u32
where
    M: prost::Message + Default + serde::de::DeserializeOwned,
{
    let first = s.next().await.expect("first event").expect("ok");
    match event(first).and_then(|e| e.event) {
        Some(process_event::Event::Start(s)) => s.pid,
        other => panic!("expected start, got {other:?}"),
    }
}

/// A raw HTTP request to the agent.
pub async fn raw(
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (http::StatusCode, http::HeaderMap, Bytes) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut b =
        http::Request::builder()
            .method(method)
            .uri(format!("http://{}{}", addr(), path_and_query));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client
        .request(b.body(Full::new(body.into())).expect("request"))
        .await
        .expect("send");
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, body)
}

pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).expect("json body")
}

pub async fn wait_until(mut cond: impl FnMut() -> bool, what: &str) {
    for _ in 0..100 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Asserts that a raw connection to the agent still answers a request: the agent did not close
/// it after the previous one.
pub async fn assert_still_serves(conn: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 204"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
}
