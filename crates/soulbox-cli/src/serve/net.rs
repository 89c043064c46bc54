//! `soulbox serve` networking flags and start-up: the sandbox network service (slots, egress
//! policy, resolver; see the `soulbox-net` crate and docs/networking.md).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use anyhow::{Context, bail};
use soulbox_net::{NetConfig, Network};

/// The network service's state dir (lease records) inside the data dir.
pub(crate) const NETWORK_DIR: &str = "network";

#[derive(clap::Args)]
pub struct NetArgs {
    /// Run sandboxes without networking: loopback only, whatever `allow_internet_access` and
    /// `network` say (`PUT /sandboxes/{id}/network` is then refused).
    #[arg(long)]
    pub no_network: bool,
    /// Addresses for sandbox network slots, a /16 to /28 cut into /30s. Default: 10.200.0.0/16
    /// for the default data dir, another 10.x.0.0/16 per other data dir.
    #[arg(long, value_name = "CIDR")]
    pub net_pool: Option<String>,
    /// Upstream DNS servers of the sandboxes' resolver (`IP` or `IP:PORT`; repeat or separate
    /// with commas). Default: the nameservers of the host's /etc/resolv.conf.
    #[arg(
        long,
        value_name = "ADDR",
        env = "SOULBOX_DNS_UPSTREAM",
        value_delimiter = ','
    )]
    pub dns_upstream: Vec<String>,
    /// Forward zones of the sandboxes' resolver: `ZONE=IP[:PORT]` sends queries for names at or
    /// below ZONE to that server (repeat or separate with commas).
    #[arg(
        long,
        value_name = "ZONE=ADDR",
        env = "SOULBOX_DNS_ZONES",
        value_delimiter = ','
    )]
    pub dns_zone: Vec<String>,
    /// Network slots kept made ahead of demand.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub net_ready_slots: usize,
}

fn parse_upstream(s: &str) -> anyhow::Result<SocketAddr> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let ip: IpAddr = s
        .parse()
        .with_context(|| format!("--dns-upstream {s:?}: expected IP or IP:PORT"))?;
    Ok(SocketAddr::new(ip, 53))
}

/// Starts the network service named `name` (the server's cgroup name), unless disabled.
pub async fn start(args: &NetArgs, data: &Path, name: &str) -> anyhow::Result<Option<Network>> {
    if args.no_network {
        tracing::warn!("--no-network: sandboxes get loopback only");
        return Ok(None);
    }
    let pool = match &args.net_pool {
        Some(p) => p
            .parse()
            .with_context(|| format!("--net-pool {p:?}: expected an IPv4 CIDR"))?,
        None => soulbox_net::default_pool(name),
    };
    let upstream_dns = if args.dns_upstream.is_empty() {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        soulbox_net::upstreams_from_resolv_conf(&text)
    } else {
        args.dns_upstream
            .iter()
            .map(|s| parse_upstream(s))
            .collect::<anyhow::Result<_>>()?
    };
    if upstream_dns.is_empty() {
        bail!("no DNS server in /etc/resolv.conf: give one with --dns-upstream");
    }
    let dns_zones = args
        .dns_zone
        .iter()
        .map(|z| {
            let (zone, addr) = z
                .split_once('=')
                .with_context(|| format!("--dns-zone {z:?}: expected ZONE=IP[:PORT]"))?;
            Ok((zone.trim().to_owned(), parse_upstream(addr)?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let net = Network::start(NetConfig {
        name: name.to_owned(),
        pool,
        state_dir: data.join(NETWORK_DIR),
        upstream_dns,
        dns_zones,
        ready_slots: args.net_ready_slots,
    })
    .await
    .context("starting sandbox networking (use --no-network to run without)")?;
    Ok(Some(net))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_parse() {
        assert_eq!(
            parse_upstream("203.0.113.53").expect("ip"),
            "203.0.113.53:53".parse::<SocketAddr>().expect("addr")
        );
        assert_eq!(
            parse_upstream("127.0.0.1:5353").expect("ip:port"),
            "127.0.0.1:5353".parse::<SocketAddr>().expect("addr")
        );
        assert!(parse_upstream("dns.example").is_err());
    }
}
