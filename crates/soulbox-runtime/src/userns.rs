//! User namespaces and the host id ranges they map to.
//!
//! Slot `n` maps sandbox uid/gid `0..65536` onto host `0x1000_0000 + n·65536 ..`; far above the
//! ranges distributions hand out in `/etc/subuid`, and never containing host root. Each live
//! sandbox holds its own slot, so no two sandboxes share a host uid: even a kernel bug that let
//! one sandbox's root act on host objects by uid would not reach another sandbox's files.
//!
//! Slots are taken host-wide, so that two servers (or a server and tests) on one host never
//! hand out the same range: `/run/soulbox/uid-slots/<n>` is a symlink to the state directory
//! of the sandbox holding slot `n`, created atomically to take it and removed to free it.
//! `/run` is cleared at boot, when no sandbox survives anyway; a link whose sandbox directory
//! is gone is stale and may be taken over. A process-wide bitmap remembers this process's own
//! slots, so taking one rarely needs more than one try.

use std::ffi::{c_int, c_void};
use std::fs::File;
use std::io::{self, ErrorKind, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::sys::{SignalsBlocked, Stack, clone_vm};

/// Ids per sandbox: sandbox uid/gid 0..65536.
pub(crate) const RANGE: u32 = 65536;
const FIRST_BASE: u32 = 0x1000_0000;
/// Slots whose whole range stays below `u32::MAX` (which is not a valid id).
const SLOTS: usize = ((u32::MAX - FIRST_BASE) / RANGE) as usize;
const WORDS: usize = SLOTS.div_ceil(64);
/// The host-wide registry of taken slots.
const REGISTRY: &str = "/run/soulbox/uid-slots";

/// Slots this process holds.
static OURS: Mutex<[u64; WORDS]> = Mutex::new([0; WORDS]);

fn slot_of(uid_base: u32) -> Option<usize> {
    let off = uid_base.checked_sub(FIRST_BASE)?;
    let slot = (off / RANGE) as usize;
    (off % RANGE == 0 && slot < SLOTS).then_some(slot)
}

fn base_of(slot: usize) -> u32 {
    FIRST_BASE + slot as u32 * RANGE
}

fn ours() -> std::sync::MutexGuard<'static, [u64; WORDS]> {
    // The bitmap stays consistent even if a holder panicked: every update is a single store.
    OURS.lock().unwrap_or_else(|e| e.into_inner())
}

fn link(slot: usize) -> PathBuf {
    Path::new(REGISTRY).join(slot.to_string())
}

fn registry() -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(REGISTRY)
}

