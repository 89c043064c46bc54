//! The resolver every sandbox uses: its `/etc/resolv.conf` names the slot's gateway, and the
//! host redirects DNS to any address (UDP and TCP port 53) here, so no sandbox reaches
//! another DNS server.
//!
//! Per sandbox (identified by source address) it: refuses everything when the policy denies
//! all traffic and allows no domain (`Closed`: no query leaves the host, so DNS cannot carry
//! data out); answers only names under an allowed domain when the policy denies all traffic
//! (`AllowedNamesOnly`, NXDOMAIN for the rest); forwards everything otherwise. Addresses in the
//! answers for an allowed name are added to the sandbox's learnt set (`l_N`) with the record's
//! TTL (at least [`MIN_LEARN_SECS`]) before the answer is sent, so the connection that follows
//! is allowed; loopback, link-local, multicast, sandbox and private addresses are never learnt
//! (DNS rebinding cannot open them).
//!
//! Limits against tunnelling and floods: [`crate::registry::DNS_RATE`] queries per second per
//! sandbox (burst [`crate::registry::DNS_BURST`]), [`MAX_INFLIGHT`] at a time, one question per
//! query, queries of at most [`MAX_QUERY`] bytes, TCP connections closed after
//! [`TCP_IDLE`] idle or [`TCP_MAX_QUERIES`] queries.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use ipnet::Ipv4Net;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::timeout;

use crate::nftnl;
use crate::policy::DnsMode;
use crate::registry::{Entry, Registry};

/// Largest query accepted (a question is at most ~260 bytes; EDNS options add a little).
pub(crate) const MAX_QUERY: usize = 1024;
/// Queries of one sandbox in progress at once.
pub(crate) const MAX_INFLIGHT: u32 = 64;
/// Shortest time a learnt address stays allowed, whatever the record's TTL.
pub(crate) const MIN_LEARN_SECS: u32 = 60;
/// Longest time a learnt address stays allowed without being resolved again.
pub(crate) const MAX_LEARN_SECS: u32 = 86_400;
pub(crate) const TCP_IDLE: Duration = Duration::from_secs(10);
pub(crate) const TCP_MAX_QUERIES: usize = 32;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

pub(crate) struct Resolver {
    pub(crate) registry: Arc<Registry>,
    pub(crate) upstreams: Vec<SocketAddr>,
    /// Forward zones: names at or below the zone go to its server instead.
    pub(crate) zones: Vec<(String, SocketAddr)>,
    /// The nftables table (`inet <table>`).
    pub(crate) table: String,
    /// Never learnt: hard-blocked and private networks (unless the policy allows them).
    pub(crate) unlearnable: Vec<Ipv4Net>,
}

fn src_v4(addr: SocketAddr) -> Option<Ipv4Addr> {
    match addr.ip() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    }
}

/// A reply carrying only `code` for the query `req`.
fn reply(req: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut m = Message::error_msg(req.metadata.id, req.metadata.op_code, code);
    m.metadata.recursion_desired = req.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_queries(req.queries.iter().cloned());
    m.to_vec().ok()
}

/// FORMERR for bytes that did not parse: the id is the first two bytes, if there are two.
fn format_error(query: &[u8]) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

