//! Compiles the sandbox seccomp filter to BPF with libseccomp at build time; `src/seccomp.rs`
//! embeds the result. Building it here keeps libseccomp out of the `soulbox` binary, which is
//! also the agent inside every template (no `libseccomp.so.2` needed there), and the filter is
//! fixed anyway. `docs/threat-model.md` has the table of what it refuses and why; [`DENY`] and
//! the constants below are its source.

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};

/// Syscalls refused with EPERM, and why no sandbox may have them.
const DENY: &[(&str, &str)] = &[
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

/// btrfs ioctls refused (matched on type and number, whatever the size and direction bits):
/// those that make a subvolume or a snapshot. A volume is a btrfs subvolume mounted into the
/// sandbox, and a subvolume made inside it would have a quota group of its own, outside the
/// volume's size limit (`soulbox_runtime::volumes`). Reflinks (FICLONE, 0x94/9) stay allowed.
const BTRFS_IOCTLS: [u64; 4] = [
    0x9401, // BTRFS_IOC_SNAP_CREATE
    0x940e, // BTRFS_IOC_SUBVOL_CREATE
    0x9417, // BTRFS_IOC_SNAP_CREATE_V2
    0x9418, // BTRFS_IOC_SUBVOL_CREATE_V2
];

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

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn syscall(name: &str) -> Result<ScmpSyscall> {
    Ok(ScmpSyscall::from_name(name).map_err(|e| format!("{name}: {e}"))?)
}

/// The filter for the target architecture (only its native ABI passes).
fn filter(arch: ScmpArch) -> Result<ScmpFilterContext> {
    let eperm = ScmpAction::Errno(libc::EPERM);
    let mut f = ScmpFilterContext::new(ScmpAction::Allow)?;
    if ScmpArch::native() != arch {
        f.add_arch(arch)?;
        f.remove_arch(ScmpArch::native())?;
    }
    f.set_act_badarch(ScmpAction::KillProcess)?;
    for (name, _) in DENY {
        f.add_rule(eperm, syscall(name)?)?;
    }
    // clone3 passes its flags in memory, where a filter cannot look: ENOSYS makes libc fall
    // back to clone(2), whose flags are checked below.
    f.add_rule(ScmpAction::Errno(libc::ENOSYS), syscall("clone3")?)?;
    for (flag, _) in NS_FLAGS {
        f.add_rule_conditional(eperm, syscall("clone")?, &[bit_set(0, flag)])?;
        f.add_rule_conditional(eperm, syscall("unshare")?, &[bit_set(0, flag)])?;
    }
    f.add_rule_conditional(eperm, syscall("unshare")?, &[bit_set(0, CLONE_NEWTIME)])?;
    for name in ["socket", "socketpair"] {
        let sc = syscall(name)?;
        for family in (0..64u64).filter(|f| !SOCKET_FAMILIES.contains(f)) {
            f.add_rule_conditional(eperm, sc, &[low32_eq(0, family)])?;
        }
        // Families ≥ 64: some bit from 6 to 31 is set.
        for bit in 6..32 {
            f.add_rule_conditional(eperm, sc, &[bit_set(0, 1 << bit)])?;
        }
    }
    for request in IOCTLS {
        f.add_rule_conditional(eperm, syscall("ioctl")?, &[low32_eq(1, request)])?;
    }
    for request in BTRFS_IOCTLS {
        let cmp = ScmpArgCompare::new(1, ScmpCompareOp::MaskedEqual(0xffff), request);
        f.add_rule_conditional(eperm, syscall("ioctl")?, &[cmp])?;
    }
    // statfs/fstatfs wait for the agent, which answers those on the root with the sandbox's
    // disk quota and lets the rest through (soulbox-agent's statfs.rs); PID 1 loads the filter
    // with a listener and hands it to the agent.
    for name in ["statfs", "fstatfs"] {
        f.add_rule(ScmpAction::Notify, syscall(name)?)?;
    }
    for flag in PERSONALITY_FLAGS {
        // Bit 31 excluded: personality(0xffffffff) only queries.
        let mask = flag | 0x8000_0000;
        let cmp = ScmpArgCompare::new(0, ScmpCompareOp::MaskedEqual(mask), flag);
        f.add_rule_conditional(eperm, syscall("personality")?, &[cmp])?;
    }
    Ok(f)
}

fn main() -> Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
    let arch = match std::env::var("CARGO_CFG_TARGET_ARCH")?.as_str() {
        "x86_64" => ScmpArch::X8664,
        "aarch64" => ScmpArch::Aarch64,
        other => return Err(format!("no seccomp filter for {other}").into()),
    };
    let out = std::path::Path::new(&std::env::var("OUT_DIR")?).join("seccomp.bpf");
    filter(arch)?.export_bpf(std::fs::File::create(&out)?)?;
    Ok(())
}
