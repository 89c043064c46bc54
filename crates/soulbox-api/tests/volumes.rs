//! Volumes over real HTTP: `/volumes` and the volume content API against a real SQLite file and
//! a volumes directory in a temporary dir (plain directories there: not btrfs). No sandbox is
//! created (a create with an unknown volume fails before the runtime is asked).

mod common;

use std::os::unix::fs::symlink;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use soulbox_core::ManagerConfig;

struct Server {
    url: String,
    key: String,
    volumes_dir: std::path::PathBuf,
    http: Client<HttpConnector, Full<Bytes>>,
    _dir: tempfile::TempDir,
}

struct Reply {
    status: StatusCode,
    body: Value,
    bytes: Bytes,
}

async fn start() -> Server {
    let b = common::boot("soulbox-test-api-volumes", |dir| ManagerConfig {
        volumes_dir: Some(dir.join("sandboxes").join("volumes")),
        volume_size_mb: 1,
        ..ManagerConfig::default()
    })
    .await;
    Server {
        url: b.url,
        key: b.key,
        volumes_dir: b.dir.path().join("sandboxes").join("volumes"),
        http: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        _dir: b.dir,
    }
}

impl Server {
    async fn call(&self, method: Method, path: &str, auth: Option<&str>, body: Vec<u8>) -> Reply {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.url));
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let req = req.body(Full::new(Bytes::from(body))).expect("request");
        let resp = self.http.request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        Reply {
            status: parts.status,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            bytes,
        }
    }

    async fn api(&self, method: Method, path: &str, body: Option<Value>) -> Reply {
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        let auth = format!("Bearer {}", self.key);
        self.call(method, path, Some(&auth), bytes).await
    }

    /// A content-API call with `token`.
    async fn content(
        &self,
        method: Method,
        token: &str,
        what: &str,
        path: &str,
        extra: &str,
        body: Vec<u8>,
    ) -> Reply {
        let (id, token) = token.split_once(':').expect("id:token");
        let q = percent_encoding::utf8_percent_encode(path, percent_encoding::NON_ALPHANUMERIC);
        let auth = format!("Bearer {token}");
        self.call(
            method,
            &format!("/volumecontent/{id}/{what}?path={q}{extra}"),
            Some(&auth),
            body,
        )
        .await
    }

    /// Creates volume `name`; `id:token`.
    async fn volume(&self, name: &str) -> String {
        let r = self
            .api(Method::POST, "/volumes", Some(json!({ "name": name })))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
        format!(
            "{}:{}",
            r.body["volumeID"].as_str().expect("id"),
            r.body["token"].as_str().expect("token")
        )
    }
}

