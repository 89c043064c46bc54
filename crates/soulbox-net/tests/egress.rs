//! Egress policy against a real "internet": a network namespace this test makes, routed from
//! the host through a veth, with HTTP/TLS-ish servers on public-looking addresses
//! (203.0.113.0/24), a private one (10.99.0.10), a fake metadata server (169.254.169.254) and
//! a DNS server (203.0.113.53) that answers test names. Probes run in threads that join a
//! leased slot's namespace, the way a sandbox's processes do. Nothing leaves the machine.
//!
//! Needs root, `ip` and `nft`; without them it says so and passes.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use soulbox_net::{EgressConfig, NetConfig, Network};

const ALLOWED: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const OTHER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
const DNS: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);
const PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 10);
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const TRANSIT_HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const TRANSIT_WORLD: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

/// Root and `ip`/`nft`; without them the test says so and passes, except where
/// `SOULBOX_TESTS_REQUIRE_HOST=1` (scripts/test): there it fails.
fn can_run() -> bool {
    let missing = |why: &str| {
        if std::env::var_os("SOULBOX_TESTS_REQUIRE_HOST").is_some_and(|v| v == "1") {
            panic!("cannot run here ({why}) and SOULBOX_TESTS_REQUIRE_HOST=1");
        }
        eprintln!("SKIPPED: {why}");
        false
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return missing("needs root");
    }
    for tool in ["ip", "nft"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return missing(&format!("needs {tool}"));
        }
    }
    true
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The fake internet; torn down on drop.
struct World {
    ns: String,
    host_if: String,
    stop: Arc<AtomicBool>,
    /// Payloads the UDP echo server received.
    seen: Arc<std::sync::Mutex<Vec<String>>>,
}

impl World {
    fn new() -> World {
        let pid = std::process::id();
        let ns = format!("sbtw{pid}");
        let host_if = format!("sbtw{pid}");
        remove_stale_worlds();
        sh(&["ip", "netns", "add", &ns]);
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        sh(&["ip", "addr", "add", "198.51.100.1/30", "dev", &host_if]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        sh(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        sh(&[
            "ip",
            "-n",
            &ns,
            "addr",
            "add",
            "198.51.100.2/30",
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        for a in [ALLOWED, OTHER, DNS, PRIVATE, METADATA] {
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{a}/32"),
                "dev",
                "lo",
            ]);
        }
        sh(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            "198.51.100.1",
        ]);
        for net in ["203.0.113.0/24", "10.99.0.0/24", "169.254.169.254/32"] {
            sh(&["ip", "route", "replace", net, "via", "198.51.100.2"]);
        }
        let world = World {
            ns,
            host_if,
            stop: Arc::new(AtomicBool::new(false)),
            seen: Arc::default(),
        };
        world.serve();
        world
    }

    fn netns(&self) -> OwnedFd {
        std::fs::File::open(format!("/run/netns/{}", self.ns))
            .expect("open world netns")
            .into()
    }

    /// Servers inside the world: every address answers TCP 80 and 443 with
    /// "hello from <address> <first line>", UDP 7 of 203.0.113.10 echoes, and DNS on 203.0.113.53.
    fn serve(&self) {
        let ns = Arc::new(self.netns());
        let (tcp80, tcp443, dns, echo) = in_netns(&ns, || {
            (
                TcpListener::bind("0.0.0.0:80").expect("bind 80"),
                TcpListener::bind("0.0.0.0:443").expect("bind 443"),
                UdpSocket::bind((DNS, 53)).expect("bind dns"),
                UdpSocket::bind((ALLOWED, 7)).expect("bind echo"),
            )
        });
        for l in [tcp80, tcp443] {
            std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    std::thread::spawn(move || hello(s));
                }
            });
        }
        std::thread::spawn(move || dns_server(dns));
        let stop = self.stop.clone();
        let seen = self.seen.clone();
        std::thread::spawn(move || {
            let _ = echo.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = echo.recv_from(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    if let Ok(mut seen) = seen.lock() {
                        seen.push(text.clone());
                    }
                    let _ = echo.send_to(format!("echo {text}").as_bytes(), from);
                }
            }
        });
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for net in ["203.0.113.0/24", "10.99.0.0/24", "169.254.169.254/32"] {
            let _ = Command::new("ip").args(["route", "del", net]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// Worlds (and their routes, which would shadow ours) left by test processes that died.
fn remove_stale_worlds() {
    let Ok(dir) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("sbtw")
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() && pid != std::process::id() {
            continue;
        }
        let _ = Command::new("ip").args(["link", "del", &name]).output();
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &format!("sbnettest{pid}")])
            .output();
        let _ = soulbox_net::remove_host_state(
            &format!("sbnettestb{pid}"),
            std::path::Path::new("/nonexistent"),
            false,
        );
    }
}

