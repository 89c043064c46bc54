//! The control plane over real HTTP: a real SQLite file, a real runtime, an ephemeral port.
//! Nothing here creates a sandbox (that needs the agent binary; see soulbox-cli's tests): these
//! are the error paths, authentication, and listing/pagination over stored rows.

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use soulbox_core::ManagerConfig;
use soulbox_store::{SandboxRecord, Store, generate_api_key};
use soulbox_wire::rest::SandboxState;

struct Server {
    url: String,
    key: String,
    store: Store,
    http: Client<HttpConnector, Full<Bytes>>,
    _dir: tempfile::TempDir,
}

struct Reply {
    status: StatusCode,
    headers: http::HeaderMap,
    body: Value,
}

async fn start() -> Server {
    let b = common::boot("soulbox-test-api", |_| ManagerConfig::default()).await;
    Server {
        url: b.url,
        key: b.key,
        store: b.store,
        http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        _dir: b.dir,
    }
}

impl Server {
    async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body)))
            .expect("request");
        let resp = self.http.request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Reply {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// An authenticated call with a JSON body (or none).
    async fn api(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        self.call(
            method,
            path,
            &[
                ("X-API-KEY", &self.key),
                ("content-type", "application/json"),
            ],
            bytes.as_bytes(),
        )
        .await
    }
}

/// `{"code": status, "message": non-empty}` with a JSON content type.
fn assert_error(r: &Reply, status: StatusCode) -> String {
    assert_eq!(r.status, status, "{:?}", r.body);
    let ct = r
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(ct.starts_with("application/json"), "content-type {ct}");
    assert_eq!(r.body["code"], status.as_u16(), "{:?}", r.body);
    let message = r.body["message"].as_str().unwrap_or("").to_owned();
    assert!(!message.is_empty(), "{:?}", r.body);
    message
}

const UNKNOWN: &str = "zzzzzzzzzzzzzzzzzzzz";