fn code(r: &Reply) -> StatusCode {
    if !r.status.is_success() {
        assert_eq!(r.body["code"], r.status.as_u16(), "{:?}", r.body);
        assert!(r.body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    r.status
}

#[tokio::test]
async fn volume_crud_and_names() {
    let s = start().await;
    let vol = s.volume("data").await;
    let id = vol.split_once(':').expect("id").0;
    assert_eq!(
        code(
            &s.api(Method::POST, "/volumes", Some(json!({"name": "data"})))
                .await
        ),
        StatusCode::CONFLICT
    );
    let big = "x".repeat(10 * 1024);
    for bad in ["a/b", "..", ".", "../x", "a\0b", "", "sp ace", big.as_str()] {
        let r = s
            .api(Method::POST, "/volumes", Some(json!({ "name": bad })))
            .await;
        assert_eq!(code(&r), StatusCode::BAD_REQUEST, "{bad:?}");
    }
    let r = s.api(Method::POST, "/volumes", Some(json!({}))).await;
    assert_eq!(code(&r), StatusCode::BAD_REQUEST);
    let listed = s.api(Method::GET, "/volumes", None).await;
    assert_eq!(listed.body, json!([{ "volumeID": id, "name": "data" }]));
    let got = s.api(Method::GET, &format!("/volumes/{id}"), None).await;
    assert_eq!(got.body["token"].as_str(), vol.split_once(':').map(|v| v.1));
    assert_eq!(
        code(&s.api(Method::GET, "/volumes/nope", None).await),
        StatusCode::NOT_FOUND
    );
    // The API key is needed for /volumes.
    let r = s.call(Method::GET, "/volumes", None, Vec::new()).await;
    assert_eq!(code(&r), StatusCode::UNAUTHORIZED);
    assert!(s.volumes_dir.join(id).is_dir());
    let r = s.api(Method::DELETE, &format!("/volumes/{id}"), None).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(!s.volumes_dir.join(id).exists());
    assert_eq!(
        code(&s.api(Method::DELETE, &format!("/volumes/{id}"), None).await),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn content_api_round_trip() {
    let s = start().await;
    let v = s.volume("files").await;
    let (id, token) = v.split_once(':').expect("id:token");
    // Tokens: none, wrong, the API key, another volume's.
    let other = s.volume("other").await;
    let url = format!("/volumecontent/{id}/dir?path=/");
    for auth in [
        None,
        Some("Bearer nope".to_owned()),
        Some(format!("Bearer {}", s.key)),
        Some(format!("Bearer {}", other.split_once(':').expect("t").1)),
    ] {
        let r = s.call(Method::GET, &url, auth.as_deref(), Vec::new()).await;
        assert_eq!(code(&r), StatusCode::UNAUTHORIZED, "{auth:?}");
    }
    let r = s
        .call(
            Method::GET,
            "/volumecontent/nope/dir?path=/",
            Some(&format!("Bearer {token}")),
            Vec::new(),
        )
        .await;
    assert_eq!(code(&r), StatusCode::NOT_FOUND);

    let w = s
        .content(
            Method::PUT,
            &v,
            "file",
            "/a/b.txt",
            "&force=true",
            b"hello".to_vec(),
        )
        .await;
    assert_eq!(code(&w), StatusCode::CREATED, "{:?}", w.body);
    assert_eq!(w.body["size"], 5);
    assert_eq!(w.body["type"], "file");
    assert_eq!(w.body["uid"], 1000);
    let r = s
        .content(Method::GET, &v, "file", "a/b.txt", "", Vec::new())
        .await;
    assert_eq!((r.status, &r.bytes[..]), (StatusCode::OK, &b"hello"[..]));
    let l = s
        .content(Method::GET, &v, "dir", "/", "&depth=2", Vec::new())
        .await;
    let paths: Vec<&str> = l
        .body
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    assert_eq!(paths, ["/a", "/a/b.txt"]);
    let p = s
        .content(
            Method::PATCH,
            &v,
            "path",
            "/a/b.txt",
            "",
            json!({"mode": 0o600, "uid": 0}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(
        (p.body["mode"].as_u64(), p.body["uid"].as_u64()),
        (Some(0o600), Some(0))
    );
    let bad_id = s
        .content(
            Method::PATCH,
            &v,
            "path",
            "/a/b.txt",
            "",
            json!({"uid": 70000}).to_string().into_bytes(),
        )
        .await;
    assert_eq!(code(&bad_id), StatusCode::BAD_REQUEST);
    let d = s
        .content(Method::POST, &v, "dir", "/x/y", "&force=true", Vec::new())
        .await;
    assert_eq!(code(&d), StatusCode::CREATED);
    let again = s
        .content(Method::POST, &v, "dir", "/x/y", "", Vec::new())
        .await;
    assert_eq!(code(&again), StatusCode::CONFLICT);
    let missing = s
        .content(Method::GET, &v, "path", "/nope", "", Vec::new())
        .await;
    assert_eq!(code(&missing), StatusCode::NOT_FOUND);
    let no_parent = s
        .content(Method::PUT, &v, "file", "/no/dir/f", "", b"x".to_vec())
        .await;
    assert_eq!(code(&no_parent), StatusCode::NOT_FOUND);
    for bad in ["../x", "/a/../../x", "a\0b", &"a/".repeat(3000)] {
        let r = s
            .content(Method::GET, &v, "file", bad, "", Vec::new())
            .await;
        assert_eq!(code(&r), StatusCode::BAD_REQUEST, "{bad:?}");
    }
    // A directory where a file is wanted, and the reverse.
    let r = s
        .content(Method::GET, &v, "file", "/a", "", Vec::new())
        .await;
    assert_eq!(code(&r), StatusCode::BAD_REQUEST);
    let r = s
        .content(Method::GET, &v, "dir", "/a/b.txt", "", Vec::new())
        .await;
    assert_eq!(code(&r), StatusCode::BAD_REQUEST);
    // Uploads past the volume's size (1 MiB here) are refused.
    let r = s
        .content(
            Method::PUT,
            &v,
            "file",
            "/big",
            "",
            vec![0u8; (1 << 20) + 1],
        )
        .await;
    assert_eq!(code(&r), StatusCode::PAYLOAD_TOO_LARGE);
    let r = s
        .content(Method::DELETE, &v, "path", "/a", "", Vec::new())
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = s
        .content(Method::DELETE, &v, "path", "/", "", Vec::new())
        .await;
    assert_eq!(code(&r), StatusCode::BAD_REQUEST);
    let _ = id;
}

/// Links a sandbox could plant are never followed by the content API.
#[tokio::test]
async fn planted_symlinks_are_not_followed() {
    let s = start().await;
    let v = s.volume("links").await;
    let other = s.volume("victim").await;
    let (id, _) = v.split_once(':').expect("id");
    let other_dir = s.volumes_dir.join(other.split_once(':').expect("id").0);
    std::fs::write(other_dir.join("secret"), "other volume").expect("write");
    let root = s.volumes_dir.join(id);
    symlink("/etc", root.join("etc")).expect("symlink");
    symlink(&other_dir, root.join("other")).expect("symlink");
    symlink(other_dir.join("secret"), root.join("secret")).expect("symlink");
    for path in ["/etc/passwd", "/other/secret", "/secret", "/etc"] {
        let r = s
            .content(Method::GET, &v, "file", path, "", Vec::new())
            .await;
        assert_eq!(code(&r), StatusCode::BAD_REQUEST, "{path}");
        assert!(
            !String::from_utf8_lossy(&r.bytes).contains("root:"),
            "{path}"
        );
    }
    for path in ["/other/new", "/secret", "/etc/soulbox-test"] {
        let r = s
            .content(Method::PUT, &v, "file", path, "&force=true", b"x".to_vec())
            .await;
        assert!(!r.status.is_success(), "{path}: {:?}", r.body);
    }
    let r = s
        .content(Method::GET, &v, "dir", "/other", "", Vec::new())
        .await;
    assert_eq!(code(&r), StatusCode::BAD_REQUEST);
    let r = s
        .content(Method::GET, &v, "path", "/secret", "", Vec::new())
        .await;
    assert_eq!(r.body["type"], "symlink");
    let r = s
        .content(Method::DELETE, &v, "path", "/other", "", Vec::new())
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        std::fs::read_to_string(other_dir.join("secret")).expect("read"),
        "other volume"
    );
    assert!(!other_dir.join("new").exists());
    assert!(!std::path::Path::new("/etc/soulbox-test").exists());
}

#[tokio::test]
async fn bad_volume_mounts_at_create_are_400() {
    let s = start().await;
    for route in ["/sandboxes", "/v2/sandboxes"] {
        let r = s
            .api(
                Method::POST,
                route,
                Some(json!({
                    "templateID": "base",
                    "volumeMounts": [{"name": "nope", "path": "/data"}],
                })),
            )
            .await;
        assert_eq!(code(&r), StatusCode::BAD_REQUEST, "{route}");
        let message = r.body["message"].as_str().unwrap_or_default();
        assert!(message.contains("\"nope\" not found"), "{message}");
    }
    s.volume("real").await;
    for mounts in [
        json!([{"name": "real", "path": "/proc/x"}]),
        json!([{"name": "real", "path": "relative"}]),
        json!([{"name": "real", "path": "/a/../b"}]),
        json!([{"name": "real", "path": "/a"}, {"name": "real", "path": "/a/b"}]),
        json!([{"name": "real", "path": "/a"}, {"name": "real", "path": "/a/"}]),
        json!([{"name": "../x", "path": "/a"}]),
    ] {
        let r = s
            .api(
                Method::POST,
                "/v2/sandboxes",
                Some(json!({"templateID": "base", "volumeMounts": mounts})),
            )
            .await;
        assert_eq!(code(&r), StatusCode::BAD_REQUEST, "{mounts}");
    }
    // No sandbox state directory was made for any of them.
    let made: Vec<String> = std::fs::read_dir(s.volumes_dir.parent().expect("state dir"))
        .expect("state dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.len() == 20 && n.bytes().all(|b| b.is_ascii_alphanumeric()))
        .collect();
    assert!(made.is_empty(), "{made:?}");
}
