//! SNI/Host inspection for sandboxes whose `allowOut` has domains: a TCP connection to port 443
//! or 80 of an address the policy would deny, and that was not learnt through the resolver
//! (a hard-coded IP, a client with its own DNS cache), is redirected here by the host.
//!
//! The proxy reads the TLS ClientHello's server name (443) or the HTTP request's `Host` (80),
//! and lets the connection through only when that name is allowed. It then connects to the
//! original address if it is one of the addresses the name resolves to now, or else to the
//! first of those: a sandbox that hard-codes a (possibly stale) CDN address of an allowed name
//! keeps working, and one that sends an allowed name to an arbitrary address (to reach a server
//! of its own that answers any name) reaches only the allowed name's servers. Addresses the
//! policy never allows (private, link-local, …) are not used even if the name resolves to them.
//!
//! What it cannot see: the HTTP `Host` inside TLS (a CDN that routes by that header, "domain
//! fronting", can reach other sites on the same CDN), and anything not TCP 80/443.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;

use crate::dns::Resolver;
use crate::registry::Registry;

/// The client must have said which name it wants within this time.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes read while looking for the name (a ClientHello with many extensions is < 4 KiB;
/// HTTP request heads are rarely over 8 KiB).
const MAX_HELLO: usize = 16 * 1024;
/// Proxied connections per sandbox at once.
const MAX_CONNS: u32 = 256;

pub(crate) struct Proxy {
    pub(crate) registry: Arc<Registry>,
    pub(crate) resolver: Arc<Resolver>,
    /// Never connected to (hard-blocked and private networks), unless the policy allows them.
    pub(crate) unusable: Vec<Ipv4Net>,
}

impl Proxy {
    pub(crate) async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, from) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "proxy: accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.handle(stream, from).await {
                    tracing::debug!(error = %e, %from, "proxy: connection refused");
                }
            });
        }
    }

    async fn handle(&self, mut client: TcpStream, from: SocketAddr) -> io::Result<()> {
        let src = match from {
            SocketAddr::V4(a) => *a.ip(),
            SocketAddr::V6(a) => a
                .ip()
                .to_ipv4_mapped()
                .ok_or_else(|| io::Error::other("IPv6 client"))?,
        };
        let entry = self
            .registry
            .get(src)
            .ok_or_else(|| io::Error::other("not a sandbox"))?;
        let _busy = entry
            .enter(MAX_CONNS)
            .ok_or_else(|| io::Error::other("too many proxied connections"))?;
        let orig = original_dst(&client)?;
        if orig.ip() == &local_of(&client)? {
            return Err(io::Error::other("connection made to the proxy itself"));
        }
        let _ = client.set_nodelay(true);
        let mut head = Vec::with_capacity(2048);
        let name = timeout(HELLO_TIMEOUT, read_name(&mut client, &mut head))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        let policy = entry.policy();
        if !policy.allows_name(&name) {
            return Err(io::Error::other(format!("{name} is not allowed")));
        }
        let resolved = self.resolver.lookup_a(&name).await?;
        let usable: Vec<Ipv4Addr> = resolved
            .into_iter()
            .map(|(ip, _)| ip)
            .filter(|ip| policy.allows_ip(*ip) || !self.unusable.iter().any(|n| n.contains(ip)))
            .collect();
        let target = if usable.contains(orig.ip()) {
            *orig.ip()
        } else {
            *usable
                .first()
                .ok_or_else(|| io::Error::other(format!("{name} has no usable address")))?
        };
        let mut upstream = timeout(
            CONNECT_TIMEOUT,
            TcpStream::connect(SocketAddrV4::new(target, orig.port())),
        )
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        let _ = upstream.set_nodelay(true);
        upstream.write_all(&head).await?;
        // Until either end closes, or a policy change no longer allows the name, or the lease
        // ends.
        let mut changes = entry.watch();
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                done = &mut copy => {
                    done?;
                    return Ok(());
                }
                changed = changes.changed() => {
                    let ended = changed.is_err() || changes.borrow_and_update().is_none();
                    if ended || !entry.policy().allows_name(&name) {
                        return Err(io::Error::other(format!("{name} is no longer allowed")));
                    }
                }
            }
        }
    }
}

fn local_of(s: &TcpStream) -> io::Result<Ipv4Addr> {
    match s.local_addr()? {
        SocketAddr::V4(a) => Ok(*a.ip()),
        SocketAddr::V6(a) => a
            .ip()
            .to_ipv4_mapped()
            .ok_or_else(|| io::Error::other("IPv6 socket")),
    }
}

/// Where the sandbox meant to connect (before the host's redirect).
fn original_dst(s: &TcpStream) -> io::Result<SocketAddrV4> {
    // SAFETY: a zeroed sockaddr_in is valid; getsockopt writes at most `len` bytes into it.
    let mut raw: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: SO_ORIGINAL_DST on a socket we own, with a buffer of the size we pass.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut raw as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let ip = Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
    Ok(SocketAddrV4::new(ip, u16::from_be(raw.sin_port)))
}

