//! Cold create / destroy cost of a sandbox, as latency percentiles.
//!
//! `cargo bench -p soulbox-runtime --bench create [-- N]` (root; N cycles, default 300).
//! The rootfs is `SOULBOX_BENCH_ROOTFS` or `/tmp/rootfs-trial/root`; the agent is a shell
//! script that sleeps, so `create` is measured up to the agent's exec, which is where
//! `Runtime::create` returns. Also reports a burst: 50 sandboxes alive at once, then destroyed.
//! With `SOULBOX_BENCH_BTRFS=1` the state dir is a loop-mounted btrfs (`prepare_state_fs`) and
//! every sandbox gets a 1 GiB disk limit, to measure what the limit costs. With
//! `SOULBOX_BENCH_LXCFS=1` the bench starts its own lxcfs and sandboxes get its `/proc` views
//! (`Runtime::with_lxcfs`), to measure what they cost.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use soulbox_runtime::{
    Limits, Runtime, RuntimeConfig, SandboxSpec, prepare_state_fs, start_lxcfs, stop_lxcfs,
};

fn percentiles(label: &str, mut v: Vec<Duration>) {
    v.sort();
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    println!(
        "{label:<28} n={:<4} p50 {:>8.3} ms  p90 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.3} ms",
        v.len(),
        at(0.50).as_secs_f64() * 1e3,
        at(0.90).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        at(1.0).as_secs_f64() * 1e3,
    );
}

/// User + system time of this process and of its reaped children (the sandboxes' PID 1s),
/// which, unlike latency, does not depend on what else the host is running.
fn cpu_time() -> Duration {
    let mut total = Duration::ZERO;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: getrusage fills the zeroed struct we pass.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::getrusage(who, &mut ru) };
        for tv in [ru.ru_utime, ru.ru_stime] {
            total +=
                Duration::from_secs(tv.tv_sec as u64) + Duration::from_micros(tv.tv_usec as u64);
        }
    }
    total
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        })
        .unwrap_or(0)
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(300);
    let rootfs = std::env::var_os("SOULBOX_BENCH_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/rootfs-trial/root"));
    let dir = tempfile::Builder::new()
        .prefix("sbx-bench-")
        .tempdir()
        .expect("tempdir");
    let agent = dir.path().join("agent");
    std::fs::write(&agent, "#!/bin/sh\nexec sleep infinity\n").expect("agent");
    std::fs::set_permissions(&agent, PermissionsExt::from_mode(0o755)).expect("chmod");
    let cgroup_name = format!("soulbox-bench-{}", std::process::id());
    let state_dir = dir.path().join("sandboxes");
    let btrfs = std::env::var_os("SOULBOX_BENCH_BTRFS").is_some();
    if btrfs {
        prepare_state_fs(&state_dir, &dir.path().join("state.btrfs"), 8192).expect("btrfs");
    }
    let lxcfs = std::env::var_os("SOULBOX_BENCH_LXCFS").map(|_| {
        let mount = dir.path().join("lxcfs");
        start_lxcfs(&mount)
            .expect("start lxcfs")
            .expect("lxcfs installed");
        mount
    });
    let rt = Runtime::with_lxcfs(
        RuntimeConfig {
            state_dir: state_dir.clone(),
            agent_binary: agent,
            cgroup_name,
        },
        lxcfs.as_deref(),
    )
    .expect("Runtime::new (needs root)");
    let tokio = tokio::runtime::Runtime::new().expect("tokio");
    let mut seq = 0u64;
    let mut spec = || {
        seq += 1;
        SandboxSpec {
            id: format!("bench{seq:015}"),
            layers: vec![rootfs.clone()],
            limits: Limits {
                disk_mb: if btrfs { 1024 } else { 0 },
                ..Limits::default()
            },
            volumes: Vec::new(),
        }
    };
    tokio.block_on(async {
        // Warm up page cache and dentries.
        for _ in 0..10 {
            let h = rt.create(&spec()).await.expect("create");
            rt.destroy(&h).await.expect("destroy");
        }
        let (mut create, mut destroy) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let cpu_before = cpu_time();
        for _ in 0..n {
            let s = spec();
            let t = Instant::now();
            let h = rt.create(&s).await.expect("create");
            create.push(t.elapsed());
            let t = Instant::now();
            rt.destroy(&h).await.expect("destroy");
            destroy.push(t.elapsed());
        }
        println!(
            "CPU time per create + destroy (this process + the reaped sandboxes): {:.3} ms",
            (cpu_time() - cpu_before).as_secs_f64() * 1e3 / n as f64
        );
        percentiles("create (sequential)", create);
        percentiles("destroy (sequential)", destroy);

        let (mut create, mut destroy, mut live) = (Vec::new(), Vec::new(), Vec::new());
        let available_before = mem_available_kib();
        for _ in 0..50 {
            let s = spec();
            let t = Instant::now();
            live.push(rt.create(&s).await.expect("create"));
            create.push(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let charged: u64 = live
            .iter()
            .filter_map(|h| {
                rt.cgroup_dirs(&h.id)
                    .iter()
                    .map(|d| d.join("memory.usage_in_bytes"))
                    .chain(rt.cgroup_dirs(&h.id).iter().map(|d| d.join("memory.current")))
                    .find_map(|f| std::fs::read_to_string(f).ok()?.trim().parse::<u64>().ok())
            })
            .sum();
        println!(
            "50 idle sandboxes (sleep agent): memory cgroups charged {} KiB each; host MemAvailable \
             dropped {} KiB each (noisy: other load on the host counts too)",
            charged / 1024 / 50,
            available_before.saturating_sub(mem_available_kib()) / 50
        );
        for h in live {
            let t = Instant::now();
            rt.destroy(&h).await.expect("destroy");
            destroy.push(t.elapsed());
        }
        percentiles("create (50 alive)", create);
        percentiles("destroy (50 alive)", destroy);
    });
    rt.remove_parent_cgroups();
    // The runtime holds the state dir (and lxcfs's files) open; it goes first, or the unmounts
    // find them busy.
    drop(rt);
    if let Some(mount) = lxcfs {
        stop_lxcfs(&mount).expect("stop lxcfs");
    }
    if btrfs {
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(&state_dir)
            .status();
    }
}
