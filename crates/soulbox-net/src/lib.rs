//! Sandbox networking: network slots, the egress policy, and DNS/SNI inspection.
//!
//! Every sandbox runs in its own network namespace. A sandbox created with networking joins a
//! **slot** instead of a loopback-only namespace: a namespace made beforehand (in the
//! background, [`NetConfig::ready_slots`] of them kept ready) with `eth0` on a /30 veth link
//! to the host, a default route, and a resolver address. The host side is one nftables table
//! per server (see `nft.rs`): NAT to the outside, the sandbox's `allowOut`/`denyOut` policy,
//! and blocks that no policy lifts (the host itself, other sandboxes, link-local and the
//! metadata address, multicast). The in-house resolver (`dns.rs`) and the SNI/Host proxy
//! (`proxy.rs`) extend the policy to domain names. IPv6 is disabled inside sandboxes.
//!
//! Interface: [`Network::acquire`] leases a slot to an owner (a sandbox id, or any other name
//! such as a template build) with an [`EgressConfig`]; the [`Lease`]'s namespace and
//! `resolv.conf` go to `soulbox_runtime::Runtime::create_with_network`;
//! [`Network::update`] replaces the policy live; [`Network::release`] scrubs the slot
//! (conntrack entries, rules, interface) and makes its index reusable. Leases are recorded in
//! `state_dir` so that a restarted server keeps the slots of the sandboxes it re-adopts.
//!
//! What sandboxed code can do with this: see `docs/threat-model.md` ("Sandbox ↔ network").

mod conntrack;
mod dns;
mod netlink;
mod nft;
mod nftnl;
pub mod policy;
mod proxy;
mod registry;
mod slot;
mod teardown;

/// Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`; not part of the API).
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    /// The name the egress proxy finds in a connection's first bytes (TLS SNI or HTTP Host).
    pub fn server_name(head: &[u8]) -> Option<String> {
        match crate::proxy::parse_name(head) {
            crate::proxy::Parsed::Name(n) => Some(n),
            _ => None,
        }
    }
}

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Notify;

pub use policy::{EgressConfig, Policy, PolicyError};
pub use teardown::{Removed, remove_host_state};

use crate::nft::{Base, Nft, SlotRef};
use crate::policy::{HARD_BLOCKED, PRIVATE, nets};
use crate::registry::{Entry, Registry};
use crate::slot::{Factory, Made};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0}")]
    Policy(#[from] PolicyError),
    #[error("no network lease for {0}")]
    NotFound(String),
    #[error("{0} already has a network lease")]
    AlreadyLeased(String),
    #[error("invalid owner name {0:?} (1-64 characters of [a-z0-9_-])")]
    InvalidOwner(String),
    #[error("no free network slot (pool {0} exhausted)")]
    Exhausted(Ipv4Net),
    #[error("network configuration: {0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, NetError>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, NetError> {
        self.map_err(|source| NetError::Io {
            context: what(),
            source,
        })
    }
}

fn join_error(e: tokio::task::JoinError) -> NetError {
    NetError::Io {
        context: "network task".into(),
        source: io::Error::other(e.to_string()),
    }
}

/// Settings of the network service.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Names this server's objects: the nftables table is `inet <name>`, and slot interfaces
    /// start with a prefix derived from it (`soulbox` → `sbx`). Use the cgroup name, which
    /// differs per data dir, so that servers never touch each other's slots.
    pub name: String,
    /// Addresses for slots, cut into /30s (prefix between /16 and /28).
    pub pool: Ipv4Net,
    /// Where leases are recorded (one JSON file per owner); created if missing (0700).
    pub state_dir: PathBuf,
    /// Where the resolver sends the queries it forwards (the host's `resolv.conf`
    /// nameservers by default, see [`upstreams_from_resolv_conf`]).
    pub upstream_dns: Vec<SocketAddr>,
    /// Forward zones (`("corp.example", 10.0.0.53:53)`): queries for names at or below a
    /// zone go to its server instead of `upstream_dns` (the longest matching zone wins).
    pub dns_zones: Vec<(String, SocketAddr)>,
    /// Slots kept made ahead of demand.
    pub ready_slots: usize,
}

