//! Pause and resume figures (docs/persistence.md): each pause is the API call; each resume is
//! `connect` until the first command has run, as a client sees it. For a small sandbox and one
//! holding anonymous memory, so that what a pause costs per byte shows.

use std::time::Instant;

use serde_json::json;

use super::{Made, Report, Samples, Target, run_output, run_true};

/// Anonymous memory the "large" sandbox holds (the base template's limit is 512 MiB).
const LARGE_MIB: usize = 384;

/// The four latencies of one pause/resume cycle kind.
#[derive(Default)]
struct Cycle {
    pause_full: Samples,
    resume_full: Samples,
    pause_filesystem: Samples,
    resume_filesystem: Samples,
}

pub(super) async fn pause_resume(target: &Target, runs: usize, report: &mut Report) {
    for (name, mib, n) in [("small", 0, runs), ("large", LARGE_MIB, runs.div_ceil(4))] {
        let cycle = match target.create(600).await {
            Ok(m) => {
                let c = cycles(target, &m, mib, n).await;
                let _ = target.kill(&m.id).await;
                c
            }
            Err(e) => {
                let mut c = Cycle::default();
                c.pause_full.record::<()>(&Err(e), Default::default());
                c
            }
        };
        report.latency(&format!("pause_full_{name}"), &cycle.pause_full);
        report.latency(
            &format!("resume_full_to_first_command_{name}"),
            &cycle.resume_full,
        );
        report.latency(&format!("pause_filesystem_{name}"), &cycle.pause_filesystem);
        report.latency(
            &format!("resume_filesystem_to_first_command_{name}"),
            &cycle.resume_filesystem,
        );
    }
    let (snap, from_snap) = snapshots(target, runs.div_ceil(4)).await;
    report.latency("snapshot_small", &snap);
    report.latency("create_from_snapshot_to_first_command", &from_snap);
    report.set(
        "pause_notes",
        json!({
            "large_anonymous_mib": LARGE_MIB,
            "full_pause": "cgroup freeze + syncfs: no memory is written, so its cost does not grow with memory",
        }),
    );
}

/// `n` full cycles then `n` filesystem cycles on `m`, which first fills `mib` MiB.
async fn cycles(target: &Target, m: &Made, mib: usize, n: usize) -> Cycle {
    let mut c = Cycle::default();
    let hold = |mib: usize| {
        format!(
            "nohup python3 -c 'import time; b = bytearray({mib} << 20); b[::4096] = b\"x\" * ({mib} << 8); time.sleep(86400)' >/dev/null 2>&1 &"
        )
    };
    if mib > 0
        && let Err(e) = run_output(&m.envd, "/bin/sh", &["-c", &hold(mib)]).await
    {
        c.pause_full.record::<()>(&Err(e), Default::default());
        return c;
    }
    for memory in [None, Some(false)] {
        for _ in 0..n {
            let t0 = Instant::now();
            let paused = target
                .rest
                .pause(&m.id, memory)
                .await
                .map_err(anyhow::Error::from);
            let t1 = Instant::now();
            let resumed = match target.rest.connect(&m.id, Some(600), None).await {
                Ok(_) => run_true(&m.envd, true).await,
                Err(e) => Err(e.into()),
            };
            let t2 = Instant::now();
            let (pause, resume) = if memory.is_none() {
                (&mut c.pause_full, &mut c.resume_full)
            } else {
                (&mut c.pause_filesystem, &mut c.resume_filesystem)
            };
            pause.record(&paused, t1 - t0);
            resume.record(&resumed, t2 - t1);
        }
        // A filesystem pause ends the memory holder; it is not started again.
    }
    c
}

/// `n` snapshots of one small sandbox (the API call), and `n` creates → first command from
/// the last of them (a cold create: snapshot templates have no warm pool). Each snapshot is
/// deleted after use.
async fn snapshots(target: &Target, n: usize) -> (Samples, Samples) {
    let (mut snap, mut from) = (Samples::default(), Samples::default());
    let source = match target.create(600).await {
        Ok(m) => m,
        Err(e) => {
            snap.record::<()>(&Err(e), Default::default());
            return (snap, from);
        }
    };
    let _ = run_output(
        &source.envd,
        "/bin/sh",
        &["-c", "echo snap > /home/user/snap.txt"],
    )
    .await;
    for _ in 0..n {
        let t0 = Instant::now();
        let made = target.rest.create_snapshot(&source.id, None).await;
        snap.record(
            &made.as_ref().map_err(|e| anyhow::anyhow!("{e}")),
            t0.elapsed(),
        );
        let Ok(s) = made else { continue };
        let t1 = Instant::now();
        let child = Target {
            template: s.snapshot_id.clone(),
            ..target.clone()
        };
        let ran = match child.create(60).await {
            Ok(m) => {
                let r = run_true(&m.envd, true).await;
                let took = t1.elapsed();
                let _ = target.kill(&m.id).await;
                r.map(|()| took)
            }
            Err(e) => Err(e),
        };
        let took = ran.as_ref().map_or_else(|_| t1.elapsed(), |t| *t);
        from.record(&ran, took);
        let _ = target.rest.delete_snapshot(&s.snapshot_id).await;
    }
    let _ = target.kill(&source.id).await;
    (snap, from)
}
