//! Sandbox traffic gateway: routes envd/interpreter/user-port requests to sandbox agents.
//!
//! A reverse proxy on its own listener. It finds the sandbox a request is for (routing headers,
//! else Host, else, for a signed `/files` URL, the sandbox whose token made the signature),
//! enforces that sandbox's access token, and streams the request to the agent's unix socket and
//! the answer back without buffering (Connect streams flush per envelope).
//!
//! What sandboxed code can do with this: nothing it could not do anyway. The gateway never
//! forwards `/_soulbox/*` (the agent's internal endpoints), strips `X-Access-Token` before
//! forwarding so the agent never sees it, and only relays the agent's answers; a sandbox can
//! only answer for itself, because each route is the sandbox's own host-side socket.

mod auth;
mod routing;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, BodyStream, Either, Full, StreamBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use soulbox_core::{Manager, Route};
use soulbox_wire::rest::{GatewayError, PORT_NOT_OPEN_MESSAGE, SANDBOX_NOT_FOUND_MESSAGE};
use tokio::net::{TcpListener, UnixStream};

pub use auth::{SignedParams, signature};
pub use routing::{Target, is_internal};

/// The envd port: the only sandbox port served until user-port tunnels exist.
pub const ENVD_PORT: u16 = 49983;
/// How long shutdown waits for in-flight requests before dropping them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

const UNAUTHORIZED_MESSAGE: &str =
    "unauthorized access, please provide a valid access token or method signing if supported";

type Body = Either<Incoming, Full<Bytes>>;

/// Serves the gateway on `listener` until `shutdown` resolves, then lets in-flight requests
/// finish for up to [`SHUTDOWN_GRACE`].
pub async fn serve(
    listener: TcpListener,
    manager: Manager,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let proxy = Arc::new(Proxy::new(manager));
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of fds and the like: keep serving the connections we have.
                    tracing::warn!(error = %e, "gateway accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY");
        }
        let p = proxy.clone();
        let service = service_fn(move |req| {
            let p = p.clone();
            async move { Ok::<_, Infallible>(p.handle(req).await) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "gateway connection ended with an error");
            }
        });
    }
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::info!("gateway shutdown: dropping requests still in flight");
    }
    Ok(())
}

/// The gateway's state: the sandboxes' routes and a pool of connections to their agents.
struct Proxy {
    manager: Manager,
    agents: Client<AgentConnector, BoxBody<Bytes, hyper::Error>>,
}

impl Proxy {
    fn new(manager: Manager) -> Proxy {
        let agents = Client::builder(TokioExecutor::new())
            // Below the agent's 60 s idle limit, so a pooled connection is not closed under us.
            .pool_idle_timeout(AGENT_POOL_IDLE)
            .pool_max_idle_per_host(AGENT_POOL_MAX_IDLE)
            .build(AgentConnector {
                manager: manager.clone(),
            });
        Proxy { manager, agents }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        handle(&self.manager, &self.agents, req).await
    }
}

/// How long an idle agent connection stays pooled.
const AGENT_POOL_IDLE: Duration = Duration::from_secs(30);
/// Idle connections kept per sandbox.
const AGENT_POOL_MAX_IDLE: usize = 4;

/// Connects to a sandbox's agent socket; the URI's host is the sandbox id, so the pool keeps
/// each sandbox's connections apart.
#[derive(Clone)]
struct AgentConnector {
    manager: Manager,
}

impl tower::Service<http::Uri> for AgentConnector {
    type Response = TokioIo<UnixStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let route = uri.host().and_then(|id| self.manager.route(id));
        Box::pin(async move {
            let route = route.ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such sandbox")
            })?;
            Ok(TokioIo::new(UnixStream::connect(&route.socket_path).await?))
        })
    }
}