/// The default slot pool of a server named `name`: `10.200.0.0/16` for `soulbox`, else one of
/// `10.201–10.254.0.0/16` chosen by the name (servers on different data dirs get different
/// pools unless they collide, which [`Network::start`] detects).
pub fn default_pool(name: &str) -> Ipv4Net {
    let second = if name == "soulbox" {
        200
    } else {
        201 + (fnv(name) % 54) as u8
    };
    Ipv4Net::new(Ipv4Addr::new(10, second, 0, 0), 16).unwrap_or_default()
}

fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// The interface prefix of a server named `name`: `sbx` for `soulbox`, else `sb` + 4 hex
/// digits of its hash + `x` (short enough for 5-digit indices in IFNAMSIZ).
fn interface_prefix(name: &str) -> String {
    if name == "soulbox" {
        "sbx".to_owned()
    } else {
        format!("sb{:04x}x", fnv(name) & 0xffff)
    }
}

/// The `nameserver` lines of a `resolv.conf` as port-53 addresses (loopback ones are kept:
/// the resolver runs on the host).
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// A slot leased to an owner.
#[derive(Debug, Clone)]
pub struct Lease {
    pub owner: String,
    pub index: u32,
    /// The sandbox's address (`eth0`).
    pub address: Ipv4Addr,
    /// The host end: default route and resolver.
    pub gateway: Ipv4Addr,
    /// The host-side interface.
    pub interface: String,
    /// The namespace to run the sandbox in. `None` for a lease re-adopted after a restart
    /// (its namespace is held by the sandbox's processes).
    pub netns: Option<Arc<OwnedFd>>,
}

impl Lease {
    /// `/etc/resolv.conf` for the sandbox: the slot's gateway, where the resolver answers.
    pub fn resolv_conf(&self) -> String {
        format!(
            "# Written by SoulBox: DNS is answered by the host for this sandbox's policy.\n\
             nameserver {}\noptions timeout:2 attempts:2\n",
            self.gateway
        )
    }
}

/// What is recorded per lease in `state_dir`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    index: u32,
    config: EgressConfig,
}

struct Leased {
    lease: Lease,
    config: EgressConfig,
    entry: Arc<Entry>,
}

/// Slot indices: never used ones first, then released ones in release order (a released
/// index is reused as late as possible).
struct Indices {
    next: u32,
    capacity: u32,
    released: VecDeque<u32>,
    /// Held by leases or ready slots.
    taken: HashSet<u32>,
}

impl Indices {
    fn take(&mut self) -> Option<u32> {
        while self.next < self.capacity {
            let i = self.next;
            self.next += 1;
            if self.taken.insert(i) {
                return Some(i);
            }
        }
        let i = self.released.pop_front()?;
        self.taken.insert(i);
        Some(i)
    }

    fn give_back(&mut self, i: u32) {
        if self.taken.remove(&i) {
            self.released.push_back(i);
        }
    }
}

struct Inner {
    cfg: NetConfig,
    nft: Nft,
    factory: Mutex<Factory>,
    registry: Arc<Registry>,
    leases: Mutex<HashMap<String, Leased>>,
    ready: Mutex<VecDeque<Made>>,
    indices: Mutex<Indices>,
    refill: Arc<Notify>,
    /// Held while slots are made: one `nft` run at a time (see [`make_slot`]).
    making: tokio::sync::Mutex<()>,
    /// Released slot indices, scrubbed in batches by the janitor task.
    janitor: tokio::sync::mpsc::UnboundedSender<u32>,
    mark_base: u32,
    dns_port: u16,
    proxy_port: u16,
    /// The resolver's and proxy's tasks; aborted when the last handle goes.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // Wakes the refill loop so that it sees the service is gone and ends.
        self.refill.notify_one();
    }
}