/// Takes `slot` for `owner` unless someone else holds it. A stale link (its directory is gone)
/// is replaced.
fn claim(slot: usize, owner: &Path) -> io::Result<bool> {
    let path = link(slot);
    match std::os::unix::fs::symlink(owner, &path) {
        Ok(()) => return Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    match std::fs::read_link(&path) {
        Ok(target) if target == owner => Ok(true),
        Ok(target) if !target.exists() => {
            // Stale. Removing and re-linking can race another taker; whoever links first wins.
            let _ = std::fs::remove_file(&path);
            match std::os::unix::fs::symlink(owner, &path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        }
        Ok(_) => Ok(false),
        Err(e) if e.kind() == ErrorKind::NotFound => claim(slot, owner),
        Err(e) => Err(e),
    }
}

/// Takes the lowest free slot for the sandbox whose state directory is `owner`; returns its
/// host uid base, or None when all are taken.
pub(crate) fn reserve(owner: &Path) -> io::Result<Option<u32>> {
    registry()?;
    let mut ours = ours();
    for slot in 0..SLOTS {
        if ours[slot / 64] & (1 << (slot % 64)) != 0 {
            continue;
        }
        if claim(slot, owner)? {
            ours[slot / 64] |= 1 << (slot % 64);
            return Ok(Some(base_of(slot)));
        }
    }
    Ok(None)
}

/// Marks the slot of `uid_base` as held by `owner` (a sandbox found after a restart);
/// `false` if `uid_base` is not a slot base or another sandbox holds it.
pub(crate) fn mark_used(uid_base: u32, owner: &Path) -> bool {
    let Some(slot) = slot_of(uid_base) else {
        return false;
    };
    if registry().is_err() || !claim(slot, owner).unwrap_or(false) {
        return false;
    }
    ours()[slot / 64] |= 1 << (slot % 64);
    true
}

/// Frees the slot of `uid_base` if `owner` holds it.
pub(crate) fn release(uid_base: u32, owner: &Path) {
    let Some(slot) = slot_of(uid_base) else {
        return;
    };
    let path = link(slot);
    if std::fs::read_link(&path).is_ok_and(|t| t == owner) {
        let _ = std::fs::remove_file(&path);
    }
    ours()[slot / 64] &= !(1 << (slot % 64));
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

/// The killed helper child of [`create`]: reaped (and its stack unmapped) on drop. Keeping it
/// until the create is done lets it die in the background instead of making the create wait
/// for the scheduler to run it once more.
pub(crate) struct Helper {
    pid: i32,
    _stack: Stack,
}

impl Drop for Helper {
    fn drop(&mut self) {
        // SAFETY: waitpid on our own child, which was sent SIGKILL; reaping it before the
        // stack is unmapped, and before its pid can be reused.
        unsafe {
            while libc::waitpid(self.pid, std::ptr::null_mut(), 0) < 0
                && io::Error::last_os_error().kind() == ErrorKind::Interrupted
            {}
        }
    }
}

/// A user namespace mapping 0..65536 to `uid_base..` for both uids and gids, owned by host root.
///
/// A user namespace only gets its maps from a process in the parent namespace writing them for
/// a process inside, so a helper child is cloned into a new user namespace (sharing our memory,
/// so this costs no page-table copy), its maps are written, the namespace is kept as a file
/// descriptor, and the helper is killed (and reaped when the returned [`Helper`] drops).
pub(crate) fn create(uid_base: u32) -> io::Result<(OwnedFd, Helper)> {
    let stack = Stack::new(16 * 1024)?;
    let pid = {
        let _blocked = SignalsBlocked::new();
        // SAFETY: `hold` only calls pause(); it gets no argument; `stack` outlives the child:
        // the Helper owning both reaps the child before unmapping the stack.
        unsafe {
            clone_vm(
                hold,
                &stack,
                libc::CLONE_NEWUSER | libc::CLONE_VM | libc::SIGCHLD,
                std::ptr::null_mut(),
            )?
        }
    };
    let helper = Helper { pid, _stack: stack };
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
    // SAFETY: kill(2) on our own, not yet reaped child (its pid cannot have been reused).
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    result.map(|ns| (ns, helper))
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
        let last = base_of(SLOTS - 1);
        assert_eq!(slot_of(last), Some(SLOTS - 1));
        assert!(u64::from(last) + u64::from(RANGE) <= u64::from(u32::MAX));
        assert_eq!(slot_of(last + RANGE), None);
    }

    #[test]
    fn slots_are_exclusive_and_stale_ones_reused() {
        if !rustix::process::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir(&a).expect("mkdir");
        std::fs::create_dir(&b).expect("mkdir");
        let base_a = reserve(&a).expect("registry").expect("slot");
        let base_b = reserve(&b).expect("registry").expect("slot");
        assert_ne!(base_a, base_b);
        // Another holder (as if another process): the link names b, not a.
        assert!(!mark_used(base_b, &a));
        assert!(mark_used(base_a, &a));
        // b's directory disappears without a release: its slot is stale and can be taken.
        std::fs::remove_dir(&b).expect("rmdir");
        ours()[slot_of(base_b).expect("slot") / 64] &=
            !(1 << (slot_of(base_b).expect("slot") % 64));
        assert!(mark_used(base_b, &a));
        release(base_b, &a);
        release(base_a, &a);
        assert!(!link(slot_of(base_a).expect("slot")).exists());
        assert!(!mark_used(12345, &a));
    }
}
