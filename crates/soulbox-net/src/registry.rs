//! Who is behind a source address: the resolver and the proxy identify a sandbox by the
//! address its packets come from (spoofing is ruled out on the host side: reverse-path
//! filtering and the `ip saddr` check of the slot's chain), and read its policy here.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::policy::Policy;

/// What the resolver and proxy know about one leased slot.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) index: u32,
    policy: RwLock<Arc<Policy>>,
    bucket: Mutex<Bucket>,
    /// DNS queries or proxied connections in progress.
    pub(crate) busy: AtomicU32,
    /// Bumped on every policy change; `None` once the lease has ended. Proxied connections
    /// watch it to re-check their name (or stop).
    generation: tokio::sync::watch::Sender<Option<u64>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// DNS queries per second a sandbox may send on average, and the burst above that.
pub(crate) const DNS_RATE: f64 = 50.0;
pub(crate) const DNS_BURST: f64 = 200.0;

impl Entry {
    pub(crate) fn new(index: u32, policy: Policy) -> Entry {
        Entry {
            index,
            policy: RwLock::new(Arc::new(policy)),
            bucket: Mutex::new(Bucket {
                tokens: DNS_BURST,
                at: Instant::now(),
            }),
            busy: AtomicU32::new(0),
            generation: tokio::sync::watch::Sender::new(Some(0)),
        }
    }

    pub(crate) fn policy(&self) -> Arc<Policy> {
        match self.policy.read() {
            Ok(p) => p.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub(crate) fn set_policy(&self, policy: Policy) {
        let policy = Arc::new(policy);
        match self.policy.write() {
            Ok(mut p) => *p = policy,
            Err(poisoned) => *poisoned.into_inner() = policy,
        }
        self.generation
            .send_modify(|g| *g = g.map(|n| n.wrapping_add(1)));
    }

    /// The lease is over: everything still proxied for it stops.
    pub(crate) fn close(&self) {
        self.generation.send_replace(None);
    }

    /// Notified on policy changes and when the lease ends.
    pub(crate) fn watch(&self) -> tokio::sync::watch::Receiver<Option<u64>> {
        self.generation.subscribe()
    }

    /// Takes one DNS token; false when the sandbox is over its rate.
    pub(crate) fn take_token(&self) -> bool {
        let mut b = match self.bucket.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = Instant::now();
        let refill = now.duration_since(b.at).as_secs_f64() * DNS_RATE;
        b.tokens = (b.tokens + refill).min(DNS_BURST);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Counts one unit of work in progress if fewer than `max` are; the guard gives it back.
    pub(crate) fn enter(self: &Arc<Self>, max: u32) -> Option<Busy> {
        let prev = self.busy.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            self.busy.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Busy(self.clone()))
    }
}

pub(crate) struct Busy(Arc<Entry>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Source address → slot.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    by_addr: RwLock<HashMap<Ipv4Addr, Arc<Entry>>>,
}

impl Registry {
    pub(crate) fn get(&self, addr: Ipv4Addr) -> Option<Arc<Entry>> {
        let map = match self.by_addr.read() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.get(&addr).cloned()
    }

    pub(crate) fn insert(&self, addr: Ipv4Addr, entry: Arc<Entry>) {
        let mut map = match self.by_addr.write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.insert(addr, entry);
    }

    pub(crate) fn remove(&self, addr: Ipv4Addr) {
        let mut map = match self.by_addr.write() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.remove(&addr);
    }
}
