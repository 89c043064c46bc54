//! Sandbox traffic gateway: routes envd, interpreter and user-port requests to sandboxes.
//!
//! A reverse proxy on its own listeners: plain HTTP (URL mode, `E2B_SANDBOX_URL`) and, in
//! domain mode, TLS for `api.<domain>` (handed to the control plane) and `*.<domain>`. It finds
//! the sandbox and port a request is for (routing headers, else Host `<port>-<id>.<domain>`,
//! else, for a signed `/files` URL, the sandbox whose token made the signature), then:
//!
//! * port 49983 (envd): checks the sandbox's access token (or a `/files` signature), strips
//!   it, and forwards over a pool of connections to the agent's unix socket;
//! * any other port (the interpreter's 49999, user servers): checks the traffic access token
//!   when the sandbox has one, and forwards through a tunnel the agent opens to
//!   `127.0.0.1:<port>` inside the sandbox (HTTP/1.1 and HTTP/2 clients, WebSocket and other
//!   upgrades, streamed bodies such as server-sent events).
//!
//! Everything is bounded: client connections served at once, tunnels per sandbox and in
//! total, the time to send a request head (slow-loris), the TLS handshake, and idle
//! connections and tunnels.
//!
//! What sandboxed code can do with this: nothing it could not do anyway. The gateway never
//! forwards `/_soulbox/*` to the agent (its internal endpoints), strips `X-Access-Token`
//! before envd sees it, only relays answers, and a tunnel reaches only the sandbox's own
//! loopback (a port number is all that crosses to the agent). A sandbox can hold at most
//! [`Limits::max_tunnels_per_sandbox`] tunnels, so it cannot starve others of tunnels.

#![forbid(unsafe_code)]

mod auth;
mod envd;
mod ports;
mod reply;
mod routing;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use soulbox_core::{Manager, Route};
use soulbox_wire::tunnel::Activity;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use auth::{SignatureError, SignedParams, signature};
pub use ports::TRAFFIC_TOKEN_HEADER;
pub use routing::{Target, host_name, is_internal};
pub use tls::{CertificateSource, Certificates, LocalCa, TlsError, validate_domain};

use ports::Peer;
use reply::envd_error;

/// The envd port: served by the agent itself, never through a tunnel.
pub const ENVD_PORT: u16 = 49983;
/// How long shutdown waits for in-flight requests before dropping them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every answer.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;
/// The control plane, for requests to `api.<domain>` in domain mode.
pub type ControlPlane = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<ResponseBody>> + Send>>
        + Send
        + Sync,
>;

/// Bounds on what clients can hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Client connections served at once, over all listeners; more wait in the kernel's
    /// accept queue. (Connections taken over by an upgrade count as tunnels instead.)
    pub max_connections: usize,
    /// Tunnels to sandbox ports open at once, over all sandboxes.
    pub max_tunnels: usize,
    /// Tunnels open at once to one sandbox: requests in flight, pooled idle connections and
    /// WebSockets to its ports. More get 503.
    pub max_tunnels_per_sandbox: usize,
    /// Time allowed to send a request head over HTTP/1.1 (slow-loris). hyper also applies it
    /// to a kept-alive connection waiting for its next request.
    pub request_head_timeout: Duration,
    /// A client connection or tunnel with no data either way for this long is closed.
    pub idle_timeout: Duration,
    pub tls_handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 16384,
            max_tunnels: 8192,
            // Two descriptors each in the agent, whose soft RLIMIT_NOFILE is 1024.
            max_tunnels_per_sandbox: 256,
            request_head_timeout: Duration::from_secs(60),
            idle_timeout: soulbox_wire::tunnel::IDLE_TIMEOUT,
            tls_handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// How the gateway is set up.
#[derive(Clone, Default)]
pub struct GatewayConfig {
    pub limits: Limits,
    /// Domain mode: the sandbox domain (lower case, no port). Hosts under it must be
    /// `<port>-<id>.<domain>`, and `api.<domain>` goes to [`control_plane`](Self::control_plane).
    pub domain: Option<String>,
    pub control_plane: Option<ControlPlane>,
}

/// The gateway. Cheap to clone; clones share pools and counters.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    manager: Manager,
    agents: envd::AgentClient,
    tunnel_client: ports::TunnelClient,
    limits: Limits,
    domain: Option<String>,
    api_host: Option<String>,
    control_plane: Option<ControlPlane>,
    connections: Arc<Semaphore>,
}

/// Serves the gateway with default settings on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    manager: Manager,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    Gateway::new(manager, GatewayConfig::default())
        .serve(listener, shutdown)
        .await
}

impl Gateway {
    pub fn new(manager: Manager, config: GatewayConfig) -> Gateway {
        let limits = config.limits;
        let tunnels = Arc::new(ports::Tunnels::new(
            limits.max_tunnels,
            limits.max_tunnels_per_sandbox,
        ));
        Gateway {
            inner: Arc::new(Inner {
                agents: envd::agent_client(manager.clone()),
                tunnel_client: ports::tunnel_client(manager.clone(), tunnels),
                manager,
                connections: Arc::new(Semaphore::new(limits.max_connections)),
                limits,
                api_host: config.domain.as_ref().map(|d| format!("api.{d}")),
                domain: config.domain,
                control_plane: config.control_plane,
            }),
        }
    }