impl Resolver {
    pub(crate) async fn serve_udp(self: Arc<Self>, sock: UdpSocket) {
        let sock = Arc::new(sock);
        let mut buf = vec![0u8; MAX_QUERY + 1];
        loop {
            let (n, from) = match sock.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "resolver: udp receive");
                    continue;
                }
            };
            if n > MAX_QUERY {
                continue;
            }
            let Some(src) = src_v4(from) else { continue };
            let query = buf[..n].to_vec();
            let this = self.clone();
            let sock = sock.clone();
            tokio::spawn(async move {
                if let Some(answer) = this.answer(src, &query, false).await {
                    let _ = sock.send_to(&answer, from).await;
                }
            });
        }
    }

    pub(crate) async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            let (stream, from) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "resolver: tcp accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(src) = src_v4(from) else { continue };
            let this = self.clone();
            tokio::spawn(async move {
                if let Err(e) = this.serve_conn(stream, src).await {
                    tracing::trace!(error = %e, "resolver: tcp connection");
                }
            });
        }
    }

    async fn serve_conn(&self, mut stream: TcpStream, src: Ipv4Addr) -> io::Result<()> {
        if self.registry.get(src).is_none() {
            return Ok(());
        }
        for _ in 0..TCP_MAX_QUERIES {
            let Ok(len) = timeout(TCP_IDLE, stream.read_u16()).await else {
                return Ok(());
            };
            let len = usize::from(len?);
            if len > MAX_QUERY {
                return Ok(());
            }
            let mut query = vec![0u8; len];
            timeout(TCP_IDLE, stream.read_exact(&mut query))
                .await
                .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            let Some(answer) = self.answer(src, &query, true).await else {
                return Ok(());
            };
            let len =
                u16::try_from(answer.len()).map_err(|_| io::Error::other("answer too big"))?;
            stream.write_u16(len).await?;
            stream.write_all(&answer).await?;
        }
        Ok(())
    }

    /// The answer to `query` from the sandbox at `src`; `None` when it gets none.
    async fn answer(&self, src: Ipv4Addr, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let entry = self.registry.get(src)?;
        let Ok(req) = Message::from_vec(query) else {
            return format_error(query);
        };
        if !entry.take_token() {
            return reply(&req, ResponseCode::Refused);
        }
        let Some(_busy) = entry.enter(MAX_INFLIGHT) else {
            return reply(&req, ResponseCode::Refused);
        };
        if req.metadata.message_type != MessageType::Query
            || req.metadata.op_code != OpCode::Query
            || req.queries.len() != 1
        {
            return reply(&req, ResponseCode::FormErr);
        }
        let name = req.queries[0].name().to_ascii();
        let policy = entry.policy();
        match policy.dns_mode() {
            DnsMode::Closed => return reply(&req, ResponseCode::Refused),
            DnsMode::AllowedNamesOnly if !policy.allows_name(&name) => {
                return reply(&req, ResponseCode::NXDomain);
            }
            _ => {}
        }
        let answer = match self.forward(&name, query, tcp).await {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, %name, "resolver: upstream failed");
                return reply(&req, ResponseCode::ServFail);
            }
        };
        if policy.allows_name(&name) {
            self.learn(&entry, &answer).await;
        }
        Some(answer)
    }

    /// Adds the A records of an answer to the sandbox's learnt set.
    async fn learn(&self, entry: &Entry, answer: &[u8]) {
        let Ok(msg) = Message::from_vec(answer) else {
            return;
        };
        let policy = entry.policy();
        let mut learnt: Vec<(Ipv4Addr, u32)> = Vec::new();
        for record in &msg.answers {
            if let RData::A(a) = &record.data {
                let ip = a.0;
                let blocked = self.unlearnable.iter().any(|n| n.contains(&ip));
                if blocked && !policy.allows_ip(ip) {
                    continue;
                }
                let secs = record.ttl.clamp(MIN_LEARN_SECS, MAX_LEARN_SECS);
                match learnt.iter_mut().find(|(l, _)| *l == ip) {
                    Some((_, s)) => *s = (*s).max(secs),
                    None => learnt.push((ip, secs)),
                }
            }
        }
        if learnt.is_empty() {
            return;
        }
        let table = self.table.clone();
        let index = entry.index;
        let learnt: Vec<(Ipv4Addr, Duration)> = learnt
            .into_iter()
            .map(|(ip, secs)| (ip, Duration::from_secs(u64::from(secs))))
            .collect();
        match tokio::task::spawn_blocking(move || nftnl::learn(&table, index, &learnt)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "resolver: adding learnt addresses"),
            Err(e) => tracing::warn!(error = %e, "resolver: learn task"),
        }
    }

    /// Where queries for `name` go: the server of the longest forward zone it falls in, else
    /// the upstream servers.
    fn servers_for(&self, name: &str) -> Vec<SocketAddr> {
        let name = name.trim_end_matches('.');
        let zone = self
            .zones
            .iter()
            .filter(|(z, _)| {
                name.eq_ignore_ascii_case(z)
                    || (name.len() > z.len()
                        && name[name.len() - z.len()..].eq_ignore_ascii_case(z)
                        && name.as_bytes()[name.len() - z.len() - 1] == b'.')
            })
            .max_by_key(|(z, _)| z.len());
        match zone {
            Some((_, server)) => vec![*server],
            None => self.upstreams.clone(),
        }
    }

    /// Sends `query` (for `name`) to its servers in turn; returns the first matching answer
    /// (with the client's id).
    async fn forward(&self, name: &str, query: &[u8], tcp: bool) -> io::Result<Vec<u8>> {
        if query.len() < 12 {
            return Err(io::Error::from(io::ErrorKind::InvalidData));
        }
        let client_id = [query[0], query[1]];
        let mut last = io::Error::other("no upstream DNS server");
        for upstream in &self.servers_for(name) {
            let id: u16 = rand::random();
            let mut q = query.to_vec();
            q[..2].copy_from_slice(&id.to_be_bytes());
            let result = if tcp {
                timeout(UPSTREAM_TIMEOUT, forward_tcp(*upstream, &q)).await
            } else {
                timeout(UPSTREAM_TIMEOUT, forward_udp(*upstream, &q, id)).await
            };
            match result {
                Ok(Ok(mut answer)) if answer.len() >= 12 => {
                    answer[..2].copy_from_slice(&client_id);
                    return Ok(answer);
                }
                Ok(Ok(_)) => last = io::Error::from(io::ErrorKind::InvalidData),
                Ok(Err(e)) => last = e,
                Err(_) => last = io::Error::from(io::ErrorKind::TimedOut),
            }
        }
        Err(last)
    }

    /// The IPv4 addresses `name` resolves to (for the proxy), through the same upstreams.
    pub(crate) async fn lookup_a(&self, name: &str) -> io::Result<Vec<(Ipv4Addr, u32)>> {
        let qname = name;
        let name = Name::from_ascii(name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let mut msg = Message::query();
        msg.metadata.recursion_desired = true;
        msg.add_query(Query::query(name, RecordType::A));
        let bytes = msg.to_vec().map_err(|e| io::Error::other(e.to_string()))?;
        let answer = self.forward(qname, &bytes, false).await?;
        let msg = Message::from_vec(&answer)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        Ok(msg
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some((a.0, r.ttl)),
                _ => None,
            })
            .collect())
    }
}

