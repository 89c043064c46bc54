//! E2B's egress configuration (`allow_internet_access`, `network.allowOut`/`denyOut`) and what
//! it compiles to: the contents of one slot's nftables sets and the resolver's mode.
//!
//! Semantics (docs/networking.md has the full story):
//! * `allow_internet_access=false` adds `0.0.0.0/0` to the deny list.
//! * A destination allowed by `allowOut` (CIDR, IP, or an address learnt by resolving an
//!   allowed domain) is reachable even if `denyOut` covers it; otherwise `denyOut` drops it;
//!   otherwise it is reachable.
//! * Never reachable, whatever the lists say: loopback, link-local (169.254.0.0/16, so the
//!   metadata address too), multicast and the reserved 240/4, `0.0.0.0/8`, every sandbox
//!   address, the host itself.
//! * Private ranges (10/8, 172.16/12, 192.168/16, 100.64/10, 192.0.0.0/24, 198.18/15, and the
//!   host's directly connected networks) are reachable only through an `allowOut` entry that
//!   lies entirely inside one of them (so `0.0.0.0/0` in `allowOut` does not open them).
//! * IPv6 entries are accepted and have no effect: sandboxes have no IPv6.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

/// Most entries one list may have (each is a set element; the kernel copes with far more, but
/// nothing legitimate needs more and every element costs memory on every policy change).
pub const MAX_ENTRIES: usize = 1000;

/// The egress configuration as the client gave it; kept verbatim so that it can be reported
/// back (`GET /sandboxes/{id}`) exactly as sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressConfig {
    pub allow_internet_access: bool,
    #[serde(default)]
    pub allow_out: Vec<String>,
    #[serde(default)]
    pub deny_out: Vec<String>,
}

impl Default for EgressConfig {
    /// E2B's default: internet access, no lists.
    fn default() -> Self {
        EgressConfig {
            allow_internet_access: true,
            allow_out: Vec::new(),
            deny_out: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid allowOut entry {0:?}: expected an IPv4/IPv6 address, a CIDR or a domain")]
    BadAllow(String),
    #[error(
        "invalid denyOut entry {0:?}: expected an IP address or a CIDR (domains are not supported in denyOut)"
    )]
    BadDeny(String),
    #[error("too many entries in {0} (at most {MAX_ENTRIES})")]
    TooMany(&'static str),
}

/// A domain of `allowOut`: `example.com` (that name only) or `*.example.com` (every name
/// below it, at any depth, but not `example.com` itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    /// Lowercase, no trailing dot, without the `*.`.
    name: String,
    wildcard: bool,
}

impl Domain {
    fn parse(s: &str) -> Option<Domain> {
        let s = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, s),
        };
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(valid_label)
            // A bare IP-looking string that failed to parse as an IP is not a domain.
            && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.');
        valid.then_some(Domain { name, wildcard })
    }

    /// Does the DNS name `qname` (any case, trailing dot or not) fall under this entry?
    pub fn matches(&self, qname: &str) -> bool {
        let q = qname.trim_end_matches('.');
        if self.wildcard {
            q.len() > self.name.len() + 1
                && q[q.len() - self.name.len()..].eq_ignore_ascii_case(&self.name)
                && q.as_bytes()[q.len() - self.name.len() - 1] == b'.'
        } else {
            q.eq_ignore_ascii_case(&self.name)
        }
    }
}

/// What the resolver does for a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsMode {
    /// Forward every query upstream (internet access not denied wholesale).
    Open,
    /// `denyOut` covers everything: answer only names that match an allowed domain.
    AllowedNamesOnly,
    /// `denyOut` covers everything and no domain is allowed: answer nothing (no query leaves
    /// the host, so DNS cannot be used as a tunnel).
    Closed,
}

/// A compiled policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// `allowOut` networks outside the private ranges.
    pub(crate) allow: Vec<Ipv4Net>,
    /// `allowOut` networks inside a private range (they open it).
    pub(crate) allow_private: Vec<Ipv4Net>,
    pub(crate) deny: Vec<Ipv4Net>,
    pub(crate) domains: Vec<Domain>,
}

