//! Domain mode and the gateway's bounds, over real TCP and TLS with a real manager (no live
//! sandbox needed): certificates, `api.<domain>` dispatch, host parsing, slow and idle clients.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use soulbox_gateway::{
    BoxError, CertificateSource, Certificates, ControlPlane, GatewayConfig, Limits, ResponseBody,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const DOMAIN: &str = "sb.localhost";

/// A control plane that says who answered.
fn control_plane() -> ControlPlane {
    Arc::new(|req: Request<hyper::body::Incoming>| {
        Box::pin(async move {
            let body = format!("control plane: {}", req.uri().path());
            let body: ResponseBody = http_body_util::Full::new(Bytes::from(body))
                .map_err(|never| -> BoxError { match never {} })
                .boxed_unsync();
            Response::new(body)
        })
    })
}

fn domain_config(limits: Limits) -> GatewayConfig {
    GatewayConfig {
        limits,
        domain: Some(DOMAIN.into()),
        control_plane: Some(control_plane()),
    }
}

/// Serves TLS with `certs`; returns the port.
async fn serve_tls(env: &common::Env, config: GatewayConfig, certs: &Arc<Certificates>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let gateway = common::gateway(env, config);
    let tls = certs.server_config().expect("server config");
    tokio::spawn(async move {
        gateway
            .serve_tls(listener, tls, std::future::pending())
            .await
    });
    port
}

/// A TLS connection to 127.0.0.1:`port` for `sni`, trusting only `ca`, offering `alpn`.
async fn tls_connect(
    port: u16,
    ca: &Path,
    sni: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("ca file") {
        roots.add(cert.expect("ca cert")).expect("add ca");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from(sni.to_owned()).expect("server name");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// GET `path` with `host` over a fresh TLS connection (HTTP/2 when `h2`); status and body.
async fn get(port: u16, ca: &Path, host: &str, path: &str, h2: bool) -> (StatusCode, Bytes) {
    get_sni(port, ca, host, host, path, h2).await
}

/// [`get`] with a TLS server name of its own (`host` may be no valid DNS name).
async fn get_sni(
    port: u16,
    ca: &Path,
    sni: &str,
    host: &str,
    path: &str,
    h2: bool,
) -> (StatusCode, Bytes) {
    let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
    let tls = tls_connect(port, ca, sni, alpn).await.expect("tls");
    let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    assert_eq!(negotiated.as_deref(), Some(alpn[0]), "ALPN");
    let io = TokioIo::new(tls);
    let response = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        let req = Request::get(format!("https://{host}:{port}{path}"))
            .body(Empty::<Bytes>::new())
            .expect("request");
        send.send_request(req).await.expect("response")
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .expect("h1 handshake");
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", format!("{host}:{port}"))
            .body(Empty::<Bytes>::new())
            .expect("request");
        send.send_request(req).await.expect("response")
    };
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, body)
}

fn json(b: &Bytes) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(b).into()))
}

