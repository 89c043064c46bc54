//! Issue 4 hardening: capability bounding set, seccomp filter, RLIMIT_NOFILE, and that
//! `sudo` (setuid inside the user namespace) still works under them.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use soulbox_runtime::Limits;

/// CAP_CHOWN … CAP_SETPCAP (0–8), NET_BIND_SERVICE (10), SYS_CHROOT (18), SYS_PTRACE (19),
/// AUDIT_WRITE (29), SETFCAP (31).
const KEPT_CAPS: &str = "00000000a00c05ff";

/// A layer that gives uid 1000 an account and passwordless sudo, as the E2B templates do.
fn sudo_layer() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("sbx-sudo-")
        .tempdir()
        .expect("tempdir");
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(etc.join("sudoers.d")).expect("mkdir");
    for (file, line) in [
        ("passwd", "user:x:1000:1000::/home/user:/bin/bash\n"),
        ("group", "user:x:1000:\n"),
        ("shadow", "user:*:19000:0:99999:7:::\n"),
    ] {
        let mut text = std::fs::read_to_string(rootfs().join("etc").join(file)).expect("read");
        text.push_str(line);
        std::fs::write(etc.join(file), text).expect("write");
    }
    std::fs::write(
        etc.join("sudoers.d/user"),
        "user ALL=(ALL:ALL) NOPASSWD: ALL\n",
    )
    .expect("write");
    std::fs::set_permissions(etc.join("sudoers.d/user"), PermissionsExt::from_mode(0o440))
        .expect("chmod");
    for d in [&etc, &etc.join("sudoers.d")] {
        std::fs::set_permissions(d, PermissionsExt::from_mode(0o755)).expect("chmod");
    }
    dir
}

/// Runs raw syscalls from Python and prints `name errno` for each (0 = succeeded).
const SYSCALLS: &str = r#"python3 - <<'EOF'
import ctypes, os, pty, socket
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def sc(nr, *args):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return 0 if r >= 0 else ctypes.get_errno()
buf = ctypes.create_string_buffer(256)
m, s = pty.openpty()
ns = os.open("/proc/self/ns/uts", os.O_RDONLY)
print("keyctl", sc(250, 0, -3, 1))                       # KEYCTL_GET_KEYRING_ID session
print("unshare_user", sc(272, 0x10000000))
print("unshare_mnt", sc(272, 0x20000))
print("unshare_user_hibits", sc(272, 0x10000000 | (1 << 40)))
print("clone3", sc(435, 0, 0))
print("setns", sc(308, ns, 0))
print("io_uring_setup", sc(425, 1, ctypes.addressof(buf)))
print("userfaultfd", sc(323, 1))                         # UFFD_USER_MODE_ONLY
print("perf_event_open", sc(298, 0, 0, -1, -1, 0))
print("name_to_handle_at", sc(303, -100, ctypes.addressof(ctypes.create_string_buffer(b"/")), ctypes.addressof(buf), ctypes.addressof(buf), 0))
print("personality_rie", sc(135, 0x0400000))
print("personality_query", sc(135, 0xffffffff))
print("tiocsti", sc(16, s, 0x5412, ctypes.addressof(ctypes.create_string_buffer(b"x"))))
print("tiocsti_hibits", sc(16, s, 0x5412 | (1 << 40), ctypes.addressof(ctypes.create_string_buffer(b"x"))))
print("socket_vsock", sc(41, 40, 1, 0))
print("socket_vsock_hibits", sc(41, 40 | (1 << 40), 1, 0))
print("socket_packet", sc(41, 17, 3, 0))
print("socket_family_99", sc(41, 99, 1, 0))
print("mount", sc(165, 0, 0, 0, 0, 0))
print("fsopen", sc(430, ctypes.addressof(ctypes.create_string_buffer(b"tmpfs")), 0))
print("bpf", sc(321, 0, 0, 0))
print("kexec_load", sc(246, 0, 0, 0, 0))
print("init_module", sc(175, 0, 0, 0))
print("syslog", sc(103, 10, 0, 0))
print("iopl", sc(172, 3))
print("clock_settime", sc(227, 0, ctypes.addressof(buf)))
for fam in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6, socket.AF_NETLINK):
    socket.socket(fam, socket.SOCK_DGRAM).close()
