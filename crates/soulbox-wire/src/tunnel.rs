//! The port tunnel between the gateway and a sandbox's agent (issue 8).
//!
//! The gateway reaches a port of a sandbox by asking the agent, over the agent's unix socket,
//! to connect to `127.0.0.1:<port>` inside the sandbox's network namespace:
//!
//! ```text
//! GET /_soulbox/tunnel/<port> HTTP/1.1
//! Connection: upgrade
//! Upgrade: soulbox-tunnel
//! ```
//!
//! * `101 Switching Protocols`: from then on the connection carries the bytes of that TCP
//!   connection, both ways, until either side closes (half-closes are passed on).
//! * `502` + `{"code":502,"message":…}`: nothing accepts connections on that port.
//! * `400`: the path names no port in 1–65535.
//!
//! Both ends move the bytes with [`splice`], which also bounds how long a tunnel may sit idle.
//! Only a port number crosses this boundary: nothing in a request chooses an address, so a
//! tunnel can only ever reach the sandbox's own loopback.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Path prefix of the tunnel endpoint; the port follows.
pub const TUNNEL_PATH: &str = "/_soulbox/tunnel/";
/// The `Upgrade` token of a tunnel request and its 101 answer.
pub const TUNNEL_PROTOCOL: &str = "soulbox-tunnel";
/// The gateway ends a tunnel, and a client connection, with no data either way for this long
/// (long-lived WebSocket and SSE streams stay up by sending something now and then, as they
/// must through any proxy). The agent allows a minute more, so only the gateway's bound is
/// seen unless the gateway lost track of a tunnel.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// The path that opens a tunnel to `port`.
pub fn tunnel_path(port: u16) -> String {
    format!("{TUNNEL_PATH}{port}")
}

/// The port of a tunnel path: decimal digits only, no leading zero, 1–65535.
pub fn tunnel_port(path: &str) -> Option<u16> {
    let digits = path.strip_prefix(TUNNEL_PATH)?;
    parse_port(digits)
}

/// A port number as text: 1–65535 in plain decimal (no sign, no leading zero, no spaces).
pub fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || s.starts_with('0') || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok().filter(|p| *p != 0)
}

/// Copies bytes both ways between `a` and `b` until both directions have ended (an end of
/// stream on one side is passed on as a write shutdown on the other), an I/O error, or `idle`
/// passing without a byte moving either way. Ends with `TimedOut` in the last case.
pub async fn splice<A, B>(a: A, b: B, idle: Duration) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let mut a = activity.track(a);
    let mut b = activity.track(b);
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut a, &mut b) => copied,
        () = activity.idle_for(idle) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no data either way for {} s", idle.as_secs()),
        )),
    }
}

/// When bytes last moved through any of the streams it [tracks](Activity::track). Cheap to
/// clone; clones share the clock.
#[derive(Clone, Debug)]
pub struct Activity {
    start: Instant,
    /// Milliseconds after `start` of the last read or write that moved bytes.
    last_ms: Arc<AtomicU64>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Wraps `io` so that every read or write that moves bytes counts as activity.
    pub fn track<S>(&self, io: S) -> Tracked<S> {
        Tracked {
            io,
            activity: self.clone(),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Resolves once nothing has moved for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        loop {
            let deadline = self.last() + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream whose reads and writes are recorded in an [`Activity`].
#[derive(Debug)]
pub struct Tracked<S> {
    io: S,
    activity: Activity,
}

impl<S> Tracked<S> {
    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn ports_parse_strictly() {
        assert_eq!(tunnel_port("/_soulbox/tunnel/8080"), Some(8080));
        assert_eq!(tunnel_port(&tunnel_path(1)), Some(1));
        assert_eq!(tunnel_port(&tunnel_path(65535)), Some(65535));
        for bad in [
            "/_soulbox/tunnel/",
            "/_soulbox/tunnel/0",
            "/_soulbox/tunnel/65536",
            "/_soulbox/tunnel/99999",
            "/_soulbox/tunnel/080",
            "/_soulbox/tunnel/+80",
            "/_soulbox/tunnel/-1",
            "/_soulbox/tunnel/80/x",
            "/_soulbox/tunnel/ 80",
            "/_soulbox/tunnel/123456",
            "/_soulbox/tunnelx/80",
            "/files",
        ] {
            assert_eq!(tunnel_port(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn splice_moves_bytes_both_ways_and_passes_half_closes_on() {
        let (client, a) = tokio::io::duplex(64);
        let (b, server) = tokio::io::duplex(64);
        let task = tokio::spawn(splice(a, b, Duration::from_secs(10)));
        let (mut client_r, mut client_w) = tokio::io::split(client);
        let (mut server_r, mut server_w) = tokio::io::split(server);
        // More than the duplex buffers hold: the copy must keep going.
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client_w.write_all(&sent).await?;
            client_w.shutdown().await?;
            Ok::<_, std::io::Error>(())
        });
        let mut got = Vec::new();
        server_r.read_to_end(&mut got).await.expect("server reads");
        assert_eq!(got, payload);
        writer.await.expect("join").expect("client writes");
        // The other direction still works after the first one ended.
        server_w.write_all(b"reply").await.expect("server writes");
        server_w.shutdown().await.expect("server shutdown");
        let mut reply = Vec::new();
        client_r
            .read_to_end(&mut reply)
            .await
            .expect("client reads");
        assert_eq!(reply, b"reply");
        let (up, down) = task.await.expect("join").expect("splice");
        assert_eq!((up, down), (10_000, 5));
    }

    #[tokio::test(start_paused = true)]
    async fn splice_ends_after_idle_time_but_not_while_bytes_move() {
        let (mut client, a) = tokio::io::duplex(64);
        let (b, mut server) = tokio::io::duplex(64);
        let task = tokio::spawn(splice(a, b, Duration::from_secs(30)));
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            client.write_all(b"x").await.expect("write");
            let mut one = [0u8; 1];
            server.read_exact(&mut one).await.expect("read");
        }
        assert!(
            !task.is_finished(),
            "100 s of traffic every 20 s is not idle"
        );
        tokio::time::sleep(Duration::from_secs(31)).await;
        let err = task.await.expect("join").expect_err("idle tunnel ends");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
