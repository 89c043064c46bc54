//! Forgetting a slot's connections: one ctnetlink `IPCTNL_MSG_CT_DELETE` request without a
//! tuple, filtered by the conntrack mark every new connection of the slot gets (see `nft.rs`).
//!
//! Built by hand (a header, a 4-byte family header and two attributes): no maintained crate
//! covers ctnetlink, and this is the only message SoulBox sends on it.

use std::io;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_MARK: u16 = 8;
const CTA_MARK_MASK: u16 = 21;
const NLMSG_ERROR: u16 = 2;

fn nla_u32_be(out: &mut Vec<u8>, kind: u16, value: u32) {
    out.extend_from_slice(&8u16.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&value.to_be_bytes());
}

/// Deletes every IPv4 conntrack entry whose mark is `mark`.
pub(crate) fn flush_mark(mark: u32) -> io::Result<()> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let mut body = vec![libc::AF_INET as u8, 0, 0, 0];
    nla_u32_be(&mut body, CTA_MARK, mark);
    nla_u32_be(&mut body, CTA_MARK_MASK, u32::MAX);
    let len = 16 + body.len() as u32;
    let mut msg = Vec::with_capacity(len as usize);
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE).to_ne_bytes());
    let flags = netlink_packet_core::NLM_F_REQUEST | netlink_packet_core::NLM_F_ACK;
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&body);
    sock.send(&msg, 0)?;
    let mut buf = vec![0u8; 4096];
    let n = sock.recv(&mut &mut buf[..], 0)?;
    if n < 20 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short ctnetlink reply",
        ));
    }
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    if kind != NLMSG_ERROR {
        return Ok(());
    }
    let code = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
    match code {
        0 => Ok(()),
        // Nothing matched.
        c if -c == libc::ENOENT => Ok(()),
        c => Err(io::Error::from_raw_os_error(-c)),
    }
}