/// Reads until the TLS server name or HTTP host is known; everything read stays in `head`.
async fn read_name(client: &mut TcpStream, head: &mut Vec<u8>) -> io::Result<String> {
    let mut buf = [0u8; 4096];
    loop {
        match parse_name(head) {
            Parsed::Name(n) => return Ok(n),
            Parsed::Invalid(why) => return Err(io::Error::other(why)),
            Parsed::More if head.len() >= MAX_HELLO => {
                return Err(io::Error::other("no server name in the first bytes"));
            }
            Parsed::More => {}
        }
        let n = client.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        head.extend_from_slice(&buf[..n]);
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    Name(String),
    More,
    Invalid(&'static str),
}

/// The server name in a TLS ClientHello (first byte 0x16) or the host of an HTTP/1 request.
pub(crate) fn parse_name(head: &[u8]) -> Parsed {
    match head.first() {
        None => Parsed::More,
        Some(0x16) => parse_sni(head),
        Some(_) => parse_host(head),
    }
}

fn parse_sni(head: &[u8]) -> Parsed {
    use tls_parser::{TlsExtension, TlsMessage, TlsMessageHandshake, parse_tls_extensions};
    if head.len() < 5 {
        return Parsed::More;
    }
    let record_len = usize::from(u16::from_be_bytes([head[3], head[4]]));
    if head.len() < 5 + record_len {
        return Parsed::More;
    }
    let Ok((_, record)) = tls_parser::parse_tls_plaintext(&head[..5 + record_len]) else {
        return Parsed::Invalid("not a TLS ClientHello");
    };
    for msg in record.msg {
        let TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello)) = msg else {
            continue;
        };
        let Some(ext) = hello.ext else {
            return Parsed::Invalid("ClientHello without extensions");
        };
        let Ok((_, exts)) = parse_tls_extensions(ext) else {
            return Parsed::Invalid("bad ClientHello extensions");
        };
        for e in exts {
            if let TlsExtension::SNI(names) = e {
                for (kind, name) in names {
                    if kind.0 == 0
                        && let Ok(n) = std::str::from_utf8(name)
                    {
                        return Parsed::Name(n.to_ascii_lowercase());
                    }
                }
            }
        }
        return Parsed::Invalid("ClientHello without a server name");
    }
    Parsed::Invalid("first TLS record is not a ClientHello")
}

fn parse_host(head: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Partial) => Parsed::More,
        Err(_) => Parsed::Invalid("not an HTTP request"),
        Ok(httparse::Status::Complete(_)) => {
            let host = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok());
            match host {
                Some(h) => {
                    let h = h.trim();
                    let name = h.rsplit_once(':').map_or(h, |(n, port)| {
                        if port.bytes().all(|b| b.is_ascii_digit()) {
                            n
                        } else {
                            h
                        }
                    });
                    Parsed::Name(name.to_ascii_lowercase())
                }
                None => Parsed::Invalid("HTTP request without Host"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_host_is_found() {
        assert_eq!(parse_name(b"GET / HTTP/1.1\r\nHo"), Parsed::More);
        assert_eq!(
            parse_name(b"GET / HTTP/1.1\r\nHost: Example.com:8080\r\n\r\n"),
            Parsed::Name("example.com".into())
        );
        assert_eq!(
            parse_name(b"GET / HTTP/1.1\r\nX: y\r\n\r\n"),
            Parsed::Invalid("HTTP request without Host")
        );
    }

    /// A ClientHello as `openssl s_client -servername files.pypi.org` sends it (trimmed to
    /// the SNI extension).
    fn client_hello(name: &str) -> Vec<u8> {
        let n = name.as_bytes();
        let sni_list_len = 3 + n.len();
        let mut ext = Vec::new();
        ext.extend_from_slice(&[0x00, 0x00]); // server_name
        ext.extend_from_slice(&((sni_list_len + 2) as u16).to_be_bytes());
        ext.extend_from_slice(&(sni_list_len as u16).to_be_bytes());
        ext.push(0); // host_name
        ext.extend_from_slice(&(n.len() as u16).to_be_bytes());
        ext.extend_from_slice(n);
        let mut body = Vec::new();
        body.extend_from_slice(&[0x03, 0x03]);
        body.extend_from_slice(&[7u8; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![0x01];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 0x03, 0x01];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn tls_server_name_is_found() {
        let hello = client_hello("Files.PyPI.org");
        assert_eq!(parse_name(&hello[..10]), Parsed::More);
        assert_eq!(parse_name(&hello), Parsed::Name("files.pypi.org".into()));
        assert!(matches!(
            parse_name(&[0x16, 3, 1, 0, 2, 1, 2]),
            Parsed::Invalid(_)
        ));
    }
}
