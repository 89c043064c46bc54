//! The hot path of the policy: set elements written straight over nf_tables netlink, in one
//! atomic batch per change.
//!
//! `nft` reads the kernel's ruleset (the elements of every interval set of every table
//! included) before it applies anything, so its cost grows with the number of sandboxes on the
//! host; what changes per create, per policy update and per DNS answer is only the contents of
//! one slot's sets, which is what this module writes. Chains and sets themselves are still made
//! with `nft` (`nft.rs`), in the background.
//!
//! Message layout (`include/uapi/linux/netfilter/nf_tables.h`): a batch begin, then
//! `NFT_MSG_DELSETELEM` with only a table and set name (= flush that set) or
//! `NFT_MSG_NEWSETELEM`/`NFT_MSG_DELSETELEM` with a list of elements, then a batch end. Interval
//! sets hold ranges as a start key and an end key (first address after the range, flagged
//! `NFT_SET_ELEM_INTERVAL_END`); a range that ends at 255.255.255.255 has no end key. Overlapping
//! ranges are refused by the kernel, so they are merged here first.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::time::Duration;

use ipnet::Ipv4Net;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_FLAGS: u16 = 3;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_DATA_VALUE: u16 = 1;
const NFT_SET_ELEM_INTERVAL_END: u32 = 1;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_CREATE: u16 = 0x400;
const NLMSG_ERROR: u16 = 2;

/// One element: a key, whether it ends an interval, and an optional timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Elem {
    key: Ipv4Addr,
    end: bool,
    timeout: Option<Duration>,
}

/// Start/end elements for `nets` in an interval set (merged, sorted).
pub(crate) fn interval_elems(nets: &[Ipv4Net]) -> Vec<Elem> {
    let mut ranges: Vec<(u32, u32)> = nets
        .iter()
        .map(|n| (u32::from(n.network()), u32::from(n.broadcast())))
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    let mut out = Vec::with_capacity(merged.len() * 2);
    for (start, end) in merged {
        out.push(Elem {
            key: Ipv4Addr::from(start),
            end: false,
            timeout: None,
        });
        if end != u32::MAX {
            out.push(Elem {
                key: Ipv4Addr::from(end + 1),
                end: true,
                timeout: None,
            });
        }
    }
    out
}

/// Plain elements with a timeout each.
pub(crate) fn timed_elems(list: &[(Ipv4Addr, Duration)]) -> Vec<Elem> {
    list.iter()
        .map(|(ip, t)| Elem {
            key: *ip,
            end: false,
            timeout: Some(*t),
        })
        .collect()
}

/// One operation of a batch.
pub(crate) enum Op<'a> {
    /// Removes every element of the set.
    Flush {
        set: &'a str,
    },
    Add {
        set: &'a str,
        elems: Vec<Elem>,
    },
    Delete {
        set: &'a str,
        elems: Vec<Elem>,
    },
}

struct Buf(Vec<u8>);

impl Buf {
    fn align(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.align();
    }

    fn string(&mut self, kind: u16, s: &str) {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.attr(kind, &b);
    }

