//! Making and unmaking network slots: a network namespace with `lo` up and an `eth0` that is
//! one end of a veth pair whose other end (`<prefix><index>`) lives in the host namespace.
//!
//! Addressing: the pool (default `10.200.0.0/16`) is cut into /30s, one per slot index:
//! `base + 4·i + 1` is the host end (the sandbox's gateway and resolver address), `+ 2` the
//! sandbox. Point-to-point links rather than a shared bridge: every packet between a sandbox
//! and anything else is routed by the host, so the forward hook sees all of it (sandbox to
//! sandbox included), there is no shared L2 segment to play ARP games on, and reverse-path
//! filtering pins each source address to its interface.
//!
//! All of this runs on one dedicated thread (`Factory`): it moves itself into a fresh
//! namespace with `unshare(CLONE_NEWNET)` and back with `setns`, which must never happen on a
//! tokio worker thread.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use ipnet::Ipv4Net;
use rustix::thread::{LinkNameSpaceType, UnshareFlags, move_into_link_name_space, unshare_unsafe};

use crate::netlink::Rtnl;

/// The sandbox's side of every slot.
pub(crate) const INNER_IF: &str = "eth0";

/// Addresses of slot `index` in `pool`.
pub(crate) fn addresses(pool: Ipv4Net, index: u32) -> (Ipv4Addr, Ipv4Addr) {
    let base = u32::from(pool.network()) + 4 * index;
    (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2))
}

/// How many slot indices the pool has (index 0 is not used: it would hold the pool's
/// network address).
pub(crate) fn capacity(pool: Ipv4Net) -> u32 {
    let bits = 32 - u32::from(pool.prefix_len());
    if bits >= 32 {
        u32::MAX
    } else {
        (1u32 << bits) / 4
    }
}

/// A made slot that no sandbox uses yet.
#[derive(Debug)]
pub(crate) struct Made {
    pub(crate) index: u32,
    pub(crate) netns: Arc<OwnedFd>,
}

/// Writes a sysctl through `/proc/sys`, which shows the calling thread's network namespace.
fn sysctl(path: &str, value: &str) -> io::Result<()> {
    fs::write(format!("/proc/sys/{path}"), value)
        .map_err(|e| io::Error::new(e.kind(), format!("sysctl {path}: {e}")))
}

/// Sets an IPv4 sysctl of the host (called from the factory thread, in the host namespace).
pub(crate) fn host_sysctl(path: &str, value: &str) -> io::Result<()> {
    sysctl(path, value)
}

pub(crate) fn read_sysctl(path: &str) -> io::Result<String> {
    Ok(fs::read_to_string(format!("/proc/sys/{path}"))?
        .trim()
        .to_owned())
}

/// Lives on the factory thread: the host namespace and a netlink socket in it.
pub(crate) struct Factory {
    host_ns: OwnedFd,
    host: Rtnl,
    pool: Ipv4Net,
    prefix: String,
}

/// Puts the calling thread back into the host namespace when dropped (also on error paths).
struct BackHome<'a>(&'a OwnedFd);

impl Drop for BackHome<'_> {
    fn drop(&mut self) {
        if let Err(e) = move_into_link_name_space(self.0.as_fd(), Some(LinkNameSpaceType::Network))
        {
            // The thread is then stuck in a sandbox namespace: nothing it does later would be
            // right, so stop the process rather than configure the wrong namespace.
            tracing::error!(error = %e, "cannot return to the host network namespace");
            std::process::abort();
        }
    }
}

impl Factory {
    /// Must be called on the thread that will use it, while it is in the host namespace.
    pub(crate) fn new(pool: Ipv4Net, prefix: &str) -> io::Result<Factory> {
        let host_ns: OwnedFd = fs::File::open("/proc/thread-self/ns/net")?.into();
        Ok(Factory {
            host_ns,
            host: Rtnl::new()?,
            pool,
            prefix: prefix.to_owned(),
        })
    }

    pub(crate) fn ifname(&self, index: u32) -> String {
        format!("{}{index}", self.prefix)
    }

    /// Makes slot `index`. A failure leaves nothing behind.
    pub(crate) fn make(&mut self, index: u32) -> io::Result<Made> {
        let started = Instant::now();
        let host_if = self.ifname(index);
        // A leftover of an earlier server (its namespace may still be being torn down).
        self.host.delete_link(&host_if)?;
        let made = self.make_inner(index, &host_if);
        if made.is_err() {
            let _ = self.host.delete_link(&host_if);
        }
        tracing::trace!(
            index,
            us = started.elapsed().as_micros() as u64,
            "made network slot"
        );
        made
    }

