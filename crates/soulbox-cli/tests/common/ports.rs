//! Clients for sandbox ports through the gateway: plain HTTP with routing headers (URL mode)
//! or TLS with `<port>-<id>.<domain>` hosts (domain mode), HTTP/1.1 or HTTP/2, WebSockets.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{Server, run};

/// The in-sandbox test server (HTTP, SSE, WebSocket echo), shared with the e2e suite.
pub const APP: &str = include_str!("../../../../tests/e2e/python/suite/ports_fixtures/app.py");

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How to reach the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Plain HTTP, `E2b-Sandbox-Id` + `E2b-Sandbox-Port` headers.
    Url,
    /// TLS, ALPN http/1.1, host `<port>-<id>.<domain>`.
    Domain,
    /// TLS, ALPN h2, host `<port>-<id>.<domain>`.
    DomainH2,
}

/// A server in domain mode, as its clients see it.
#[derive(Clone)]
pub struct Gateway {
    pub plain: String,
    /// `<domain>:<port>`, what `E2B_DOMAIN` says.
    pub domain: String,
    pub tls_port: u16,
    pub ca: PathBuf,
}

impl Gateway {
    pub fn of(server: &Server) -> Gateway {
        let domain = server.exports["E2B_DOMAIN"].clone();
        let tls_port = domain
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("E2B_DOMAIN with the TLS port");
        Gateway {
            plain: server.sandbox_url.trim_start_matches("http://").to_owned(),
            domain,
            tls_port,
            ca: PathBuf::from(&server.exports["NODE_EXTRA_CA_CERTS"]),
        }
    }

    /// `<port>-<id>.<domain>:<tls port>`, what `get_host(port)` returns.
    pub fn host(&self, id: &str, port: u16) -> String {
        format!("{port}-{id}.{}", self.domain)
    }

    /// A connection for a request to `host` (`Url` mode ignores it).
    pub async fn connect(&self, mode: Mode, host: &str) -> Box<dyn Io> {
        match mode {
            Mode::Url => Box::new(TcpStream::connect(&self.plain).await.expect("connect")),
            Mode::Domain | Mode::DomainH2 => {
                let alpn: &[u8] = if mode == Mode::DomainH2 {
                    b"h2"
                } else {
                    b"http/1.1"
                };
                let name = host.rsplit_once(':').map_or(host, |(n, _)| n);
                Box::new(tls(self.tls_port, &self.ca, name, alpn).await)
            }
        }
    }

    /// Sends `req` (path-only URI) to `port` of sandbox `id`.
    pub async fn send(
        &self,
        mode: Mode,
        id: &str,
        port: u16,
        mut req: Request<Full<Bytes>>,
    ) -> Response<Incoming> {
        let host = self.host(id, port);
        match mode {
            Mode::Url => {
                let h = req.headers_mut();
                h.insert("e2b-sandbox-id", id.parse().expect("id"));
                h.insert("e2b-sandbox-port", port.into());
                h.insert("host", self.plain.parse().expect("host"));
            }
            Mode::Domain => {
                req.headers_mut()
                    .insert("host", host.parse().expect("host"));
            }
            Mode::DomainH2 => {
                let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                *req.uri_mut() = format!("https://{host}{path}").parse().expect("uri");
            }
        }
        let io = TokioIo::new(self.connect(mode, &host).await);
        if mode == Mode::DomainH2 {
            let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .expect("h2 handshake");
            tokio::spawn(conn);
            send.send_request(req).await.expect("response")
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("handshake");
            tokio::spawn(conn.with_upgrades());
            send.send_request(req).await.expect("response")
        }
    }

    /// GET `path`; status, headers and the whole body.
    pub async fn get(
        &self,
        mode: Mode,
        id: &str,
        port: u16,
        path: &str,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let req = Request::get(path).body(Full::default()).expect("request");
        let r = self.send(mode, id, port, req).await;
        let (parts, body) = r.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        (parts.status, parts.headers, body)
    }

    /// Opens a WebSocket to `port` of `id` (path `/ws`); the status, and the stream after the
    /// response head.
    pub async fn websocket(
        &self,
        mode: Mode,
        id: &str,
        port: u16,
        extra: &str,
    ) -> (u16, Box<dyn Io>) {
        let host = self.host(id, port);
        let mut io = self.connect(mode, &host).await;
        let routing = match mode {
            Mode::Url => format!(
                "Host: {}\r\nE2b-Sandbox-Id: {id}\r\nE2b-Sandbox-Port: {port}\r\n",
                self.plain
            ),
            _ => format!("Host: {host}\r\n"),
        };
        let head = format!(
            "GET /ws HTTP/1.1\r\n{routing}{extra}Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        io.write_all(head.as_bytes()).await.expect("send upgrade");
        let head = read_head(&mut io).await;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (status, io)
    }
}

/// A TLS connection to 127.0.0.1:`port` for `sni`, trusting only the PEM CA at `ca`.
pub async fn tls(
    port: u16,
    ca: &std::path::Path,
    sni: &str,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA cert")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect TLS");
    tcp.set_nodelay(true).expect("nodelay");
    let name = ServerName::try_from(sni.to_owned()).expect("server name");
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(alpn), "ALPN");
    stream
}

/// Reads an HTTP response head (up to the blank line).
pub async fn read_head(io: &mut Box<dyn Io>) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(30), io.read(&mut byte))
            .await
            .expect("response head in time")
            .expect("read head");
        if n == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Sends one masked WebSocket frame.
pub async fn ws_send(io: &mut Box<dyn Io>, opcode: u8, payload: &[u8]) {
    let mut frame = vec![0x80 | opcode];
    let n = payload.len();
    if n < 126 {
        frame.push(0x80 | n as u8);
    } else if n < 65536 {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend_from_slice(&(n as u64).to_be_bytes());
    }
    let mask = [0x12, 0x34, 0x56, 0x78];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    io.write_all(&frame).await.expect("send frame");
}

/// Reads one (unmasked, server) WebSocket frame: opcode and payload.
pub async fn ws_recv(io: &mut Box<dyn Io>) -> (u8, Vec<u8>) {
    let read = async {
        let mut h = [0u8; 2];
        io.read_exact(&mut h).await?;
        let n = match h[1] & 0x7F {
            126 => {
                let mut l = [0u8; 2];
                io.read_exact(&mut l).await?;
                u64::from(u16::from_be_bytes(l))
            }
            127 => {
                let mut l = [0u8; 8];
                io.read_exact(&mut l).await?;
                u64::from_be_bytes(l)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0u8; usize::try_from(n).expect("frame size")];
        io.read_exact(&mut payload).await?;
        Ok::<_, std::io::Error>((h[0] & 0x0F, payload))
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("frame in time")
        .expect("frame")
}

/// Writes the test app into the sandbox and starts it on 127.0.0.1:`port` (only the tunnel
/// can reach it there).
pub async fn start_app(server: &Server, id: &str, token: &str, port: u16) {
    let envd = server.envd(id, Some(token));
    let cmd = format!(
        "cat > /tmp/app.py <<'SOULBOX_APP_EOF'\n{APP}\nSOULBOX_APP_EOF\n\
         setsid python3 /tmp/app.py {port} </dev/null >/tmp/app-{port}.log 2>&1 &"
    );
    let ran = run(&envd, &cmd, Some("user")).await;
    assert_eq!(ran.exit_code, 0, "{ran:?}");
}