fn hello(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 2048];
    let n = s.read(&mut buf).unwrap_or(0);
    let first = buf[..n]
        .split(|b| *b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim().to_owned())
        .unwrap_or_default();
    let local = s
        .local_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let _ = s.write_all(format!("hello from {local} {first}\n").as_bytes());
    // A long-lived connection: echo until the client goes.
    if first.contains("KEEP") {
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    }
}

fn dns_server(sock: UdpSocket) {
    let mut buf = [0u8; 1500];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            return;
        };
        let Ok(q) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let Some(query) = q.queries.first() else {
            continue;
        };
        let name = query
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let ip = match name.as_str() {
            "allowed.test" | "www.wild.test" | "a.b.wild.test" => Some(ALLOWED),
            "other.test" => Some(OTHER),
            "rebind.test" => Some(PRIVATE),
            "meta.test" => Some(METADATA),
            _ => None,
        };
        let mut r = Message::response(q.metadata.id, OpCode::Query);
        r.metadata.recursion_available = true;
        r.add_query(query.clone());
        match ip {
            Some(ip) if query.query_type() == RecordType::A => {
                r.add_answer(Record::from_rdata(
                    query.name().clone(),
                    300,
                    RData::A(A(ip)),
                ));
            }
            Some(_) => {}
            None => r.metadata.response_code = ResponseCode::NXDomain,
        }
        if let Ok(bytes) = r.to_vec() {
            let _ = sock.send_to(&bytes, from);
        }
    }
}

/// Runs `f` on a thread that has joined the namespace `ns` (sockets it makes stay there).
fn in_netns<T: Send + 'static>(ns: &Arc<OwnedFd>, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.clone();
    std::thread::spawn(move || {
        move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network)).expect("setns");
        f()
    })
    .join()
    .expect("probe thread")
}

/// Connects from the sandbox to `to`, sends `payload`, returns the answer's first line.
fn tcp(ns: &Arc<OwnedFd>, to: SocketAddrV4, payload: Vec<u8>) -> Result<String, String> {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_millis(1500))
            .map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(8)))
            .map_err(|e| e.to_string())?;
        s.write_all(&payload).map_err(|e| e.to_string())?;
        let mut out = String::new();
        match s.read_to_string(&mut out) {
            Ok(_) if !out.is_empty() => Ok(out.lines().next().unwrap_or_default().to_owned()),
            Ok(_) => Err("closed without an answer".into()),
            Err(e) => Err(e.to_string()),
        }
    })
}

/// Whether a TCP connection to `to` opens from inside the sandbox.
fn connects(ns: &Arc<OwnedFd>, to: SocketAddrV4) -> bool {
    in_netns(ns, move || {
        TcpStream::connect_timeout(&SocketAddr::V4(to), Duration::from_millis(1500)).is_ok()
    })
}