    fn make_inner(&mut self, index: u32, host_if: &str) -> io::Result<Made> {
        let (gateway, address) = addresses(self.pool, index);
        // 1. A fresh namespace, entered by this thread only.
        let (netns, mut inner) = {
            let _home = BackHome(&self.host_ns);
            // SAFETY: unsharing the network namespace of this (dedicated, non-tokio) thread
            // touches no memory; BackHome moves it back before anything else runs here.
            unsafe { unshare_unsafe(UnshareFlags::NEWNET) }.map_err(io::Error::from)?;
            let netns: OwnedFd = fs::File::open("/proc/thread-self/ns/net")?.into();
            let mut inner = Rtnl::new()?;
            // No IPv6 on the sandbox's eth0 (it is made after this): the egress policy is
            // IPv4 only. `lo` keeps ::1.
            sysctl("net/ipv6/conf/default/disable_ipv6", "1")?;
            inner.set_up(1)?;
            (netns, inner)
        };
        // 2. The veth pair, made from the host with its peer straight in the new namespace.
        self.host.add_veth(host_if, INNER_IF, netns.as_raw_fd())?;
        for (key, value) in [
            ("rp_filter", "1"),
            ("send_redirects", "0"),
            ("accept_redirects", "0"),
            ("accept_source_route", "0"),
            ("proxy_arp", "0"),
        ] {
            sysctl(&format!("net/ipv4/conf/{host_if}/{key}"), value)?;
        }
        sysctl(&format!("net/ipv6/conf/{host_if}/disable_ipv6"), "1")?;
        let host_index = self.host.index(host_if)?;
        self.host.add_address(host_index, gateway, 30)?;
        self.host.set_up(host_index)?;
        // 3. The sandbox side.
        {
            let _home = BackHome(&self.host_ns);
            move_into_link_name_space(netns.as_fd(), Some(LinkNameSpaceType::Network))?;
            sysctl(&format!("net/ipv6/conf/{INNER_IF}/disable_ipv6"), "1")?;
            let eth0 = inner.index(INNER_IF)?;
            inner.add_address(eth0, address, 30)?;
            inner.set_up(eth0)?;
            inner.add_default_route(gateway)?;
        }
        Ok(Made {
            index,
            netns: Arc::new(netns),
        })
    }

    /// Deletes slot `index`'s veth pair (the namespace goes when its last user does).
    pub(crate) fn unmake(&mut self, index: u32) -> io::Result<()> {
        let name = self.ifname(index);
        self.host.delete_link(&name)
    }

    /// Names of this server's slot interfaces that exist on the host.
    pub(crate) fn existing(&mut self) -> io::Result<Vec<u32>> {
        Ok(self
            .host
            .link_names()?
            .into_iter()
            .filter_map(|n| n.strip_prefix(&self.prefix)?.parse().ok())
            .collect())
    }

    /// The host's directly connected IPv4 networks (not counting sandbox interfaces).
    pub(crate) fn lan(&mut self) -> io::Result<Vec<Ipv4Net>> {
        Ok(self
            .host
            .connected_routes(&self.prefix)?
            .into_iter()
            .filter_map(|(addr, len)| Ipv4Net::new(addr, len).ok())
            .collect())
    }

    /// The host's uplinks: the interfaces its IPv4 default routes leave through and every
    /// interface backed by a device (`/sys/class/net/<if>/device`: a NIC, not a veth, bridge,
    /// tunnel or VPN). Routing from one uplink to another is what turning `ip_forward` on newly
    /// allows and what no local workload (containers, VMs, other servers' sandboxes) needs.
    pub(crate) fn uplinks(&mut self) -> io::Result<Vec<String>> {
        let mut names = self.host.default_route_links()?;
        for entry in fs::read_dir("/sys/class/net")? {
            let entry = entry?;
            if entry.path().join("device").exists()
                && let Some(name) = entry.file_name().to_str()
            {
                names.push(name.to_owned());
            }
        }
        names.retain(|n| n != "lo" && !n.starts_with(&self.prefix));
        names.sort();
        names.dedup();
        Ok(names)
    }
}