/// The network service. Cheap to clone; clones share state. Needs root and a tokio runtime.
#[derive(Clone)]
pub struct Network {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network")
            .field("table", &self.inner.nft.table)
            .field("pool", &self.inner.cfg.pool)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn valid_owner(owner: &str) -> bool {
    (1..=64).contains(&owner.len())
        && owner
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The resolver's UDP and TCP sockets on one port number, picked by the kernel for UDP. That
/// number can be taken for TCP (another service, another server's proxy): then it tries again.
async fn bind_resolver() -> Result<(UdpSocket, TcpListener, u16), NetError> {
    const TRIES: usize = 16;
    let mut tries = 0;
    loop {
        let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .ctx(|| "bind the resolver".into())?;
        let port = udp.local_addr().ctx(|| "resolver address".into())?.port();
        match TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await {
            Ok(tcp) => return Ok((udp, tcp, port)),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries + 1 < TRIES => tries += 1,
            Err(e) => return Err(e).ctx(|| "bind the resolver (tcp)".into()),
        }
    }
}

impl Network {
    /// Sets the host up (forwarding on, the nftables table rebuilt with the slots of recorded
    /// leases whose interface still exists), starts the resolver and the proxy, and starts
    /// making ready slots. Records of leases whose interface is gone are dropped.
    pub async fn start(cfg: NetConfig) -> Result<Network, NetError> {
        let bits = cfg.pool.prefix_len();
        if !(16..=28).contains(&bits) {
            return Err(NetError::Config(format!(
                "slot pool {} must be between a /16 and a /28",
                cfg.pool
            )));
        }
        if cfg.upstream_dns.is_empty() {
            return Err(NetError::Config(
                "no upstream DNS server (none in /etc/resolv.conf and none given)".into(),
            ));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(&cfg.state_dir)
            .ctx(|| format!("create {}", cfg.state_dir.display()))?;
        let prefix = interface_prefix(&cfg.name);
        let nft = Nft {
            table: cfg.name.clone(),
            prefix: prefix.clone(),
        };
        let pool = cfg.pool;
        let state_dir = cfg.state_dir.clone();
        let prefix2 = prefix.clone();
        let (factory, lan, uplinks, existing, forward_guard) =
            tokio::task::spawn_blocking(move || -> Result<_, NetError> {
                let mut factory = Factory::new(pool, &prefix2).ctx(|| "open rtnetlink".into())?;
                let lan = factory.lan().ctx(|| "list the host's routes".into())?;
                if let Some(clash) = lan.iter().find(|n| n.contains(&pool) || pool.contains(*n)) {
                    return Err(NetError::Config(format!(
                        "slot pool {pool} overlaps the host network {clash}; choose another with --net-pool"
                    )));
                }
                let existing = factory.existing().ctx(|| "list interfaces".into())?;
                let uplinks = factory.uplinks().ctx(|| "list the host's uplinks".into())?;
                let marker = state_dir.join(teardown::FORWARDING_MARKER);
                let forwarding = slot::read_sysctl("net/ipv4/ip_forward")
                    .ctx(|| "read net.ipv4.ip_forward".into())?;
                if forwarding != "1" {
                    std::fs::write(&marker, b"1").ctx(|| "record forwarding".into())?;
                    slot::host_sysctl("net/ipv4/ip_forward", "1")
                        .ctx(|| "enable net.ipv4.ip_forward".into())?;
                }
                Ok((factory, lan, uplinks, existing, marker.exists()))
            })
            .await
            .map_err(join_error)??;

        // Recorded leases whose interface survived (their sandbox is alive).
        let capacity = slot::capacity(pool);
        let mut records: Vec<(String, Record)> = Vec::new();
        for entry in std::fs::read_dir(&cfg.state_dir).ctx(|| "list network state".into())? {
            let entry = entry.ctx(|| "list network state".into())?;
            let path = entry.path();
            let Some(owner) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .map(str::to_owned)
            else {
                continue;
            };
            let rec = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Record>(&b).ok());
            match rec {
                Some(r)
                    if valid_owner(&owner)
                        && r.index > 0
                        && r.index < capacity
                        && existing.contains(&r.index) =>
                {
                    records.push((owner, r))
                }
                _ => {
                    tracing::info!(owner, "dropping the network record of a slot that is gone");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }

        // Conntrack marks of slots are `mark_base | index`; the resolver's and proxy's sockets
        // carry `mark_base` itself (index 0 is never a slot).
        let mark_base = (fnv(&cfg.name) & 0x7fff | 0x4000) << 16;
        let (dns_udp, dns_tcp, dns_port) = bind_resolver().await?;
        let proxy_listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .ctx(|| "bind the proxy".into())?;
        let proxy_port = proxy_listener
            .local_addr()
            .ctx(|| "proxy address".into())?
            .port();

        for fd in [dns_udp.as_fd(), dns_tcp.as_fd(), proxy_listener.as_fd()] {
            nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::Mark, &mark_base)
                .map_err(std::io::Error::from)
                .ctx(|| "mark the resolver's and proxy's sockets".into())?;
        }
        let registry = Arc::new(Registry::default());
        let mut leases = HashMap::new();
        let mut taken = HashSet::new();
        let mut slots = Vec::new();
        for (owner, rec) in records {
            let policy = match Policy::compile(&rec.config) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(owner, error = %e, "recorded egress config no longer valid; denying all");
                    Policy::compile(&EgressConfig {
                        allow_internet_access: false,
                        ..EgressConfig::default()
                    })?
                }
            };
            let (gateway, address) = slot::addresses(pool, rec.index);
            slots.push((SlotRef::new(pool, mark_base, rec.index), policy.clone()));
            let entry = Arc::new(Entry::new(rec.index, policy));
            registry.insert(address, entry.clone());
            taken.insert(rec.index);
            leases.insert(
                owner.clone(),
                Leased {
                    lease: Lease {
                        owner,
                        index: rec.index,
                        address,
                        gateway,
                        interface: format!("{prefix}{}", rec.index),
                        netns: None,
                    },
                    config: rec.config,
                    entry,
                },
            );
        }
        let script = nft.base_script(
            &Base {
                pool,
                lan: &lan,
                dns_port,
                proxy_port,
                socket_mark: mark_base,
                uplinks: &uplinks,
                forward_guard,
            },
            &slots.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        );
        let table = nft.table.clone();
        // Interfaces of slots that are not leased (ready slots of an earlier server).
        let stale: Vec<u32> = existing
            .into_iter()
            .filter(|i| !taken.contains(i))
            .collect();
        let factory = tokio::task::spawn_blocking(move || -> Result<Factory, NetError> {
            let mut factory = factory;
            nft::run(&script).ctx(|| "create the nftables table".into())?;
            for (slot, policy) in &slots {
                nftnl::set_policy(&table, slot.index, slot.address, policy)
                    .ctx(|| format!("restore the egress policy of slot {}", slot.index))?;
            }
            for i in stale {
                factory
                    .unmake(i)
                    .ctx(|| format!("remove stale slot interface {i}"))?;
            }
            Ok(factory)
        })
        .await
        .map_err(join_error)??;

        let mut unlearnable = nets(&HARD_BLOCKED);
        unlearnable.extend(nets(&PRIVATE));
        unlearnable.push(pool);
        unlearnable.extend(lan.iter().copied());
        let resolver = Arc::new(dns::Resolver {
            registry: registry.clone(),
            upstreams: cfg.upstream_dns.clone(),
            zones: cfg
                .dns_zones
                .iter()
                .map(|(z, a)| (z.trim_end_matches('.').to_ascii_lowercase(), *a))
                .collect(),
            table: nft.table.clone(),
            unlearnable: unlearnable.clone(),
        });
        let proxy = Arc::new(proxy::Proxy {
            registry: registry.clone(),
            resolver: resolver.clone(),
            unusable: unlearnable,
        });
        let tasks = vec![
            tokio::spawn(resolver.clone().serve_udp(dns_udp)),
            tokio::spawn(resolver.serve_tcp(dns_tcp)),
            tokio::spawn(proxy.serve(proxy_listener)),
        ];
        let (janitor_tx, janitor_rx) = tokio::sync::mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            nft,
            factory: Mutex::new(factory),
            registry,
            leases: Mutex::new(leases),
            ready: Mutex::new(VecDeque::new()),
            indices: Mutex::new(Indices {
                next: 1,
                capacity,
                released: VecDeque::new(),
                taken,
            }),
            refill: Arc::new(Notify::new()),
            making: tokio::sync::Mutex::new(()),
            janitor: janitor_tx,
            mark_base,
            dns_port,
            proxy_port,
            tasks,
            cfg,
        });
        let weak = Arc::downgrade(&inner);
        let notify = inner.refill.clone();
        tokio::spawn(async move { refill_loop(weak, notify).await });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move { janitor_loop(weak, janitor_rx).await });
        inner.refill.notify_one();
        tracing::info!(
            pool = %inner.cfg.pool,
            table = %inner.nft.table,
            dns_port,
            proxy_port,
            adopted = lock(&inner.leases).len(),
            "sandbox networking ready"
        );
        Ok(Network { inner })
    }

    /// Leases a slot to `owner` with the egress policy `config` (validated first: a bad
    /// config is [`NetError::Policy`] and takes nothing). Takes a ready slot, or makes one if
    /// none is ready.
    pub async fn acquire(&self, owner: &str, config: &EgressConfig) -> Result<Lease, NetError> {
        if !valid_owner(owner) {
            return Err(NetError::InvalidOwner(owner.to_owned()));
        }
        let policy = Policy::compile(config)?;
        if lock(&self.inner.leases).contains_key(owner) {
            return Err(NetError::AlreadyLeased(owner.to_owned()));
        }
        let made = lock(&self.inner.ready).pop_front();
        self.inner.refill.notify_one();
        let made = match made {
            Some(m) => m,
            None => self.make_slot().await?,
        };
        let index = made.index;
        let (gateway, address) = slot::addresses(self.inner.cfg.pool, index);
        let lease = Lease {
            owner: owner.to_owned(),
            index,
            address,
            gateway,
            interface: format!("{}{index}", self.inner.nft.prefix),
            netns: Some(made.netns),
        };
        let result = self.finish_acquire(&lease, config, policy).await;
        if let Err(e) = result {
            self.scrub(index);
            return Err(e);
        }
        Ok(lease)
    }

    async fn finish_acquire(
        &self,
        lease: &Lease,
        config: &EgressConfig,
        policy: Policy,
    ) -> Result<(), NetError> {
        if !policy.is_default() {
            let table = self.inner.nft.table.clone();
            let (index, address, p) = (lease.index, lease.address, policy.clone());
            let started = Instant::now();
            tokio::task::spawn_blocking(move || nftnl::set_policy(&table, index, address, &p))
                .await
                .map_err(join_error)?
                .ctx(|| "apply the egress policy".into())?;
            tracing::debug!(
                index,
                us = started.elapsed().as_micros() as u64,
                "egress policy applied"
            );
        }
        self.record(&lease.owner, lease.index, config)?;
        let entry = Arc::new(Entry::new(lease.index, policy));
        self.inner.registry.insert(lease.address, entry.clone());
        let mut leases = lock(&self.inner.leases);
        if leases.contains_key(&lease.owner) {
            self.inner.registry.remove(lease.address);
            return Err(NetError::AlreadyLeased(lease.owner.clone()));
        }
        leases.insert(
            lease.owner.clone(),
            Leased {
                lease: lease.clone(),
                config: config.clone(),
                entry,
            },
        );
        Ok(())
    }

    /// Replaces `owner`'s egress policy. New connections follow it at once; tracked
    /// connections are forgotten, so an existing connection to a destination that is now
    /// denied stops (one that is still allowed usually survives: its next packet is
    /// re-admitted). Addresses learnt through DNS are forgotten too.
    pub async fn update(&self, owner: &str, config: &EgressConfig) -> Result<(), NetError> {
        let policy = Policy::compile(config)?;
        let (index, entry) = {
            let leases = lock(&self.inner.leases);
            let l = leases
                .get(owner)
                .ok_or_else(|| NetError::NotFound(owner.to_owned()))?;
            (l.lease.index, l.entry.clone())
        };
        let slot = self.slot_ref(index);
        let table = self.inner.nft.table.clone();
        let p = policy.clone();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            nftnl::set_policy(&table, slot.index, slot.address, &p)?;
            conntrack::flush_mark(slot.mark)
        })
        .await
        .map_err(join_error)?
        .ctx(|| "apply the egress policy".into())?;
        self.record(owner, index, config)?;
        entry.set_policy(policy);
        if let Some(l) = lock(&self.inner.leases).get_mut(owner) {
            l.config = config.clone();
        }
        Ok(())
    }

    /// `owner`'s egress configuration as last given.
    pub fn config(&self, owner: &str) -> Option<EgressConfig> {
        lock(&self.inner.leases)
            .get(owner)
            .map(|l| l.config.clone())
    }

    /// `owner`'s lease.
    pub fn lease(&self, owner: &str) -> Option<Lease> {
        lock(&self.inner.leases).get(owner).map(|l| l.lease.clone())
    }

    /// Ends `owner`'s lease at once (its policy no longer applies, its record is gone); the
    /// slot's interface, tracked connections, chains and sets are then removed in the
    /// background, after which its index is reusable. Idempotent. Call it after the sandbox's
    /// processes are gone.
    pub async fn release(&self, owner: &str) -> Result<(), NetError> {
        let Some(leased) = lock(&self.inner.leases).remove(owner) else {
            return Ok(());
        };
        self.inner.registry.remove(leased.lease.address);
        leased.entry.close();
        drop(leased.lease.netns);
        self.scrub(leased.lease.index);
        let path = self.record_path(owner);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx(|| format!("remove {}", path.display())),
        }
    }

    /// Releases every lease whose owner is not in `keep` (after a restart: the sandboxes that
    /// did not survive). Returns how many it released.
    pub async fn retain(&self, keep: &HashSet<String>) -> usize {
        let owners: Vec<String> = lock(&self.inner.leases)
            .keys()
            .filter(|o| !keep.contains(*o))
            .cloned()
            .collect();
        for owner in &owners {
            if let Err(e) = self.release(owner).await {
                tracing::warn!(owner, error = %e, "releasing a network lease");
            }
        }
        owners.len()
    }

    /// Number of leased slots.
    pub fn lease_count(&self) -> usize {
        lock(&self.inner.leases).len()
    }

    /// Number of slots made and waiting.
    pub fn ready_count(&self) -> usize {
        lock(&self.inner.ready).len()
    }

    /// The nftables table (`inet <name>`) of this server.
    pub fn table(&self) -> &str {
        &self.inner.nft.table
    }

    /// The prefix of this server's slot interfaces on the host.
    pub fn interface_prefix(&self) -> &str {
        &self.inner.nft.prefix
    }

    /// The resolver's and proxy's ports on the host.
    pub fn ports(&self) -> (u16, u16) {
        (self.inner.dns_port, self.inner.proxy_port)
    }

    fn slot_ref(&self, index: u32) -> SlotRef {
        SlotRef::new(self.inner.cfg.pool, self.inner.mark_base, index)
    }

    fn record_path(&self, owner: &str) -> PathBuf {
        self.inner.cfg.state_dir.join(format!("{owner}.json"))
    }

    fn record(&self, owner: &str, index: u32, config: &EgressConfig) -> Result<(), NetError> {
        let path = self.record_path(owner);
        let body = serde_json::to_vec(&Record {
            index,
            config: config.clone(),
        })
        .map_err(|e| NetError::Config(e.to_string()))?;
        write_atomic(&path, &body).ctx(|| format!("write {}", path.display()))
    }

    /// Makes one slot now (index, namespace, veth, chains).
    async fn make_slot(&self) -> Result<Made, NetError> {
        make_slot(&self.inner).await
    }

    /// Hands a slot (leased or ready) to the janitor, which undoes it and makes its index
    /// reusable.
    fn scrub(&self, index: u32) {
        if self.inner.janitor.send(index).is_err() {
            tracing::error!(index, "network janitor gone; slot not scrubbed");
        }
    }
}

