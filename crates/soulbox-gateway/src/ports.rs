//! Every port but envd's (49983): HTTP through a tunnel that the agent opens to
//! `127.0.0.1:<port>` inside the sandbox (`soulbox_wire::tunnel`). Tunnels are pooled per
//! sandbox and port like any upstream connection; an upgrade (WebSocket) takes its tunnel out
//! of the pool and splices it to the client's connection.
//!
//! Clients may speak HTTP/1.1 or HTTP/2 to the gateway; the gateway speaks HTTP/1.1 through the
//! tunnel, so servers in the sandbox need not know HTTP/2. Tunnels are counted per sandbox and
//! in total, and every tunnel ends after [`Limits::idle_timeout`](crate::Limits) without data.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use soulbox_core::{Manager, Route};
use soulbox_wire::tunnel::{self, TUNNEL_PROTOCOL};
use tokio::net::UnixStream;

use crate::envd::prebuffer;
use crate::reply::{self, gateway_error, strip_hop_by_hop};
use crate::routing::upstream_uri;
use crate::{ResponseBody, auth};

/// The header that carries a sandbox's traffic access token.
pub const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";
/// How long an idle tunnel stays pooled.
const POOL_IDLE: Duration = Duration::from_secs(30);
/// Idle tunnels kept per sandbox and port.
const POOL_MAX_IDLE: usize = 8;
/// How long the agent may take to open a tunnel (it gives up connecting after 5 s).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) type TunnelClient = Client<TunnelConnector, BoxBody<Bytes, hyper::Error>>;

pub(crate) fn tunnel_client(manager: Manager, tunnels: Arc<Tunnels>) -> TunnelClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE)
        .pool_max_idle_per_host(POOL_MAX_IDLE)
        .build(TunnelConnector { manager, tunnels })
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TunnelError {
    #[error("the sandbox is gone")]
    NoSandbox,
    #[error("too many tunnels")]
    Busy,
    #[error("{0}")]
    PortClosed(String),
    #[error("the agent answered {0}")]
    Agent(String),
    #[error("talking to the agent: {0}")]
    Http(#[from] hyper::Error),
}

/// Open tunnels, in total and per sandbox, against their caps.
#[derive(Debug)]
pub(crate) struct Tunnels {
    max_total: usize,
    max_per_sandbox: usize,
    open: Mutex<Open>,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_sandbox: HashMap<String, usize>,
}

impl Tunnels {
    pub(crate) fn new(max_total: usize, max_per_sandbox: usize) -> Tunnels {
        Tunnels {
            max_total,
            max_per_sandbox,
            open: Mutex::new(Open::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for one more tunnel to `id`, held until the permit is dropped.
    fn acquire(self: &Arc<Self>, id: &str) -> Result<TunnelPermit, TunnelError> {
        let mut open = self.lock();
        let of_sandbox = open.per_sandbox.get(id).copied().unwrap_or(0);
        if open.total >= self.max_total || of_sandbox >= self.max_per_sandbox {
            return Err(TunnelError::Busy);
        }
        open.total += 1;
        open.per_sandbox.insert(id.to_owned(), of_sandbox + 1);
        Ok(TunnelPermit {
            tunnels: self.clone(),
            id: id.to_owned(),
        })
    }

    /// Open tunnels: in total, and to `id`.
    #[cfg(test)]
    fn count(&self, id: &str) -> (usize, usize) {
        let open = self.lock();
        (open.total, open.per_sandbox.get(id).copied().unwrap_or(0))
    }
}

#[derive(Debug)]
struct TunnelPermit {
    tunnels: Arc<Tunnels>,
    id: String,
}

impl Drop for TunnelPermit {
    fn drop(&mut self) {
        let mut open = self.tunnels.lock();
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_sandbox.get_mut(&self.id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_sandbox.remove(&self.id);
            }
        }
    }
}

/// Opens tunnels for the pool; the URI is `http://<sandbox id>:<port>`.
#[derive(Clone)]
pub(crate) struct TunnelConnector {
    manager: Manager,
    tunnels: Arc<Tunnels>,
}

impl tower::Service<http::Uri> for TunnelConnector {
    type Response = TunnelStream;
    type Error = TunnelError;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let route = uri.host().and_then(|id| self.manager.route(id));
        let port = uri.port_u16();
        let tunnels = self.tunnels.clone();
        Box::pin(async move {
            let (Some(route), Some(port)) = (route, port) else {
                return Err(TunnelError::NoSandbox);
            };
            let permit = tunnels.acquire(&route.sandbox_id)?;
            let io = tokio::time::timeout(OPEN_TIMEOUT, open(&route, port))
                .await
                .map_err(|_| TunnelError::Agent("nothing in time".into()))??;
            Ok(TunnelStream {
                io,
                _permit: permit,
            })
        })
    }
}

/// Asks the sandbox's agent for a tunnel to `port`.
async fn open(route: &Route, port: u16) -> Result<Upgraded, TunnelError> {
    let unix = UnixStream::connect(&route.socket_path)
        .await
        .map_err(|_| TunnelError::NoSandbox)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(unix)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "tunnel handshake connection");
        }
    });
    let req = Request::get(tunnel::tunnel_path(port))
        .header(header::HOST, "localhost")
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, TUNNEL_PROTOCOL)
        .body(Empty::<Bytes>::new())
        .map_err(|e| TunnelError::Agent(e.to_string()))?;
    let mut resp = sender.send_request(req).await?;
    match resp.status() {
        StatusCode::SWITCHING_PROTOCOLS => Ok(hyper::upgrade::on(&mut resp).await?),
        StatusCode::BAD_GATEWAY => {
            // The agent's reason (refused, timed out): logged, never shown to clients.
            let body = Limited::new(resp.into_body(), 4096)
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            Err(TunnelError::PortClosed(body))
        }
        other => Err(TunnelError::Agent(other.to_string())),
    }
}

