//! The seccomp filter every sandbox process runs under (installed by PID 1 right before it
//! execs the agent; inherited by everything the agent starts, and irremovable).
//!
//! A deny-list: the sandbox is a general-purpose Linux box (compilers, package managers,
//! browsers, debuggers), so everything is allowed except kernel interfaces that no sandbox
//! needs and that have a record of privilege escalations or namespace escapes. Most of them
//! would already fail for lack of a host capability (sandbox root holds capabilities only in
//! its own user namespace); the filter removes the kernel code paths behind them from reach,
//! so a bug in a permission check does not matter. `docs/threat-model.md` has the table with
//! the reason for each entry; [`DENY`] is its source.
//!
//! Built with libseccomp (the reference implementation: it validates the architecture and
//! handles x32 and the i386 compat ABI, which hand-written or other generated BPF tends to get
//! wrong). Only the native x86_64/aarch64 ABI is allowed: a syscall through another ABI (e.g.
//! `int 0x80`) kills the process, because compat entry points are a classic source of
//! kernel bugs and sandboxed code has no need for 32-bit binaries.

use std::io::{Read, Seek, SeekFrom};

use libseccomp::{ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};

use crate::RuntimeError;

/// Syscalls refused with EPERM, and why no sandbox may have them.
pub(crate) const DENY: &[(&str, &str)] = &[
    ("kexec_load", "loads a new kernel"),
    ("kexec_file_load", "loads a new kernel"),
    ("init_module", "loads kernel code"),
    ("finit_module", "loads kernel code"),
    ("delete_module", "unloads kernel code"),
    ("create_module", "obsolete module interface"),
    ("query_module", "obsolete module interface"),
    ("get_kernel_syms", "obsolete module interface"),
    (
        "bpf",
        "eBPF: verifier and JIT bugs; kernel memory inspection",
    ),
    (
        "perf_event_open",
        "kernel profiling: info leaks, long CVE record",
    ),
    (
        "userfaultfd",
        "makes kernel races easy to win (exploit primitive)",
    ),
    ("keyctl", "kernel keyrings are not namespaced by sandbox"),
    ("add_key", "kernel keyrings are not namespaced by sandbox"),
    (
        "request_key",
        "kernel keyrings; can call host upcall helpers",
    ),
    (
        "open_by_handle_at",
        "opens files by handle, bypassing the mount tree (shocker)",
    ),
    ("name_to_handle_at", "companion of open_by_handle_at"),
    ("reboot", "host power state"),
    ("swapon", "host swap"),
    ("swapoff", "host swap"),
    ("acct", "host process accounting"),
    ("quotactl", "host filesystem quotas"),
    ("quotactl_fd", "host filesystem quotas"),
    ("mount", "mounting: the tree is the host's to build"),
    ("umount2", "unmounting could reveal what a mount hides"),
    ("pivot_root", "changes the root mount"),
    ("move_mount", "new mount API"),
    ("open_tree", "new mount API (clones mounts)"),
    ("fsopen", "new mount API (filesystem contexts: parser bugs)"),
    ("fsconfig", "new mount API"),
    ("fsmount", "new mount API"),
    ("fspick", "new mount API (reconfigures mounts)"),
    ("mount_setattr", "changes mount flags and id mappings"),
    ("setns", "joins other namespaces (e.g. via a leaked fd)"),
    ("iopl", "raw I/O port access"),
    ("ioperm", "raw I/O port access"),
    ("syslog", "kernel log: addresses and host activity"),
    ("lookup_dcookie", "kernel profiling interface"),
    ("nfsservctl", "kernel NFS server control"),
    ("uselib", "obsolete loader interface"),
    ("settimeofday", "host clock"),
    ("clock_settime", "host clock"),
    ("clock_adjtime", "host clock"),
    ("sethostname", "uts names are set by the runtime"),
    ("setdomainname", "uts names are set by the runtime"),
    (
        "io_uring_setup",
        "io_uring: the largest recent source of kernel exploits",
    ),
    ("io_uring_enter", "io_uring"),
    ("io_uring_register", "io_uring"),
    ("fanotify_init", "filesystem-wide event monitoring"),
];

/// Namespace-creating flags of clone(2) and unshare(2): every namespace a sandbox has is made
/// by the runtime. `CLONE_NEWUSER` matters most: it needs no privilege and opens up kernel code
/// (mounting, netfilter, ...) that otherwise requires capabilities.
const NS_FLAGS: [(u64, &str); 7] = [
    (libc::CLONE_NEWUSER as u64, "CLONE_NEWUSER"),
    (libc::CLONE_NEWNS as u64, "CLONE_NEWNS"),
    (libc::CLONE_NEWPID as u64, "CLONE_NEWPID"),
    (libc::CLONE_NEWNET as u64, "CLONE_NEWNET"),
    (libc::CLONE_NEWUTS as u64, "CLONE_NEWUTS"),
    (libc::CLONE_NEWIPC as u64, "CLONE_NEWIPC"),
    (libc::CLONE_NEWCGROUP as u64, "CLONE_NEWCGROUP"),
];
/// Only unshare(2) takes it (in clone(2) that bit is part of the exit signal).
const CLONE_NEWTIME: u64 = 0x80;