/// Ranges that are never reachable from a sandbox (the sandbox pool is added at run time).
pub(crate) const HARD_BLOCKED: [&str; 5] = [
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// Private and shared ranges: reachable only when `allowOut` names them (the host's connected
/// networks are added at run time).
pub(crate) const PRIVATE: [&str; 6] = [
    "10.0.0.0/8",
    "100.64.0.0/10",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "192.0.0.0/24",
    "198.18.0.0/15",
];

pub(crate) fn nets(list: &[&str]) -> Vec<Ipv4Net> {
    list.iter().filter_map(|s| s.parse().ok()).collect()
}

fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    if let Ok(n) = s.parse::<IpNet>() {
        return Some(n.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

impl Policy {
    pub fn compile(cfg: &EgressConfig) -> Result<Policy, PolicyError> {
        if cfg.allow_out.len() > MAX_ENTRIES {
            return Err(PolicyError::TooMany("allowOut"));
        }
        if cfg.deny_out.len() > MAX_ENTRIES {
            return Err(PolicyError::TooMany("denyOut"));
        }
        let private = nets(&PRIVATE);
        let mut p = Policy::default();
        for entry in &cfg.allow_out {
            match parse_net(entry) {
                Some(IpNet::V4(n)) => {
                    if private.iter().any(|r| r.contains(&n)) {
                        p.allow_private.push(n);
                    } else {
                        p.allow.push(n);
                    }
                }
                Some(IpNet::V6(_)) => {}
                None => p.domains.push(
                    Domain::parse(entry).ok_or_else(|| PolicyError::BadAllow(entry.clone()))?,
                ),
            }
        }
        for entry in &cfg.deny_out {
            match parse_net(entry) {
                Some(IpNet::V4(n)) => p.deny.push(n),
                Some(IpNet::V6(_)) => {}
                None => return Err(PolicyError::BadDeny(entry.clone())),
            }
        }
        if !cfg.allow_internet_access {
            p.deny.push(Ipv4Net::default());
        }
        Ok(p)
    }

    /// `denyOut` covers the whole IPv4 space.
    pub fn denies_all(&self) -> bool {
        self.deny.iter().any(|n| n.prefix_len() == 0)
    }

    pub fn dns_mode(&self) -> DnsMode {
        match (self.denies_all(), self.domains.is_empty()) {
            (false, _) => DnsMode::Open,
            (true, false) => DnsMode::AllowedNamesOnly,
            (true, true) => DnsMode::Closed,
        }
    }

    /// Does `name` match an allowed domain?
    pub fn allows_name(&self, name: &str) -> bool {
        self.domains.iter().any(|d| d.matches(name))
    }

    /// Do HTTP/HTTPS connections to denied addresses go through the SNI/Host proxy?
    pub fn inspects(&self) -> bool {
        !self.domains.is_empty() && !self.deny.is_empty()
    }

    /// Is `ip` allowed by an `allowOut` network (not counting learnt addresses)?
    pub fn allows_ip(&self, ip: Ipv4Addr) -> bool {
        self.allow
            .iter()
            .chain(&self.allow_private)
            .any(|n| n.contains(&ip))
    }

    pub fn is_default(&self) -> bool {
        *self == Policy::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(allow: &[&str], deny: &[&str], internet: bool) -> EgressConfig {
        EgressConfig {
            allow_internet_access: internet,
            allow_out: allow.iter().map(|s| s.to_string()).collect(),
            deny_out: deny.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn entries_are_classified() {
        let p = Policy::compile(&cfg(
            &[
                "1.1.1.1",
                "8.8.8.0/24",
                "10.1.2.0/24",
                "Example.COM.",
                "*.pypi.org",
                "::1",
            ],
            &["0.0.0.0/0", "2001:db8::/32"],
            true,
        ))
        .expect("valid");
        assert_eq!(
            p.allow,
            vec![
                "1.1.1.1/32".parse::<Ipv4Net>().expect("net"),
                "8.8.8.0/24".parse().expect("net")
            ]
        );
        assert_eq!(
            p.allow_private,
            vec!["10.1.2.0/24".parse::<Ipv4Net>().expect("net")]
        );
        assert!(p.denies_all());
        assert_eq!(p.dns_mode(), DnsMode::AllowedNamesOnly);
        assert!(p.inspects());
        assert!(p.allows_name("example.com"));
        assert!(p.allows_name("EXAMPLE.com."));
        assert!(!p.allows_name("www.example.com"));
        assert!(p.allows_name("files.pypi.org"));
        assert!(p.allows_name("a.b.pypi.org"));
        assert!(!p.allows_name("pypi.org"));
        assert!(!p.allows_name("xpypi.org"));
    }

    #[test]
    fn internet_off_means_deny_all_and_closed_dns() {
        let p = Policy::compile(&cfg(&[], &[], false)).expect("valid");
        assert!(p.denies_all());
        assert_eq!(p.dns_mode(), DnsMode::Closed);
        let p = Policy::compile(&cfg(&["1.2.3.4"], &["0.0.0.0/0"], true)).expect("valid");
        assert_eq!(p.dns_mode(), DnsMode::Closed);
        assert!(p.allows_ip("1.2.3.4".parse().expect("ip")));
        let p = Policy::compile(&EgressConfig::default()).expect("valid");
        assert!(p.is_default());
        assert_eq!(p.dns_mode(), DnsMode::Open);
    }

    #[test]
    fn all_traffic_in_allow_out_does_not_open_private_ranges() {
        let p = Policy::compile(&cfg(&["0.0.0.0/0", "10.0.0.0/7"], &[], true)).expect("valid");
        assert!(p.allow_private.is_empty());
        assert_eq!(p.allow.len(), 2);
    }

    #[test]
    fn bad_entries_are_rejected() {
        for bad in [
            "",
            "*",
            "exa mple.com",
            "1.2.3.4/33",
            "300.1.1.1",
            "*.",
            "a..b",
        ] {
            assert!(Policy::compile(&cfg(&[bad], &[], true)).is_err(), "{bad:?}");
        }
        assert_eq!(
            Policy::compile(&cfg(&[], &["example.com"], true)),
            Err(PolicyError::BadDeny("example.com".into()))
        );
        let many: Vec<String> = (0..=MAX_ENTRIES)
            .map(|i| format!("1.1.{}.{}", i / 256, i % 256))
            .collect();
        let c = EgressConfig {
            allow_out: many,
            ..EgressConfig::default()
        };
        assert_eq!(Policy::compile(&c), Err(PolicyError::TooMany("allowOut")));
    }
}
