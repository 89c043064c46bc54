//! What a sandbox sees and cannot do: namespaces, id mapping, layers, /dev, limits.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt, chown};
use std::path::Path;

use common::*;
use soulbox_runtime::Limits;

/// A second layer on top of the Debian rootfs: a home owned by uid/gid 1000 (as the templates
/// make it) and a file shadowing one of the lower layer.
fn user_layer() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("sbx-layer-")
        .tempdir()
        .expect("tempdir");
    let home = dir.path().join("home/user");
    std::fs::create_dir_all(&home).expect("mkdir");
    std::fs::write(home.join("hello.txt"), "from layer 2\n").expect("write");
    chown(&home, Some(1000), Some(1000)).expect("chown");
    chown(home.join("hello.txt"), Some(1000), Some(1000)).expect("chown");
    std::fs::create_dir_all(dir.path().join("etc")).expect("mkdir");
    std::fs::write(dir.path().join("etc/issue.net"), "layer 2 wins\n").expect("write");
    for p in ["home", "etc"] {
        std::fs::set_permissions(dir.path().join(p), PermissionsExt::from_mode(0o755))
            .expect("chmod");
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_view_and_privileges() {
    if !can_run() {
        return;
    }
    let env = Env::new("view");
    let layer2 = user_layer();
    let mut spec = env.spec(Limits::default());
    spec.layers.push(layer2.path().to_path_buf());
    let h = env.rt.create(&spec).await.expect("create");

    // uts + pid namespaces: hostname is the id, the agent is PID 1.
    assert_eq!(sh(&h, "hostname"), spec.id);
    assert_eq!(
        sh(&h, "tr '\\0' ' ' < /proc/1/cmdline"),
        "/usr/bin/python3 /.soulbox/bin/soulbox agent --fd 3 --statfs-fd 4"
    );
    let nprocs: usize = sh(&h, "ls -d /proc/[0-9]* | wc -l").parse().expect("count");
    assert!(nprocs <= 5, "host processes visible? {nprocs} pids");

    // PID 1's environment and descriptors: nothing of the server's.
    assert_eq!(
        sh(&h, "tr '\\0' '\\n' < /proc/1/environ"),
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\nHOME=/root"
    );
    for fd in 0..3 {
        assert_eq!(sh(&h, &format!("readlink /proc/1/fd/{fd}")), "/dev/null");
    }
    assert!(sh(&h, "readlink /proc/1/fd/3").starts_with("socket:"));
    assert_eq!(sh(&h, "readlink /proc/1/fd/4"), "anon_inode:seccomp notify");
    let fds = sh(&h, "for f in /proc/1/fd/*; do readlink $f; done");
    for target in fds.lines() {
        assert!(
            target == "/dev/null"
                || target == "anon_inode:seccomp notify"
                || target.starts_with("socket:")
                || target.starts_with("pipe:"),
            "PID 1 holds an unexpected descriptor: {target}"
        );
    }

    // user namespace: sandbox 0..65536 = host uid_base.., for uids and gids.
    let map = format!("0 {} 65536", h.uid_base);
    let squash = |s: String| s.split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(squash(sh(&h, "cat /proc/self/uid_map")), map);
    assert_eq!(squash(sh(&h, "cat /proc/self/gid_map")), map);
    assert_eq!(sh(&h, "id -u; id -g"), "0\n0");
    assert_eq!(
        exec_as(&h, "id -u; id -g", Some(1000)).stdout.trim(),
        "1000\n1000"
    );
    let st = std::fs::metadata(format!("/proc/{}", h.pid)).expect("stat pid");
    assert_eq!((st.uid(), st.gid()), (h.uid_base, h.uid_base));

    // Layers through idmapped mounts: host 0 and 1000 show as sandbox 0 and 1000; the top
    // layer wins.
    assert_eq!(sh(&h, "stat -c %u:%g /etc/passwd /usr/bin"), "0:0\n0:0");
    assert_eq!(
        sh(&h, "stat -c %u:%g /home/user /home/user/hello.txt"),
        "1000:1000\n1000:1000"
    );
    assert_eq!(sh(&h, "cat /home/user/hello.txt"), "from layer 2");
    assert_eq!(sh(&h, "cat /etc/issue.net"), "layer 2 wins");

    // Writes land in the upper dir only, owned by the mapped ids.
    sh(&h, "echo root-data > /tmp/new && echo x >> /etc/issue.net");
    let out = exec_as(&h, "echo user-data > /home/user/mine", Some(1000));
    assert_eq!(out.code, 0, "{out:?}");
    let upper = env.cfg.state_dir.join(&spec.id).join("upper");
    assert_eq!(
        std::fs::read_to_string(upper.join("tmp/new")).expect("upper"),
        "root-data\n"
    );
    assert_eq!(
        std::fs::metadata(upper.join("tmp/new"))
            .expect("upper")
            .uid(),
        h.uid_base
    );
    assert_eq!(
        std::fs::metadata(upper.join("home/user/mine"))
            .expect("upper")
            .uid(),
        h.uid_base + 1000
    );
    assert!(!rootfs().join("tmp/new").exists());
    assert_eq!(
        std::fs::read_to_string(layer2.path().join("etc/issue.net")).expect("layer"),
        "layer 2 wins\n"
    );
    assert!(!layer2.path().join("home/user/mine").exists());

    // Nothing of the host is visible.
    let marker = tempfile::NamedTempFile::new_in("/tmp").expect("marker");
    let marker = marker.path().display().to_string();
    assert_ne!(exec(&h, &format!("test -e {marker}")).code, 0);
    assert_ne!(exec(&h, "test -e /work").code, 0);
    assert_eq!(
        sh(&h, "ls /sys/class/net"),
        "lo",
        "sysfs of the own network namespace"
    );
    let mountinfo = sh(&h, "cat /proc/self/mountinfo");
    let state_dir = env.cfg.state_dir.display().to_string();
    assert!(
        !mountinfo.contains(&state_dir),
        "host state dir leaks into mountinfo:\n{mountinfo}"
    );
    assert_eq!(sh(&h, "grep -c : /proc/net/dev"), "1", "only lo");

    // Sandbox root cannot mount, rename the host, or reconfigure the network.
    for cmd in [
        "mount -t tmpfs none /mnt",
        "umount /proc",
        "mount --bind /tmp /mnt",
        "hostname evil",
        "echo evil > /proc/sys/kernel/hostname",
        "echo 1 > /proc/sys/net/ipv4/ip_forward",
    ] {
        let out = exec(&h, cmd);
        assert_ne!(out.code, 0, "{cmd:?} succeeded inside the sandbox: {out:?}");
    }
    assert_eq!(sh(&h, "hostname"), spec.id);
    let lo_down = r#"python3 -c '
import fcntl, socket, struct
s = socket.socket()
try:
    fcntl.ioctl(s, 0x8914, struct.pack("16sh", b"lo", 0))
    print("changed")
except PermissionError:
    print("EPERM")'"#;
    assert_eq!(sh(&h, lo_down), "EPERM");

    // Loopback is up and usable.
    let echo = r#"python3 -c '
import socket
srv = socket.create_server(("127.0.0.1", 0))
c = socket.create_connection(srv.getsockname())
a, _ = srv.accept()
c.sendall(b"ping")
print(a.recv(4).decode())'"#;
    assert_eq!(sh(&h, echo), "ping");
    // Low ports and ICMP echo work without privileges on the host (own namespace only).
    let low_port_and_ping = r#"python3 -c '
import socket
s = socket.socket()
s.bind(("127.0.0.1", 80))
i = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
i.sendto(b"\x08\x00\x00\x00\x00\x01\x00\x01", ("127.0.0.1", 0))
print(i.recv(64)[0])'"#;
    assert_eq!(
        exec_as(&h, low_port_and_ping, Some(1000)).stdout.trim(),
        "0"
    );

    // /dev: the usual nodes work, ptys come from a private devpts with the tty group.
    sh(
        &h,
        "echo x > /dev/null && test $(head -c 16 /dev/urandom | wc -c) = 16",
    );
    assert_eq!(
        sh(&h, "ls /dev | tr '\\n' ' '"),
        "fd full null ptmx pts random shm stderr stdin stdout tty urandom zero"
    );
    let pty = r#"python3 -c '
import os
m, s = os.openpty()
st = os.fstat(s)
print(os.ttyname(s), st.st_uid, st.st_gid, oct(st.st_mode & 0o777))'"#;
    assert_eq!(
        exec_as(&h, pty, Some(1000)).stdout.trim(),
        "/dev/pts/0 1000 5 0o620"
    );
    let out = exec_as(&h, "echo hi > /dev/shm/x && cat /dev/shm/x", Some(1000));
    assert_eq!(out.stdout.trim(), "hi", "{out:?}");

    // cgroup namespace: the sandbox sees its own group as the root.
    for line in sh(&h, "cat /proc/self/cgroup").lines() {
        assert!(line.ends_with(":/"), "cgroup path leaks: {line}");
    }

    env.rt.destroy(&h).await.expect("destroy");
}

/// The cgroup directory of `h` in the hierarchy that has `file`.
fn group_with(env: &Env, id: &str, file: &str) -> std::path::PathBuf {
    env.rt
        .cgroup_dirs(id)
        .into_iter()
        .find(|d| d.join(file).exists())
        .unwrap_or_else(|| panic!("no group of {id} has {file}"))
}

fn read_trim(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_applied() {
    if !can_run() {
        return;
    }
    let env = Env::new("limits");
    let spec = env.spec(Limits {
        cpu_count: 3,
        memory_mb: 200,
        pids_max: 77,
        ..Limits::default()
    });
    let h = env.rt.create(&spec).await.expect("create");
    let cpu = env
        .rt
        .cgroup_dirs(&spec.id)
        .into_iter()
        .find(|d| d.join("cpu.cfs_quota_us").exists() || d.join("cpu.max").exists())
        .expect("cpu group");
    let quota = if cpu.join("cpu.max").exists() {
        read_trim(&cpu.join("cpu.max"))
    } else {
        format!(
            "{} {}",
            read_trim(&cpu.join("cpu.cfs_quota_us")),
            read_trim(&cpu.join("cpu.cfs_period_us"))
        )
    };
    assert_eq!(quota, "300000 100000");
    let mem = env
        .rt
        .cgroup_dirs(&spec.id)
        .into_iter()
        .find(|d| d.join("memory.limit_in_bytes").exists() || d.join("memory.max").exists())
        .expect("memory group");
    let limit = ["memory.limit_in_bytes", "memory.max"]
        .iter()
        .map(|f| mem.join(f))
        .find(|p| p.exists())
        .map(|p| read_trim(&p));
    assert_eq!(limit.as_deref(), Some("209715200"));
    assert_eq!(
        read_trim(&group_with(&env, &spec.id, "pids.max").join("pids.max")),
        "77"
    );
    // PID 1 is in every group, and every group holds only the sandbox.
    for dir in env.rt.cgroup_dirs(&spec.id) {
        let procs = read_trim(&dir.join("cgroup.procs"));
        assert!(
            procs.lines().any(|p| p == h.pid.to_string()),
            "{} lacks PID 1",
            dir.display()
        );
    }
    env.rt.destroy(&h).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_kills_inside_only() {
    if !can_run() {
        return;
    }
    let env = Env::new("oom");
    let spec = env.spec(Limits {
        memory_mb: 64,
        ..Limits::default()
    });
    let h = env.rt.create(&spec).await.expect("create");
    let out = exec(&h, "python3 -c 'b = bytearray(256 << 20); print(len(b))'");
    assert!(
        out.code == 137 || out.code == -9,
        "the 256 MiB allocation was not OOM-killed: {out:?}"
    );
    // The agent (PID 1) and the sandbox live on.
    assert_eq!(sh(&h, "echo alive"), "alive");
    let mem = group_with(&env, &spec.id, "memory.oom_control");
    let oom = read_trim(&mem.join("memory.oom_control"));
    assert!(
        oom.lines()
            .any(|l| l.starts_with("oom_kill ") && l != "oom_kill 0"),
        "no OOM kill recorded in the sandbox's group: {oom}"
    );
    env.rt.destroy(&h).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pids_limit_stops_forks() {
    if !can_run() {
        return;
    }
    let env = Env::new("pids");
    let spec = env.spec(Limits {
        pids_max: 24,
        ..Limits::default()
    });
    let h = env.rt.create(&spec).await.expect("create");
    let forker = r#"python3 -c '
import os, time
kids, err = [], None
try:
    while len(kids) < 200:
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        kids.append(pid)
except OSError as e:
    err = e.errno
for k in kids:
    os.kill(k, 9)
    os.waitpid(k, 0)
print(len(kids), err)'"#;
    let out = sh(&h, forker);
    let mut parts = out.split_whitespace();
    let forked: usize = parts.next().and_then(|n| n.parse().ok()).expect("count");
    assert!(forked < 24, "forked {forked} processes past pids.max=24");
    assert_eq!(parts.next(), Some("11"), "fork should fail with EAGAIN");
    assert_eq!(sh(&h, "echo alive"), "alive");
    env.rt.destroy(&h).await.expect("destroy");
}
