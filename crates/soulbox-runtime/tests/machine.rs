//! A sandbox looks like its own machine: its memory, CPUs, cgroup, uptime and boot id, through
//! the runtime's own lxcfs, a read-only /sys and a time namespace.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use soulbox_runtime::{Limits, SandboxHandle, start_lxcfs, stop_lxcfs};

/// An lxcfs of the test's own, stopped (and its mount detached) on drop.
struct Lxcfs {
    mount: PathBuf,
    pid: i32,
    _dir: tempfile::TempDir,
}

impl Lxcfs {
    fn start() -> Option<Lxcfs> {
        let dir = tempfile::Builder::new()
            .prefix("sbx-lxcfs-")
            .tempdir()
            .expect("tempdir");
        let mount = dir.path().join("lxcfs");
        let Some(l) = start_lxcfs(&mount).expect("start lxcfs") else {
            common::skip("lxcfs is not installed");
            return None;
        };
        assert!(!l.reused);
        Some(Lxcfs {
            mount,
            pid: l.pid,
            _dir: dir,
        })
    }
}

impl Drop for Lxcfs {
    fn drop(&mut self) {
        let _ = stop_lxcfs(&self.mount);
    }
}

fn host_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The sandbox's memory limit as its /sys/fs/cgroup shows it (v2, or v1 where the memory
/// controller is a v1 hierarchy).
fn cgroup_memory_limit(h: &SandboxHandle) -> String {
    sh(
        h,
        "cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
    )
}

