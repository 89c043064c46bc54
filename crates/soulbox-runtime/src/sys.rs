//! The few kernel interfaces rustix does not wrap: `mount_setattr`, `clone` with a caller-chosen
//! stack, and blocking every signal around it.

use std::ffi::{c_int, c_void};
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::{self, NonNull};

use rustix::mount::MountAttrFlags;

/// `struct mount_attr` from `<linux/mount.h>`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Sets `attrs` on the detached mount `mnt`; with `idmap`, also makes it an idmapped mount that
/// shows ids through that user namespace's mapping.
pub(crate) fn mount_setattr(
    mnt: BorrowedFd<'_>,
    attrs: MountAttrFlags,
    idmap: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let attrs = match idmap {
        Some(_) => attrs | MountAttrFlags::MOUNT_ATTR_IDMAP,
        None => attrs,
    };
    let mut attr = MountAttr {
        attr_set: u64::from(attrs.bits()),
        attr_clr: 0,
        propagation: 0,
        userns_fd: idmap.map_or(0, |fd| fd.as_raw_fd() as u64),
    };
    // SAFETY: the path is a valid C string, `attr` is a live `struct mount_attr` and its size is
    // passed; the kernel only reads it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mnt.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            &mut attr as *mut MountAttr,
            size_of::<MountAttr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An mmap'd stack for a `clone`d child, with a guard page below it so that an overflow faults
/// instead of silently writing into the parent's heap.
pub(crate) struct Stack {
    base: NonNull<c_void>,
    len: usize,
}

const GUARD: usize = 4096;

impl Stack {
    pub(crate) fn new(size: usize) -> io::Result<Stack> {
        let len = size.next_multiple_of(GUARD) + GUARD;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let Some(base) = NonNull::new(base) else {
            return Err(io::Error::other("mmap returned NULL"));
        };
        let stack = Stack { base, len };
        // SAFETY: the first page of our own mapping.
        if unsafe { libc::mprotect(base.as_ptr(), GUARD, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The initial stack pointer (stacks grow down; page-aligned, so 16-byte aligned).
    fn top(&self) -> *mut c_void {
        // SAFETY: one past the end of our mapping, as `clone` expects.
        unsafe { self.base.as_ptr().cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no child still runs on it (callers
        // only drop it after the child exec'd, exited or was reaped).
        unsafe {
            libc::munmap(self.base.as_ptr(), self.len);
        }
    }
}

/// Starts `f(arg)` in a child created with `flags` (which must include `CLONE_VM`, so the child
/// shares our memory) on `stack`, and returns its pid.
///
/// # Safety
/// `f` must only make async-signal-safe system calls and must neither allocate, panic, nor touch
/// locks: it runs in a copy of a possibly multi-threaded process. `arg` must stay valid for as
/// long as the child may use it, and `stack` must outlive the child's use of it.
pub(crate) unsafe fn clone_vm(
    f: extern "C" fn(*mut c_void) -> c_int,
    stack: &Stack,
    flags: c_int,
    arg: *mut c_void,
) -> io::Result<i32> {
    // SAFETY: forwarded to the caller (see above).
    let pid = unsafe { libc::clone(f, stack.top(), flags, arg) };
    if pid < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(pid)
    }
}

/// Blocks every signal on this thread while alive, so that no signal handler of the server runs
/// in a `clone`d child before it resets them; restores the old mask on drop.
pub(crate) struct SignalsBlocked {
    old: libc::sigset_t,
    /// The mask is per thread: the guard must be dropped where it was made.
    _not_send: PhantomData<*const ()>,
}

impl SignalsBlocked {
    pub(crate) fn new() -> SignalsBlocked {
        // SAFETY: plain-data sigset_t values, initialised by sigfillset / pthread_sigmask.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            SignalsBlocked {
                old,
                _not_send: PhantomData,
            }
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`, on the same thread (the guard is not Send).
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, ptr::null_mut());
        }
    }
}