#[tokio::test]
async fn local_ca_serves_api_and_sandbox_hosts_over_h1_and_h2() {
    let env = common::env("soulbox-test-gateway-domain").await;
    let tls_dir = env.dir.path().join("tls");
    let source = CertificateSource::LocalCa {
        dir: tls_dir.clone(),
        domain: DOMAIN.into(),
    };
    let certs = Certificates::load(source.clone()).expect("certificates");
    let ca = certs.local_ca().expect("local CA").clone();
    let port = serve_tls(&env, domain_config(Limits::default()), &certs).await;

    for h2 in [false, true] {
        let (status, body) = get(port, &ca.cert, &format!("api.{DOMAIN}"), "/health", h2).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            body, "control plane: /health",
            "api.<domain> goes to the control plane"
        );

        let host = format!("49983-zzzzzzzzzzzzzzzzzzzz.{DOMAIN}");
        let (status, body) = get(port, &ca.cert, &host, "/health", h2).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        let body = json(&body);
        assert_eq!(body["sandboxId"], "zzzzzzzzzzzzzzzzzzzz");
        assert!(
            body["message"]
                .as_str()
                .unwrap_or("")
                .contains("was not found")
        );

        // Host names are case-insensitive: the same sandbox id, lower-cased.
        let host = format!("3000-ZZZZZZZZZZZZZZZZZZZZ.{}", DOMAIN.to_uppercase());
        let (status, body) = get(port, &ca.cert, &host, "/", h2).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(json(&body)["sandboxId"], "zzzzzzzzzzzzzzzzzzzz");

        for bad in ["abc", "99999-abc", "0-abc", "3000-", "x-abc", "3000-a.b"] {
            let sni = format!("api.{DOMAIN}");
            let (status, body) =
                get_sni(port, &ca.cert, &sni, &format!("{bad}.{DOMAIN}"), "/", h2).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            let message = json(&body)["message"].as_str().unwrap_or("").to_owned();
            assert!(message.contains("invalid sandbox host"), "{bad}: {message}");
        }
    }

    // The CA is made once: a second load keeps it, and its key is private.
    let pem = std::fs::read(&ca.cert).expect("ca.pem");
    let again = Certificates::load(source).expect("reload");
    assert_eq!(
        std::fs::read(&again.local_ca().expect("ca").cert).expect("ca.pem"),
        pem
    );
    let key = tls_dir.join(DOMAIN).join("ca.key");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key).expect("ca.key").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    // The bundle trusts the CA too.
    let bundle = std::fs::read_to_string(&ca.bundle).expect("bundle");
    assert!(bundle.contains(std::str::from_utf8(&pem).expect("pem text").trim()));
    // Names outside the domain get no certificate the CA vouches for.
    let err = tls_connect(port, &ca.cert, "api.example.com", &[b"h2"])
        .await
        .expect_err("wrong name");
    assert!(err.to_string().contains("certificate"), "{err}");
}

/// A self-signed certificate for `*.<DOMAIN>` written to `dir`; returns its PEM.
fn write_self_signed(dir: &Path, cn: &str) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec![format!("*.{DOMAIN}")]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = params.self_signed(&key).expect("cert");
    // Replace whole files, as certbot or a secret mount does.
    let tmp = dir.join("new.pem");
    std::fs::write(&tmp, cert.pem()).expect("write cert");
    std::fs::rename(&tmp, dir.join("cert.pem")).expect("rename cert");
    let tmp = dir.join("new.key");
    std::fs::write(&tmp, key.serialize_pem()).expect("write key");
    std::fs::rename(&tmp, dir.join("key.pem")).expect("rename key");
    cert.pem()
}

