//! The gateway over real HTTP with a real manager: routing decisions and error answers that
//! need no live sandbox (flows through live sandboxes are in soulbox-cli's tests).

use bytes::Bytes;
use chrono::Utc;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use soulbox_gateway::GatewayConfig;

mod common;

struct Gateway {
    url: String,
    http: Client<HttpConnector, Full<Bytes>>,
    _env: common::Env,
}

async fn start() -> Gateway {
    let env = common::env("soulbox-test-gateway").await;
    let url = common::serve_plain(common::gateway(&env, GatewayConfig::default())).await;
    Gateway {
        url,
        http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        _env: env,
    }
}

impl Gateway {
    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .http
            .request(
                req.body(Full::new(Bytes::from_static(b"{}")))
                    .expect("request"),
            )
            .await
            .expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, body)
    }
}

#[tokio::test]
async fn own_health_when_no_sandbox_is_addressed() {
    let g = start().await;
    let (status, body) = g.call(Method::GET, "/health", &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, Value::String("OK".into()));
}

#[tokio::test]
async fn unknown_sandboxes_are_502_was_not_found() {
    let g = start().await;
    let long = "a".repeat(300);
    for id in [
        "zzzzzzzzzzzzzzzzzzzz",
        "UPPER",
        "has-dash",
        long.as_str(),
        "..%2f..%2fetc",
    ] {
        for path in [
            "/health",
            "/filesystem.Filesystem/Stat",
            "/files?path=/etc/hostname",
        ] {
            let (status, body) = g
                .call(
                    Method::POST,
                    path,
                    &[
                        ("E2b-Sandbox-Id", id),
                        ("E2b-Sandbox-Port", "49983"),
                        ("X-Access-Token", "t"),
                    ],
                )
                .await;
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{id} {path}");
            assert_eq!(body["sandboxId"], id);
            assert_eq!(body["code"], 502);
            assert!(
                body["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("was not found"),
                "{body}"
            );
        }
    }
    // Host routing finds the same nothing.
    let (status, body) = g
        .call(
            Method::GET,
            "/health",
            &[("Host", "49983-zzzzzzzzzzzzzzzzzzzz.sb.example")],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body["sandboxId"], "zzzzzzzzzzzzzzzzzzzz");
}

#[tokio::test]
async fn half_the_routing_headers_is_400() {
    let g = start().await;
    for headers in [[("E2b-Sandbox-Id", "abc")], [("E2b-Sandbox-Port", "49983")]] {
        let (status, body) = g.call(Method::GET, "/health", &headers).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("Missing header"),
            "{body}"
        );
        assert_eq!(body["code"], 400);
    }
    let (status, _) = g
        .call(
            Method::GET,
            "/health",
            &[("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "x")],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn requests_without_a_sandbox() {
    let g = start().await;
    let (status, body) = g.call(Method::POST, "/process.Process/List", &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], 400);
    // A signed /files URL that no live sandbox signed, expired or not: envd's 401 for a
    // signature that is not the sandbox's (the URL names no sandbox that could be "not found").
    let sig = soulbox_gateway::signature("/home/user/a.txt", "read", "", "gone", None);
    let path = format!(
        "/files?path=%2Fhome%2Fuser%2Fa.txt&signature={}",
        sig.replace('/', "%2F").replace('+', "%2B")
    );
    let (status, body) = g.call(Method::GET, &path, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, json!({"code": 401, "message": "invalid signature"}));
    let expired = format!(
        "{path}&signature_expiration={}",
        Utc::now().timestamp() - 10
    );
    let (status, body) = g.call(Method::POST, &expired, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, json!({"code": 401, "message": "invalid signature"}));
}

#[tokio::test]
async fn internal_agent_paths_are_never_forwarded() {
    let g = start().await;
    for path in ["/_soulbox/init", "/%5Fsoulbox/init", "//_soulbox/init"] {
        let (status, _) = g
            .call(
                Method::POST,
                path,
                &[
                    ("E2b-Sandbox-Id", "zzzzzzzzzzzzzzzzzzzz"),
                    ("E2b-Sandbox-Port", "49983"),
                ],
            )
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
    }
}