fn mem_total_kib(h: &SandboxHandle) -> u64 {
    sh(h, "awk '/^MemTotal:/ {print $2}' /proc/meminfo")
        .parse()
        .expect("MemTotal")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_sees_its_own_machine() {
    if !can_run() {
        return;
    }
    let Some(lxcfs) = Lxcfs::start() else { return };
    let env = Env::with_lxcfs("machine", &lxcfs.mount);

    // The default sandbox: 512 MiB, 2 CPUs (capped at the host's).
    let spec = env.spec(Limits::default());
    let h = env.rt.create(&spec).await.expect("create");
    assert_eq!(mem_total_kib(&h), 512 * 1024, "MemTotal");
    assert_eq!(cgroup_memory_limit(&h), "536870912");
    let cpus = 2.min(host_cpus()).to_string();
    assert_eq!(sh(&h, "nproc"), cpus, "nproc");
    assert_eq!(
        sh(&h, "python3 -c 'import os; print(os.cpu_count())'"),
        cpus,
        "os.cpu_count()"
    );
    assert_eq!(sh(&h, "grep -c ^processor /proc/cpuinfo"), cpus);

    // One CPU: nproc, os.cpu_count(), /proc/cpuinfo and /sys/devices/system/cpu/online agree.
    let one = env.spec(Limits {
        cpu_count: 1,
        memory_mb: 200,
        ..Limits::default()
    });
    let h1 = env.rt.create(&one).await.expect("create");
    assert_eq!(mem_total_kib(&h1), 200 * 1024);
    assert_eq!(cgroup_memory_limit(&h1), "209715200");
    assert_eq!(sh(&h1, "nproc"), "1");
    assert_eq!(
        sh(
            &h1,
            "python3 -c 'import os; print(os.cpu_count(), len(os.sched_getaffinity(0)))'"
        ),
        "1 1"
    );
    assert_eq!(sh(&h1, "grep -c ^processor /proc/cpuinfo"), "1");
    assert_eq!(sh(&h1, "grep -c '^cpu[0-9]' /proc/stat"), "1");
    assert_eq!(sh(&h1, "cat /sys/devices/system/cpu/online"), "0");
    assert_eq!(
        sh(&h1, "free -b | awk '/^Mem:/ {print $2}'"),
        (200u64 << 20).to_string()
    );
    // The other views answer too: loadavg (5 fields), swaps (its header), diskstats.
    assert_eq!(sh(&h1, "wc -w < /proc/loadavg"), "5");
    assert!(sh(&h1, "head -1 /proc/swaps").starts_with("Filename"));
    sh(&h1, "cat /proc/diskstats > /dev/null");

    // More CPUs than the host has: capped at the host's.
    let many = env.spec(Limits {
        cpu_count: 64,
        ..Limits::default()
    });
    let hm = env.rt.create(&many).await.expect("create");
    assert_eq!(sh(&hm, "nproc"), host_cpus().to_string());

    // /sys: read-only everywhere, the sandbox's own network interfaces, firmware masked.
    let mounts = sh(
        &h,
        "awk '$5 ~ \"^/sys\" {print $5, $6}' /proc/self/mountinfo",
    );
    assert!(mounts.lines().count() >= 2, "no /sys mounts: {mounts}");
    for line in mounts.lines() {
        let opts = line.split(' ').nth(1).unwrap_or("");
        assert!(
            opts.split(',').any(|o| o == "ro"),
            "a /sys mount is writable: {line}"
        );
    }
    for cmd in [
        "touch /sys/x",
        "echo 1 > /sys/kernel/mm/ksm/run",
        "echo 1073741824 > /sys/fs/cgroup/memory.max",
        "echo 1073741824 > /sys/fs/cgroup/memory/memory.limit_in_bytes",
        "mkdir /sys/fs/cgroup/x",
        "mkdir /sys/fs/cgroup/memory/x",
    ] {
        let out = exec(&h, cmd);
        assert_ne!(out.code, 0, "{cmd:?} succeeded inside the sandbox: {out:?}");
    }
    assert_eq!(cgroup_memory_limit(&h), "536870912");
    assert_eq!(sh(&h, "ls /sys/class/net"), "lo");
    assert_eq!(sh(&h, "ls -A /sys/firmware | wc -l"), "0");
    assert!(
        exec(&h, "test -e /sys/devices/system/cpu/online").code == 0,
        "no /sys/devices/system/cpu/online"
    );

    // Clocks: the sandbox booted a moment ago; lxcfs's /proc/uptime and the time namespace's
    // boot clock agree.
    let clocks = sh(
        &h,
        "python3 -c 'import time; print(open(\"/proc/uptime\").read().split()[0], \
         time.clock_gettime(time.CLOCK_BOOTTIME), time.monotonic())'",
    );
    let clocks: Vec<f64> = clocks
        .split_whitespace()
        .map(|v| v.parse().expect("number"))
        .collect();
    assert!(
        clocks.iter().all(|&c| c < 60.0),
        "uptime not small: {clocks:?}"
    );
    assert!(
        (clocks[0] - clocks[1]).abs() < 2.0,
        "/proc/uptime and CLOCK_BOOTTIME disagree: {clocks:?}"
    );
    let up: f64 = sh(&h, "cut -d' ' -f1 /proc/uptime")
        .parse()
        .expect("uptime");
    assert!(up < 60.0, "uptime {up}");

    // boot_id: fresh per sandbox, none the host's.
    let host_boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot_id");
    let ids: Vec<String> = [&h, &h1, &hm]
        .iter()
        .map(|h| sh(h, "cat /proc/sys/kernel/random/boot_id"))
        .collect();
    for id in &ids {
        assert_eq!(id.len(), 36, "{id:?}");
        assert_ne!(id, host_boot_id.trim());
    }
    assert_ne!(ids[0], ids[1]);
    assert_ne!(ids[1], ids[2]);
    assert_ne!(exec(&h, "echo x > /proc/sys/kernel/random/boot_id").code, 0);
    let mount = sh(
        &h,
        "grep ' /proc/sys/kernel/random/boot_id ' /proc/self/mountinfo",
    );
    assert!(mount.contains(" ro,"), "boot_id is not read-only: {mount}");
    // It is the sandbox's state, kept with it.
    let kept = std::fs::read_to_string(env.cfg.state_dir.join(&spec.id).join("boot_id"))
        .expect("boot_id in the state dir");
    assert_eq!(kept.trim(), ids[0]);

    for h in [h, h1, hm] {
        env.rt.destroy(&h).await.expect("destroy");
    }
    assert!(lxcfs.pid > 0);
}

/// A dead lxcfs makes the views fail at once (ENOTCONN), never hang; sandboxes still start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lxcfs_fails_reads_not_creates() {
    if !can_run() {
        return;
    }
    let Some(lxcfs) = Lxcfs::start() else { return };
    let env = Env::with_lxcfs("deadlxcfs", &lxcfs.mount);
    let before = env
        .rt
        .create(&env.spec(Limits::default()))
        .await
        .expect("create");
    assert_eq!(mem_total_kib(&before), 512 * 1024);

    // SIGKILL: the mount stays, with nobody serving it.
    // SAFETY: kill with a pid and a signal number.
    assert_eq!(unsafe { libc::kill(lxcfs.pid, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{}/stat", lxcfs.pid)).exists()
        && std::fs::read_to_string(format!("/proc/{}/stat", lxcfs.pid))
            .is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(Instant::now() < deadline, "lxcfs did not die");
        std::thread::sleep(Duration::from_millis(20));
    }

    let t = Instant::now();
    let after = env
        .rt
        .create(&env.spec(Limits::default()))
        .await
        .expect("create with dead lxcfs");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "create took {:?}",
        t.elapsed()
    );
    for h in [&before, &after] {
        let t = Instant::now();
        let out = exec(h, "cat /proc/meminfo");
        assert_ne!(out.code, 0, "{out:?}");
        assert!(
            out.stderr.contains("Transport endpoint is not connected"),
            "{out:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(5));
        // The rest of the machine still works.
        assert_eq!(sh(h, "nproc"), 2.min(host_cpus()).to_string());
        assert_eq!(cgroup_memory_limit(h), "536870912");
    }
    for h in [before, after] {
        env.rt.destroy(&h).await.expect("destroy");
    }
}

/// A second start (a restarted server) re-uses the running lxcfs; stopping it detaches the
/// mount and ends the process; a start after that makes a new one.
#[test]
fn lxcfs_is_reused_then_stopped() {
    if !can_run() {
        return;
    }
    let Some(lxcfs) = Lxcfs::start() else { return };
    let sid = |pid: i32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        rest.split(' ').nth(3).map(str::to_owned).expect("session")
    };
    assert_eq!(
        sid(lxcfs.pid),
        lxcfs.pid.to_string(),
        "lxcfs has its own session"
    );
    let again = start_lxcfs(&lxcfs.mount)
        .expect("start")
        .expect("installed");
    assert!(again.reused);
    assert_eq!(again.pid, lxcfs.pid);
    assert_eq!(
        std::fs::read_to_string(soulbox_runtime::lxcfs_pidfile(&lxcfs.mount))
            .expect("pid file")
            .trim(),
        lxcfs.pid.to_string()
    );
    assert!(stop_lxcfs(&lxcfs.mount).expect("stop"));
    let mounted = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounted.contains(&*lxcfs.mount.to_string_lossy()));
    assert!(
        std::fs::read_to_string(format!("/proc/{}/stat", lxcfs.pid))
            .map_or(true, |s| s.contains(") Z ")),
        "lxcfs still runs"
    );
    assert!(!stop_lxcfs(&lxcfs.mount).expect("stop again"));
    let fresh = start_lxcfs(&lxcfs.mount)
        .expect("start")
        .expect("installed");
    assert!(!fresh.reused);
    assert_ne!(fresh.pid, lxcfs.pid);
}