/// Answers one request.
async fn handle(
    manager: &Manager,
    agents: &Client<AgentConnector, BoxBody<Bytes, hyper::Error>>,
    req: Request<Incoming>,
) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let target = match routing::target(req.headers(), host) {
        Ok(t) => t,
        Err(e) => return envd_error(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    if routing::is_internal(req.uri().path()) {
        return envd_error(StatusCode::NOT_FOUND, "not found");
    }
    let (route, port, signed) = match target {
        Some(t) => match manager.route(&t.sandbox_id) {
            Some(route) => (route, t.port, false),
            None => return not_found(&t.sandbox_id),
        },
        None => {
            if req.uri().path() == "/health" {
                return text(StatusCode::OK, "OK");
            }
            if !is_signed_files(&req) {
                return envd_error(
                    StatusCode::BAD_REQUEST,
                    "no sandbox addressed: send E2b-Sandbox-Id and E2b-Sandbox-Port, \
                     or use the host <port>-<sandbox id>.<domain>",
                );
            }
            match route_by_signature(manager, &req) {
                Some(route) => (route, ENVD_PORT, true),
                // The sandbox that signed it is gone (or never was).
                None => return not_found(""),
            }
        }
    };
    if port != ENVD_PORT {
        return port_not_open(&route.sandbox_id, port);
    }
    if !signed && !authorized(&route, &req) {
        return envd_error(StatusCode::UNAUTHORIZED, UNAUTHORIZED_MESSAGE);
    }
    forward(manager, agents, &route, req).await
}

/// Whether the request may reach the sandbox's envd (protocol doc §4.1).
fn authorized(route: &Route, req: &Request<Incoming>) -> bool {
    let Some(token) = route.access_token.as_deref() else {
        return true;
    };
    let path = req.uri().path();
    if path == "/health" {
        return true;
    }
    if let Some(given) = req.headers().get("x-access-token") {
        return auth::ct_eq(given.as_bytes(), token.as_bytes());
    }
    match file_operation(req) {
        Some(op) => SignedParams::from_query(req.uri().query()).verify(op, token, unix_now()),
        None => false,
    }
}

/// `read`/`write` for `GET`/`POST /files`, the requests a signature can authorise.
fn file_operation<B>(req: &Request<B>) -> Option<&'static str> {
    if req.uri().path() != "/files" {
        return None;
    }
    match *req.method() {
        Method::GET => Some("read"),
        Method::POST => Some("write"),
        _ => None,
    }
}

/// Whether the request is a `/files` transfer carrying a signature.
fn is_signed_files<B>(req: &Request<B>) -> bool {
    file_operation(req).is_some()
        && SignedParams::from_query(req.uri().query())
            .signature
            .is_some()
}

/// A signed `/files` URL in single-URL mode names no sandbox: find the one whose token made
/// the signature.
fn route_by_signature(manager: &Manager, req: &Request<Incoming>) -> Option<Arc<Route>> {
    let op = file_operation(req)?;
    let params = SignedParams::from_query(req.uri().query());
    let now = unix_now();
    manager.find_route(|r| {
        r.access_token
            .as_deref()
            .is_some_and(|token| params.verify(op, token, now))
    })
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn forward(
    manager: &Manager,
    agents: &Client<AgentConnector, BoxBody<Bytes, hyper::Error>>,
    route: &Route,
    req: Request<Incoming>,
) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove("x-access-token");
    if !parts.headers.contains_key(header::HOST) {
        parts
            .headers
            .insert(header::HOST, HeaderValue::from_static("localhost"));
    }
    parts.version = Version::HTTP_11;
    // The pool is keyed by the URI's authority: the sandbox id (ids are [a-z0-9], a valid host).
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_owned();
    parts.uri = match format!("http://{}{path}", route.sandbox_id).parse() {
        Ok(uri) => uri,
        Err(_) => return envd_error(StatusCode::BAD_REQUEST, "invalid request target"),
    };
    // A buffered body has an exact size, so hyper sends it with a Content-Length.
    let body = prebuffer(body).await.into_http_body();
    match agents.request(Request::from_parts(parts, body)).await {
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Either::Left(body))
        }
        Err(e) => agent_unreachable(manager, route, &e),
    }
}

/// Largest request body sent to the agent in one piece.
const MAX_BUFFERED_BODY: usize = 64 * 1024;

