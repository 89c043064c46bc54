//! User namespaces and the host id ranges they map to.
//!
//! Slot `n` maps sandbox uid/gid `0..65536` onto host `0x1000_0000 + n·65536 ..`; far above the
//! ranges distributions hand out in `/etc/subuid`, and never containing host root. Each live
//! sandbox holds its own slot, so no two sandboxes share a host uid: even a kernel bug that let
//! one sandbox's root act on host objects by uid would not reach another sandbox's files.
//!
//! The allocator is process-wide (all `Runtime`s of a process share it); a restarted server
//! learns the slots in use from the state directories (see `lib.rs`).

use std::ffi::{c_int, c_void};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use crate::sys::{SignalsBlocked, Stack, clone_vm};

/// Ids per sandbox: sandbox uid/gid 0..65536.
pub(crate) const RANGE: u32 = 65536;
const FIRST_BASE: u32 = 0x1000_0000;
/// Slots whose whole range stays below `u32::MAX` (which is not a valid id).
const SLOTS: usize = ((u32::MAX - FIRST_BASE) / RANGE) as usize;
const WORDS: usize = SLOTS.div_ceil(64);

static USED: Mutex<[u64; WORDS]> = Mutex::new([0; WORDS]);

fn slot_of(uid_base: u32) -> Option<usize> {
    let off = uid_base.checked_sub(FIRST_BASE)?;
    let slot = (off / RANGE) as usize;
    (off % RANGE == 0 && slot < SLOTS).then_some(slot)
}

fn used() -> std::sync::MutexGuard<'static, [u64; WORDS]> {
    // The bitmap stays consistent even if a holder panicked: every update is a single store.
    USED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes the lowest free slot; returns its host uid base.
pub(crate) fn reserve() -> Option<u32> {
    let mut used = used();
    let (word, bits) = used.iter_mut().enumerate().find(|(_, w)| **w != u64::MAX)?;
    let bit = bits.trailing_ones() as usize;
    let slot = word * 64 + bit;
    if slot >= SLOTS {
        return None;
    }
    *bits |= 1 << bit;
    Some(FIRST_BASE + slot as u32 * RANGE)
}

/// Marks the slot of `uid_base` as taken (after a restart); `false` if it is not a slot base.
pub(crate) fn mark_used(uid_base: u32) -> bool {
    let Some(slot) = slot_of(uid_base) else {
        return false;
    };
    used()[slot / 64] |= 1 << (slot % 64);
    true
}

pub(crate) fn release(uid_base: u32) {
    if let Some(slot) = slot_of(uid_base) {
        used()[slot / 64] &= !(1 << (slot % 64));
    }
}

/// Body of the helper child: it only has to exist while its maps are written.
extern "C" fn hold(_: *mut c_void) -> c_int {
    loop {
        // SAFETY: pause() only sleeps; the parent ends this child with SIGKILL.
        unsafe {
            libc::pause();
        }
    }
}

/// A user namespace mapping 0..65536 to `uid_base..` for both uids and gids, owned by host root.
///
/// A user namespace only gets its maps from a process in the parent namespace writing them for
/// a process inside, so a helper child is cloned into a new user namespace (sharing our memory,
/// so this costs no page-table copy), its maps are written, the namespace is kept as a file
/// descriptor, and the helper is killed.
pub(crate) fn create(uid_base: u32) -> io::Result<OwnedFd> {
    let stack = Stack::new(16 * 1024)?;
    let pid = {
        let _blocked = SignalsBlocked::new();
        // SAFETY: `hold` only calls pause(); it gets no argument; `stack` outlives the child,
        // which is killed and reaped below before `stack` is dropped.
        unsafe {
            clone_vm(
                hold,
                &stack,
                libc::CLONE_NEWUSER | libc::CLONE_VM | libc::SIGCHLD,
                std::ptr::null_mut(),
            )?
        }
    };
    let result = (|| {
        let map = format!("0 {uid_base} {RANGE}\n");
        File::options()
            .write(true)
            .open(format!("/proc/{pid}/uid_map"))?
            .write_all(map.as_bytes())?;
        File::options()
            .write(true)
            .open(format!("/proc/{pid}/gid_map"))?
            .write_all(map.as_bytes())?;
        Ok(OwnedFd::from(File::open(format!("/proc/{pid}/ns/user"))?))
    })();
    // SAFETY: plain syscalls on the child we just made; waitpid reaps it so the pid is not
    // reused while we still name it.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        while libc::waitpid(pid, std::ptr::null_mut(), 0) < 0
            && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
        {}
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_map_to_aligned_bases() {
        assert_eq!(slot_of(FIRST_BASE), Some(0));
        assert_eq!(slot_of(FIRST_BASE + RANGE), Some(1));
        assert_eq!(slot_of(FIRST_BASE + 1), None);
        assert_eq!(slot_of(0), None);
        assert_eq!(slot_of(1000), None);
        let last = FIRST_BASE + (SLOTS as u32 - 1) * RANGE;
        assert_eq!(slot_of(last), Some(SLOTS - 1));
        assert!(u64::from(last) + u64::from(RANGE) <= u64::from(u32::MAX));
        assert_eq!(slot_of(last + RANGE), None);
    }

    #[test]
    fn reserve_release_reuse() {
        let a = reserve().expect("slot");
        let b = reserve().expect("slot");
        assert_ne!(a, b);
        assert!(slot_of(a).is_some() && slot_of(b).is_some());
        release(a);
        assert!(mark_used(a));
        release(a);
        release(b);
        assert!(!mark_used(12345));
    }
}
