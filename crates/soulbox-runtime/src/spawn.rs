//! Starting a sandbox's PID 1.
//!
//! The server is a multi-threaded tokio process, so the child is made the way `posix_spawn`
//! makes one: `clone(CLONE_VM | CLONE_VFORK)` on a separate stack, with every signal blocked.
//! The calling thread sleeps until the child has exec'd, no page tables are copied (a fork of a
//! large server costs more than everything else here), and the child runs only raw system
//! calls on data prepared beforehand: it never allocates, locks, or panics. Everything that
//! needs ordinary code (the mount tree, the user namespace, the cgroups, the socket) is built by
//! the parent before the clone; the child only does what must happen inside the new
//! namespaces, in this order:
//!
//! 1. `setsid` — own session: nothing of the server's terminal or process group reaches it.
//! 2. Reset every signal disposition to default (the server's handlers must not run here);
//!    raise RLIMIT_NOFILE for the setup (the inherited descriptor table can be larger than the
//!    sandbox's limit; step 8 sets that, once nothing more is opened).
//! 3. Move itself into its cgroups (writes `0` to each `cgroup.procs`), then unshare a cgroup
//!    namespace rooted there: limits apply before it runs anything.
//! 4. Hostname = sandbox id; join the pre-made network namespace if one was given; bring `lo` up (one ioctl: no helper process, no netlink); let
//!    sandbox users bind low ports and ping (see [`NET_SYSCTLS`]).
//! 5. Restrict the CPU affinity to the sandbox's CPUs (`crate::views::affinity`), and unshare
//!    a time namespace whose monotonic and boot-time clocks start at 0 now
//!    ([`new_time_namespace`]; PID 1 enters it at exec).
//! 6. Make every inherited mount private, mount `/proc` (it must be mounted from inside the new
//!    pid namespace) with the lxcfs files and the boot id bound over its files, mount a
//!    read-only `/sys` (a fresh sysfs of the sandbox's network namespace, masked, with the
//!    sandbox's own cgroups at `/sys/fs/cgroup`, mounted from inside its cgroup namespace; see
//!    `crate::views`), attach the detached root tree, `pivot_root` into it and detach the old
//!    root: nothing of the host's filesystem stays reachable.
//! 7. Join the sandbox user namespace and become its root (uid/gid 0, no supplementary groups).
//!    The mount, uts, ipc and net namespaces were created by host root before this, so they
//!    belong to the host user namespace and sandbox root has no capability over them. Drop
//!    the bounding set to [`KEPT_CAPS`].
//! 8. stdin/stdout/stderr = `/dev/null` (the host's, opened beforehand), the agent's listening
//!    socket = fd 3, every other descriptor close-on-exec; install the seccomp filter
//!    (`crate::seccomp`) with a user-notification listener, passed on as fd 4 (the agent
//!    answers statfs/fstatfs through it); RLIMIT_NOFILE soft 1024, hard the limit; unblock
//!    signals; exec the agent.
//!
//! No `no_new_privs`: templates give `user` passwordless `sudo`, a setuid binary, and E2B
//! users rely on it. What setuid can reach is sandbox root, which is itself unprivileged on
//! the host, bounded by [`KEPT_CAPS`] and the filter. (Installing the filter without
//! `no_new_privs` is allowed because PID 1 holds CAP_SYS_ADMIN in its user namespace.)
//!
//! There is no `PR_SET_PDEATHSIG`: the sandbox outlives the server. It stays our child, so the
//! runtime reaps it (see `proc::reap`); after a server restart, init does.

use std::convert::Infallible;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, openat, statat};
use rustix::io::Errno;
use rustix::mount::{
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MountPropagationFlags, MoveMountFlags,
    OpenTreeFlags, UnmountFlags, fsconfig_create, fsconfig_set_flag, fsconfig_set_string, fsmount,
    fsopen, mount_change, mount_remount, move_mount, open_tree, unmount,
};
use rustix::process::{chdir, pivot_root, setsid, umask};
use rustix::thread::{
    CapabilitySet, CpuSet, Gid, LinkNameSpaceType, Uid, UnshareFlags, move_into_link_name_space,
    sched_setaffinity, set_thread_groups, set_thread_res_gid, set_thread_res_uid, unshare_unsafe,
};