    /// Serves plain HTTP (h1, and h2 with prior knowledge) on `listener` until `shutdown`
    /// resolves, then lets in-flight requests finish for up to [`SHUTDOWN_GRACE`].
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.run(listener, None, shutdown).await
    }

    /// Serves TLS (ALPN h2 and http/1.1, as `tls` offers) on `listener` until `shutdown`.
    pub async fn serve_tls(
        &self,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.run(
            listener,
            Some(tokio_rustls::TlsAcceptor::from(tls)),
            shutdown,
        )
        .await
    }

    async fn run(
        &self,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let graceful = GracefulShutdown::new();
        let builder = self.builder();
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                permit = self.inner.connections.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break, // never closed
                },
                () = &mut shutdown => break,
            };
            let (stream, addr) = tokio::select! {
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
            let inner = self.inner.clone();
            let builder = builder.clone();
            let watcher = graceful.watcher();
            match tls.clone() {
                None => {
                    let peer = Peer {
                        addr,
                        scheme: "http",
                    };
                    tokio::spawn(inner.serve_connection(builder, stream, peer, watcher, permit));
                }
                Some(acceptor) => {
                    let peer = Peer {
                        addr,
                        scheme: "https",
                    };
                    tokio::spawn(async move {
                        let handshake = tokio::time::timeout(
                            inner.limits.tls_handshake_timeout,
                            acceptor.accept(stream),
                        );
                        match handshake.await {
                            Ok(Ok(tls)) => {
                                inner
                                    .serve_connection(builder, tls, peer, watcher, permit)
                                    .await;
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%addr, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::info!("gateway shutdown: dropping requests still in flight");
        }
        Ok(())
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.inner.limits.request_head_timeout);
        builder.http2().timer(TokioTimer::new());
        builder
    }
}

impl Inner {
    /// Serves one client connection until it ends, is upgraded, or sits idle too long.
    async fn serve_connection<IO>(
        self: Arc<Self>,
        builder: auto::Builder<TokioExecutor>,
        io: IO,
        peer: Peer,
        watcher: Watcher,
        permit: OwnedSemaphorePermit,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Activity::new();
        let io = TokioIo::new(activity.track(io));
        let idle = self.limits.idle_timeout;
        let service = service_fn(move |req| {
            let this = self.clone();
            async move { Ok::<_, Infallible>(this.handle(req, peer).await) }
        });
        let conn = watcher.watch(
            builder
                .serve_connection_with_upgrades(io, service)
                .into_owned(),
        );
        tokio::select! {
            served = conn => if let Err(e) = served {
                tracing::debug!(addr = %peer.addr, error = %e, "gateway connection ended with an error");
            },
            () = activity.idle_for(idle) => {
                tracing::debug!(addr = %peer.addr, "closing a connection idle for {} s", idle.as_secs());
            }
        }
        drop(permit);
    }

    /// Answers one request.
    async fn handle(&self, req: Request<Incoming>, peer: Peer) -> Response<ResponseBody> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .map(host_name);
        if let (Some(api), Some(control_plane), Some(host)) =
            (&self.api_host, &self.control_plane, &host)
            && api == host
        {
            return control_plane(req).await;
        }
        let target = match routing::target(req.headers(), host.as_deref(), self.domain.as_deref()) {
            Ok(t) => t,
            Err(e) => return envd_error(StatusCode::BAD_REQUEST, &e.to_string()),
        };
        let Some(target) = target else {
            return self.unaddressed(req).await;
        };
        // The agent's own endpoints are for the host alone.
        if target.port == ENVD_PORT && routing::is_internal(req.uri().path()) {
            return envd_error(StatusCode::NOT_FOUND, "not found");
        }
        let Some(route) = self
            .live_route(&target.sandbox_id, target.port, req.headers())
            .await
        else {
            return reply::not_found(&target.sandbox_id);
        };
        if target.port == ENVD_PORT {
            envd::handle(&self.manager, &self.agents, &route, req, false).await
        } else {
            ports::handle(
                &self.manager,
                &self.tunnel_client,
                self.limits.idle_timeout,
                &route,
                target.port,
                req,
                peer,
            )
            .await
        }
    }

    /// A request that names no sandbox: the gateway's own health, or a signed `/files` URL
    /// of single-URL mode, which goes to the sandbox whose token made the signature.
    async fn unaddressed(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        if req.uri().path() == "/health" {
            return reply::text(StatusCode::OK, "OK");
        }
        if !envd::is_signed_files(&req) {
            return envd_error(
                StatusCode::BAD_REQUEST,
                "no sandbox addressed: send E2b-Sandbox-Id and E2b-Sandbox-Port, \
                 or use the host <port>-<sandbox id>.<domain>",
            );
        }
        match envd::route_by_signature(&self.manager, &req) {
            Ok(route) => envd::handle(&self.manager, &self.agents, &route, req, true).await,
            // Expired, or no live sandbox signed it: envd's 401.
            Err(e) => envd_error(StatusCode::UNAUTHORIZED, e.message()),
        }
    }

    /// The route of a live sandbox, resuming it first when it is paused with `autoResume`
    /// (E2B: traffic to such a sandbox wakes it; the request then goes on to it as if it had
    /// never slept). Traffic to envd wakes it only with the sandbox's access token (what the
    /// request needs anyway); traffic to its ports, which may be public, wakes it as it is.
    async fn live_route(
        &self,
        id: &str,
        port: u16,
        headers: &http::HeaderMap,
    ) -> Option<Arc<Route>> {
        if let Some(route) = self.manager.route(id) {
            return Some(route);
        }
        let given = headers.get("x-access-token").map(|v| v.as_bytes());
        let may_wake = |token: Option<&str>| match (port == ENVD_PORT, token) {
            (true, Some(token)) => given.is_some_and(|g| auth::ct_eq(g, token.as_bytes())),
            _ => true,
        };
        if self.manager.resume_on_traffic(id, may_wake).await {
            return self.manager.route(id);
        }
        None
    }
}
