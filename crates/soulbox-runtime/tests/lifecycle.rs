//! Create, destroy, failures, churn, restart adoption and orphan reaping.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use common::*;
use soulbox_runtime::{Limits, Runtime, RuntimeConfig, RuntimeError, SandboxHandle};

fn assert_gone(env: &Env, h: &SandboxHandle, ns: u64) {
    assert!(
        !env.cfg.state_dir.join(&h.id).exists(),
        "state dir left behind"
    );
    for dir in env.rt.cgroup_dirs(&h.id) {
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
    assert!(!pid_exists(h.pid), "PID 1 {} still exists", h.pid);
    assert!(!mnt_ns_in_use(ns), "mount namespace {ns} still in use");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_reclaims_everything_and_is_idempotent() {
    if !can_run() {
        return;
    }
    let env = Env::new("destroy");
    let spec = env.spec(Limits::default());
    let h = env.rt.create(&spec).await.expect("create");
    // A few more processes, some in the background, one ignoring SIGTERM.
    sh(
        &h,
        "sleep 1000 >/dev/null 2>&1 & (trap '' TERM; sleep 1000) >/dev/null 2>&1 & echo started",
    );
    let ns = mnt_ns(h.pid);
    assert!(mnt_ns_in_use(ns));
    env.rt.destroy(&h).await.expect("destroy");
    assert_gone(&env, &h, ns);
    env.rt.destroy(&h).await.expect("second destroy is a no-op");
    tokio::time::timeout(Duration::from_secs(1), env.rt.exited(&h))
        .await
        .expect("exited() resolves at once for a destroyed sandbox");
    assert!(!env.rt.adopt(&h));
    assert!(env.leftover_cgroups().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exited_resolves_when_pid1_dies() {
    if !can_run() {
        return;
    }
    let env = Env::new("exited");
    let h = env
        .rt
        .create(&env.spec(Limits::default()))
        .await
        .expect("create");
    let rt = env.rt.clone();
    let h2 = h.clone();
    let waiter = tokio::spawn(async move { rt.exited(&h2).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "exited() resolved while PID 1 runs");
    // SAFETY: kill(2) on the sandbox's PID 1, which this test created.
    assert_eq!(unsafe { libc::kill(h.pid, libc::SIGKILL) }, 0);
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("exited() resolves after PID 1 dies")
        .expect("task");
    assert!(!pid_exists(h.pid), "PID 1 was not reaped");
    assert!(!env.rt.adopt(&h));
    env.rt.destroy(&h).await.expect("destroy after death");
    assert!(env.leftover_dirs().is_empty());
    assert!(env.leftover_cgroups().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_creates_leave_nothing_behind() {
    if !can_run() {
        return;
    }
    let env = Env::new("fail");

    let mut bad = env.spec(Limits::default());
    bad.id = "../../etc".into();
    assert!(matches!(
        env.rt.create(&bad).await,
        Err(RuntimeError::InvalidId(_))
    ));
    let mut bad = env.spec(Limits::default());
    bad.layers = vec![PathBuf::from("/nonexistent/layer")];
    assert!(matches!(
        env.rt.create(&bad).await,
        Err(RuntimeError::InvalidSpec(_))
    ));
    let mut bad = env.spec(Limits::default());
    bad.limits.memory_mb = 1;
    assert!(matches!(
        env.rt.create(&bad).await,
        Err(RuntimeError::InvalidSpec(_))
    ));

    // A layer without the agent's interpreter: everything is set up, then exec fails in the
    // sandbox's PID 1.
    let empty = tempfile::tempdir().expect("tempdir");
    let mut bad = env.spec(Limits::default());
    bad.layers = vec![empty.path().to_path_buf()];
    match env.rt.create(&bad).await {
        Err(RuntimeError::Init { step, source }) => {
            assert_eq!(step, "exec agent");
            assert_eq!(source.raw_os_error(), Some(libc::ENOENT));
        }
        other => panic!("expected an init failure, got {other:?}"),
    }
    assert!(
        !empty.path().join(".soulbox").exists(),
        "lower layer written"
    );

    // A symlink where the tree needs a directory must not redirect a host mount.
    let evil = tempfile::tempdir().expect("tempdir");
    std::os::unix::fs::symlink("/etc", evil.path().join("dev")).expect("symlink");
    let mut bad = env.spec(Limits::default());
    bad.layers = vec![rootfs(), evil.path().to_path_buf()];
    let err = env.rt.create(&bad).await.expect_err("symlinked /dev");
    assert!(
        err.to_string().contains("/dev"),
        "unexpected error for a symlinked /dev: {err}"
    );

    // The same id twice: the second fails, the first is untouched.
    let spec = env.spec(Limits::default());
    let h = env.rt.create(&spec).await.expect("create");
    assert!(matches!(
        env.rt.create(&spec).await,
        Err(RuntimeError::AlreadyExists(_))
    ));
    assert_eq!(sh(&h, "echo still-here"), "still-here");
    env.rt.destroy(&h).await.expect("destroy");

    assert!(env.leftover_dirs().is_empty(), "{:?}", env.leftover_dirs());
    assert!(
        env.leftover_cgroups().is_empty(),
        "{:?}",
        env.leftover_cgroups()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reap_orphans_removes_only_unknown_sandboxes() {
    if !can_run() {
        return;
    }
    let env = Env::new("reap");
    let keep = env
        .rt
        .create(&env.spec(Limits::default()))
        .await
        .expect("create");
    let orphan = env
        .rt
        .create(&env.spec(Limits::default()))
        .await
        .expect("create");
    let orphan_ns = mnt_ns(orphan.pid);
    sh(&orphan, "sleep 1000 >/dev/null 2>&1 & echo bg");
    // A cgroup without a state dir, as a crash in the middle of a create could leave.
    let stray = new_id();
    let stray_dir = env.rt.cgroup_dirs(&stray).remove(0);
    std::fs::create_dir(&stray_dir).expect("mkdir stray cgroup");

    let reaped = env
        .rt
        .reap_orphans(&HashSet::from([keep.id.clone()]))
        .await
        .expect("reap");
    assert_eq!(reaped, 2);
    assert!(!stray_dir.exists());
    assert!(!env.cfg.state_dir.join(&orphan.id).exists());
    for dir in env.rt.cgroup_dirs(&orphan.id) {
        assert!(!dir.exists());
    }
    // The orphan was killed through its cgroup; it was our child, so reap it here.
    tokio::time::timeout(Duration::from_secs(5), env.rt.exited(&orphan))
        .await
        .expect("orphan's PID 1 gone");
    assert!(!mnt_ns_in_use(orphan_ns));
    assert_eq!(sh(&keep, "echo kept"), "kept");
    assert_eq!(
        env.rt
            .reap_orphans(&HashSet::from([keep.id.clone()]))
            .await
            .expect("reap"),
        0
    );
    env.rt.destroy(&keep).await.expect("destroy");
}

/// Run by `sandbox_survives_its_creator` in a child process: creates a sandbox, writes its
/// handle to `SOULBOX_TEST_HANDLE` and exits without destroying it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process for sandbox_survives_its_creator"]
async fn creator_process() {
    let (Some(state), Some(cgroup), Some(out)) = (
        std::env::var_os("SOULBOX_TEST_STATE"),
        std::env::var("SOULBOX_TEST_CGROUP").ok(),
        std::env::var_os("SOULBOX_TEST_HANDLE"),
    ) else {
        return;
    };
    let rt = Runtime::new(RuntimeConfig {
        state_dir: state.into(),
        agent_binary: agent_py(),
        cgroup_name: cgroup,
    })
    .expect("runtime");
    let spec = soulbox_runtime::SandboxSpec {
        id: new_id(),
        layers: vec![rootfs()],
        limits: Limits::default(),
        volumes: Vec::new(),
    };
    let h = rt.create(&spec).await.expect("create");
    std::fs::write(out, serde_json::to_vec(&h).expect("json")).expect("write handle");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_survives_its_creator_and_is_adopted() {
    if !can_run() {
        return;
    }
    let env = Env::new("adopt");
    let handle_file = env.cfg.state_dir.with_file_name("handle.json");
    let status = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args(["--ignored", "--exact", "creator_process", "--nocapture"])
        .env("SOULBOX_TEST_STATE", &env.cfg.state_dir)
        .env("SOULBOX_TEST_CGROUP", &env.cfg.cgroup_name)
        .env("SOULBOX_TEST_HANDLE", &handle_file)
        .status()
        .expect("run creator");
    assert!(status.success());
    let h: SandboxHandle =
        serde_json::from_slice(&std::fs::read(&handle_file).expect("handle")).expect("json");

    // The creator is gone; the sandbox runs on, reparented, in its own session.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", h.pid)).expect("alive");
    let fields: Vec<&str> = stat[stat.rfind(')').expect("stat") + 2..]
        .split(' ')
        .collect();
    assert_ne!(fields[1], std::process::id().to_string());
    assert_eq!(fields[3], h.pid.to_string(), "PID 1 leads its own session");

    // A new runtime (a restarted server) adopts it and can still use and destroy it.
    let rt = Runtime::new(env.cfg.clone()).expect("runtime");
    assert!(rt.adopt(&h));
    let mut forged = h.clone();
    forged.start_time += 1;
    assert!(
        !rt.adopt(&forged),
        "adopted a process with another start time"
    );
    assert_eq!(sh(&h, "echo adopted"), "adopted");
    // The restarted runtime knows the adopted range is taken.
    let other = rt
        .create(&env.spec(Limits::default()))
        .await
        .expect("create");
    assert_ne!(other.uid_base, h.uid_base);
    let rt2 = rt.clone();
    let h2 = h.clone();
    let waiter = tokio::spawn(async move { rt2.exited(&h2).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiter.is_finished());
    rt.destroy(&h).await.expect("destroy adopted");
    tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("exited() after destroy")
        .expect("task");
    assert!(!rt.adopt(&h));
    rt.destroy(&other).await.expect("destroy");
    assert!(env.leftover_dirs().is_empty());
    assert!(env.leftover_cgroups().is_empty());
}

/// Freeze stops every process without losing one; stop ends them but keeps the files and uid
/// range; resume boots a new PID 1 over those files; destroy removes it all. A resume of an
/// id with no kept state is `NotFound`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freeze_stop_and_resume_keep_the_sandbox() {
    if !can_run() {
        return;
    }
    let env = Env::new("pause");
    let spec = env.spec(Limits::default());
    let h = env.rt.create(&spec).await.expect("create");
    sh(
        &h,
        "echo kept > /root/file; (while :; do date +%s%N > /tmp/tick.new; mv /tmp/tick.new /tmp/tick; sleep 0.01; done) >/dev/null 2>&1 & echo ok",
    );
    // The loop's last tick, read from the host (renamed into place, so never half-written).
    let tick = |h: &SandboxHandle| {
        std::fs::read_to_string(env.cfg.state_dir.join(&h.id).join("upper/tmp/tick"))
            .ok()
            .filter(|t| !t.trim().is_empty())
    };
    // Waits (at most 10 s, the machine may be busy) for a tick other than `not`.
    let next_tick = |h: &SandboxHandle, not: Option<&String>| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match tick(h) {
                Some(t) if Some(&t) != not => return Some(t),
                _ if std::time::Instant::now() > deadline => return None,
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    };
    next_tick(&h, None).expect("the loop never ticked");
    env.rt.freeze(&h, true).await.expect("freeze");
    let frozen_at = next_tick(&h, None).expect("a tick while frozen");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(tick(&h), Some(frozen_at.clone()), "a frozen sandbox ran");
    env.rt.freeze(&h, false).await.expect("thaw");
    assert!(
        next_tick(&h, Some(&frozen_at)).is_some(),
        "a thawed sandbox did not run"
    );
    assert!(env.rt.adopt(&h), "same PID 1 after a freeze");

    env.rt.stop(&h).await.expect("stop");
    assert!(!pid_exists(h.pid), "PID 1 survived a stop");
    for dir in env.rt.cgroup_dirs(&h.id) {
        assert!(!dir.exists(), "cgroup {} left after a stop", dir.display());
    }
    assert!(
        env.rt.has_state(&h.id),
        "a stop removed the state directory"
    );
    env.rt.stop(&h).await.expect("second stop is a no-op");

    let again = env
        .rt
        .resume_with_network(&spec, None)
        .await
        .expect("resume");
    assert_ne!(again.pid, h.pid);
    assert_eq!(again.uid_base, h.uid_base, "a resume keeps the uid range");
    assert_eq!(sh(&again, "cat /root/file").trim(), "kept");
    let ns = mnt_ns(again.pid);
    env.rt.destroy(&again).await.expect("destroy");
    assert_gone(&env, &again, ns);

    match env.rt.resume_with_network(&spec, None).await {
        Err(RuntimeError::NotFound(id)) => assert_eq!(id, spec.id),
        other => panic!("resume of a destroyed sandbox: {other:?}"),
    }
}