/// A tunnel: the upgraded agent connection, holding its slot.
pub(crate) struct TunnelStream {
    io: Upgraded,
    _permit: TunnelPermit,
}

impl Connection for TunnelStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// The client side of a request, as the forwarded headers describe it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer {
    pub addr: SocketAddr,
    /// `http` or `https`.
    pub scheme: &'static str,
}

/// Whether the request carries a valid traffic access token, when the sandbox needs one.
fn traffic_allowed(route: &Route, req: &Request<Incoming>) -> bool {
    let Some(token) = route.traffic_token.as_deref() else {
        return true;
    };
    req.headers()
        .get(TRAFFIC_TOKEN_HEADER)
        .is_some_and(|given| auth::ct_eq(given.as_bytes(), token.as_bytes()))
}

/// Forwards a request to `port` of the sandbox.
pub(crate) async fn handle(
    manager: &Manager,
    client: &TunnelClient,
    idle_timeout: Duration,
    route: &Route,
    port: u16,
    mut req: Request<Incoming>,
    from: Peer,
) -> Response<ResponseBody> {
    let id = route.sandbox_id.as_str();
    if req.method() == Method::CONNECT {
        return gateway_error(
            StatusCode::METHOD_NOT_ALLOWED,
            id,
            "CONNECT is not forwarded to sandbox ports",
            Some(port),
        );
    }
    if !traffic_allowed(route, &req) {
        return gateway_error(
            StatusCode::FORBIDDEN,
            id,
            reply::TRAFFIC_TOKEN_MESSAGE,
            Some(port),
        );
    }
    let upgrade = upgrade_protocol(&req).map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some((protocol, _)) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol.clone());
    }
    parts.headers.remove(TRAFFIC_TOKEN_HEADER);
    // HTTP/2 carries the host in the URI; servers behind us expect a Host header.
    if !parts.headers.contains_key(header::HOST)
        && let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        parts.headers.insert(header::HOST, host);
    }
    add_forwarded(&mut parts.headers, from);
    parts.version = Version::HTTP_11;
    parts.uri = match upstream_uri(&format!("{id}:{port}"), &parts.uri) {
        Some(uri) => uri,
        None => {
            return gateway_error(
                StatusCode::BAD_REQUEST,
                id,
                "invalid request target",
                Some(port),
            );
        }
    };
    let body = prebuffer(body).await.into_http_body();
    let mut response = match client.request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => return failed(manager, id, port, &e),
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some((_, client_side)) = upgrade else {
            return gateway_error(
                StatusCode::BAD_GATEWAY,
                id,
                "the server switched protocols without being asked to",
                Some(port),
            );
        };
        let server_side = hyper::upgrade::on(&mut response);
        tokio::spawn(splice_upgraded(client_side, server_side, idle_timeout));
        let (parts, _) = response.into_parts();
        return Response::from_parts(parts, reply::empty());
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.map_err(Into::into).boxed_unsync())
}

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection: upgrade` + `Upgrade`).
fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks || req.version() != Version::HTTP_11 {
        return None;
    }
    req.headers().get(header::UPGRADE).cloned()
}

/// `X-Forwarded-For` (appended) and `X-Forwarded-Proto`, for servers that build links.
fn add_forwarded(headers: &mut http::HeaderMap, from: Peer) {
    const FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    const PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    let ip = from.addr.ip().to_string();
    let value = match headers.get(&FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {ip}"),
        None => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(FOR, v);
    }
    headers.insert(PROTO, HeaderValue::from_static(from.scheme));
}

/// Moves bytes between the client's and the server's upgraded connections.
async fn splice_upgraded(client: OnUpgrade, server: OnUpgrade, idle: Duration) {
    match tokio::try_join!(client, server) {
        Ok((c, s)) => {
            if let Err(e) = tunnel::splice(TokioIo::new(c), TokioIo::new(s), idle).await {
                tracing::debug!(error = %e, "upgraded connection ended");
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
    }
}

/// The answer to a request that could not be forwarded.
fn failed(
    manager: &Manager,
    id: &str,
    port: u16,
    e: &hyper_util::client::legacy::Error,
) -> Response<ResponseBody> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(t) = err.downcast_ref::<TunnelError>() {
            return match t {
                TunnelError::NoSandbox => reply::not_found(id),
                TunnelError::Busy => gateway_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    id,
                    reply::TOO_MANY_TUNNELS_MESSAGE,
                    Some(port),
                ),
                TunnelError::PortClosed(why) => {
                    tracing::debug!(%id, port, %why, "port not open");
                    reply::port_not_open(id, port)
                }
                TunnelError::Agent(_) | TunnelError::Http(_) => break,
            };
        }
        source = err.source();
    }
    tracing::debug!(%id, port, error = %e, "forwarding to a sandbox port");
    if manager.route(id).is_none() {
        return reply::not_found(id);
    }
    gateway_error(
        StatusCode::BAD_GATEWAY,
        id,
        &format!("error talking to port {port} of the sandbox: {e}"),
        Some(port),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_slots_are_capped_per_sandbox_and_in_total_and_given_back() {
        let t = Arc::new(Tunnels::new(3, 2));
        let a1 = t.acquire("a").expect("a1");
        let a2 = t.acquire("a").expect("a2");
        assert!(matches!(t.acquire("a"), Err(TunnelError::Busy)));
        let b1 = t.acquire("b").expect("b1");
        assert!(
            matches!(t.acquire("c"), Err(TunnelError::Busy)),
            "total cap"
        );
        assert_eq!(t.count("a"), (3, 2));
        drop(a1);
        let c1 = t.acquire("c").expect("freed slot");
        drop((a2, b1, c1));
        assert_eq!(t.count("a"), (0, 0));
        assert!(t.lock().per_sandbox.is_empty(), "no entries left behind");
    }

    #[test]
    fn only_http11_connection_upgrades_are_upgrades() {
        let req = |conn: &'static str, version| {
            let mut r = Request::new(());
            *r.version_mut() = version;
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static(conn));
            r.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            r
        };
        assert!(upgrade_protocol(&req("keep-alive, Upgrade", Version::HTTP_11)).is_some());
        assert!(upgrade_protocol(&req("keep-alive", Version::HTTP_11)).is_none());
        assert!(upgrade_protocol(&req("upgrade", Version::HTTP_10)).is_none());
        assert!(upgrade_protocol(&req("upgrade", Version::HTTP_2)).is_none());
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = http::HeaderMap::new();
        let from = Peer {
            addr: "10.0.0.1:5555".parse().expect("addr"),
            scheme: "https",
        };
        add_forwarded(&mut h, from);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        add_forwarded(&mut h, from);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 10.0.0.1");
    }
}