/// The cost of reading `/proc/meminfo` inside a sandbox, through lxcfs and (for comparison)
/// the kernel's own, as p50/p99 of 1000 reads (open, read, close) by one Python process.
/// A measurement, not a check: `cargo test --release -p soulbox-runtime --test machine --
/// --ignored --nocapture meminfo_read_cost` (docs/benchmarks.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn meminfo_read_cost() {
    if !can_run() {
        return;
    }
    let Some(lxcfs) = Lxcfs::start() else { return };
    let reads = r#"python3 -c '
import time
t = []
for _ in range(1100):
    s = time.perf_counter_ns()
    with open("/proc/meminfo", "rb") as f:
        f.read()
    t.append(time.perf_counter_ns() - s)
t = sorted(t[100:])
print(t[len(t) // 2] / 1000, t[len(t) * 99 // 100] / 1000)'"#;
    for (label, env) in [
        ("lxcfs view", Env::with_lxcfs("costlxcfs", &lxcfs.mount)),
        ("kernel /proc/meminfo", Env::new("costkernel")),
    ] {
        let h = env
            .rt
            .create(&env.spec(Limits::default()))
            .await
            .expect("create");
        let out = sh(&h, reads);
        let (p50, p99) = out.split_once(' ').expect("two numbers");
        println!("{label}: p50 {p50} µs, p99 {p99} µs (1000 reads)");
        env.rt.destroy(&h).await.expect("destroy");
    }
}
