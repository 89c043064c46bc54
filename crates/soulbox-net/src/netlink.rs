//! The few rtnetlink requests a slot needs, sent synchronously on a `netlink-sys` socket with
//! messages built from `netlink-packet-route` types (no `ip` processes).
//!
//! A netlink socket acts on the network namespace it was created in, whatever namespace the
//! calling thread is in later; [`Rtnl::new`] therefore opens it in the caller's current one.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::RawFd;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

pub(crate) struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    /// A route netlink socket in the calling thread's current network namespace.
    pub(crate) fn new() -> io::Result<Rtnl> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl { sock, seq: 0 })
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.exchange(msg, flags, |_| {})
    }

    /// Sends one request; `on_reply` sees every message answered before the acknowledgement.
    fn exchange(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        mut on_reply: impl FnMut(RouteNetlinkMessage),
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        let mut rx = vec![0u8; 64 * 1024];
        loop {
            let n = self.sock.recv(&mut &mut rx[..], 0)?;
            let mut off = 0;
            while off < n {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[off..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "empty netlink message",
                    ));
                }
                off += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                match reply.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::InnerMessage(m) => on_reply(m),
                    _ => {}
                }
            }
        }
    }

    /// Creates a veth pair: `host` here, `peer` inside the namespace `peer_netns`.
    pub(crate) fn add_veth(&mut self, host: &str, peer: &str, peer_netns: RawFd) -> io::Result<()> {
        let mut peer_msg = LinkMessage::default();
        peer_msg
            .attributes
            .push(LinkAttribute::IfName(peer.to_owned()));
        peer_msg.attributes.push(LinkAttribute::NetNsFd(peer_netns));
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(host.to_owned()));
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        self.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// The index of the interface called `name`.
    pub(crate) fn index(&mut self, name: &str) -> io::Result<u32> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        let mut index = None;
        self.exchange(RouteNetlinkMessage::GetLink(msg), 0, |m| {
            if let RouteNetlinkMessage::NewLink(l) = m {
                index = Some(l.header.index);
            }
        })?;
        index.ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))
    }

    /// Names of every interface of this namespace.
    pub(crate) fn link_names(&mut self) -> io::Result<Vec<String>> {
        Ok(self.link_map()?.into_values().collect())
    }

    pub(crate) fn set_up(&mut self, index: u32) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags |= LinkFlags::Up;
        msg.header.change_mask |= LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(msg), 0)
    }

    /// Deletes the interface `name` (for a veth, both ends). Missing is not an error.
    pub(crate) fn delete_link(&mut self, name: &str) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        match self.request(RouteNetlinkMessage::DelLink(msg), 0) {
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
            other => other,
        }
    }

    pub(crate) fn add_address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(addr.into()));
        msg.attributes.push(AddressAttribute::Address(addr.into()));
        self.request(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    pub(crate) fn add_default_route(&mut self, gateway: Ipv4Addr) -> io::Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        msg.header.table = netlink_packet_route::route::RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Static;
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        self.request(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// Interface names by index.
    fn link_map(&mut self) -> io::Result<std::collections::HashMap<u32, String>> {
        let mut links = std::collections::HashMap::new();
        self.exchange(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            netlink_packet_core::NLM_F_DUMP,
            |m| {
                if let RouteNetlinkMessage::NewLink(l) = m {
                    for a in l.attributes {
                        if let LinkAttribute::IfName(n) = a {
                            links.insert(l.header.index, n);
                        }
                    }
                }
            },
        )?;
        Ok(links)
    }

    /// IPv4 routes of the main table with the names of the interfaces they leave through (one,
    /// or each next hop's of a multipath route).
    fn main_routes(&mut self) -> io::Result<Vec<(RouteMessage, Vec<String>)>> {
        let links = self.link_map()?;
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let mut out = Vec::new();
        self.exchange(
            RouteNetlinkMessage::GetRoute(msg),
            netlink_packet_core::NLM_F_DUMP,
            |m| {
                let RouteNetlinkMessage::NewRoute(r) = m else {
                    return;
                };
                if r.header.table != 254 {
                    return;
                }
                let mut oifs = Vec::new();
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Oif(i) => oifs.extend(links.get(i).cloned()),
                        RouteAttribute::MultiPath(hops) => oifs.extend(
                            hops.iter()
                                .filter_map(|h| links.get(&h.interface_index).cloned()),
                        ),
                        _ => {}
                    }
                }
                out.push((r, oifs));
            },
        )?;
        Ok(out)
    }

    /// Directly connected IPv4 networks of the main table as (destination, prefix length),
    /// skipping those through `lo` and interfaces whose name starts with `skip_prefix`.
    pub(crate) fn connected_routes(
        &mut self,
        skip_prefix: &str,
    ) -> io::Result<Vec<(Ipv4Addr, u8)>> {
        Ok(self
            .main_routes()?
            .into_iter()
            .filter(|(r, oifs)| {
                r.header.scope == RouteScope::Link
                    && !oifs.iter().any(|n| n.starts_with(skip_prefix) || n == "lo")
            })
            .filter_map(|(r, _)| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => {
                        Some((*d, r.header.destination_prefix_length))
                    }
                    _ => None,
                })
            })
            .collect())
    }

    /// Names of the interfaces the main table's IPv4 default routes leave through.
    pub(crate) fn default_route_links(&mut self) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = self
            .main_routes()?
            .into_iter()
            .filter(|(r, _)| r.header.destination_prefix_length == 0)
            .flat_map(|(_, oifs)| oifs)
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }
}