/// Scrubs released slots, a batch at a time: each slot's interface is deleted and its
/// conntrack entries flushed, then one `nft` transaction removes every slot's chains and sets.
/// Failures are logged and the index is then not reused. Ends when the service is dropped.
async fn janitor_loop(
    weak: std::sync::Weak<Inner>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<u32>,
) {
    while let Some(first) = rx.recv().await {
        // Releases tend to come in bursts (a client killing its sandboxes): gather them.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut batch = vec![first];
        while let Ok(i) = rx.try_recv() {
            batch.push(i);
        }
        let Some(inner) = weak.upgrade() else { return };
        let inner2 = inner.clone();
        let indices = batch.clone();
        let result = tokio::task::spawn_blocking(move || -> io::Result<()> {
            let mut script = String::new();
            for &index in &indices {
                let slot = SlotRef::new(inner2.cfg.pool, inner2.mark_base, index);
                lock(&inner2.factory).unmake(index)?;
                conntrack::flush_mark(slot.mark)?;
                script.push_str(&inner2.nft.remove_script(&slot));
            }
            nft::run(&script)
        })
        .await;
        match result {
            Ok(Ok(())) => {
                let mut indices = lock(&inner.indices);
                for i in batch {
                    indices.give_back(i);
                }
            }
            Ok(Err(e)) => {
                tracing::error!(?batch, error = %e, "scrubbing network slots; not reusing them")
            }
            Err(e) => {
                tracing::error!(?batch, error = %e, "scrubbing network slots; not reusing them")
            }
        }
    }
}