/// Socket families a sandbox may use: local, IPv4, IPv6 and netlink (which `getifaddrs` and
/// `ip` need). Everything else (vsock to the hypervisor, packet sockets, and rarely used
/// protocols whose modules the kernel would autoload) is refused.
const SOCKET_FAMILIES: [u64; 4] = [
    libc::AF_UNIX as u64,
    libc::AF_INET as u64,
    libc::AF_INET6 as u64,
    libc::AF_NETLINK as u64,
];

/// Terminal ioctls refused: TIOCSTI pushes input into a terminal (a process inside `sudo` or
/// `su` could type into the shell that started it); TIOCLINUX talks to the host console.
const IOCTLS: [u64; 2] = [libc::TIOCSTI, 0x541C /* TIOCLINUX */];

/// personality(2) flags refused: they weaken exploit mitigations (executable heap, legacy
/// mmap layout, a mapped page 0). `ADDR_NO_RANDOMIZE` stays allowed for debuggers.
const PERSONALITY_FLAGS: [u64; 3] = [
    0x0400000, // READ_IMPLIES_EXEC
    0x0200000, // ADDR_COMPAT_LAYOUT
    0x0100000, // MMAP_PAGE_ZERO
];

/// Integer arguments are 32-bit in the kernel: compare only the low half, so that garbage
/// in the upper half cannot slip a value past the filter.
fn low32_eq(arg: u32, value: u64) -> ScmpArgCompare {
    ScmpArgCompare::new(arg, ScmpCompareOp::MaskedEqual(0xffff_ffff), value)
}

fn bit_set(arg: u32, bit: u64) -> ScmpArgCompare {
    ScmpArgCompare::new(arg, ScmpCompareOp::MaskedEqual(bit), bit)
}

fn err(e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Unsupported(format!("seccomp filter: {e}"))
}

fn syscall(name: &str) -> Result<ScmpSyscall, RuntimeError> {
    ScmpSyscall::from_name(name).map_err(|e| err(format!("{name}: {e}")))
}

/// Builds the filter; returns it as a BPF program (`struct sock_filter` array).
pub(crate) fn build() -> Result<Vec<libc::sock_filter>, RuntimeError> {
    let eperm = ScmpAction::Errno(libc::EPERM);
    let mut f = ScmpFilterContext::new(ScmpAction::Allow).map_err(err)?;
    f.set_act_badarch(ScmpAction::KillProcess).map_err(err)?;
    for (name, _) in DENY {
        f.add_rule(eperm, syscall(name)?).map_err(err)?;
    }
    // clone3 passes its flags in memory, where a filter cannot look: ENOSYS makes libc fall
    // back to clone(2), whose flags are checked below.
    f.add_rule(ScmpAction::Errno(libc::ENOSYS), syscall("clone3")?)
        .map_err(err)?;
    for (flag, _) in NS_FLAGS {
        f.add_rule_conditional(eperm, syscall("clone")?, &[bit_set(0, flag)])
            .map_err(err)?;
        f.add_rule_conditional(eperm, syscall("unshare")?, &[bit_set(0, flag)])
            .map_err(err)?;
    }
    f.add_rule_conditional(eperm, syscall("unshare")?, &[bit_set(0, CLONE_NEWTIME)])
        .map_err(err)?;
    for name in ["socket", "socketpair"] {
        let sc = syscall(name)?;
        for family in (0..64u64).filter(|f| !SOCKET_FAMILIES.contains(f)) {
            f.add_rule_conditional(eperm, sc, &[low32_eq(0, family)])
                .map_err(err)?;
        }
        // Families ≥ 64: some bit from 6 to 31 is set.
        for bit in 6..32 {
            f.add_rule_conditional(eperm, sc, &[bit_set(0, 1 << bit)])
                .map_err(err)?;
        }
    }
    for request in IOCTLS {
        f.add_rule_conditional(eperm, syscall("ioctl")?, &[low32_eq(1, request)])
            .map_err(err)?;
    }
    for flag in PERSONALITY_FLAGS {
        // Bit 31 excluded: personality(0xffffffff) only queries.
        let mask = flag | 0x8000_0000;
        let cmp = ScmpArgCompare::new(0, ScmpCompareOp::MaskedEqual(mask), flag);
        f.add_rule_conditional(eperm, syscall("personality")?, &[cmp])
            .map_err(err)?;
    }
    export(&f)
}

/// The filter as BPF instructions (libseccomp writes them to a descriptor).
fn export(f: &ScmpFilterContext) -> Result<Vec<libc::sock_filter>, RuntimeError> {
    let fd = rustix::fs::memfd_create("soulbox-seccomp", rustix::fs::MemfdFlags::CLOEXEC)
        .map_err(err)?;
    f.export_bpf(&fd).map_err(err)?;
    let mut file = std::fs::File::from(fd);
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(err)?;
    let size = size_of::<libc::sock_filter>();
    if bytes.is_empty() || bytes.len() % size != 0 || bytes.len() / size > u16::MAX as usize {
        return Err(err(format!("unexpected BPF size {}", bytes.len())));
    }
    Ok(bytes
        .chunks_exact(size)
        .map(|c| libc::sock_filter {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_builds_and_fits() {
        let prog = build().expect("filter");
        // The kernel limit is 4096 instructions per filter.
        assert!(
            prog.len() > DENY.len() && prog.len() < 4096,
            "{}",
            prog.len()
        );
    }
}
