//! `df` inside a sandbox: `statfs(2)` and `fstatfs(2)` on the root filesystem answer with the
//! sandbox's own disk quota and use.
//!
//! The root is an overlay whose upper layer is a btrfs subvolume on an image every sandbox of
//! the server shares. The kernel answers statfs there with the whole image (btrfs ignores
//! quota groups in statfs), so `df`, `shutil.disk_usage`, the JVM and package managers would
//! see the image's free space where the sandbox may write only its `disk_mb`. The runtime's
//! seccomp filter turns both calls into user notifications and hands the listener to the
//! agent; this thread answers those whose target is on the root filesystem from the
//! subvolume's quota group, whose sysfs directory the host bind-mounts read-only at
//! [`DISK_DIR`] (`referenced`, `max_referenced`: live figures, no polling). Every other call
//! (another filesystem, a bad pointer, no quota) continues to the kernel unchanged.
//!
//! Failure mode: a caller waits only on this thread. If it cannot go on, it returns and drops
//! the listener, and the calls fail with ENOSYS instead of waiting; the thread never calls
//! statfs itself (it would wait on itself). It must be a thread of its own, not a task on the
//! agent's runtime: the agent calls statfs too (a watch checks for network mounts), and on the
//! runtime's one thread that call would wait for an answer only that thread could give.
//!
//! Threat model: the callers are sandbox processes, possibly hostile. They can only make their
//! own calls slow or get figures for their own sandbox; the thread reads at most a path from
//! the caller and writes only into the caller's buffer, after checking that the notification
//! is still live (so a pid reused since is never written to).

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where the host mounts the sandbox's quota group (btrfs sysfs `qgroups/0_<subvolume>`).
pub const DISK_DIR: &str = "/.soulbox/disk";
/// What statfs reports as the type of the sandbox's root (it is an overlay).
const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
/// Block size of the figures we report.
const BLOCK: u64 = 4096;
/// Longest path read from a caller (PATH_MAX).
const PATH_MAX: usize = 4096;
/// `f_flags` bit saying the flags are filled in (`ST_VALID`, not in libc).
const ST_VALID: i64 = 0x0020;

/// The kernel's `struct statfs` on 64-bit architectures (`asm-generic/statfs.h`), which the
/// caller's buffer receives; libc's hides `f_flags` among spare words.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct KernelStatfs {
    f_type: i64,
    f_bsize: i64,
    f_blocks: u64,
    f_bfree: u64,
    f_bavail: u64,
    f_files: u64,
    f_ffree: u64,
    f_fsid: [i32; 2],
    f_namelen: i64,
    f_frsize: i64,
    f_flags: i64,
    f_spare: [i64; 4],
}
const _: () = assert!(size_of::<KernelStatfs>() == size_of::<libc::statfs>());

/// Starts answering the notifications of `listener` (a seccomp user-notification fd) on a
/// thread of its own.
pub fn start(listener: OwnedFd) -> io::Result<()> {
    let root_dev = fs::metadata("/")?.dev();
    std::thread::Builder::new()
        .name("statfs".into())
        .stack_size(64 * 1024)
        .spawn(move || serve(&listener, root_dev, Path::new(DISK_DIR)))?;
    Ok(())
}

/// What to tell the kernel about one call.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Run the real system call.
    Continue,
    /// The caller's buffer holds our figures: return 0.
    Done,
    /// Fail the call with this errno.
    Errno(i32),
}

fn serve(listener: &OwnedFd, root_dev: u64, disk_dir: &Path) {
    let fd = listener.as_raw_fd();
    loop {
        // SAFETY: an all-zero seccomp_notif is valid (plain integers) and is what RECV requires.
        let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: RECV writes one seccomp_notif into `req`, which we own and which has the
        // size the ioctl number encodes.
        if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut req) } != 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // Interrupted, or the caller went away before we received it.
                Some(libc::EINTR) | Some(libc::ENOENT) => continue,
                _ => {
                    tracing::error!(error = %e, "statfs view stopped: statfs calls now fail with ENOSYS");
                    return;
                }
            }
        }
        let answer = answer(&req, root_dev, disk_dir, fd);
        let mut resp = libc::seccomp_notif_resp {
            id: req.id,
            val: 0,
            error: 0,
            flags: 0,
        };
        match answer {
            Answer::Continue => resp.flags = libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32,
            Answer::Done => {}
            Answer::Errno(e) => resp.error = -e,
        }
        // SAFETY: SEND reads one seccomp_notif_resp from `resp`, which we own.
        if unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp) } != 0 {
            // ENOENT: the caller was interrupted or exited meanwhile; nothing waits on it.
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                tracing::warn!(error = %e, "statfs view: answering a call failed");
            }
        }
    }
}

fn answer(req: &libc::seccomp_notif, root_dev: u64, disk_dir: &Path, listener: RawFd) -> Answer {
    let pid = req.pid;
    let nr = libc::c_long::from(req.data.nr);
    let target = if nr == libc::SYS_statfs {
        match read_path(pid, req.data.args[0]) {
            Some(p) => as_seen_by(pid, &p),
            None => return Answer::Continue,
        }
    } else if nr == libc::SYS_fstatfs {
        // The descriptor is a C int in the low half of the register.
        let fd = req.data.args[0] as u32 as i32;
        if fd < 0 {
            return Answer::Continue;
        }
        PathBuf::from(format!("/proc/{pid}/fd/{fd}"))
    } else {
        return Answer::Continue;
    };
    match fs::metadata(&target) {
        Ok(m) if m.dev() == root_dev => {}
        _ => return Answer::Continue,
    }
    let Some(st) = quota_statfs(disk_dir) else {
        return Answer::Continue;
    };
    // The caller may have died and its pid been reused since RECV: write only into a live one.
    if !id_valid(listener, req.id) {
        return Answer::Continue;
    }
    write_statfs(pid, req.data.args[1], &st)
}

