//! Taking a stopped server's network objects off the host (`soulbox down`).
//!
//! A server that stops keeps its nftables table and lease records on purpose: the sandboxes it
//! leaves running keep their egress policy, and its next start re-adopts them. Once those
//! sandboxes are gone too, nothing needs them, and a stale table still filters the ports its
//! resolver and proxy had.

use std::path::Path;

use crate::slot::{self, Factory};
use crate::{Context, NetError, default_pool, interface_prefix, nft};

/// Where [`Network::start`](crate::Network::start) records that it turned forwarding on.
pub(crate) const FORWARDING_MARKER: &str = ".forwarding-enabled";

/// What [`remove_host_state`] took off the host.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// The server's nftables table existed and is gone.
    pub table: bool,
    /// Slot interfaces deleted (veth pairs whose sandbox or server did not take them along).
    pub interfaces: usize,
    /// Lease records deleted.
    pub leases: usize,
    /// `net.ipv4.ip_forward`, which this server had turned on, is off again.
    pub forwarding_off: bool,
    /// Other SoulBox servers' tables, for which forwarding (turned on by this server) stays on.
    pub forwarding_kept_for: Vec<String>,
}

/// Deletes what the network service of server `name` (its [`NetConfig::name`]) left on the
/// host: its nftables table, its slot interfaces, the lease records in `state_dir`, and, with
/// `restore_forwarding`, when this server was the one that turned `net.ipv4.ip_forward` on and
/// no other SoulBox table is left, turns it off again (without the table's forward guard the
/// host would route for anyone). Only for a server that is stopped and whose sandboxes are
/// gone: their slots go with the table. A server starting at the same moment may not have made
/// its table yet and would lose forwarding: hosts that start servers side by side pass
/// `restore_forwarding: false`. Blocking; needs root.
///
/// [`NetConfig::name`]: crate::NetConfig::name
pub fn remove_host_state(
    name: &str,
    state_dir: &Path,
    restore_forwarding: bool,
) -> Result<Removed, NetError> {
    let mut removed = Removed::default();
    let mut factory = Factory::new(default_pool(name), &interface_prefix(name))
        .ctx(|| "open rtnetlink".into())?;
    for index in factory.existing().ctx(|| "list interfaces".into())? {
        factory
            .unmake(index)
            .ctx(|| format!("delete slot interface {}", factory.ifname(index)))?;
        removed.interfaces += 1;
    }
    let tables = nft::inet_tables().ctx(|| "list nftables tables".into())?;
    if tables.iter().any(|t| t == name) {
        nft::run(&format!("delete table inet {name}\n"))
            .ctx(|| format!("delete nftables table inet {name}"))?;
        removed.table = true;
    }
    let mut forwarding_was_ours = false;
    match std::fs::read_dir(state_dir) {
        Ok(entries) => {
            for entry in entries {
                let path = entry.ctx(|| "list network state".into())?.path();
                let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if file == FORWARDING_MARKER {
                    forwarding_was_ours = true;
                } else if file.ends_with(".json") {
                    std::fs::remove_file(&path)
                        .ctx(|| format!("remove lease record {}", path.display()))?;
                    removed.leases += 1;
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).ctx(|| format!("list {}", state_dir.display())),
    }
    if forwarding_was_ours && restore_forwarding {
        removed.forwarding_kept_for = tables
            .into_iter()
            .filter(|t| t != name && t.starts_with("soulbox"))
            .collect();
        // With other servers still routing, the marker stays: this data dir's next start
        // then keeps its forward guard, and a later `down` can still turn forwarding off.
        if removed.forwarding_kept_for.is_empty() {
            slot::host_sysctl("net/ipv4/ip_forward", "0")
                .ctx(|| "turn net.ipv4.ip_forward off".into())?;
            removed.forwarding_off = true;
            let marker = state_dir.join(FORWARDING_MARKER);
            std::fs::remove_file(&marker).ctx(|| format!("remove {}", marker.display()))?;
        }
    }
    Ok(removed)
}