fn nft_list(table: &str) -> String {
    let out = Command::new("nft")
        .args(["list", "table", "inet", table])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn http(ns: &Arc<OwnedFd>, ip: Ipv4Addr, host: &str) -> Result<String, String> {
    tcp(
        ns,
        SocketAddrV4::new(ip, 80),
        format!("GET /{host} HTTP/1.1\r\nHost: {host}\r\n\r\n").into_bytes(),
    )
}

/// A minimal TLS ClientHello naming `sni`.
fn client_hello(sni: &str) -> Vec<u8> {
    let n = sni.as_bytes();
    let mut ext = vec![0, 0];
    ext.extend_from_slice(&((n.len() + 5) as u16).to_be_bytes());
    ext.extend_from_slice(&((n.len() + 3) as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(n.len() as u16).to_be_bytes());
    ext.extend_from_slice(n);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[9u8; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 1, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec.push(b'\n');
    rec
}

fn tls(ns: &Arc<OwnedFd>, ip: Ipv4Addr, sni: &str) -> Result<String, String> {
    tcp(ns, SocketAddrV4::new(ip, 443), client_hello(sni))
}

/// Asks `server` (port 53) for the A records of `name` from inside the sandbox.
fn resolve(
    ns: &Arc<OwnedFd>,
    server: Ipv4Addr,
    name: &str,
) -> Result<(ResponseCode, Vec<Ipv4Addr>), String> {
    resolve_at(ns, SocketAddrV4::new(server, 53), name)
}

/// Asks `server` for the A records of `name` from inside the sandbox.
fn resolve_at(
    ns: &Arc<OwnedFd>,
    server: SocketAddrV4,
    name: &str,
) -> Result<(ResponseCode, Vec<Ipv4Addr>), String> {
    let name = name.to_owned();
    in_netns(ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        let mut q = Message::query();
        q.metadata.id = 4242;
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(
            Name::from_ascii(&name).map_err(|e| e.to_string())?,
            RecordType::A,
        ));
        sock.send_to(&q.to_vec().map_err(|e| e.to_string())?, server)
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 1500];
        let n = sock.recv(&mut buf).map_err(|e| e.to_string())?;
        let r = Message::from_vec(&buf[..n]).map_err(|e| e.to_string())?;
        assert_eq!(r.metadata.id, 4242);
        assert_eq!(r.metadata.message_type, MessageType::Response);
        let ips = r
            .answers
            .iter()
            .filter_map(|a| match &a.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect();
        Ok((r.metadata.response_code, ips))
    })
}

fn cfg(internet: bool, allow: &[&str], deny: &[&str]) -> EgressConfig {
    EgressConfig {
        allow_internet_access: internet,
        allow_out: allow.iter().map(|s| s.to_string()).collect(),
        deny_out: deny.iter().map(|s| s.to_string()).collect(),
    }
}

fn netcfg(name: &str, state: &std::path::Path, ready: usize) -> NetConfig {
    netcfg_in(name, state, ready, 198)
}

/// A config whose slot pool is `10.<second>.<pid % 250>.0/24`.
fn netcfg_in(name: &str, state: &std::path::Path, ready: usize, second: u8) -> NetConfig {
    let pid = std::process::id();
    NetConfig {
        name: name.to_owned(),
        pool: format!("10.{second}.{}.0/24", pid % 250)
            .parse()
            .expect("pool"),
        state_dir: state.to_path_buf(),
        // Only `.test` names go to the world's DNS server: the default upstream is a black hole.
        upstream_dns: vec![SocketAddr::from(([192, 0, 2, 255], 53))],
        dns_zones: vec![("test".to_owned(), SocketAddr::from((DNS, 53)))],
        ready_slots: ready,
    }
}

fn host_links(prefix: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn slot_chains(table: &str) -> usize {
    let out = Command::new("nft")
        .args(["list", "table", "inet", table])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.trim_start().starts_with("chain s_") || l.trim_start().starts_with("set l_"))
        .count()
}

fn ok(r: Result<String, String>, want: &str, what: &str) {
    match r {
        Ok(line) => assert!(
            line.starts_with(want),
            "{what}: got {line:?}, want {want:?}"
        ),
        Err(e) => panic!("{what}: {e}"),
    }
}

fn blocked(r: Result<String, String>, what: &str) {
    assert!(r.is_err(), "{what} should be blocked, got {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_policy_end_to_end() {
    if !can_run() {
        return;
    }
    let world = World::new();
    let state = tempfile::tempdir().expect("tempdir");
    let name = format!("sbnettest{}", std::process::id());
    let net = Network::start(netcfg(&name, state.path(), 2))
        .await
        .expect("start");
    let table = net.table().to_owned();
    let prefix = net.interface_prefix().to_owned();

    // A service on the host (like the API on 127.0.0.1:3000, here on every address).
    let host_svc = TcpListener::bind("0.0.0.0:0").expect("bind host service");
    let host_port = host_svc.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for s in host_svc.incoming().flatten() {
            hello(s);
        }
    });

    // Default: the internet is reachable, private/LAN/metadata/host are not.
    let t0 = Instant::now();
    let open = net
        .acquire("open", &EgressConfig::default())
        .await
        .expect("acquire");
    eprintln!(
        "first acquire, right after start (pool still filling): {:?}",
        t0.elapsed()
    );
    let ns = open.netns.clone().expect("netns");
    ok(
        http(&ns, ALLOWED, "x"),
        "hello from 203.0.113.10",
        "internet by IP",
    );
    blocked(http(&ns, PRIVATE, "x"), "a private address");
    blocked(http(&ns, METADATA, "x"), "the metadata address");
    blocked(http(&ns, TRANSIT_WORLD, "x"), "the host's LAN");
    blocked(
        tcp(
            &ns,
            SocketAddrV4::new(open.gateway, host_port),
            b"x\n".to_vec(),
        ),
        "the host via the gateway",
    );
    blocked(
        tcp(
            &ns,
            SocketAddrV4::new(TRANSIT_HOST, host_port),
            b"x\n".to_vec(),
        ),
        "the host's other address",
    );
    assert_eq!(
        resolve(&ns, open.gateway, "allowed.test").expect("dns"),
        (ResponseCode::NoError, vec![ALLOWED])
    );
    // DNS to any server is answered by the host's resolver.
    assert_eq!(
        resolve(&ns, Ipv4Addr::new(8, 8, 8, 8), "other.test").expect("dns via 8.8.8.8"),
        (ResponseCode::NoError, vec![OTHER])
    );
    let rc = std::fs::read_to_string(state.path().join("open.json")).expect("record");
    assert!(rc.contains("allowInternetAccess"), "{rc}");

    // Another sandbox's address is unreachable.
    let peer = net
        .acquire("peer", &EgressConfig::default())
        .await
        .expect("acquire peer");
    let peer_ns = peer.netns.clone().expect("netns");
    let peer_addr = peer.address;
    let listener = in_netns(&peer_ns, move || {
        TcpListener::bind((peer_addr, 8080)).expect("bind in peer")
    });
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            hello(s);
        }
    });
    blocked(
        tcp(&ns, SocketAddrV4::new(peer.address, 8080), b"x\n".to_vec()),
        "another sandbox",
    );
    ok(
        tcp(
            &peer_ns,
            SocketAddrV4::new(peer.address, 8080),
            b"x\n".to_vec(),
        ),
        "hello",
        "own service",
    );

    // The resolver and proxy answer only on the host end of a sandbox's own link, not on the
    // gateway address of another slot (their sockets listen on every address).
    let (dns_port, proxy_port) = net.ports();
    assert_eq!(
        resolve_at(
            &ns,
            SocketAddrV4::new(open.gateway, dns_port),
            "allowed.test"
        )
        .expect("resolver on the own gateway")
        .0,
        ResponseCode::NoError
    );
    assert!(
        resolve_at(
            &ns,
            SocketAddrV4::new(peer.gateway, dns_port),
            "allowed.test"
        )
        .is_err(),
        "the resolver answered on another slot's gateway"
    );
    assert!(connects(&ns, SocketAddrV4::new(open.gateway, proxy_port)));
    for port in [dns_port, proxy_port] {
        assert!(
            !connects(&ns, SocketAddrV4::new(peer.gateway, port)),
            "port {port} opened on another slot's gateway"
        );
    }

    // Two servers side by side (issue 12): a second server that turned forwarding on carries
    // a forward guard; neither it running nor the table it leaves behind when it stops cuts
    // this server's sandboxes off, and its stale input rules close none of our ports.
    let other_state = tempfile::tempdir().expect("tempdir");
    // What `Network::start` records when it turns `ip_forward` on (this host has it on).
    std::fs::write(other_state.path().join(".forwarding-enabled"), b"1").expect("marker");
    let other_name = format!("sbnettestb{}", std::process::id());
    let other = Network::start(netcfg_in(&other_name, other_state.path(), 1, 197))
        .await
        .expect("start a second server");
    assert!(
        nft_list(other.table()).contains("iifname @uplinks oifname @uplinks drop"),
        "the second server has a forward guard: {}",
        nft_list(other.table())
    );
    let theirs = other
        .acquire("theirs", &EgressConfig::default())
        .await
        .expect("acquire on the second server");
    let theirs_ns = theirs.netns.clone().expect("netns");
    ok(
        http(&theirs_ns, ALLOWED, "x"),
        "hello from 203.0.113.10",
        "the second server's sandbox",
    );
    ok(
        http(&ns, ALLOWED, "x"),
        "hello from 203.0.113.10",
        "a sandbox beside a guarded server",
    );
    let other_table = other.table().to_owned();
    drop(other);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        nft_list(&other_table).contains("@uplinks"),
        "a stopped server keeps its table"
    );
    ok(
        http(&ns, ALLOWED, "x"),
        "hello from 203.0.113.10",
        "a sandbox beside a stopped server's table",
    );
    let fresh = net
        .acquire("fresh", &EgressConfig::default())
        .await
        .expect("acquire beside a stopped server's table");
    let fresh_ns = fresh.netns.clone().expect("netns");
    ok(
        http(&fresh_ns, ALLOWED, "x"),
        "hello from 203.0.113.10",
        "a new sandbox beside a stopped server's table",
    );
    assert_eq!(
        resolve(&fresh_ns, fresh.gateway, "allowed.test")
            .expect("dns beside a stopped server's table")
            .0,
        ResponseCode::NoError
    );
    drop((fresh_ns, fresh, theirs_ns, theirs));
    net.release("fresh").await.expect("release");
    let removed = soulbox_net::remove_host_state(&other_table, other_state.path(), false)
        .expect("take the stopped server off the host");
    assert!(removed.table, "{removed:?}");

    // Spoofed source addresses do not get out (IP_FREEBIND lets any process send them).
    let spoofed = in_netns(&ns, move || {
        let s = socket_freebind(peer_addr);
        let _ = s.send_to(b"spoof", (ALLOWED, 7));
        let s2 = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s2.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let _ = s2.send_to(b"plain", (ALLOWED, 7));
        let mut buf = [0u8; 512];
        s2.recv(&mut buf)
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    });
    assert!(
        spoofed
            .expect("echo of the plain datagram")
            .contains("plain")
    );
    let seen = world.seen.lock().map(|s| s.clone()).unwrap_or_default();
    assert!(seen.iter().any(|s| s == "plain"), "{seen:?}");
    assert!(
        !seen.iter().any(|s| s == "spoof"),
        "a spoofed datagram got out: {seen:?}"
    );

    // allow_internet_access=false: nothing, not even DNS.
    let closed = net
        .acquire("closed", &cfg(false, &[], &[]))
        .await
        .expect("acquire");
    let cns = closed.netns.clone().expect("netns");
    blocked(http(&cns, ALLOWED, "x"), "internet with access off");
    assert_eq!(
        resolve(&cns, closed.gateway, "allowed.test")
            .expect("dns")
            .0,
        ResponseCode::Refused
    );

    // CIDR allow beats deny-all.
    let cidr = net
        .acquire("cidr", &cfg(true, &["203.0.113.10/32"], &["0.0.0.0/0"]))
        .await
        .expect("acquire");
    let cidr_ns = cidr.netns.clone().expect("netns");
    ok(
        http(&cidr_ns, ALLOWED, "x"),
        "hello from 203.0.113.10",
        "allowed CIDR",
    );
    blocked(http(&cidr_ns, OTHER, "x"), "denied address");
    // A deny list alone blocks only what it names.
    let partial = net
        .acquire("partial", &cfg(true, &[], &["203.0.113.11"]))
        .await
        .expect("acquire");
    let pns = partial.netns.clone().expect("netns");
    ok(
        http(&pns, ALLOWED, "x"),
        "hello from 203.0.113.10",
        "not denied",
    );
    blocked(http(&pns, OTHER, "x"), "denied by denyOut");
    // Private ranges open only when allowOut names them.
    let lan = net
        .acquire("lan", &cfg(true, &["10.99.0.0/24"], &[]))
        .await
        .expect("acquire");
    ok(
        http(lan.netns.as_ref().expect("netns"), PRIVATE, "x"),
        "hello from 10.99.0.10",
        "named private range",
    );
    let all = net
        .acquire("all", &cfg(true, &["0.0.0.0/0"], &[]))
        .await
        .expect("acquire");
    blocked(
        http(all.netns.as_ref().expect("netns"), PRIVATE, "x"),
        "private range via 0.0.0.0/0",
    );

    // Domains: DNS answers only allowed names; learnt addresses open; others stay closed.
    let dom = net
        .acquire(
            "dom",
            &cfg(
                true,
                &["allowed.test", "*.wild.test", "rebind.test"],
                &["0.0.0.0/0"],
            ),
        )
        .await
        .expect("acquire");
    let dns_ = dom.netns.clone().expect("netns");
    // Before any lookup, a hard-coded address goes through the SNI/Host check.
    ok(
        tls(&dns_, ALLOWED, "allowed.test"),
        "hello from 203.0.113.10",
        "SNI of an allowed name",
    );
    blocked(tls(&dns_, OTHER, "other.test"), "SNI of another name");
    blocked(http(&dns_, OTHER, "other.test"), "Host of another name");
    // An allowed name sent to another address reaches the name's own address, not that one.
    ok(
        http(&dns_, OTHER, "allowed.test"),
        "hello from 203.0.113.10",
        "Host of an allowed name at a foreign address",
    );
    assert_eq!(
        resolve(&dns_, dom.gateway, "other.test").expect("dns").0,
        ResponseCode::NXDomain
    );
    assert_eq!(
        resolve(&dns_, dom.gateway, "wild.test").expect("dns").0,
        ResponseCode::NXDomain
    );
    assert_eq!(
        resolve(&dns_, dom.gateway, "a.b.wild.test").expect("dns"),
        (ResponseCode::NoError, vec![ALLOWED])
    );
    assert_eq!(
        resolve(&dns_, dom.gateway, "allowed.test").expect("dns"),
        (ResponseCode::NoError, vec![ALLOWED])
    );
    // Learnt: any port of the learnt address now works; the other address does not.
    let echo = in_netns(&dns_, || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let _ = s.send_to(b"udp", (ALLOWED, 7));
        let mut buf = [0u8; 512];
        s.recv(&mut buf).map(|n| n > 0)
    });
    assert!(echo.expect("UDP to a learnt address"));
    blocked(
        tcp(&dns_, SocketAddrV4::new(OTHER, 8443), b"x".to_vec()),
        "other port of another address",
    );
    // DNS rebinding: an allowed name resolving to a private address does not open it.
    assert_eq!(
        resolve(&dns_, dom.gateway, "rebind.test").expect("dns"),
        (ResponseCode::NoError, vec![PRIVATE])
    );
    blocked(
        http(&dns_, PRIVATE, "rebind.test"),
        "private address learnt through DNS",
    );
    let learnt = Command::new("nft")
        .args(["list", "set", "inet", &table, &format!("l_{}", dom.index)])
        .output()
        .expect("nft");
    let learnt = String::from_utf8_lossy(&learnt.stdout);
    assert!(
        learnt.contains("203.0.113.10") && !learnt.contains("10.99.0.10"),
        "{learnt}"
    );

    // A connection that went through the SNI/Host check ends when the name is no longer
    // allowed.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let held = {
        let ns = dns_.clone();
        std::thread::spawn(move || {
            move_into_link_name_space(ns.as_fd(), Some(LinkNameSpaceType::Network)).expect("setns");
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::V4(SocketAddrV4::new(OTHER, 80)),
                Duration::from_secs(2),
            )
            .expect("connect");
            s.write_all(b"GET /KEEP HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
                .expect("send");
            s.set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).expect("greeting");
            let greeting = String::from_utf8_lossy(&buf[..n]).into_owned();
            ready_tx.send(greeting).expect("ready");
            go_rx.recv().expect("go");
            let _ = s.write_all(b"still there?\n");
            // EOF or reset: the proxy dropped the connection.
            match s.read(&mut buf) {
                Ok(0) => true,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                Ok(_) => false,
            }
        })
    };
    let greeting = ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("greeting");
    assert!(
        greeting.starts_with("hello from 203.0.113.10"),
        "{greeting}"
    );
    net.update("dom", &cfg(false, &[], &[]))
        .await
        .expect("update");
    go_tx.send(()).expect("go");
    assert!(
        held.join().expect("thread"),
        "the proxied connection outlived the policy"
    );

    // PUT network: live.
    net.update("open", &cfg(false, &[], &[]))
        .await
        .expect("update");
    blocked(http(&ns, ALLOWED, "x"), "after turning access off");
    assert_eq!(net.config("open"), Some(cfg(false, &[], &[])));
    net.update("open", &cfg(true, &[], &["203.0.113.10"]))
        .await
        .expect("update");
    blocked(http(&ns, ALLOWED, "x"), "after denying it");
    ok(
        http(&ns, OTHER, "x"),
        "hello from 203.0.113.11",
        "after the update",
    );
    net.update("open", &EgressConfig::default())
        .await
        .expect("update");
    ok(
        http(&ns, ALLOWED, "x"),
        "hello from 203.0.113.10",
        "after allowing again",
    );
    assert!(
        net.update("nobody", &EgressConfig::default())
            .await
            .is_err()
    );
    assert!(
        net.acquire("bad", &cfg(true, &["not a domain"], &[]))
            .await
            .is_err()
    );
    assert!(
        net.acquire("open", &EgressConfig::default()).await.is_err(),
        "double lease"
    );

    // Restart: the service goes, a lease whose namespace lives on is adopted with its policy.
    drop(ns);
    let keep_closed = cns.clone();
    let leased: HashSet<String> = [
        "open", "peer", "closed", "cidr", "partial", "lan", "all", "dom",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    drop(net);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let net = Network::start(netcfg(&name, state.path(), 8))
        .await
        .expect("restart");
    assert_eq!(
        net.lease_count(),
        leased.len(),
        "every recorded lease with a live interface"
    );
    assert_eq!(net.config("closed"), Some(cfg(false, &[], &[])));
    blocked(http(&keep_closed, ALLOWED, "x"), "adopted closed sandbox");
    assert_eq!(
        resolve(&keep_closed, closed.gateway, "allowed.test")
            .expect("dns")
            .0,
        ResponseCode::Refused
    );
    ok(
        http(&cidr_ns, ALLOWED, "x"),
        "hello from 203.0.113.10",
        "adopted CIDR sandbox",
    );
    // Sandboxes that did not survive are released.
    let keep: HashSet<String> = ["closed".to_owned()].into();
    assert_eq!(net.retain(&keep).await, leased.len() - 1);
    net.release("closed").await.expect("release");
    net.release("closed").await.expect("release twice");

    // Churn: acquire/release many; measure; nothing left.
    // (8 ready slots, as `soulbox serve` keeps by default; a create and a kill take a few ms.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut times = Vec::new();
    for i in 0..40 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let t = Instant::now();
        let l = net
            .acquire(&format!("churn{i}"), &EgressConfig::default())
            .await
            .expect("acquire");
        times.push(t.elapsed());
        net.release(&l.owner).await.expect("release");
    }
    times.sort();
    eprintln!(
        "acquire during churn: p50 {:?} p90 {:?} max {:?}",
        times[times.len() / 2],
        times[times.len() * 9 / 10],
        times[times.len() - 1]
    );
    drop((
        cidr_ns,
        pns,
        dns_,
        peer_ns,
        keep_closed,
        cns,
        open,
        peer,
        closed,
        cidr,
        partial,
        lan,
        all,
        dom,
    ));
    assert_eq!(net.lease_count(), 0);
    // Released slots are scrubbed in the background and the pool refills: wait until only the
    // ready slots (as many as the pool wants) have interfaces, chains and sets.
    let deadline = Instant::now() + Duration::from_secs(20);
    let settled =
        |ready: usize| host_links(&prefix).len() == ready && slot_chains(&table) == 2 * ready;
    loop {
        let ready = net.ready_count();
        if ready == 8 && settled(ready) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leftovers: {} interfaces, {} chains+learnt sets, {ready} ready slots",
            host_links(&prefix).len(),
            slot_chains(&table)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let records: Vec<_> = std::fs::read_dir(state.path())
        .expect("state")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .collect();
    assert!(records.is_empty(), "{records:?}");
    drop(net);
    let _ = Command::new("nft")
        .args(["delete", "table", "inet", &table])
        .output();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !host_links(&prefix).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        host_links(&prefix).is_empty(),
        "ready slots vanish with the service"
    );
    drop(world);
}

/// A UDP socket bound to `addr` even though it is not local (IP_FREEBIND).
fn socket_freebind(addr: Ipv4Addr) -> UdpSocket {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor we own; the sockaddr is fully initialised.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_IP,
            libc::IP_FREEBIND,
            (&one as *const libc::c_int).cast(),
            4,
        );
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(addr).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        assert_eq!(rc, 0, "freebind bind");
        UdpSocket::from_raw_fd(fd)
    }
}