use crate::RuntimeError;
use crate::cgroup::CgroupView;
use crate::rootfs::Tree;
use crate::sys::{SignalsBlocked, Stack, clone_vm};
use crate::views::{self, Bind};

/// Where the agent is inside every sandbox.
pub(crate) const AGENT_PATH: &CStr = c"/.soulbox/bin/soulbox";
/// The agent's listening socket arrives as this descriptor.
pub(crate) const AGENT_FD: RawFd = 3;
/// Where the agent finds the seccomp listener for statfs/fstatfs (`soulbox agent --statfs-fd`).
pub(crate) const STATFS_FD: RawFd = AGENT_FD + 1;

/// Everything PID 1 needs, prepared by the parent.
pub(crate) struct Plan<'a> {
    /// `cgroup.procs` of each of the sandbox's groups, open for writing.
    pub(crate) cgroup_procs: Vec<OwnedFd>,
    pub(crate) hostname: String,
    pub(crate) tree: Tree,
    /// An empty host directory to attach the root tree on before `pivot_root` (in the child's
    /// private mount namespace only, so every sandbox can use the same one).
    pub(crate) attach_point: CString,
    /// `<attach_point>/boot_id`.
    pub(crate) boot_id_path: CString,
    pub(crate) userns: OwnedFd,
    /// The agent's listening socket (≥ 4, so it survives setting up 0–3).
    pub(crate) listener: OwnedFd,
    /// The host's `/dev/null` (≥ 4).
    pub(crate) devnull: BorrowedFd<'a>,
    pub(crate) argv: Vec<CString>,
    pub(crate) env: Vec<CString>,
    /// Hard RLIMIT_NOFILE.
    pub(crate) nofile: u64,
    /// The seccomp filter (BPF).
    pub(crate) seccomp: &'a [libc::sock_filter],
    /// A pre-made network namespace to join instead of creating one.
    pub(crate) netns: Option<BorrowedFd<'a>>,
    /// The lxcfs files, the boot id and the `/sys/fs/cgroup` tmpfs (`crate::views`).
    pub(crate) mounts: views::Mounts,
    /// The hierarchies to mount at `/sys/fs/cgroup`.
    pub(crate) cgroups: &'a [CgroupView],
    /// PID 1's CPUs, when fewer than the server's.
    pub(crate) cpus: Option<CpuSet>,
}

/// What the child reads: raw descriptors and pointers only, shared with the parent (CLONE_VM).
struct Shared<'a> {
    procs: &'a [RawFd],
    hostname: &'a [u8],
    tree: RawFd,
    proc_dir: RawFd,
    /// Mounts to attach on files of the fresh `/proc` and `/sys`: (relative path, mount).
    proc_binds: &'a [(&'a CStr, RawFd)],
    sys_dir: RawFd,
    sys_binds: &'a [(&'a CStr, RawFd)],
    cgroups: &'a [CgroupView],
    /// -1: none (one cgroup2 hierarchy, mounted at `/sys/fs/cgroup` directly).
    cgroup_tmpfs: RawFd,
    cpus: Option<&'a CpuSet>,
    boot_id: &'a [u8],
    attach_point: &'a CStr,
    /// `<attach_point>/boot_id`.
    boot_id_path: &'a CStr,
    userns: RawFd,
    listener: RawFd,
    devnull: RawFd,
    argv: &'a [*const c_char],
    envp: &'a [*const c_char],
    nofile: u64,
    seccomp: libc::sock_fprog,
    /// -1: none (a fresh namespace was made by clone).
    netns: RawFd,
    /// Set by the child when a step fails: the step's index + 1, and the errno.
    failed_step: AtomicUsize,
    errno: AtomicI32,
}