print("allowed_families", 0)
EOF"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syscall_filter_capabilities_and_limits() {
    if !can_run() {
        return;
    }
    let env = Env::new("harden");
    let layer = sudo_layer();
    let mut spec = env.spec(Limits::default());
    spec.layers.push(layer.path().to_path_buf());
    let h = env.rt.create(&spec).await.expect("create");

    let status = sh(
        &h,
        "grep -E '^(Seccomp|NoNewPrivs|CapBnd|CapEff):' /proc/self/status",
    );
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .to_owned()
    };
    assert_eq!(field("Seccomp:"), "2", "no seccomp filter");
    assert_eq!(field("CapBnd:"), KEPT_CAPS);
    assert_eq!(field("CapEff:"), KEPT_CAPS);
    // Decided against no_new_privs (sudo needs setuid); see spawn.rs.
    assert_eq!(field("NoNewPrivs:"), "0");
    let user = exec_as(&h, "grep -E '^Cap(Eff|Bnd):' /proc/self/status", Some(1000));
    assert_eq!(
        user.stdout.split_whitespace().collect::<Vec<_>>(),
        ["CapEff:", "0000000000000000", "CapBnd:", KEPT_CAPS]
    );

    let out = sh(&h, SYSCALLS);
    let results: Vec<(&str, i32)> = out
        .lines()
        .filter_map(|l| {
            let (name, errno) = l.split_once(' ')?;
            Some((name, errno.parse().ok()?))
        })
        .collect();
    let expected = |name: &str| match name {
        "clone3" => libc::ENOSYS,
        "personality_query" | "allowed_families" => 0,
        _ => libc::EPERM,
    };
    assert_eq!(results.len(), 27, "{out}");
    for (name, errno) in &results {
        assert_eq!(*errno, expected(name), "{name}: errno {errno}\n{out}");
    }

    // The i386 ABI (int 0x80) is not allowed at all: the process is killed with SIGSYS.
    let int80 = r#"python3 -c '
import ctypes, mmap
code = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
code.write(b"\xb8\x14\x00\x00\x00\xcd\x80\xc3")  # mov eax, 20 (getpid); int 0x80; ret
fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(code)))
print(fn())'"#;
    let out = exec(&h, int80);
    assert!(
        out.code == 128 + libc::SIGSYS || out.code == -libc::SIGSYS,
        "i386 syscall not killed: {out:?}"
    );

    // RLIMIT_NOFILE: soft 1024, hard the limit (or the server's own hard limit, if lower
    // and it cannot raise it).
    let mut own = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut own) }, 0);
    let hard = Limits::default().open_files;
    let can_raise = std::fs::read_to_string("/proc/self/status")
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 24) != 0);
    let hard = if can_raise {
        hard
    } else {
        hard.min(own.rlim_max)
    };
    assert_eq!(sh(&h, "ulimit -Sn; ulimit -Hn"), format!("1024\n{hard}"));

    // sudo (setuid root inside the user namespace) works for the user, and gives sandbox
    // root with the same reduced capabilities.
    let out = exec_as(
        &h,
        "sudo -n id -u && sudo -n grep CapEff /proc/self/status",
        Some(1000),
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stdout.split_whitespace().collect::<Vec<_>>(),
        ["0", "CapEff:", KEPT_CAPS]
    );

    // Ordinary work is unaffected: processes, ptys, ownership changes, loopback sockets.
    sh(
        &h,
        "touch /tmp/f && chown 1000:1000 /tmp/f && test $(stat -c %u /tmp/f) = 1000 \
         && sh -c 'sleep 0 & wait' && python3 -c 'import pty, subprocess; pty.openpty(); \
         subprocess.run([\"true\"], check=True)'",
    );
    env.rt.destroy(&h).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_files_limit_is_configurable() {
    if !can_run() {
        return;
    }
    let env = Env::new("nofile");
    let spec = env.spec(Limits {
        open_files: 200,
        ..Limits::default()
    });
    let h = env.rt.create(&spec).await.expect("create");
    assert_eq!(sh(&h, "ulimit -Sn; ulimit -Hn"), "200\n200");
    let out = sh(
        &h,
        "python3 -c '
import os
fds = []
try:
    while True:
        fds.append(os.open(\"/dev/null\", os.O_RDONLY))
except OSError as e:
    print(e.errno, len(fds) < 200)'",
    );
    assert_eq!(out, format!("{} True", libc::EMFILE));
    env.rt.destroy(&h).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_holding_many_descriptors_still_creates() {
    // A server with a few hundred sandboxes holds more than 1024 descriptors (netns, pidfds,
    // sockets); the child inherits that table, so its setup must not run under the sandbox's
    // soft limit of 1024 (it failed with EMFILE at 'set up the network namespace').
    if !can_run() {
        return;
    }
    let mut own = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct; setrlimit reads it.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut own), 0);
        own.rlim_cur = own.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &own), 0);
    }
    assert!(
        own.rlim_max >= 2048,
        "hard RLIMIT_NOFILE {} too low",
        own.rlim_max
    );
    let env = Env::new("manyfds");
    let held: Vec<std::fs::File> = (0..1500)
        .map(|_| std::fs::File::open("/dev/null").expect("open /dev/null"))
        .collect();
    let h = env
        .rt
        .create(&env.spec(Limits::default()))
        .await
        .expect("create with 1500 descriptors held");
    assert_eq!(sh(&h, "ulimit -Sn"), "1024");
    drop(held);
    env.rt.destroy(&h).await.expect("destroy");
}
