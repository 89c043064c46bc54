"""Pause, resume and snapshots (docs/persistence.md) from the attacker's side.

* Snapshot: the host copies the sandbox's writable layer (as root) into the layer store. The
  sandbox plants symlinks to host files (absolute, relative, through /proc) and a setuid-root
  copy of a shell in it; the copy must keep the links as links (a sandbox made from the
  snapshot reads its own files through them, never the host's), and nothing of the host may
  change.
* Resume by boot: the runtime boots the sandbox again over the layer it owns, and the new
  `/etc/resolv.conf` is written from inside. The sandbox replaces `/etc` entries with symlinks
  to host paths before a filesystem pause; the resume must not write through them.
* A frozen sandbox does not run: a process writing a counter makes no progress while paused.
"""

from __future__ import annotations

import inspect
import time

from e2b import Sandbox

from conftest import record, run


def test_snapshot_copies_links_as_links(sandboxes, plants):
    sbx = sandboxes.make()
    secret_path = str(plants.victim_file)
    setup = run(
        sbx,
        f"ln -s {secret_path} /home/user/abs-link; "
        f"ln -s ../../..{secret_path} /home/user/rel-link; "
        f"ln -s /proc/1/root{secret_path} /home/user/proc-link; "
        "cp /bin/sh /home/user/suid-sh && chmod 4755 /home/user/suid-sh; "
        f"rm -f /etc/resolv.conf && ln -s {secret_path} /etc/resolv.conf; echo done",
        "root",
    )
    problems = [] if "done" in setup.stdout else [f"setup failed: {setup.stderr[-300:]}"]
    snap = sbx.create_snapshot()
    child = sandboxes.make(snap.snapshot_id)
    out = run(
        child,
        "for l in abs-link rel-link proc-link; do cat /home/user/$l 2>&1; echo; done; "
        "readlink /home/user/abs-link; stat -c '%u %a' /home/user/suid-sh",
        "root",
    )
    if plants.secret in out.stdout:
        problems.append("a snapshot link led to the host's file")
    if secret_path not in out.stdout:
        problems.append(f"the link was not copied as a link: {out.stdout[-300:]}")
    # The setuid bit stays (it is sandbox root's own file), owned by sandbox root, not host root.
    if "0 4755" not in out.stdout:
        problems.append(f"setuid file came back as {out.stdout.splitlines()[-1:]}")
    if plants.victim_file.read_text().strip() != plants.secret:
        problems.append("the host file changed")
    record("snapshot of planted links and a setuid file", "root", problems, "links stay links; host unchanged")
    try:
        Sandbox.delete_snapshot(snap.snapshot_id)
    except Exception:
        pass


def test_resume_by_boot_writes_nothing_through_planted_links(sandboxes, plants):
    sbx = sandboxes.make()
    secret_path = str(plants.victim_file)
    run(
        sbx,
        f"rm -f /etc/resolv.conf /etc/hostname; ln -s {secret_path} /etc/resolv.conf; "
        f"ln -s {secret_path} /etc/hostname; mkdir -p /run/e2b; rm -rf /run/e2b; "
        f"ln -s {plants.victim_dir} /run/e2b",
        "root",
    )
    before = sorted(p.name for p in plants.victim_dir.iterdir())
    if "mode" in inspect.signature(sbx._cls_pause).parameters:
        paused = sbx.pause(mode="filesystem")
    else:
        paused = sbx.pause(keep_memory=False)
    problems = [] if paused else ["the pause did not happen"]
    resumed = Sandbox.connect(sbx.sandbox_id)
    alive = run(resumed, "echo alive", "user")
    if plants.victim_file.read_text().strip() != plants.secret:
        problems.append("the host file was written through a planted link")
    after = sorted(p.name for p in plants.victim_dir.iterdir())
    if after != before:
        problems.append(f"files appeared in the host's directory: {set(after) - set(before)}")
    record(
        "resume by boot over planted /etc links",
        "root",
        problems,
        f"resumed ({alive.stdout.strip() or alive.stderr[-100:]}); host unchanged",
    )


def test_a_paused_sandbox_does_not_run(sandboxes):
    sbx = sandboxes.make()
    run(sbx, "(while :; do date +%s%N >> /tmp/ticks; sleep 0.01; done) >/dev/null 2>&1", "user", background=True)
    time.sleep(0.3)
    problems = []
    if sbx.pause() is not True:
        problems.append("the pause did not happen")
    paused_at = time.time_ns()
    time.sleep(1.0)
    resumed_from = time.time_ns()
    resumed = Sandbox.connect(sbx.sandbox_id)
    time.sleep(0.2)
    # The sandbox's realtime clock is the host's (its time namespace moves only monotonic and
    # boot time), so its ticks can be placed against the host's.
    ticks = [int(t) for t in run(resumed, "cat /tmp/ticks", "user").stdout.split()]
    during = [t for t in ticks if paused_at < t < resumed_from]
    after = [t for t in ticks if t >= resumed_from]
    if during:
        problems.append(f"{len(during)} ticks while paused")
    if not after:
        problems.append("the loop did not go on after the resume")
    record("run while paused", "user", problems, f"{len(ticks)} ticks, none in the paused second")
