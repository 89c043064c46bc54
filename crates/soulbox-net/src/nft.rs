//! The host side of the egress policy: one nftables table per server, written as nft scripts
//! and applied with `nft -f -` (each script is one atomic transaction).
//!
//! Why scripts for `nft`: the text grammar is nftables' documented, stable interface and reads
//! like the docs; the JSON form (`nftables` crate) goes through the same `nft` process and is
//! harder to review. `nft` runs only when a slot is made or released, a policy changes, or the
//! resolver learns addresses for a sandbox with domain rules; no packet passes through
//! userspace except DNS and the HTTP/HTTPS connections sent to the SNI/Host proxy.
//!
//! Layout (`T` = table, `N` = slot index, `PFX` = the server's interface prefix):
//! * `forward`: packets from `PFX*` jump to their slot's chain `s_N` through the verdict map
//!   `fwd_slots` (an unknown `PFX*` interface is dropped); packets to `PFX*` pass only as
//!   replies (established/related).
//! * `s_N`: source must be the slot's address; established flows pass; new ones are limited
//!   (count and rate), marked with the slot's conntrack mark, then checked in order: `hard`
//!   (drop), `p_N` (allowed private networks), `private` (drop), `l_N` (addresses learnt by
//!   DNS, with timeouts), `a_N` (allowOut), `d_N` (denyOut: drop), accept.
//! * `input`: from `PFX*` only DNS to the resolver port and TCP to the resolver and proxy
//!   ports, and only on the host end of the sandbox's own link (set `links`: interface .
//!   gateway address); the resolver's and proxy's sockets (found by their `SO_MARK`) are closed
//!   to every other interface but `lo`.
//! * `prerouting` (nat): DNS to any address is redirected to the resolver; for slots in the
//!   `inspect` set, TCP 80/443 to a denied, not allowed, not learnt address goes to the proxy.
//! * `postrouting` (nat): the pool is masqueraded behind the host's address.
//! * Forward guard (only when this server turned `ip_forward` on): new connections from one
//!   of the host's uplinks to another are dropped, so the host does not start routing for its
//!   neighbours; nothing else is touched, so other servers and workloads keep their traffic
//!   even while a stopped server's table stays in place.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use ipnet::Ipv4Net;

use crate::policy::{HARD_BLOCKED, PRIVATE, nets};

/// Most new connections a sandbox may have tracked at once (conntrack exhaustion).
pub(crate) const MAX_CONNS: u32 = 4096;
/// New connections per second a sandbox may open (burst 2×).
pub(crate) const NEW_CONNS_PER_SEC: u32 = 500;

/// Names the nft objects of one server.
#[derive(Debug, Clone)]
pub(crate) struct Nft {
    pub(crate) table: String,
    pub(crate) prefix: String,
}

/// Runs one nft script as a single transaction.
pub(crate) fn run(script: &str) -> io::Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("running nft: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "nft failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// Names of the host's `inet` tables (none on a host without `nft`: no server made one).
pub(crate) fn inet_tables() -> io::Result<Vec<String>> {
    let out = match Command::new("nft")
        .args(["list", "tables", "inet"])
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io::Error::new(e.kind(), format!("running nft: {e}"))),
    };
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "nft list tables failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table inet "))
        .map(str::to_owned)
        .collect())
}

fn elements(list: &[Ipv4Net]) -> String {
    list.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Everything the base table needs to know.
pub(crate) struct Base<'a> {
    pub(crate) pool: Ipv4Net,
    /// The host's directly connected networks (added to `private`).
    pub(crate) lan: &'a [Ipv4Net],
    pub(crate) dns_port: u16,
    pub(crate) proxy_port: u16,
    /// `SO_MARK` of the resolver's and proxy's sockets: the input chain closes exactly those
    /// sockets to every interface but the sandboxes' and `lo` (matching by port instead would,
    /// once this server stops and leaves its table, close the same port of another server).
    pub(crate) socket_mark: u32,
    /// The host's uplinks (see `Factory::uplinks`).
    pub(crate) uplinks: &'a [String],
    /// Drop new forwarded connections from one uplink to another (set when this server turned
    /// forwarding on: the host was not a router before). Scoped to uplinks so that it never
    /// touches traffic of other servers' sandboxes or other forwarding workloads (containers,
    /// VMs, VPNs), which enter or leave through their own virtual interfaces, and so a stopped
    /// server's table left in place cuts nobody off.
    pub(crate) forward_guard: bool,
}

