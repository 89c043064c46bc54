//! `/_soulbox/tunnel/<port>`: the agent connects to a local TCP port and splices the upgraded
//! connection to it (the development agent reaches this machine's loopback, as a sandboxed
//! agent reaches its sandbox's).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sends a tunnel request for `path` to the agent; returns the status, the head, and the
/// connection (positioned after the head).
async fn request(path: &str, upgrade: bool) -> (u16, String, TcpStream) {
    let mut s = TcpStream::connect(common::addr())
        .await
        .expect("connect agent");
    let headers = if upgrade {
        "Connection: upgrade\r\nUpgrade: soulbox-tunnel\r\n"
    } else {
        ""
    };
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n").as_bytes())
        .await
        .expect("send head");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).await.expect("read head");
        assert_eq!(n, 1, "agent closed before the end of the head: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("utf-8 head");
    let status = head[9..12].parse().expect("status");
    (status, head, s)
}

/// Reads the JSON body of a non-101 answer (Content-Length framed).
async fn body(head: &str, s: &mut TcpStream) -> serde_json::Value {
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().expect("length"))
        })
        .expect("content-length");
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await.expect("body");
    serde_json::from_slice(&buf).expect("json body")
}

async fn echo_server(addr: &str) -> SocketAddr {
    let l = TcpListener::bind(addr).await.expect("bind echo server");
    let local = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                s.write_all(b"hello\n").await.ok();
                let (mut r, mut w) = s.split();
                tokio::io::copy(&mut r, &mut w).await.ok();
                w.shutdown().await.ok();
            });
        }
    });
    local
}

#[tokio::test]
async fn tunnel_splices_both_ways_including_server_first_bytes_and_half_close() {
    let server = echo_server("127.0.0.1:0").await;
    let (status, head, mut s) = request(&format!("/_soulbox/tunnel/{}", server.port()), true).await;
    assert_eq!(status, 101, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("upgrade: soulbox-tunnel"),
        "{head}"
    );
    let mut greeting = [0u8; 6];
    s.read_exact(&mut greeting).await.expect("greeting");
    assert_eq!(&greeting, b"hello\n");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.expect("write");
        // Half-close: the server sees the end and closes its side after echoing everything.
        w.shutdown().await.expect("shutdown");
    });
    let mut echoed = Vec::new();
    r.read_to_end(&mut echoed).await.expect("read echo");
    writer.await.expect("writer");
    assert_eq!(echoed.len(), payload.len());
    assert!(echoed == payload, "echo differs");
}

#[tokio::test]
async fn tunnel_reaches_a_server_on_the_ipv6_loopback_only() {
    let Ok(l) = std::net::TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback on this machine; nothing to test");
        return;
    };
    drop(l);
    let server = echo_server("[::1]:0").await;
    let (status, head, mut s) = request(&format!("/_soulbox/tunnel/{}", server.port()), true).await;
    assert_eq!(status, 101, "{head}");
    let mut greeting = [0u8; 6];
    s.read_exact(&mut greeting).await.expect("greeting");
    assert_eq!(&greeting, b"hello\n");
}

#[tokio::test]
async fn closed_port_is_502_with_a_message() {
    // A port that was just free: nothing listens there now.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let (status, head, mut s) = request(&format!("/_soulbox/tunnel/{port}"), true).await;
    assert_eq!(status, 502, "{head}");
    let b = body(&head, &mut s).await;
    assert_eq!(b["code"], 502);
    let message = b["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("port {port}")), "{message}");
}

#[tokio::test]
async fn bad_ports_and_plain_requests_are_400() {
    for path in [
        "/_soulbox/tunnel/0",
        "/_soulbox/tunnel/65536",
        "/_soulbox/tunnel/99999",
        "/_soulbox/tunnel/abc",
        "/_soulbox/tunnel/",
        "/_soulbox/tunnel/-1",
        "/_soulbox/tunnel/080",
    ] {
        let (status, head, mut s) = request(path, true).await;
        assert_eq!(status, 400, "{path}: {head}");
        assert_eq!(body(&head, &mut s).await["code"], 400);
    }
    let server = echo_server("127.0.0.1:0").await;
    let (status, head, _) = request(&format!("/_soulbox/tunnel/{}", server.port()), false).await;
    assert_eq!(
        status, 400,
        "a request without Upgrade opens no tunnel: {head}"
    );
}