    /// Starts a nested attribute; returns its offset for [`Buf::end_nest`].
    fn nest(&mut self, kind: u16) -> usize {
        let at = self.0.len();
        self.0.extend_from_slice(&0u16.to_ne_bytes());
        self.0
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn end_nest(&mut self, at: usize) {
        let len = (self.0.len() - at) as u16;
        self.0[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// Starts a netlink message with an nfgenmsg header; returns its offset.
    fn msg(&mut self, kind: u16, flags: u16, seq: u32, family: u8, res_id: u16) -> usize {
        let at = self.0.len();
        self.0.extend_from_slice(&0u32.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(&flags.to_ne_bytes());
        self.0.extend_from_slice(&seq.to_ne_bytes());
        self.0.extend_from_slice(&0u32.to_ne_bytes());
        self.0.push(family);
        self.0.push(0);
        self.0.extend_from_slice(&res_id.to_be_bytes());
        at
    }

    fn end_msg(&mut self, at: usize) {
        self.align();
        let len = (self.0.len() - at) as u32;
        self.0[at..at + 4].copy_from_slice(&len.to_ne_bytes());
    }
}

/// Applies `ops` to sets of table `inet <table>` as one transaction.
pub(crate) fn apply(table: &str, ops: &[Op<'_>]) -> io::Result<()> {
    let mut sock = Socket::new(NETLINK_NETFILTER)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a valid timeval on a socket we own.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let mut b = Buf(Vec::with_capacity(1024));
    let mut seq = 1u32;
    let at = b.msg(
        NFNL_MSG_BATCH_BEGIN,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
    );
    b.end_msg(at);
    let mut acks = Vec::new();
    for op in ops {
        seq += 1;
        let (kind, set, elems) = match op {
            Op::Flush { set } => (NFT_MSG_DELSETELEM, *set, None),
            Op::Add { set, elems } => (NFT_MSG_NEWSETELEM, *set, Some(elems)),
            Op::Delete { set, elems } => (NFT_MSG_DELSETELEM, *set, Some(elems)),
        };
        if elems.is_some_and(|e| e.is_empty()) {
            continue;
        }
        let flags = NLM_F_REQUEST
            | NLM_F_ACK
            | if kind == NFT_MSG_NEWSETELEM {
                NLM_F_CREATE
            } else {
                0
            };
        let at = b.msg(
            (NFNL_SUBSYS_NFTABLES << 8) | kind,
            flags,
            seq,
            NFPROTO_INET,
            0,
        );
        b.string(NFTA_SET_ELEM_LIST_TABLE, table);
        b.string(NFTA_SET_ELEM_LIST_SET, set);
        if let Some(elems) = elems {
            let list = b.nest(NFTA_SET_ELEM_LIST_ELEMENTS);
            for e in elems {
                let item = b.nest(NFTA_LIST_ELEM);
                let key = b.nest(NFTA_SET_ELEM_KEY);
                b.attr(NFTA_DATA_VALUE, &e.key.octets());
                b.end_nest(key);
                if e.end {
                    b.attr(
                        NFTA_SET_ELEM_FLAGS,
                        &NFT_SET_ELEM_INTERVAL_END.to_be_bytes(),
                    );
                }
                if let Some(t) = e.timeout {
                    let ms = u64::try_from(t.as_millis()).unwrap_or(u64::MAX);
                    b.attr(NFTA_SET_ELEM_TIMEOUT, &ms.to_be_bytes());
                }
                b.end_nest(item);
            }
            b.end_nest(list);
        }
        b.end_msg(at);
        acks.push(seq);
    }
    if acks.is_empty() {
        return Ok(());
    }
    seq += 1;
    let at = b.msg(
        NFNL_MSG_BATCH_END,
        NLM_F_REQUEST,
        seq,
        0,
        NFNL_SUBSYS_NFTABLES,
    );
    b.end_msg(at);
    sock.send(&b.0, 0)?;
    let mut rx = vec![0u8; 16 * 1024];
    while !acks.is_empty() {
        let n = sock.recv(&mut &mut rx[..], 0)?;
        let mut off = 0;
        while off + 16 <= n {
            let len = u32::from_ne_bytes([rx[off], rx[off + 1], rx[off + 2], rx[off + 3]]) as usize;
            if len < 16 || off + len > n {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "bad netlink reply",
                ));
            }
            let kind = u16::from_ne_bytes([rx[off + 4], rx[off + 5]]);
            let rseq = u32::from_ne_bytes([rx[off + 8], rx[off + 9], rx[off + 10], rx[off + 11]]);
            if kind == NLMSG_ERROR && len >= 20 {
                let code =
                    i32::from_ne_bytes([rx[off + 16], rx[off + 17], rx[off + 18], rx[off + 19]]);
                if code != 0 {
                    return Err(io::Error::from_raw_os_error(-code));
                }
                acks.retain(|s| *s != rseq);
            }
            off += (len + 3) & !3;
        }
    }
    Ok(())
}

/// Replaces slot `index`'s policy sets (`a_N`, `p_N`, `d_N`), empties its learnt set `l_N`,
/// and puts its address in `inspect` or not.
pub(crate) fn set_policy(
    table: &str,
    index: u32,
    address: Ipv4Addr,
    policy: &crate::policy::Policy,
) -> io::Result<()> {
    let (a, p, d, l) = (
        format!("a_{index}"),
        format!("p_{index}"),
        format!("d_{index}"),
        format!("l_{index}"),
    );
    let me = vec![Elem {
        key: address,
        end: false,
        timeout: None,
    }];
    let mut ops = vec![
        Op::Flush { set: &a },
        Op::Add {
            set: &a,
            elems: interval_elems(&policy.allow),
        },
        Op::Flush { set: &p },
        Op::Add {
            set: &p,
            elems: interval_elems(&policy.allow_private),
        },
        Op::Flush { set: &d },
        Op::Add {
            set: &d,
            elems: interval_elems(&policy.deny),
        },
        Op::Flush { set: &l },
        // Adding first makes the delete valid whether or not the element was there.
        Op::Add {
            set: "inspect",
            elems: me.clone(),
        },
    ];
    if !policy.inspects() {
        ops.push(Op::Delete {
            set: "inspect",
            elems: me,
        });
    }
    apply(table, &ops)
}

/// Adds addresses to slot `index`'s learnt set with their timeouts (refreshing the timeout of
/// those already there: add, delete, add again, in one transaction).
pub(crate) fn learn(table: &str, index: u32, learnt: &[(Ipv4Addr, Duration)]) -> io::Result<()> {
    let set = format!("l_{index}");
    let plain: Vec<Elem> = learnt
        .iter()
        .map(|(ip, _)| Elem {
            key: *ip,
            end: false,
            timeout: None,
        })
        .collect();
    apply(
        table,
        &[
            Op::Add {
                set: &set,
                elems: plain.clone(),
            },
            Op::Delete {
                set: &set,
                elems: plain,
            },
            Op::Add {
                set: &set,
                elems: timed_elems(learnt),
            },
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<Ipv4Net> {
        list.iter().map(|s| s.parse().expect("net")).collect()
    }

    #[test]
    fn intervals_are_merged_and_ended() {
        let e = interval_elems(&nets(&[
            "10.0.0.0/8",
            "1.2.3.4/32",
            "10.1.0.0/16",
            "11.0.0.0/8",
        ]));
        let keys: Vec<(String, bool)> = e.iter().map(|e| (e.key.to_string(), e.end)).collect();
        assert_eq!(
            keys,
            vec![
                ("1.2.3.4".into(), false),
                ("1.2.3.5".into(), true),
                ("10.0.0.0".into(), false),
                ("12.0.0.0".into(), true),
            ]
        );
        let all = interval_elems(&nets(&["0.0.0.0/0", "8.8.8.8/32"]));
        assert_eq!(all.len(), 1, "the whole space has no end key: {all:?}");
        assert!(!all[0].end && all[0].key == Ipv4Addr::UNSPECIFIED);
        assert!(interval_elems(&[]).is_empty());
    }
}
