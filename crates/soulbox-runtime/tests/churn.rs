//! 200 create/destroy cycles (and some failing creates) leak nothing. Its own test binary, so
//! that the process-wide checks (descriptors, zombie children) see no other test's work.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::*;
use soulbox_runtime::{Limits, RuntimeError};

/// A minimal agent: a shell that sleeps (create returns at exec, so its start cost does not
/// matter; it only has to stay alive).
fn sleep_agent(dir: &Path) -> PathBuf {
    let path = dir.join("sleep-agent");
    std::fs::write(&path, "#!/bin/sh\nexec sleep infinity\n").expect("write agent");
    std::fs::set_permissions(&path, PermissionsExt::from_mode(0o755)).expect("chmod");
    path
}

fn open_fds() -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .expect("fds")
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path()).unwrap_or_default();
            format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.display()
            )
        })
        .collect();
    fds.sort();
    fds
}

/// Our children that are zombies (not reaped).
fn zombie_children() -> Vec<String> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 2..];
            let mut f = rest.split(' ');
            let (state, ppid) = (f.next()?, f.next()?);
            (state == "Z" && ppid == me).then(|| e.file_name().to_string_lossy().into_owned())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_200_cycles_leaks_nothing() {
    if !can_run() {
        return;
    }
    let agents = tempfile::tempdir().expect("tempdir");
    let env = Env::with_agent("churn", &sleep_agent(agents.path()));
    let empty = tempfile::tempdir().expect("tempdir");
    // One cycle first, so lazily opened descriptors (tokio's blocking pool) exist already.
    let h = env
        .rt
        .create(&env.spec(Limits::default()))
        .await
        .expect("create");
    env.rt.destroy(&h).await.expect("destroy");
    let fds = open_fds();

    let mut bases = BTreeSet::new();
    let (mut create, mut destroy) = (Vec::new(), Vec::new());
    for i in 0..200 {
        if i % 20 == 0 {
            // A create that fails inside the sandbox's PID 1 (no interpreter for the agent).
            let mut bad = env.spec(Limits::default());
            bad.layers = vec![empty.path().to_path_buf()];
            assert!(matches!(
                env.rt.create(&bad).await,
                Err(RuntimeError::Init { .. })
            ));
        }
        let spec = env.spec(Limits::default());
        let t = Instant::now();
        let h = env.rt.create(&spec).await.expect("create");
        create.push(t.elapsed());
        bases.insert(h.uid_base);
        let ns = mnt_ns(h.pid);
        let t = Instant::now();
        env.rt.destroy(&h).await.expect("destroy");
        destroy.push(t.elapsed());
        assert!(!mnt_ns_in_use(ns), "mounts of {} outlive it", h.id);
        assert!(!pid_exists(h.pid), "PID 1 of {} not reaped", h.id);
    }
    // Concurrent creates and destroys (the server does them from many tasks at once).
    let creates: Vec<_> = (0..16)
        .map(|_| {
            let rt = env.rt.clone();
            let spec = env.spec(Limits::default());
            tokio::spawn(async move { rt.create(&spec).await })
        })
        .collect();
    let mut live = Vec::new();
    for c in creates {
        live.push(c.await.expect("task").expect("concurrent create"));
    }
    let distinct: BTreeSet<u32> = live.iter().map(|h| h.uid_base).collect();
    assert_eq!(
        distinct.len(),
        live.len(),
        "concurrent sandboxes share a uid range"
    );
    let destroys: Vec<_> = live
        .into_iter()
        .map(|h| {
            let rt = env.rt.clone();
            tokio::spawn(async move { rt.destroy(&h).await })
        })
        .collect();
    for d in destroys {
        d.await.expect("task").expect("concurrent destroy");
    }
    create.sort();
    destroy.sort();
    eprintln!(
        "create p50 {:?} p99 {:?}; destroy p50 {:?} p99 {:?} (test profile)",
        create[100], create[198], destroy[100], destroy[198]
    );
    assert!(env.leftover_dirs().is_empty(), "{:?}", env.leftover_dirs());
    assert!(
        env.leftover_cgroups().is_empty(),
        "{:?}",
        env.leftover_cgroups()
    );
    assert!(zombie_children().is_empty(), "{:?}", zombie_children());
    assert_eq!(open_fds(), fds, "descriptors leaked");
    // Freed uid ranges are reused: a leak would show up as 200 distinct ranges. (Other
    // processes on the host take and free slots meanwhile, hence not exactly one.)
    assert!(
        bases.len() < 50,
        "uid ranges not reused: {} distinct",
        bases.len()
    );
}