/// A request body as forwarded to the agent.
enum RequestBody {
    /// The whole body, which had fully arrived: sent with a `Content-Length`.
    Buffered(Bytes),
    /// What has arrived so far, then the rest as it comes.
    Streaming(Bytes, Incoming),
}

/// Collects the body while it is already there: small requests (every RPC, most uploads) are
/// forwarded whole, in one write, with a length. A server that answers a request after reading
/// its one message then closes the connection; if the end of a chunked body were still on its
/// way, the close would reset the connection under the answer. Bodies that are large or still
/// being sent (client streams, big uploads) are streamed after what arrived.
async fn prebuffer(mut body: Incoming) -> RequestBody {
    use http_body::Body as _;
    let mut buf = bytes::BytesMut::new();
    let mut waited = false;
    loop {
        if body.is_end_stream() {
            return RequestBody::Buffered(buf.freeze());
        }
        // Wait for the first frame (it is usually in flight with the head), then only take
        // frames that are ready.
        let next = if waited {
            match futures::FutureExt::now_or_never(body.frame()) {
                Some(next) => next,
                None => return RequestBody::Streaming(buf.freeze(), body),
            }
        } else {
            waited = true;
            body.frame().await
        };
        match next {
            None => return RequestBody::Buffered(buf.freeze()),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
                if buf.len() > MAX_BUFFERED_BODY {
                    return RequestBody::Streaming(buf.freeze(), body);
                }
            }
            // The client went away mid-body: forward what came; the agent sees it cut short.
            Some(Err(e)) => {
                tracing::debug!(error = %e, "reading the request body");
                return RequestBody::Streaming(buf.freeze(), body);
            }
        }
    }
}

impl RequestBody {
    fn into_http_body(self) -> BoxBody<Bytes, hyper::Error> {
        match self {
            RequestBody::Buffered(b) => Full::new(b).map_err(|never| match never {}).boxed(),
            RequestBody::Streaming(prefix, rest) => {
                let prefix = futures::stream::iter(
                    (!prefix.is_empty()).then(|| Ok(http_body::Frame::data(prefix))),
                );
                BodyExt::boxed(StreamBody::new(prefix.chain(BodyStream::new(rest))))
            }
        }
    }
}

/// 502 for a failed exchange with the agent: "was not found" when the sandbox is gone by now.
fn agent_unreachable(
    manager: &Manager,
    route: &Route,
    e: &hyper_util::client::legacy::Error,
) -> Response<Body> {
    tracing::debug!(id = %route.sandbox_id, error = %e, "proxying to the agent");
    // Nothing listens on the socket any more, or the sandbox is gone by now.
    if e.is_connect() || manager.route(&route.sandbox_id).is_none() {
        return not_found(&route.sandbox_id);
    }
    envd_error(
        StatusCode::BAD_GATEWAY,
        &format!("error talking to the sandbox's agent: {e}"),
    )
}

/// Removes the headers that describe one connection, not the message (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

fn not_found(sandbox_id: &str) -> Response<Body> {
    gateway_error(GatewayError {
        sandbox_id: sandbox_id.to_owned(),
        message: SANDBOX_NOT_FOUND_MESSAGE.to_owned(),
        port: None,
        code: StatusCode::BAD_GATEWAY.as_u16(),
    })
}

fn port_not_open(sandbox_id: &str, port: u16) -> Response<Body> {
    gateway_error(GatewayError {
        sandbox_id: sandbox_id.to_owned(),
        message: PORT_NOT_OPEN_MESSAGE.to_owned(),
        port: Some(port),
        code: StatusCode::BAD_GATEWAY.as_u16(),
    })
}

fn gateway_error(body: GatewayError) -> Response<Body> {
    json(
        StatusCode::BAD_GATEWAY,
        serde_json::to_vec(&body).unwrap_or_default(),
    )
}

/// envd's error body: `{"code": status, "message": …}`.
fn envd_error(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "code": status.as_u16(), "message": message });
    json(status, serde_json::to_vec(&body).unwrap_or_default())
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed_including_listed_ones() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }
}