/// The child's steps, in order; a failure reports the step's name.
mod step {
    pub(super) const SETSID: usize = 0;
    pub(super) const RLIMITS: usize = 1;
    pub(super) const JOIN_CGROUP: usize = 2;
    pub(super) const CGROUP_NS: usize = 3;
    pub(super) const HOSTNAME: usize = 4;
    pub(super) const LOOPBACK: usize = 5;
    pub(super) const AFFINITY: usize = 6;
    pub(super) const TIME_NS: usize = 7;
    pub(super) const PRIVATE_MOUNTS: usize = 8;
    pub(super) const MOUNT_PROC: usize = 9;
    pub(super) const MOUNT_SYS: usize = 10;
    pub(super) const ATTACH_ROOT: usize = 11;
    pub(super) const PIVOT_ROOT: usize = 12;
    pub(super) const JOIN_USERNS: usize = 13;
    pub(super) const BECOME_ROOT: usize = 14;
    pub(super) const DROP_CAPS: usize = 15;
    pub(super) const DESCRIPTORS: usize = 16;
    pub(super) const SECCOMP: usize = 17;
    pub(super) const EXEC: usize = 18;
    pub(super) const NAMES: [&str; 19] = [
        "setsid",
        "set resource limits",
        "join cgroup",
        "unshare cgroup namespace",
        "set hostname",
        "set up the network namespace",
        "set CPU affinity",
        "set up the time namespace",
        "make mounts private",
        "mount /proc",
        "mount /sys",
        "attach root",
        "pivot_root",
        "join user namespace",
        "become sandbox root",
        "drop capabilities",
        "set up descriptors",
        "install seccomp filter",
        "exec agent",
    ];
}

/// Clones the sandbox's PID 1 into new pid, mount, uts, ipc and net namespaces and runs the
/// steps above; returns its host pid once it has exec'd the agent.
pub(crate) fn spawn(plan: &Plan<'_>) -> Result<i32, RuntimeError> {
    let procs: Vec<RawFd> = plan.cgroup_procs.iter().map(|f| f.as_raw_fd()).collect();
    let argv: Vec<*const c_char> = plan
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let envp: Vec<*const c_char> = plan
        .env
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let raw = |binds: &[Bind]| -> Vec<(&CStr, RawFd)> {
        binds.iter().map(|(p, fd)| (*p, fd.as_raw_fd())).collect()
    };
    let proc_binds = raw(&plan.mounts.proc);
    let sys_binds = raw(&plan.mounts.sys);
    let shared = Shared {
        procs: &procs,
        hostname: plan.hostname.as_bytes(),
        tree: plan.tree.root.as_raw_fd(),
        proc_dir: plan.tree.proc_dir.as_raw_fd(),
        proc_binds: &proc_binds,
        sys_dir: plan.tree.sys_dir.as_raw_fd(),
        sys_binds: &sys_binds,
        cgroups: plan.cgroups,
        cgroup_tmpfs: plan
            .mounts
            .cgroup_tmpfs
            .as_ref()
            .map_or(-1, |fd| fd.as_raw_fd()),
        cpus: plan.cpus.as_ref(),
        boot_id: &plan.mounts.boot_id,
        attach_point: &plan.attach_point,
        boot_id_path: &plan.boot_id_path,
        userns: plan.userns.as_raw_fd(),
        listener: plan.listener.as_raw_fd(),
        devnull: plan.devnull.as_raw_fd(),
        argv: &argv,
        envp: &envp,
        nofile: plan.nofile,
        seccomp: libc::sock_fprog {
            // The length was checked against u16::MAX when the filter was built.
            len: plan.seccomp.len() as u16,
            filter: plan.seccomp.as_ptr().cast_mut(),
        },
        netns: plan.netns.map_or(-1, |fd| fd.as_raw_fd()),
        failed_step: AtomicUsize::new(0),
        errno: AtomicI32::new(0),
    };
    let stack = Stack::new(256 * 1024).map_err(|source| RuntimeError::Io {
        context: "map child stack".into(),
        source,
    })?;
    let new_net = if plan.netns.is_some() {
        0
    } else {
        libc::CLONE_NEWNET
    };
    let flags = libc::CLONE_VM
        | libc::CLONE_VFORK
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | new_net
        | libc::SIGCHLD;
    let pid = {
        let _blocked = SignalsBlocked::new();
        // SAFETY: `child` keeps to raw syscalls on `shared` (see its doc); with CLONE_VFORK this
        // thread sleeps until the child has exec'd or exited, so `shared`, the vectors it points
        // into and `stack` all outlive its use of them.
        unsafe {
            clone_vm(
                child,
                &stack,
                flags,
                &shared as *const Shared<'_> as *mut c_void,
            )
        }
    }
    .map_err(|source| RuntimeError::Io {
        context: "clone sandbox init".into(),
        source,
    })?;
    let step = shared.failed_step.load(Ordering::Acquire);
    if step == 0 {
        return Ok(pid);
    }
    // SAFETY: reaps the child that just exited (it failed before exec).
    unsafe {
        while libc::waitpid(pid, std::ptr::null_mut(), 0) < 0
            && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
        {}
    }
    Err(RuntimeError::Init {
        step: step::NAMES.get(step - 1).copied().unwrap_or("?"),
        source: io::Error::from_raw_os_error(shared.errno.load(Ordering::Acquire)),
    })
}