/// Slots made per `nft` run when a create finds none ready. `nft` reads the whole table before
/// it applies anything, which takes longer the more sandboxes the host has (about a second at
/// 1500), so concurrent creates share one run instead of each paying for their own.
const MAKE_BATCH: usize = 16;

/// A slot for a create that found none ready. One maker at a time: concurrent creates queue
/// here, and the first one makes enough for those behind it.
async fn make_slot(inner: &Arc<Inner>) -> Result<Made, NetError> {
    let _making = inner.making.lock().await;
    if let Some(m) = lock(&inner.ready).pop_front() {
        return Ok(m);
    }
    let mut made = make_slots(inner, MAKE_BATCH.max(inner.cfg.ready_slots)).await?;
    let first = made.pop().ok_or(NetError::Exhausted(inner.cfg.pool))?;
    lock(&inner.ready).extend(made);
    Ok(first)
}

/// Makes up to `n` slots (fewer if the pool runs out of indices): each slot's namespace and
/// veth, then one `nft` transaction for all their chains and sets.
async fn make_slots(inner: &Arc<Inner>, n: usize) -> Result<Vec<Made>, NetError> {
    let indices: Vec<u32> = {
        let mut ix = lock(&inner.indices);
        (0..n).map_while(|_| ix.take()).collect()
    };
    if indices.is_empty() {
        return Err(NetError::Exhausted(inner.cfg.pool));
    }
    let inner2 = inner.clone();
    let started = Instant::now();
    let taken = indices.clone();
    let made = tokio::task::spawn_blocking(move || -> io::Result<Vec<Made>> {
        let mut made: Vec<Made> = Vec::with_capacity(taken.len());
        let mut script = String::new();
        for &index in &taken {
            let m = match lock(&inner2.factory).make(index) {
                Ok(m) => m,
                Err(e) => {
                    for m in &made {
                        let _ = lock(&inner2.factory).unmake(m.index);
                    }
                    return Err(e);
                }
            };
            let slot = SlotRef::new(inner2.cfg.pool, inner2.mark_base, index);
            script.push_str(
                &inner2
                    .nft
                    .slot_script(&slot, inner2.dns_port, inner2.proxy_port),
            );
            made.push(m);
        }
        if let Err(e) = nft::run(&script) {
            let mut undo = String::new();
            for m in &made {
                let _ = lock(&inner2.factory).unmake(m.index);
                undo.push_str(&inner2.nft.remove_script(&SlotRef::new(
                    inner2.cfg.pool,
                    inner2.mark_base,
                    m.index,
                )));
            }
            let _ = nft::run(&undo);
            return Err(e);
        }
        Ok(made)
    })
    .await
    .map_err(join_error)
    .and_then(|r| r.ctx(|| format!("make network slots {indices:?}")));
    match &made {
        Err(_) => {
            let mut ix = lock(&inner.indices);
            for i in indices {
                ix.give_back(i);
            }
        }
        Ok(m) => tracing::debug!(
            count = m.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "network slots made"
        ),
    }
    made
}