/// Does `answer` answer `query` (same id and question)?
fn matches(query: &[u8], answer: &[u8]) -> bool {
    let (Ok(q), Ok(a)) = (Message::from_vec(query), Message::from_vec(answer)) else {
        return false;
    };
    a.metadata.id == q.metadata.id
        && a.metadata.message_type == MessageType::Response
        && a.queries == q.queries
}

async fn forward_udp(upstream: SocketAddr, query: &[u8], id: u16) -> io::Result<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 4096];
    // Stray datagrams (wrong id, spoofed) are skipped; the caller's timeout bounds this.
    loop {
        let n = sock.recv(&mut buf).await?;
        let answer = &buf[..n];
        if n >= 2 && u16::from_be_bytes([answer[0], answer[1]]) == id && matches(query, answer) {
            return Ok(answer.to_vec());
        }
    }
}

async fn forward_tcp(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    let len = u16::try_from(query.len()).map_err(|_| io::Error::other("query too big"))?;
    stream.write_u16(len).await?;
    stream.write_all(query).await?;
    let len = usize::from(stream.read_u16().await?);
    let mut answer = vec![0u8; len];
    stream.read_exact(&mut answer).await?;
    if !matches(query, &answer) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "mismatched answer",
        ));
    }
    Ok(answer)
}