/// The path `p` of a caller resolved as the caller sees it (its root and working directory).
fn as_seen_by(pid: u32, p: &[u8]) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    let p = Path::new(std::ffi::OsStr::from_bytes(p));
    match p.strip_prefix("/") {
        Ok(rel) => Path::new(&format!("/proc/{pid}/root")).join(rel),
        Err(_) => Path::new(&format!("/proc/{pid}/cwd")).join(p),
    }
}

/// Reads a NUL-terminated path (not empty, at most [`PATH_MAX`] bytes) from the caller's
/// memory, page by page (a read across into an unmapped page would fail whole).
fn read_path(pid: u32, addr: u64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = addr;
    while out.len() < PATH_MAX {
        let to_page_end = 4096 - (at % 4096) as usize;
        let mut buf = vec![0u8; to_page_end.min(PATH_MAX - out.len())];
        let n = vm_read(pid, at, &mut buf).ok()?;
        if n == 0 {
            return None;
        }
        if let Some(end) = buf[..n].iter().position(|&b| b == 0) {
            out.extend_from_slice(&buf[..end]);
            return (!out.is_empty()).then_some(out);
        }
        out.extend_from_slice(&buf[..n]);
        at = at.checked_add(n as u64)?;
    }
    None
}

fn vm_read(pid: u32, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: `local` describes `buf`, which we own for the call; `remote` is only an address
    // in the other process, which the kernel checks.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Our figures for the root: the quota group's limit as the size, its use as used; `None`
/// when the sandbox has no quota (then the kernel's answer stands).
fn quota_statfs(disk_dir: &Path) -> Option<KernelStatfs> {
    let read = |name: &str| -> Option<u64> {
        fs::read_to_string(disk_dir.join(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let max = read("max_referenced").filter(|&m| m > 0)?;
    let used = read("referenced")?;
    let free = max.saturating_sub(used) / BLOCK;
    Some(KernelStatfs {
        f_type: OVERLAYFS_SUPER_MAGIC,
        f_bsize: BLOCK as i64,
        f_blocks: max / BLOCK,
        f_bfree: free,
        f_bavail: free,
        f_namelen: 255,
        f_frsize: BLOCK as i64,
        f_flags: ST_VALID | libc::ST_RELATIME as i64,
        ..KernelStatfs::default()
    })
}

fn id_valid(listener: RawFd, id: u64) -> bool {
    let mut id = id;
    // SAFETY: ID_VALID reads one u64 from `id`.
    unsafe { libc::ioctl(listener, libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &mut id) == 0 }
}

fn write_statfs(pid: u32, addr: u64, st: &KernelStatfs) -> Answer {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return Answer::Continue;
    };
    let len = size_of::<KernelStatfs>();
    let local = libc::iovec {
        iov_base: (st as *const KernelStatfs).cast_mut().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` describes `st` (only read); `remote` is an address in the caller's
    // memory, checked by the kernel (EFAULT when it is not writable there).
    let n = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
    if usize::try_from(n).ok() == Some(len) {
        Answer::Done
    } else {
        Answer::Errno(libc::EFAULT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_come_from_the_quota_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("max_referenced"), "10737418240\n").expect("write");
        std::fs::write(dir.path().join("referenced"), "1048576\n").expect("write");
        let st = quota_statfs(dir.path()).expect("figures");
        assert_eq!(st.f_blocks, 10737418240 / 4096);
        assert_eq!(st.f_bfree, (10737418240 - 1048576) / 4096);
        assert_eq!(st.f_bavail, st.f_bfree);
        assert_eq!(st.f_type, OVERLAYFS_SUPER_MAGIC);
        // Over the limit (reserved space, racing writers): nothing free, never negative.
        std::fs::write(dir.path().join("referenced"), "20000000000\n").expect("write");
        assert_eq!(quota_statfs(dir.path()).expect("figures").f_bfree, 0);
        // No limit ("none" or 0) or no quota group: the kernel's answer stands.
        std::fs::write(dir.path().join("max_referenced"), "none\n").expect("write");
        assert!(quota_statfs(dir.path()).is_none());
        assert!(quota_statfs(&dir.path().join("missing")).is_none());
    }

    #[test]
    fn paths_resolve_in_the_callers_root_and_cwd() {
        assert_eq!(as_seen_by(7, b"/etc"), PathBuf::from("/proc/7/root/etc"));
        assert_eq!(as_seen_by(7, b"/"), PathBuf::from("/proc/7/root"));
        assert_eq!(as_seen_by(7, b"data"), PathBuf::from("/proc/7/cwd/data"));
    }

    #[test]
    fn a_path_is_read_from_the_callers_memory() {
        let pid = std::process::id();
        let s = c"/home/user";
        assert_eq!(
            read_path(pid, s.as_ptr() as u64).as_deref(),
            Some(&b"/home/user"[..])
        );
        assert_eq!(read_path(pid, c"".as_ptr() as u64), None, "empty path");
        assert_eq!(read_path(pid, 0), None, "NULL");
        let long = vec![b'a'; PATH_MAX + 10];
        assert_eq!(
            read_path(pid, long.as_ptr() as u64),
            None,
            "no NUL within PATH_MAX"
        );
    }
}
