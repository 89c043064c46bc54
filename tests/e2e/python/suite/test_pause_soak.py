"""Pause/resume soak: many sandboxes at once, and cycles across server restarts, with zero losses.

Short in CI; the issue's sizes on demand:
    SOULBOX_SOAK_PARALLEL=50 SOULBOX_SOAK_CYCLES=20 pytest suite/test_pause_soak.py
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from e2b import Sandbox, SandboxState
from packaging.version import Version

from helpers import E2B_VERSION, pause, require

pytestmark = pytest.mark.skipif(E2B_VERSION < Version("2.20.0"), reason="pause(mode=...) needs e2b >= 2.20")

PARALLEL = int(os.environ.get("SOULBOX_SOAK_PARALLEL", "10"))
CYCLES = int(os.environ.get("SOULBOX_SOAK_CYCLES", "3"))


def check(sbx: Sandbox, tag: str, pid: int | None) -> None:
    assert sbx.files.read("/home/user/soak.txt") == tag
    if pid is not None:
        assert pid in {p.pid for p in sbx.commands.list()}, f"{sbx.sandbox_id}: pid {pid} lost"


def test_many_sandboxes_pause_and_resume_at_once(make_sandbox):
    def one(i: int) -> None:
        sbx = make_sandbox(timeout=300)
        tag = f"{sbx.sandbox_id}-{i}"
        sbx.files.write("/home/user/soak.txt", tag)
        pid = sbx.commands.run("sleep 3600", background=True).pid
        mode = "full" if i % 2 == 0 else "filesystem"
        assert pause(sbx, mode) is True
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=300)
        check(resumed, tag, pid if mode == "full" else None)
        Sandbox.kill(sbx.sandbox_id)

    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        for f in [pool.submit(one, i) for i in range(PARALLEL)]:
            f.result()


def test_pause_restart_resume_cycles(e2e, make_sandbox):
    """Files, a background server process and an in-memory value survive each cycle of
    pause → server restart → resume."""
    require(e2e, "SOULBOX_SERVERCTL (a restart hook)", e2e.serverctl is not None)
    sbx = make_sandbox(timeout=600)
    tag = f"soak-{sbx.sandbox_id}"
    sbx.files.write("/home/user/soak.txt", tag)
    server = sbx.commands.run("python3 -m http.server 8000 --bind 127.0.0.1", background=True)
    # A value that exists only in a process's memory, read back over a pipe on request.
    # Its handler is in place before it writes v0 (a SIGUSR1 before that would kill it), and
    # the cycles start only once v0 is there.
    holder = sbx.commands.run(
        "python3 -c \"import os,time,signal\nv=os.urandom(8).hex()\n"
        "signal.signal(signal.SIGUSR1, lambda *a: open('/tmp/v1','w').write(v))\n"
        "open('/tmp/v0','w').write(v)\nwhile True: time.sleep(1)\"",
        background=True,
    )
    sbx.commands.run("for i in $(seq 200); do [ -s /tmp/v0 ] && break; sleep 0.05; done; test -s /tmp/v0")
    for cycle in range(CYCLES):
        assert pause(sbx) is True, f"cycle {cycle}"
        e2e.restart_server()
        sbx = Sandbox.connect(sbx.sandbox_id, timeout=600)
        check(sbx, tag, server.pid)
        assert holder.pid in {p.pid for p in sbx.commands.list()}
        sbx.commands.run(
            f"rm -f /tmp/v1; kill -USR1 {holder.pid}; for i in $(seq 100); do [ -s /tmp/v1 ] && break; sleep 0.05; done"
        )
        assert sbx.files.read("/tmp/v1") == sbx.files.read("/tmp/v0"), f"cycle {cycle}: memory lost"
        out = sbx.commands.run("python3 -c \"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8000/').status)\"")
        assert out.stdout.strip() == "200", f"cycle {cycle}: the server process does not answer"


def test_server_killed_during_pauses_and_resumes_loses_nothing(e2e, make_sandbox):
    """SIGKILL of the server while pauses and resumes are in flight: afterwards every sandbox
    is running or paused (never gone, never both), its files intact, and it resumes."""
    require(e2e, "SOULBOX_SERVERCTL (a restart hook)", e2e.serverctl is not None)
    boxes = [make_sandbox(timeout=300) for _ in range(PARALLEL)]
    for sbx in boxes:
        sbx.files.write("/home/user/soak.txt", sbx.sandbox_id)
    half = len(boxes) // 2
    for sbx in boxes[:half]:
        assert pause(sbx) is True

    def churn(i: int, sbx: Sandbox) -> None:
        try:
            if i < half:
                Sandbox.connect(sbx.sandbox_id, timeout=300)
            else:
                pause(sbx, "full" if i % 2 else "filesystem")
        except Exception:
            pass  # the server died under it: what counts is the state afterwards

    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        futures = [pool.submit(churn, i, sbx) for i, sbx in enumerate(boxes)]
        e2e.crash_server()
        for f in futures:
            f.result()

    for sbx in boxes:
        state = Sandbox.get_info(sbx.sandbox_id).state
        assert state in (SandboxState.RUNNING, SandboxState.PAUSED), (sbx.sandbox_id, state)
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=300)
        check(resumed, sbx.sandbox_id, None)
        Sandbox.kill(sbx.sandbox_id)