#[tokio::test]
async fn supplied_certificate_is_used_as_is_and_reloaded_when_the_files_change() {
    let env = common::env("soulbox-test-gateway-certfiles").await;
    let dir = env.dir.path().to_owned();
    write_self_signed(&dir, "first");
    let certs = Certificates::load(CertificateSource::Files {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    })
    .expect("certificates");
    assert!(certs.local_ca().is_none());
    let port = serve_tls(&env, domain_config(Limits::default()), &certs).await;
    // Trusting the self-signed certificate itself proves which one is served.
    std::fs::copy(dir.join("cert.pem"), dir.join("first.pem")).expect("copy");
    let (status, _) = get(
        port,
        &dir.join("first.pem"),
        &format!("api.{DOMAIN}"),
        "/",
        false,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(!certs.refresh().expect("refresh"), "unchanged files");

    // A broken pair keeps the old certificate.
    std::fs::write(dir.join("key.pem"), "not a key").expect("break key");
    assert!(certs.refresh().is_err());
    let (status, _) = get(
        port,
        &dir.join("first.pem"),
        &format!("api.{DOMAIN}"),
        "/",
        true,
    )
    .await;
    assert_eq!(status, StatusCode::OK);

    write_self_signed(&dir, "second");
    assert!(
        certs.refresh().expect("refresh"),
        "changed files are reloaded"
    );
    let (status, _) = get(
        port,
        &dir.join("cert.pem"),
        &format!("api.{DOMAIN}"),
        "/",
        true,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let err = tls_connect(
        port,
        &dir.join("first.pem"),
        &format!("api.{DOMAIN}"),
        &[b"h2"],
    )
    .await
    .expect_err("the old certificate is gone");
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[tokio::test]
async fn plain_listener_routes_hosts_under_the_domain_strictly() {
    let env = common::env("soulbox-test-gateway-hosts").await;
    let url = common::serve_plain(common::gateway(&env, domain_config(Limits::default()))).await;
    let client: hyper_util::client::legacy::Client<_, Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let call = |host: String, headers: Vec<(&'static str, &'static str)>| {
        let mut req = Request::get(format!("{url}/x")).header("host", host);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        let req = req.body(Empty::new()).expect("request");
        let client = client.clone();
        async move {
            let r = client.request(req).await.expect("response");
            let status = r.status();
            (
                status,
                json(&r.into_body().collect().await.expect("body").to_bytes()),
            )
        }
    };
    let (status, body) = call(format!("api.{DOMAIN}"), vec![]).await;
    assert_eq!(
        (status, body),
        (StatusCode::OK, Value::String("control plane: /x".into()))
    );
    // The control plane wins over routing headers (old SDKs send them to the API).
    let (status, _) = call(
        format!("api.{DOMAIN}"),
        vec![("e2b-sandbox-id", "abc"), ("e2b-sandbox-port", "49983")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(format!("65536-abc.{DOMAIN}"), vec![]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    for port in ["0", "65536", "99999", "x"] {
        let (status, body) = call(
            "127.0.0.1".into(),
            vec![("e2b-sandbox-id", "abc"), ("e2b-sandbox-port", port)],
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{port}");
        assert!(
            body["message"].as_str().unwrap_or("").contains("1-65535"),
            "{body}"
        );
    }
    // A user port of a sandbox that does not exist.
    let (status, body) = call(format!("8080-abc.{DOMAIN}"), vec![]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(body["sandboxId"], "abc");
}

fn short_limits() -> Limits {
    Limits {
        request_head_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(2),
        tls_handshake_timeout: Duration::from_secs(1),
        ..Limits::default()
    }
}

/// Reads until the server closes the connection; how long that took.
async fn until_closed(s: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> Duration {
    let t0 = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return t0.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("connection still open after {limit:?}"),
        }
    }
}

#[tokio::test]
async fn slow_and_idle_clients_are_cut_off() {
    let env = common::env("soulbox-test-gateway-slow").await;
    let url = common::serve_plain(common::gateway(&env, domain_config(short_limits()))).await;
    let addr = url.trim_start_matches("http://").to_owned();
    let bound = Duration::from_secs(30);

    // Slow-loris: a head that never ends.
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    until_closed(&mut s, bound).await;

    // A head trickled a byte at a time is cut off too, though bytes keep coming.
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    let t0 = Instant::now();
    let mut cut = false;
    for b in
        b"GET /health HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    {
        if s.write_all(&[*b]).await.is_err() {
            cut = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if t0.elapsed() > bound {
            break;
        }
    }
    assert!(cut || until_closed(&mut s, bound).await < bound);

    // A body that never finishes sending, on a request the gateway answers at once.
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    s.write_all(
        format!(
            "POST /x HTTP/1.1\r\nHost: 8080-abc.{DOMAIN}\r\nContent-Length: 100000\r\n\r\npartial"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    until_closed(&mut s, bound).await;

    // An idle kept-alive connection.
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    until_closed(&mut s, bound).await;

    // TLS: a client that never says hello.
    let certs = Certificates::load(CertificateSource::LocalCa {
        dir: env.dir.path().join("tls"),
        domain: DOMAIN.into(),
    })
    .expect("certificates");
    let port = serve_tls(&env, domain_config(short_limits()), &certs).await;
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    until_closed(&mut s, bound).await;

    // The gateway still answers.
    let (status, _) = get(
        port,
        &certs.local_ca().expect("ca").cert,
        &format!("api.{DOMAIN}"),
        "/",
        true,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_and_are_served_when_one_ends() {
    let env = common::env("soulbox-test-gateway-cap").await;
    let limits = Limits {
        max_connections: 2,
        ..short_limits()
    };
    let url = common::serve_plain(common::gateway(&env, domain_config(limits))).await;
    let addr = url.trim_start_matches("http://").to_owned();
    let request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(&addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    // The third is accepted by the kernel but not served while two are held.
    let mut third = TcpStream::connect(&addr).await.expect("connect");
    third.write_all(request).await.expect("write");
    let mut buf = [0u8; 256];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), third.read(&mut buf))
            .await
            .is_err(),
        "served beyond the cap"
    );
    drop(held);
    let n = tokio::time::timeout(Duration::from_secs(30), third.read(&mut buf))
        .await
        .expect("served once a slot is free")
        .expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
}