/// Keeps `ready_slots` slots made; ends when the service is dropped.
async fn refill_loop(weak: std::sync::Weak<Inner>, notify: Arc<Notify>) {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let Some(inner) = weak.upgrade() else { return };
            loop {
                let _making = inner.making.lock().await;
                let missing = inner
                    .cfg
                    .ready_slots
                    .saturating_sub(lock(&inner.ready).len());
                if missing == 0 {
                    break;
                }
                match make_slots(&inner, missing).await {
                    Ok(m) => lock(&inner.ready).extend(m),
                    Err(e) => {
                        tracing::warn!(error = %e, "making ready network slots");
                        break;
                    }
                }
            }
        }
        notified.await;
    }
}

/// Writes `path` through a temporary file and a rename (a crash never leaves half a record).
fn write_atomic(path: &Path, body: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_upstreams() {
        let text = "# c\nnameserver 10.255.255.53\nnameserver  ::1\nsearch x\nnameserver fe80::1%eth0\nnameserver bogus\n";
        let ups = upstreams_from_resolv_conf(text);
        assert_eq!(
            ups,
            vec![
                "10.255.255.53:53".parse::<SocketAddr>().expect("addr"),
                "[::1]:53".parse().expect("addr"),
                "[fe80::1]:53".parse().expect("addr"),
            ]
        );
    }

    #[test]
    fn names_pools_and_prefixes() {
        assert_eq!(default_pool("soulbox").to_string(), "10.200.0.0/16");
        let p = default_pool("soulbox-0123456789ab");
        assert_ne!(p, default_pool("soulbox"));
        assert_eq!(p.prefix_len(), 16);
        assert_eq!(interface_prefix("soulbox"), "sbx");
        let pre = interface_prefix("soulbox-0123456789ab");
        assert_eq!(pre.len(), 7);
        assert!(format!("{pre}16383").len() <= 15);
        assert!(valid_owner("abc-1_2"));
        assert!(!valid_owner("../x"));
        assert!(!valid_owner(""));
    }

    #[test]
    fn indices_reuse_released_ones_last() {
        let mut ix = Indices {
            next: 1,
            capacity: 4,
            released: VecDeque::new(),
            taken: HashSet::from([2]),
        };
        assert_eq!(ix.take(), Some(1));
        assert_eq!(ix.take(), Some(3));
        ix.give_back(1);
        assert_eq!(ix.take(), Some(1));
        assert_eq!(ix.take(), None);
    }
}
