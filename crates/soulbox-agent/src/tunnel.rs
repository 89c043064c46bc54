//! `GET /_soulbox/tunnel/<port>`: the gateway's way to a TCP port of the sandbox (protocol in
//! `soulbox_wire::tunnel`). The agent connects to the port on the sandbox's loopback, answers
//! 101, and splices the upgraded connection to it.
//!
//! What sandboxed code can do with this: nothing new. The agent only ever connects to its own
//! network namespace's loopback, at a port the host names; a server in the sandbox sees an
//! ordinary local client (the agent, sandbox root) and can answer whatever it likes, which the
//! gateway relays without trusting. Every tunnel ends once idle for longer than the gateway
//! allows, so tunnels the gateway lost track of cannot pile up.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use soulbox_wire::tunnel::{self, TUNNEL_PROTOCOL};
use tokio::net::TcpStream;

use crate::http::{Body, error, status};

/// How long a connection to a port may take: loopback answers at once unless the server's
/// accept queue is full.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A tunnel with no data either way for this long ends. Longer than the gateway's own bound
/// ([`tunnel::IDLE_TIMEOUT`]), so in the normal case the gateway ends it.
const IDLE_TIMEOUT: Duration = Duration::from_secs(tunnel::IDLE_TIMEOUT.as_secs() + 60);

pub(crate) async fn open(req: Request<Incoming>) -> Response<Body> {
    let Some(port) = tunnel::tunnel_port(req.uri().path()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the tunnel path must end in a port number in 1-65535",
        );
    };
    if !asks_for_tunnel(req.headers()) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("a tunnel needs Connection: upgrade and Upgrade: {TUNNEL_PROTOCOL}"),
        );
    }
    let stream = match connect(port).await {
        Ok(s) => s,
        Err(e) => {
            return error(
                StatusCode::BAD_GATEWAY,
                format!("connecting to port {port}: {e}"),
            );
        }
    };
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                if let Err(e) = tunnel::splice(TokioIo::new(upgraded), stream, IDLE_TIMEOUT).await {
                    tracing::debug!(port, "tunnel ended: {e}");
                }
            }
            Err(e) => tracing::debug!(port, "tunnel upgrade failed: {e}"),
        }
    });
    let mut r = status(StatusCode::SWITCHING_PROTOCOLS);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    r.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(TUNNEL_PROTOCOL));
    r
}

fn asks_for_tunnel(headers: &HeaderMap) -> bool {
    let upgrade = headers.get(header::UPGRADE).is_some_and(|v| {
        v.as_bytes()
            .eq_ignore_ascii_case(TUNNEL_PROTOCOL.as_bytes())
    });
    let connection = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    upgrade && connection
}

/// Connects to `port` on 127.0.0.1, or on ::1 when nothing listens on the IPv4 loopback
/// (servers that bound `localhost` may have got only the IPv6 one).
async fn connect(port: u16) -> std::io::Result<TcpStream> {
    let v4 = connect_to(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await;
    let stream = match v4 {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            // Report the IPv4 refusal if IPv6 fails too: that is the address users expect.
            connect_to(SocketAddr::from((Ipv6Addr::LOCALHOST, port)))
                .await
                .map_err(|_| e)?
        }
        other => other?,
    };
    // Without it small writes wait ~40 ms for delayed ACKs.
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn connect_to(addr: SocketAddr) -> std::io::Result<TcpStream> {
    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            )
        })?
}