/// Entry point of the cloned child. Only raw syscalls from here on.
extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Shared` that `spawn` passed; the parent sleeps (CLONE_VFORK) and
    // keeps it alive until this child has exec'd or exited.
    let s = unsafe { &*(arg as *const Shared<'_>) };
    let Err((step, errno)) = setup_and_exec(s);
    s.errno.store(errno, Ordering::Release);
    s.failed_step.store(step + 1, Ordering::Release);
    1
}

/// A failed step of the child: its index in [`step::NAMES`] and the raw errno. (Raw, because
/// rustix's `Errno::from_raw_os_error` asserts on odd values, and a panic here is fatal.)
type Failed = (usize, i32);

fn at(step: usize) -> impl Fn(Errno) -> Failed {
    move |e| (step, e.raw_os_error())
}

/// Runs the steps; returns only on failure (a successful exec does not return).
fn setup_and_exec(s: &Shared<'_>) -> Result<Infallible, Failed> {
    let fd = |raw: RawFd| {
        // SAFETY: these descriptors are owned by the parent's `Plan`, which outlives this child
        // (CLONE_VFORK), and this child's copy of the descriptor table holds them too.
        unsafe { BorrowedFd::borrow_raw(raw) }
    };

    setsid().map_err(at(step::SETSID))?;
    reset_signal_handlers();
    // While still host root: raising a hard limit needs CAP_SYS_RESOURCE on the host.
    raise_nofile(s.nofile).map_err(|e| (step::RLIMITS, e))?;

    for &procs in s.procs {
        rustix::io::write(fd(procs), b"0").map_err(at(step::JOIN_CGROUP))?;
    }
    // SAFETY: unsharing only the cgroup namespace touches no state our memory depends on.
    unsafe { unshare_unsafe(UnshareFlags::NEWCGROUP) }.map_err(at(step::CGROUP_NS))?;

    rustix::system::sethostname(s.hostname).map_err(at(step::HOSTNAME))?;
    if s.netns >= 0 {
        // As host root, before joining the user namespace: the namespace stays the host's.
        move_into_link_name_space(fd(s.netns), Some(LinkNameSpaceType::Network))
            .map_err(at(step::LOOPBACK))?;
    }
    loopback_up().map_err(|e| (step::LOOPBACK, e))?;
    for (path, value) in NET_SYSCTLS {
        write_file(path, value).map_err(|e| (step::LOOPBACK, e))?;
    }
    if let Some(cpus) = s.cpus {
        sched_setaffinity(None, cpus).map_err(at(step::AFFINITY))?;
    }
    new_time_namespace().map_err(|e| (step::TIME_NS, e))?;

    mount_change(
        c"/",
        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
    )
    .map_err(at(step::PRIVATE_MOUNTS))?;
    mount_proc(s).map_err(at(step::MOUNT_PROC))?;
    // Still host root, in the sandbox's network and cgroup namespaces: sysfs shows that
    // network namespace, cgroupfs that cgroup namespace's root (the sandbox's own groups).
    mount_sys(s).map_err(at(step::MOUNT_SYS))?;
    move_mount(
        fd(s.tree),
        c"",
        rustix::fs::CWD,
        s.attach_point,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(at(step::ATTACH_ROOT))?;
    chdir(s.attach_point).map_err(at(step::PIVOT_ROOT))?;
    pivot_root(c".", c".").map_err(at(step::PIVOT_ROOT))?;
    unmount(c".", UnmountFlags::DETACH).map_err(at(step::PIVOT_ROOT))?;
    chdir(c"/").map_err(at(step::PIVOT_ROOT))?;

    move_into_link_name_space(fd(s.userns), Some(LinkNameSpaceType::User))
        .map_err(at(step::JOIN_USERNS))?;
    set_thread_groups(&[]).map_err(at(step::BECOME_ROOT))?;
    set_thread_res_gid(Gid::ROOT, Gid::ROOT, Gid::ROOT).map_err(at(step::BECOME_ROOT))?;
    set_thread_res_uid(Uid::ROOT, Uid::ROOT, Uid::ROOT).map_err(at(step::BECOME_ROOT))?;
    drop_capabilities().map_err(|e| (step::DROP_CAPS, e))?;
    umask(Mode::from_raw_mode(0o022));

    for target in 0..3 {
        dup2(s.devnull, target).map_err(|e| (step::DESCRIPTORS, e))?;
    }
    dup2(s.listener, AGENT_FD).map_err(|e| (step::DESCRIPTORS, e))?;
    close_range_cloexec(AGENT_FD + 1).map_err(|e| (step::DESCRIPTORS, e))?;

    // Last: the filter forbids some of the calls above (setns, mount, ...). Its listener is a
    // new descriptor, made while the raised descriptor limit still holds (this child shares
    // the server's table, which may hold more than the sandbox's limit).
    let statfs = install_seccomp(&s.seccomp).map_err(|e| (step::SECCOMP, e))?;
    pass_on(statfs, STATFS_FD).map_err(|e| (step::SECCOMP, e))?;
    final_nofile(s.nofile).map_err(|e| (step::RLIMITS, e))?;
    unblock_signals();
    // SAFETY: argv and envp are NULL-terminated arrays of C strings owned by the parent's plan.
    unsafe {
        libc::execve(AGENT_PATH.as_ptr(), s.argv.as_ptr(), s.envp.as_ptr());
    }
    Err((step::EXEC, last_errno()))
}

/// Capabilities sandbox root keeps (in its own user namespace; it has none on the host):
/// what managing files, users and processes inside needs (package managers, `sudo`, `chown`,
/// debuggers). Everything else leaves the bounding set, so no exec (setuid or not) regains
/// it. Most dropped ones would only act on namespaces the host owns (network, mounts,
/// hostname, IPC) and fail anyway; dropping them also removes CAP_SYS_ADMIN's side doors
/// (e.g. unsharing a mount namespace, which the seccomp filter refuses as well).
pub(crate) const KEPT_CAPS: u64 = CapabilitySet::CHOWN
    .union(CapabilitySet::DAC_OVERRIDE)
    .union(CapabilitySet::DAC_READ_SEARCH)
    .union(CapabilitySet::FOWNER)
    .union(CapabilitySet::FSETID)
    .union(CapabilitySet::KILL)
    .union(CapabilitySet::SETGID)
    .union(CapabilitySet::SETUID)
    .union(CapabilitySet::SETPCAP)
    .union(CapabilitySet::NET_BIND_SERVICE)
    .union(CapabilitySet::SYS_CHROOT)
    .union(CapabilitySet::SYS_PTRACE)
    .union(CapabilitySet::AUDIT_WRITE)
    .union(CapabilitySet::SETFCAP)
    .bits();

/// Drops every capability not in [`KEPT_CAPS`] from the bounding set and clears the ambient
/// set. (Capabilities past the kernel's last one answer EINVAL; that ends the loop.)
fn drop_capabilities() -> Result<(), i32> {
    for cap in 0..64 {
        if KEPT_CAPS & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            match last_errno() {
                libc::EINVAL => break,
                e => return Err(e),
            }
        }
    }
    // SAFETY: as above.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } < 0
    {
        return Err(last_errno());
    }
    Ok(())
}

/// Raises RLIMIT_NOFILE for the setup: soft = hard = the larger of `nofile` and the server's
/// own hard limit. The child's descriptor table is a copy of the server's, which holds more
/// than 1024 descriptors once it runs a few hundred sandboxes, so what the setup opens gets
/// numbers above the sandbox's eventual limit. [`final_nofile`] sets that limit before exec.
/// A server without CAP_SYS_RESOURCE (some container hosts drop it) cannot raise its hard
/// limit, and then only raises the soft one to it.
fn raise_nofile(nofile: u64) -> Result<(), i32> {
    let own = get_nofile()?;
    let hard = nofile.max(own.rlim_max);
    match set_nofile(hard, hard) {
        Err(libc::EPERM) => set_nofile(own.rlim_max, own.rlim_max),
        other => other,
    }
}

/// The sandbox's RLIMIT_NOFILE: hard `nofile` (capped at what [`raise_nofile`] could reach),
/// soft 1024 (what `select`-based code and most distributions expect; programs that want more
/// raise it themselves). Only lowers, so it needs no privilege.
fn final_nofile(nofile: u64) -> Result<(), i32> {
    let hard = nofile.min(get_nofile()?.rlim_max);
    set_nofile(hard.min(1024), hard)
}

fn get_nofile() -> Result<libc::rlimit, i32> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } < 0 {
        return Err(last_errno());
    }
    Ok(lim)
}

fn set_nofile(soft: u64, hard: u64) -> Result<(), i32> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } < 0 {
        return Err(last_errno());
    }
    Ok(())
}

/// Installs the filter with a user-notification listener (for the calls it hands to the agent:
/// statfs and fstatfs) and returns the listener, close-on-exec.
fn install_seccomp(prog: &libc::sock_fprog) -> Result<RawFd, i32> {
    // SAFETY: `prog` points into the runtime's filter, which outlives this child; the kernel
    // copies it. Allowed without no_new_privs: we hold CAP_SYS_ADMIN in our user namespace.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            prog as *const libc::sock_fprog,
        )
    };
    if rc < 0 {
        return Err(last_errno());
    }
    RawFd::try_from(rc).map_err(|_| libc::EBADF)
}

/// Makes `fd` available as `to` across exec (dup2 leaves close-on-exec set when they are the
/// same descriptor).
fn pass_on(fd: RawFd, to: RawFd) -> Result<(), i32> {
    if fd == to {
        // SAFETY: F_SETFD only changes the descriptor's flags.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
            return Err(last_errno());
        }
        return Ok(());
    }
    dup2(fd, to)
}

fn last_errno() -> i32 {
    // SAFETY: reads this thread's errno.
    unsafe { *libc::__errno_location() }
}

fn reset_signal_handlers() {
    for sig in 1..=libc::SIGRTMAX() {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: sets a default disposition; failures (reserved signals) are harmless.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

fn unblock_signals() {
    // SAFETY: an empty sigset; sigprocmask on this (single-threaded) child.
    unsafe {
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
    }
}

fn dup2(from: RawFd, to: RawFd) -> Result<(), i32> {
    // SAFETY: plain dup2 on descriptors of this process; it clears close-on-exec on `to`.
    if unsafe { libc::dup2(from, to) } < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

fn close_range_cloexec(first: RawFd) -> Result<(), i32> {
    // SAFETY: marks descriptors close-on-exec; closes nothing now.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if rc < 0 { Err(last_errno()) } else { Ok(()) }
}

/// Sysctls of the sandbox's own network namespace (written through the host's `/proc` before
/// `pivot_root`; `/proc/sys/net` shows the writer's namespace). Its root owns nothing in that
/// namespace, so without the first it could not bind ports below 1024 (E2B sandboxes serve on
/// 80); the second lets `ping` use ICMP datagram sockets instead of raw sockets (CAP_NET_RAW).
/// Both only concern the sandbox's own namespace; Docker sets the same.
const NET_SYSCTLS: [(&CStr, &[u8]); 2] = [
    (c"/proc/sys/net/ipv4/ip_unprivileged_port_start", b"0"),
    (c"/proc/sys/net/ipv4/ping_group_range", b"0 2147483647"),
];

fn write_file(path: &CStr, value: &[u8]) -> Result<(), i32> {
    // SAFETY: open/write/close on a descriptor we own, with a valid C string and buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(last_errno());
        }
        let n = libc::write(fd, value.as_ptr().cast(), value.len());
        let err = last_errno();
        libc::close(fd);
        if n < 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// `ip link set lo up`, as one ioctl on a throwaway socket.
fn loopback_up() -> Result<(), i32> {
    // SAFETY: socket/ioctl/close on a descriptor we own; `ifr` is a zeroed, valid ifreq.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(last_errno());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo") {
            *dst = *src as c_char;
        }
        ifr.ifr_ifru.ifru_flags = libc::IFF_UP as libc::c_short;
        let rc = libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr);
        let err = last_errno();
        libc::close(sock);
        if rc < 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// Attaches the detached mounts `binds` on paths below the (detached) mount `mnt`.
fn attach_binds(mnt: BorrowedFd<'_>, binds: &[(&CStr, RawFd)]) -> Result<(), Errno> {
    for &(path, raw) in binds {
        // SAFETY: the descriptors are owned by the parent's plan, which outlives this child
        // (CLONE_VFORK), and this child's copy of the descriptor table holds them too.
        let from = unsafe { BorrowedFd::borrow_raw(raw) };
        move_mount(
            from,
            c"",
            mnt,
            path,
            MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )?;
    }
    Ok(())
}

/// Moves the detached mount `mnt` onto `target` (below `dir`, or `dir` itself if empty).
fn attach_at(mnt: BorrowedFd<'_>, dir: BorrowedFd<'_>, target: &CStr) -> Result<(), Errno> {
    let to_empty = if target.is_empty() {
        MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH
    } else {
        MoveMountFlags::empty()
    };
    move_mount(
        mnt,
        c"",
        dir,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH | to_empty,
    )
}

const NOSUID_NODEV_NOEXEC: MountAttrFlags = MountAttrFlags::MOUNT_ATTR_NOSUID
    .union(MountAttrFlags::MOUNT_ATTR_NODEV)
    .union(MountAttrFlags::MOUNT_ATTR_NOEXEC);
const READ_ONLY: MountAttrFlags = NOSUID_NODEV_NOEXEC.union(MountAttrFlags::MOUNT_ATTR_RDONLY);

/// A fresh proc instance for the new pid namespace, with the lxcfs files and the boot id on
/// some of its files, mounted on the tree's `/proc`.
fn mount_proc(s: &Shared<'_>) -> Result<(), Errno> {
    let fs = fsopen(c"proc", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_create(&fs)?;
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, NOSUID_NODEV_NOEXEC)?;
    attach_binds(mnt.as_fd(), s.proc_binds)?;
    let boot_id = boot_id_mount(s)?;
    attach_at(boot_id.as_fd(), mnt.as_fd(), c"sys/kernel/random/boot_id")?;
    // SAFETY: owned by the parent's plan, which outlives this child (CLONE_VFORK).
    attach_at(
        mnt.as_fd(),
        unsafe { BorrowedFd::borrow_raw(s.proc_dir) },
        c"",
    )
}

/// The boot id as a read-only file mount from a tmpfs of its own, so that mountinfo names no
/// host path. The tmpfs is attached for a moment on the attach point (before Linux 6.15 only
/// mounts of our own namespace can be cloned), made read-only and the file cloned from it,
/// then detached again; the clone keeps it.
fn boot_id_mount(s: &Shared<'_>) -> Result<OwnedFd, Errno> {
    let fs = fsopen(c"tmpfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_set_string(&fs, c"size", c"4k")?;
    fsconfig_set_string(&fs, c"nr_inodes", c"4")?;
    fsconfig_create(&fs)?;
    let tmp = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, NOSUID_NODEV_NOEXEC)?;
    let file = openat(
        &tmp,
        c"boot_id",
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o444),
    )?;
    if rustix::io::write(&file, s.boot_id)? != s.boot_id.len() {
        return Err(Errno::IO);
    }
    drop(file);
    attach_at(tmp.as_fd(), rustix::fs::CWD, s.attach_point)?;
    let clone = mount_remount(
        s.attach_point,
        MountFlags::BIND
            | MountFlags::RDONLY
            | MountFlags::NOSUID
            | MountFlags::NODEV
            | MountFlags::NOEXEC,
        c"",
    )
    .and_then(|()| {
        open_tree(
            rustix::fs::CWD,
            s.boot_id_path,
            OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
        )
    });
    unmount(s.attach_point, UnmountFlags::DETACH)?;
    clone
}

/// A read-only fresh sysfs with [`views::SYS_MASKS`] hidden, the lxcfs files bound over its
/// files, and the sandbox's cgroups at `fs/cgroup`, mounted on the tree's `/sys`.
fn mount_sys(s: &Shared<'_>) -> Result<(), Errno> {
    let fs = fsopen(c"sysfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
    fsconfig_create(&fs)?;
    let sys = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, READ_ONLY)?;
    for mask in views::SYS_MASKS {
        match statat(&sys, mask, AtFlags::SYMLINK_NOFOLLOW) {
            Err(Errno::NOENT) => continue,
            other => other?,
        };
        let fs = fsopen(c"tmpfs", FsOpenFlags::FSOPEN_CLOEXEC)?;
        fsconfig_set_string(&fs, c"size", c"4k")?;
        fsconfig_create(&fs)?;
        let empty = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, READ_ONLY)?;
        attach_at(empty.as_fd(), sys.as_fd(), mask)?;
    }
    attach_binds(sys.as_fd(), s.sys_binds)?;
    if s.cgroup_tmpfs >= 0 {
        // SAFETY: owned by the parent's plan, which outlives this child (CLONE_VFORK).
        let tmpfs = unsafe { BorrowedFd::borrow_raw(s.cgroup_tmpfs) };
        for view in s.cgroups {
            attach_at(cgroup_mount(view)?.as_fd(), tmpfs, &view.dir)?;
        }
        attach_at(tmpfs, sys.as_fd(), c"fs/cgroup")?;
    } else if let Some(view) = s.cgroups.first() {
        attach_at(cgroup_mount(view)?.as_fd(), sys.as_fd(), c"fs/cgroup")?;
    }
    // SAFETY: as above.
    attach_at(
        sys.as_fd(),
        unsafe { BorrowedFd::borrow_raw(s.sys_dir) },
        c"",
    )
}

/// A read-only mount of one cgroup hierarchy; made inside the sandbox's cgroup namespace, its
/// root is the sandbox's own group.
fn cgroup_mount(view: &CgroupView) -> Result<OwnedFd, Errno> {
    let fstype = if view.v2 { c"cgroup2" } else { c"cgroup" };
    let fs = fsopen(fstype, FsOpenFlags::FSOPEN_CLOEXEC)?;
    for flag in &view.flags {
        fsconfig_set_flag(&fs, flag.as_c_str())?;
    }
    if let Some(name) = &view.name {
        fsconfig_set_string(&fs, c"name", name.as_c_str())?;
    }
    fsconfig_create(&fs)?;
    fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, READ_ONLY)
}

/// Unshares a time namespace (the caller stays in its own; it enters the new one at exec)
/// whose `CLOCK_MONOTONIC` and `CLOCK_BOOTTIME` read 0 now: `uptime` and `/proc/uptime` start
/// at the sandbox's boot, as in a VM. Done as host root, so the namespace is the host user
/// namespace's and its offsets, frozen once PID 1 is in it, can never change.
fn new_time_namespace() -> Result<(), i32> {
    // SAFETY: unsharing the time namespace only changes which one the next exec enters.
    unsafe { unshare_unsafe(UnshareFlags::NEWTIME) }.map_err(|e| e.raw_os_error())?;
    let mut buf = [0u8; 128];
    let mut len = 0;
    for clock in [libc::CLOCK_MONOTONIC, libc::CLOCK_BOOTTIME] {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec we pass (the vDSO, or one syscall).
        if unsafe { libc::clock_gettime(clock, &mut now) } < 0 {
            return Err(last_errno());
        }
        // The offset is -now, with its nanoseconds in [0, 1e9) as the kernel wants them.
        let (sec, nsec) = if now.tv_nsec == 0 {
            (-now.tv_sec, 0)
        } else {
            (-now.tv_sec - 1, 1_000_000_000 - now.tv_nsec)
        };
        for (value, end) in [(i64::from(clock), b' '), (sec, b' '), (nsec, b'\n')] {
            len += put_decimal(&mut buf[len..], value).ok_or(libc::ENOSPC)?;
            *buf.get_mut(len).ok_or(libc::ENOSPC)? = end;
            len += 1;
        }
    }
    write_file(c"/proc/self/timens_offsets", &buf[..len])
}

/// Writes `value` in decimal at the start of `out`; returns the length, or `None` if it does
/// not fit. (No formatting machinery: this runs in the cloned child.)
fn put_decimal(out: &mut [u8], value: i64) -> Option<usize> {
    let mut digits = [0u8; 20];
    let mut n = value.unsigned_abs();
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let sign = usize::from(value < 0);
    let out = out.get_mut(..sign + count)?;
    if sign == 1 {
        out[0] = b'-';
    }
    for (o, d) in out[sign..].iter_mut().zip(digits[..count].iter().rev()) {
        *o = *d;
    }
    Some(sign + count)
}
