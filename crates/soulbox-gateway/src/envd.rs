//! Port 49983: the agent's envd surface, over a pool of connections to its unix socket.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, BodyStream, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use soulbox_core::{Manager, Route};
use tokio::net::UnixStream;

use crate::ResponseBody;
use crate::auth::{self, SignatureError, SignedParams};
use crate::reply::{self, envd_error, strip_hop_by_hop};
use crate::routing::upstream_uri;

/// How long an idle agent connection stays pooled (below the agent's own idle limit, so a
/// pooled connection is not closed under us).
const AGENT_POOL_IDLE: Duration = Duration::from_secs(30);
/// Idle connections kept per sandbox.
const AGENT_POOL_MAX_IDLE: usize = 4;
/// Largest request body sent in one piece.
const MAX_BUFFERED_BODY: usize = 64 * 1024;

pub(crate) type AgentClient = Client<AgentConnector, BoxBody<Bytes, hyper::Error>>;

pub(crate) fn agent_client(manager: Manager) -> AgentClient {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(AGENT_POOL_IDLE)
        .pool_max_idle_per_host(AGENT_POOL_MAX_IDLE)
        .build(AgentConnector { manager })
}

/// Connects to a sandbox's agent socket; the URI's host is the sandbox id, so the pool keeps
/// each sandbox's connections apart.
#[derive(Clone)]
pub(crate) struct AgentConnector {
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

/// Answers a request for the sandbox's envd (never one for the agent's internal paths):
/// `signed` when a `/files` signature already picked (and so authorised) the sandbox.
pub(crate) async fn handle(
    manager: &Manager,
    agents: &AgentClient,
    route: &Route,
    req: Request<Incoming>,
    signed: bool,
) -> Response<ResponseBody> {
    if !signed && let Err(message) = authorize(route, &req) {
        return envd_error(StatusCode::UNAUTHORIZED, message);
    }
    forward(manager, agents, route, req).await
}

/// Whether the request may reach the sandbox's envd (protocol doc §4.1); if not, envd's
/// message for the 401.
fn authorize(route: &Route, req: &Request<Incoming>) -> Result<(), &'static str> {
    let Some(token) = route.access_token.as_deref() else {
        return Ok(());
    };
    if req.uri().path() == "/health" {
        return Ok(());
    }
    let operation = file_operation(req);
    if let Some(given) = req.headers().get("x-access-token") {
        return match (auth::ct_eq(given.as_bytes(), token.as_bytes()), operation) {
            (true, _) => Ok(()),
            (false, Some(_)) => Err("access token present in header but does not match"),
            (false, None) => Err(reply::UNAUTHORIZED_MESSAGE),
        };
    }
    match operation {
        Some(op) => SignedParams::from_query(req.uri().query())
            .verify(op, token, unix_now())
            .map_err(SignatureError::message),
        None => Err(reply::UNAUTHORIZED_MESSAGE),
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
pub(crate) fn is_signed_files<B>(req: &Request<B>) -> bool {
    file_operation(req).is_some()
        && SignedParams::from_query(req.uri().query())
            .signature
            .is_some()
}

/// A signed `/files` URL in single-URL mode names no sandbox: find the one whose token made
/// the signature, then check its expiry. A signature no live sandbox made is `Invalid`: the
/// URL does not say which sandbox it was for, so a killed sandbox's URL cannot be told from a
/// forged one (with a sandbox in the URL, the first answers 502 "was not found").
pub(crate) fn route_by_signature<B>(
    manager: &Manager,
    req: &Request<B>,
) -> Result<Arc<Route>, SignatureError> {
    let op = file_operation(req).ok_or(SignatureError::Missing)?;
    let params = SignedParams::from_query(req.uri().query());
    let signed_by = |r: &Route| {
        r.access_token
            .as_deref()
            .is_some_and(|token| params.signed_by(op, token))
    };
    let route = manager
        .find_route(signed_by)
        .ok_or(SignatureError::Invalid)?;
    if let Some(token) = route.access_token.as_deref() {
        params.verify(op, token, unix_now())?;
    }
    Ok(route)
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

async fn forward(
    manager: &Manager,
    agents: &AgentClient,
    route: &Route,
    req: Request<Incoming>,
) -> Response<ResponseBody> {
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
    parts.uri = match upstream_uri(&route.sandbox_id, &parts.uri) {
        Some(uri) => uri,
        None => return envd_error(StatusCode::BAD_REQUEST, "invalid request target"),
    };
    let body = prebuffer(body).await.into_http_body();
    match agents.request(Request::from_parts(parts, body)).await {
        Err(e) if e.is_connect() => {
            tracing::debug!(id = %route.sandbox_id, error = %error_chain(&e), "agent socket");
            reply::not_found(&route.sandbox_id)
        }
        Ok(response) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.map_err(Into::into).boxed_unsync())
        }
        Err(e) => {
            let e = error_chain(&e);
            // The sandbox is gone by now.
            if manager.route(&route.sandbox_id).is_none() {
                tracing::debug!(id = %route.sandbox_id, error = %e, "proxying to the agent");
                return reply::not_found(&route.sandbox_id);
            }
            tracing::warn!(id = %route.sandbox_id, error = %e, "proxying to the agent");
            envd_error(
                StatusCode::BAD_GATEWAY,
                &format!("error talking to the sandbox's agent: {e}"),
            )
        }
    }
}

/// An error and its sources, `: `-separated: hyper's own message ("client error
/// (SendRequest)") does not say what went wrong.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

/// A request body as forwarded.
pub(crate) enum RequestBody {
    /// The whole body, which had fully arrived: sent with a `Content-Length`.
    Buffered(Bytes),
    /// What has arrived so far, then the rest as it comes.
    Streaming(Bytes, Incoming),
}

/// Collects the body while it is already there: small requests (every RPC, most uploads, most
/// form posts) are forwarded whole, in one write, with a length. A server that answers a
/// request after reading its one message then closes the connection; if the end of a chunked
/// body were still on its way, the close would reset the connection under the answer (and
/// simple servers, Python's `http.server` among them, cannot read chunked bodies at all).
/// Bodies that are large or still being sent (client streams, big uploads) are streamed after
/// what arrived.
pub(crate) async fn prebuffer(mut body: Incoming) -> RequestBody {
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
            // The client went away mid-body: forward what came; the server sees it cut short.
            Some(Err(e)) => {
                tracing::debug!(error = %e, "reading the request body");
                return RequestBody::Streaming(buf.freeze(), body);
            }
        }
    }
}

impl RequestBody {
    pub(crate) fn into_http_body(self) -> BoxBody<Bytes, hyper::Error> {
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