/// The address of one slot as nft needs it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotRef {
    pub(crate) index: u32,
    /// The host end of the slot's link: the only address its sandbox may reach the resolver
    /// and proxy on.
    pub(crate) gateway: Ipv4Addr,
    pub(crate) address: Ipv4Addr,
    pub(crate) mark: u32,
}

impl SlotRef {
    /// Slot `index` of `pool`, for the server whose conntrack marks start at `mark_base`.
    pub(crate) fn new(pool: Ipv4Net, mark_base: u32, index: u32) -> SlotRef {
        let (gateway, address) = crate::slot::addresses(pool, index);
        SlotRef {
            index,
            gateway,
            address,
            mark: mark_base | index,
        }
    }
}

impl Nft {
    fn ifname(&self, index: u32) -> String {
        format!("{}{index}", self.prefix)
    }

    /// Replaces the whole table (atomically) by the base chains and the given slots.
    pub(crate) fn base_script(&self, b: &Base<'_>, slots: &[SlotRef]) -> String {
        let t = &self.table;
        let p = &self.prefix;
        let mut hard = nets(&HARD_BLOCKED);
        hard.push(b.pool);
        let mut private = nets(&PRIVATE);
        private.extend(b.lan.iter().filter(|n| !b.pool.contains(*n)));
        let (dns, proxy) = (b.dns_port, b.proxy_port);
        let guard = if b.forward_guard {
            "        iifname @uplinks oifname @uplinks ct state established,related accept\n        \
             iifname @uplinks oifname @uplinks drop\n"
        } else {
            ""
        };
        let uplinks = if b.uplinks.is_empty() {
            String::new()
        } else {
            let quoted: Vec<String> = b.uplinks.iter().map(|u| format!("\"{u}\"")).collect();
            format!(" elements = {{ {} }};", quoted.join(", "))
        };
        let mark = b.socket_mark;
        let mut s = format!(
            r#"table inet {t} {{}}
delete table inet {t}
table inet {t} {{
    set hard {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {hard} }} }}
    set private {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {private} }} }}
    set inspect {{ type ipv4_addr; }}
    set uplinks {{ type ifname;{uplinks} }}
    set links {{ type ifname . ipv4_addr; }}
    map fwd_slots {{ type ifname : verdict; }}
    map nat_slots {{ type ifname : verdict; }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{p}*" meta nfproto ipv6 drop
        iifname "{p}*" iifname vmap @fwd_slots
        iifname "{p}*" drop
        oifname "{p}*" ct state established,related accept
        oifname "{p}*" drop
{guard}    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{p}*" jump from_sandbox
        iifname != "lo" socket mark {mark} drop
    }}
    chain from_sandbox {{
        meta nfproto ipv6 drop
        ct state established,related accept
        iifname . ip daddr != @links drop
        udp dport {dns} accept
        tcp dport {{ {dns}, {proxy} }} accept
        drop
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{p}*" iifname vmap @nat_slots
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {pool} oifname != "{p}*" masquerade
    }}
}}
"#,
            hard = elements(&hard),
            private = elements(&private),
            pool = b.pool,
        );
        for slot in slots {
            s.push_str(&self.slot_script(slot, dns, proxy));
        }
        s
    }

    /// Adds one slot's sets and chains and hooks them up.
    pub(crate) fn slot_script(&self, slot: &SlotRef, dns: u16, proxy: u16) -> String {
        let t = &self.table;
        let n = slot.index;
        let a = slot.address;
        let m = slot.mark;
        let ifname = self.ifname(n);
        format!(
            r#"add set inet {t} a_{n} {{ type ipv4_addr; flags interval; auto-merge; }}
add set inet {t} p_{n} {{ type ipv4_addr; flags interval; auto-merge; }}
add set inet {t} d_{n} {{ type ipv4_addr; flags interval; auto-merge; }}
add set inet {t} l_{n} {{ type ipv4_addr; flags timeout; }}
add chain inet {t} s_{n}
add rule inet {t} s_{n} ip saddr != {a} drop
add rule inet {t} s_{n} ct state established,related accept
add rule inet {t} s_{n} ct state new ct count over {MAX_CONNS} drop
add rule inet {t} s_{n} ct state new limit rate over {NEW_CONNS_PER_SEC}/second burst {burst} packets drop
add rule inet {t} s_{n} ct mark set {m}
add rule inet {t} s_{n} ip daddr @hard drop
add rule inet {t} s_{n} ip daddr @p_{n} accept
add rule inet {t} s_{n} ip daddr @private drop
add rule inet {t} s_{n} ip daddr @l_{n} accept
add rule inet {t} s_{n} ip daddr @a_{n} accept
add rule inet {t} s_{n} ip daddr @d_{n} drop
add rule inet {t} s_{n} accept
add chain inet {t} n_{n}
add rule inet {t} n_{n} udp dport 53 redirect to :{dns}
add rule inet {t} n_{n} tcp dport 53 redirect to :{dns}
add rule inet {t} n_{n} ip saddr @inspect tcp dport {{ 80, 443 }} ip daddr @d_{n} ip daddr != @a_{n} ip daddr != @p_{n} ip daddr != @l_{n} redirect to :{proxy}
add element inet {t} fwd_slots {{ "{ifname}" : jump s_{n} }}
add element inet {t} nat_slots {{ "{ifname}" : jump n_{n} }}
add element inet {t} links {{ "{ifname}" . {g} }}
"#,
            burst = NEW_CONNS_PER_SEC * 2,
            g = slot.gateway,
        )
    }

    /// Removes one slot's chains and sets (idempotent: a missing piece is created first).
    pub(crate) fn remove_script(&self, slot: &SlotRef) -> String {
        let t = &self.table;
        let n = slot.index;
        let a = slot.address;
        let ifname = self.ifname(n);
        let mut s = String::new();
        for (map, chain) in [("fwd_slots", "s"), ("nat_slots", "n")] {
            let _ = writeln!(s, "add chain inet {t} {chain}_{n}");
            let _ = writeln!(
                s,
                "add element inet {t} {map} {{ \"{ifname}\" : jump {chain}_{n} }}"
            );
            let _ = writeln!(s, "delete element inet {t} {map} {{ \"{ifname}\" }}");
        }
        let _ = writeln!(s, "add element inet {t} inspect {{ {a} }}");
        let _ = writeln!(s, "delete element inet {t} inspect {{ {a} }}");
        let link = format!("\"{ifname}\" . {}", slot.gateway);
        let _ = writeln!(s, "add element inet {t} links {{ {link} }}");
        let _ = writeln!(s, "delete element inet {t} links {{ {link} }}");
        for chain in ["s", "n"] {
            let _ = writeln!(s, "flush chain inet {t} {chain}_{n}");
            let _ = writeln!(s, "delete chain inet {t} {chain}_{n}");
        }
        for (set, kind) in [
            ("a", "flags interval;"),
            ("p", "flags interval;"),
            ("d", "flags interval;"),
            ("l", "flags timeout;"),
        ] {
            let _ = writeln!(s, "add set inet {t} {set}_{n} {{ type ipv4_addr; {kind} }}");
            let _ = writeln!(s, "delete set inet {t} {set}_{n}");
        }
        s
    }
}