#[tokio::test]
async fn health_needs_no_key() {
    let s = start().await;
    let r = s.call(Method::GET, "/health", &[], b"").await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn every_route_needs_a_valid_key() {
    let s = start().await;
    let routes = [
        (Method::POST, "/sandboxes".to_owned()),
        (Method::POST, "/v2/sandboxes".to_owned()),
        (Method::GET, "/sandboxes".to_owned()),
        (Method::GET, "/v2/sandboxes".to_owned()),
        (Method::GET, format!("/sandboxes/{UNKNOWN}")),
        (Method::DELETE, format!("/sandboxes/{UNKNOWN}")),
        (Method::POST, format!("/sandboxes/{UNKNOWN}/timeout")),
        (Method::POST, format!("/sandboxes/{UNKNOWN}/connect")),
        (Method::POST, format!("/v2/sandboxes/{UNKNOWN}/connect")),
    ];
    let wrong = generate_api_key();
    let bearer_wrong = format!("Bearer {wrong}");
    let cases: [&[(&str, &str)]; 5] = [
        &[],
        &[("x-api-key", &wrong)],
        &[("X-Api-Key", "not-even-a-key")],
        &[("x-api-key", "")],
        &[("authorization", &bearer_wrong)],
    ];
    for (method, path) in &routes {
        for headers in cases {
            let r = s
                .call(method.clone(), path, headers, br#"{"templateID":"base"}"#)
                .await;
            assert_error(&r, StatusCode::UNAUTHORIZED);
        }
    }
    // Any spelling of the header, and a bearer token, are accepted.
    for headers in [
        [("X-API-KEY", s.key.as_str())],
        [("x-api-key", s.key.as_str())],
    ] {
        let r = s.call(Method::GET, "/v2/sandboxes", &headers, b"").await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    let bearer = format!("Bearer {}", s.key);
    let r = s
        .call(
            Method::GET,
            "/v2/sandboxes",
            &[("authorization", &bearer)],
            b"",
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
}

#[tokio::test]
async fn malformed_bodies_are_400() {
    let s = start().await;
    for route in ["/sandboxes", "/v2/sandboxes"] {
        for body in [
            &br#"{"templateID": "base", "timeout": "#[..],
            br#"{"templateID": "base", "timeout": "ten"}"#,
            br#"{"templateID": 5}"#,
            br#"{"timeout": 5}"#,
            br#"{"templateID": "base", "metadata": {"k": 1}}"#,
            br#"{"templateID": "base", "envVars": ["A=1"]}"#,
            br#"{"templateID": "base", "envVars": {"A=B": "x"}}"#,
            br#"{"templateID": "base", "envVars": {"": "x"}}"#,
            b"[]",
            b"",
            b"\xff\xfe",
        ] {
            let r = s
                .call(
                    Method::POST,
                    route,
                    &[("x-api-key", &s.key), ("content-type", "application/json")],
                    body,
                )
                .await;
            assert_error(&r, StatusCode::BAD_REQUEST);
        }
    }
    let r = s
        .api(
            Method::POST,
            &format!("/sandboxes/{UNKNOWN}/timeout"),
            Some(json!({"timeout": "x"})),
        )
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST);
    // Pause, resume and keep-alive bodies are optional but must be well-formed when sent.
    for (path, body) in [
        ("pause", json!({"memory": "yes"})),
        ("pause", json!({"requireHealthyGuest": 1})),
        ("resume", json!({"timeout": "x"})),
        ("resume", json!({"timeout": -1})),
        ("refreshes", json!({"duration": 3601})),
        ("refreshes", json!({"duration": -1})),
    ] {
        let r = s
            .api(
                Method::POST,
                &format!("/sandboxes/{UNKNOWN}/{path}"),
                Some(body),
            )
            .await;
        assert_error(&r, StatusCode::BAD_REQUEST);
    }
    // autoResume without a pause on timeout, or with a filesystem-only one, cannot work.
    for body in [
        json!({"templateID": "base", "autoResume": {"enabled": true}}),
        json!({"templateID": "base", "autoPause": true, "autoPauseMemory": false,
               "autoResume": {"enabled": true}}),
        json!({"templateID": "base", "autoResume": true}),
    ] {
        let r = s.api(Method::POST, "/v2/sandboxes", Some(body)).await;
        assert_error(&r, StatusCode::BAD_REQUEST);
    }
    // v1 connect requires its body; v2 connect does not (unknown id then answers 404).
    let r = s
        .api(Method::POST, &format!("/sandboxes/{UNKNOWN}/connect"), None)
        .await;
    assert_error(&r, StatusCode::BAD_REQUEST);
    let r = s
        .api(
            Method::POST,
            &format!("/v2/sandboxes/{UNKNOWN}/connect"),
            None,
        )
        .await;
    assert_error(&r, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn bad_timeouts_are_400_and_create_nothing() {
    let s = start().await;
    for route in ["/sandboxes", "/v2/sandboxes"] {
        for timeout in [json!(-5), json!(0), json!(24 * 3600 + 1), json!(1.5)] {
            let r = s
                .api(
                    Method::POST,
                    route,
                    Some(json!({"templateID": "base", "timeout": timeout})),
                )
                .await;
            let msg = assert_error(&r, StatusCode::BAD_REQUEST);
            if timeout == json!(-5) {
                assert_eq!(msg, "Timeout must be greater than 0");
            }
        }
    }
    // Setting a timeout takes 0 (expire now, as E2B does), not less.
    for timeout in [json!(-1), json!(24 * 3600 + 1), json!(0.5)] {
        let r = s
            .api(
                Method::POST,
                &format!("/sandboxes/{UNKNOWN}/timeout"),
                Some(json!({ "timeout": timeout })),
            )
            .await;
        assert_error(&r, StatusCode::BAD_REQUEST);
    }
    let rows = s.store.all_sandboxes().await.expect("rows");
    assert!(rows.is_empty());
}

#[tokio::test]
async fn unknown_template_is_404_naming_it() {
    let s = start().await;
    for route in ["/sandboxes", "/v2/sandboxes"] {
        let r = s
            .api(
                Method::POST,
                route,
                Some(json!({"templateID": "no-such-template"})),
            )
            .await;
        let msg = assert_error(&r, StatusCode::NOT_FOUND);
        assert!(msg.contains("no-such-template"), "{msg}");
    }
}

#[tokio::test]
async fn unknown_sandbox_is_404_everywhere() {
    let s = start().await;
    let cases = [
        (Method::GET, format!("/sandboxes/{UNKNOWN}"), None),
        (Method::DELETE, format!("/sandboxes/{UNKNOWN}"), None),
        (
            Method::POST,
            format!("/sandboxes/{UNKNOWN}/timeout"),
            Some(json!({"timeout": 30})),
        ),
        (
            Method::POST,
            format!("/sandboxes/{UNKNOWN}/timeout"),
            Some(json!({"timeout": 0})),
        ),
        (
            Method::POST,
            format!("/sandboxes/{UNKNOWN}/connect"),
            Some(json!({"timeout": 30})),
        ),
        (
            Method::POST,
            format!("/v2/sandboxes/{UNKNOWN}/connect"),
            Some(json!({"timeout": 30})),
        ),
        (Method::GET, "/sandboxes/..%2f..%2fetc".to_owned(), None),
        (Method::GET, "/sandboxes/UPPER-case".to_owned(), None),
        (Method::POST, format!("/sandboxes/{UNKNOWN}/pause"), None),
        (
            Method::POST,
            format!("/sandboxes/{UNKNOWN}/pause"),
            Some(json!({"memory": false})),
        ),
        (Method::POST, format!("/sandboxes/{UNKNOWN}/resume"), None),
        (
            Method::POST,
            format!("/sandboxes/{UNKNOWN}/refreshes"),
            Some(json!({"duration": 10})),
        ),
        (
            Method::POST,
            format!("/sandboxes/{UNKNOWN}/fork"),
            Some(json!({"count": 2})),
        ),
    ];
    for (method, path, body) in cases {
        let r = s.api(method, &path, body).await;
        assert_error(&r, StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn axum_rejections_get_the_error_body() {
    let s = start().await;
    let r = s.api(Method::GET, "/no/such/route", None).await;
    assert_error(&r, StatusCode::NOT_FOUND);
    let r = s.api(Method::PUT, "/v2/sandboxes", None).await;
    assert_error(&r, StatusCode::METHOD_NOT_ALLOWED);
    let big = vec![b' '; soulbox_api::MAX_BODY_BYTES + 10];
    let r = s
        .call(
            Method::POST,
            "/v2/sandboxes",
            &[("x-api-key", &s.key)],
            &big,
        )
        .await;
    assert_error(&r, StatusCode::PAYLOAD_TOO_LARGE);
}

fn row(id: &str, started_ms: i64, meta: &[(&str, &str)]) -> SandboxRecord {
    let at = |ms| DateTime::from_timestamp_millis(ms).expect("time");
    SandboxRecord {
        id: id.to_owned(),
        template_id: "base".into(),
        alias: Some("base".into()),
        metadata: meta
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        env_vars: BTreeMap::new(),
        access_token: Some("tok".into()),
        started_at: at(started_ms),
        end_at: at(started_ms + 60_000),
        cpu_count: 2,
        memory_mb: 512,
        disk_mb: 1024,
        handle: "{}".into(),
        state: SandboxState::Running,
        lifecycle: "{}".into(),
        pause: None,
    }
}

/// Encodes a metadata filter exactly as Python e2b 2.63 does (protocol doc §3.5).
fn sdk_metadata_query(pairs: &[(&str, &str)]) -> String {
    use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
    // urllib.parse.quote keeps these; quote_plus and httpx's query encoding keep `-._~`.
    const QUOTE: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~')
        .remove(b'/');
    const PLUS: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let k = utf8_percent_encode(k, QUOTE).to_string();
            let v = utf8_percent_encode(v, QUOTE).to_string();
            format!(
                "{}={}",
                utf8_percent_encode(&k, PLUS),
                utf8_percent_encode(&v, PLUS)
            )
        })
        .collect();
    format!("metadata={}", utf8_percent_encode(&inner.join("&"), PLUS))
}

fn ids(r: &Reply) -> Vec<String> {
    r.body
        .as_array()
        .expect("array")
        .iter()
        .map(|s| s["sandboxID"].as_str().expect("id").to_owned())
        .collect()
}

#[tokio::test]
async fn list_filters_and_paginates() {
    let s = start().await;
    let tricky = [
        "with spaces",
        "slash/and/more",
        "percent%20x%",
        "equals=sign==",
        "ünï ✓ 日本",
        "a&b+c",
    ];
    for (i, v) in tricky.iter().enumerate() {
        let id = format!("{i}{}", "a".repeat(19));
        s.store
            .insert_sandbox(&row(&id, 1_000 + i as i64, &[("group", "g"), ("value", v)]))
            .await
            .expect("insert");
    }
    s.store
        .insert_sandbox(&row(&"o".repeat(20), 5, &[("group", "other")]))
        .await
        .expect("insert");

    // Every tricky value finds exactly its sandbox.
    for (i, v) in tricky.iter().enumerate() {
        let q = sdk_metadata_query(&[("group", "g"), ("value", v)]);
        let r = s
            .api(Method::GET, &format!("/v2/sandboxes?{q}"), None)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{q}: {:?}", r.body);
        assert_eq!(ids(&r), vec![format!("{i}{}", "a".repeat(19))], "{v}: {q}");
        assert_eq!(r.body[0]["metadata"]["value"], *v);
    }
    // v1 list takes the same filter and returns running sandboxes.
    let q = sdk_metadata_query(&[("group", "other")]);
    let r = s.api(Method::GET, &format!("/sandboxes?{q}"), None).await;
    assert_eq!(ids(&r), vec!["o".repeat(20)]);

    // Pages of 4 then 2 (newest first), then the rest in ascending order.
    let q = sdk_metadata_query(&[("group", "g")]);
    let r = s
        .api(Method::GET, &format!("/v2/sandboxes?{q}&limit=4"), None)
        .await;
    let first = ids(&r);
    assert_eq!(first.len(), 4);
    assert_eq!(first[0], format!("5{}", "a".repeat(19)));
    let token = r
        .headers
        .get("x-next-token")
        .and_then(|v| v.to_str().ok())
        .expect("next token")
        .to_owned();
    let r = s
        .api(
            Method::GET,
            &format!("/v2/sandboxes?{q}&limit=4&nextToken={token}"),
            None,
        )
        .await;
    let second = ids(&r);
    assert_eq!(second.len(), 2);
    assert!(r.headers.get("x-next-token").is_none());
    let mut all: Vec<String> = first.into_iter().chain(second).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 6);

    let r = s
        .api(
            Method::GET,
            &format!("/v2/sandboxes?{q}&order=asc&limit=1"),
            None,
        )
        .await;
    assert_eq!(ids(&r), vec![format!("0{}", "a".repeat(19))]);

    // Listed entries carry what the SDK parsers require.
    let r = s.api(Method::GET, "/v2/sandboxes?limit=1", None).await;
    let item = &r.body[0];
    for key in [
        "templateID",
        "sandboxID",
        "clientID",
        "startedAt",
        "endAt",
        "cpuCount",
        "memoryMB",
        "diskSizeMB",
        "state",
        "envdVersion",
    ] {
        assert!(!item[key].is_null(), "{key} missing in {item}");
    }

    // State and template filters.
    let r = s.api(Method::GET, "/v2/sandboxes?state=paused", None).await;
    assert_eq!(ids(&r), Vec::<String>::new());
    let r = s
        .api(
            Method::GET,
            "/v2/sandboxes?state=running&template=base&limit=100",
            None,
        )
        .await;
    assert_eq!(ids(&r).len(), 7);
    let r = s
        .api(Method::GET, "/v2/sandboxes?template=nope", None)
        .await;
    assert_eq!(ids(&r), Vec::<String>::new());
    let r = s
        .api(
            Method::GET,
            "/v2/sandboxes?startedAfter=1970-01-01T00%3A00%3A01.002Z",
            None,
        )
        .await;
    assert_eq!(ids(&r).len(), 3);

    // Bad parameters.
    for q in [
        "state=sleeping",
        "order=up",
        "limit=0",
        "limit=1000",
        "nextToken=zz",
        "metadata=novalue",
        "startedAfter=now",
    ] {
        let r = s
            .api(Method::GET, &format!("/v2/sandboxes?{q}"), None)
            .await;
        assert_error(&r, StatusCode::BAD_REQUEST);
    }
}

#[tokio::test]
async fn info_timeout_and_connect_on_a_stored_sandbox() {
    let s = start().await;
    let id = "k".repeat(20);
    s.store
        .insert_sandbox(&row(&id, Utc::now().timestamp_millis(), &[("a", "b")]))
        .await
        .expect("insert");
    let r = s.api(Method::GET, &format!("/sandboxes/{id}"), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["sandboxID"], id.as_str());
    assert_eq!(r.body["envdAccessToken"], "tok");
    assert_eq!(r.body["state"], "running");
    assert_eq!(r.body["metadata"]["a"], "b");
    assert!(r.body.get("domain").is_some());

    let r = s
        .api(
            Method::POST,
            &format!("/sandboxes/{id}/timeout"),
            Some(json!({"timeout": 1000})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let end = |r: &Reply| {
        DateTime::parse_from_rfc3339(r.body["endAt"].as_str().expect("endAt"))
            .expect("rfc3339")
            .with_timezone(&Utc)
    };
    let r = s.api(Method::GET, &format!("/sandboxes/{id}"), None).await;
    let left = (end(&r) - Utc::now()).num_seconds();
    assert!((990..=1000).contains(&left), "{left}");

    // Connect never shortens, and extends when asked for more.
    let r = s
        .api(
            Method::POST,
            &format!("/sandboxes/{id}/connect"),
            Some(json!({"timeout": 10})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["envdAccessToken"], "tok");
    let r = s.api(Method::GET, &format!("/sandboxes/{id}"), None).await;
    assert!((end(&r) - Utc::now()).num_seconds() >= 990);
    let r = s
        .api(
            Method::POST,
            &format!("/v2/sandboxes/{id}/connect"),
            Some(json!({"timeout": 2000})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    let r = s.api(Method::GET, &format!("/sandboxes/{id}"), None).await;
    assert!((end(&r) - Utc::now()).num_seconds() >= 1990);

    // 0 expires it now (E2B answers 204 and the sandbox is gone; this row has no live
    // sandbox to reap, so its deadline is what shows it).
    let r = s
        .api(
            Method::POST,
            &format!("/sandboxes/{id}/timeout"),
            Some(json!({"timeout": 0})),
        )
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{:?}", r.body);
    let r = s.api(Method::GET, &format!("/sandboxes/{id}"), None).await;
    let left = (end(&r) - Utc::now()).num_milliseconds();
    assert!((-5000..=0).contains(&left), "{left}");
}
