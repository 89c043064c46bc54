"""Pause and resume through the official SDK: full (memory) and filesystem pauses, connect-resume,
auto-pause on timeout, auto-resume on traffic, a server restart while paused, and bad input."""

from __future__ import annotations

import json
import urllib.request

import pytest
from e2b import NotFoundException, Sandbox, SandboxQuery, SandboxState

from helpers import E2B_VERSION, pause, require, wait_until
from packaging.version import Version

pytestmark = pytest.mark.skipif(
    E2B_VERSION < Version("2.20.0"), reason="pause(mode=...) and lifecycle need e2b >= 2.20"
)


def boot_id(sbx: Sandbox) -> str:
    return sbx.commands.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()


def state_of(sandbox_id: str) -> SandboxState:
    return Sandbox.get_info(sandbox_id).state


def pause_mode(e2e, sandbox_id: str) -> str | None:
    """`pauseMode` of GET /sandboxes/{id} (the SDK's SandboxInfo does not carry it)."""
    req = urllib.request.Request(f"{e2e.api_url}/sandboxes/{sandbox_id}", headers=e2e.api_headers())
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp).get("pauseMode")


def test_full_pause_keeps_processes_memory_and_files(e2e, make_sandbox):
    sbx = make_sandbox(timeout=120)
    sbx.files.write("/home/user/notes.txt", "keep me")
    # A process holding state only in memory: it counts, and prints its count on request.
    counter = sbx.commands.run(
        "python3 -c \"import time,signal,sys\nn=0\nsignal.signal(signal.SIGUSR1, lambda *a: open('/tmp/count','w').write(str(n)))\nopen('/tmp/ready','w').close()\nwhile True:\n  n+=1; time.sleep(0.01)\"",
        background=True,
    )
    # Its handler is in place before the pause (a SIGUSR1 before that would kill it).
    sbx.commands.run("for i in $(seq 200); do [ -e /tmp/ready ] && break; sleep 0.05; done; test -e /tmp/ready")
    before_boot = boot_id(sbx)
    before_end = sbx.get_info().end_at

    assert pause(sbx) is True
    assert state_of(sbx.sandbox_id) == SandboxState.PAUSED
    assert pause_mode(e2e, sbx.sandbox_id) == "full"
    assert not sbx.is_running()
    # Pausing a paused sandbox is not an error: the SDK answers False (409).
    assert pause(sbx) is False
    paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
    assert sbx.sandbox_id in {s.sandbox_id for s in paused}

    resumed = Sandbox.connect(sbx.sandbox_id, timeout=200)
    assert resumed.is_running()
    assert resumed.files.read("/home/user/notes.txt") == "keep me"
    assert counter.pid in {p.pid for p in resumed.commands.list()}, "the background process is gone"
    assert boot_id(resumed) == before_boot, "a full resume must not boot again"
    # The process's memory survived: its count kept growing from where it was.
    resumed.commands.run(
        f"kill -USR1 {counter.pid}; for i in $(seq 100); do [ -s /tmp/count ] && break; sleep 0.05; done",
        user="root",
    )
    assert int(resumed.files.read("/tmp/count")) > 0
    assert resumed.get_info().end_at > before_end
    assert state_of(sbx.sandbox_id) == SandboxState.RUNNING


def test_filesystem_pause_keeps_files_and_boots_again(e2e, make_sandbox):
    sbx = make_sandbox(timeout=120)
    sbx.files.write("/home/user/fs.txt", "on disk")
    sbx.commands.run("sleep 600", background=True)
    before_boot = boot_id(sbx)

    assert pause(sbx, "filesystem") is True
    assert sbx.get_info().state == SandboxState.PAUSED
    assert pause_mode(e2e, sbx.sandbox_id) == "filesystem"

    resumed = Sandbox.connect(sbx.sandbox_id)
    assert resumed.files.read("/home/user/fs.txt") == "on disk"
    assert resumed.commands.run("hostname").stdout.strip() == sbx.sandbox_id
    assert boot_id(resumed) != before_boot, "a filesystem resume boots again"
    assert not any("sleep 600" in " ".join([p.cmd, *p.args]) for p in resumed.commands.list())
    # It still works as a sandbox: writes, commands as the default user.
    assert resumed.commands.run("whoami").stdout.strip() == "user"


def test_connect_to_running_sandbox_never_shortens_its_timeout(make_sandbox):
    sbx = make_sandbox(timeout=600)
    end = sbx.get_info().end_at
    again = Sandbox.connect(sbx.sandbox_id, timeout=30)
    assert again.get_info().end_at == end
    assert state_of(sbx.sandbox_id) == SandboxState.RUNNING


def test_reboot_on_resume_of_a_full_pause(make_sandbox):
    sbx = make_sandbox(timeout=120)
    sbx.files.write("/home/user/r.txt", "r")
    before_boot = boot_id(sbx)
    assert pause(sbx) is True
    resumed = Sandbox.connect(sbx.sandbox_id, on_resume="reboot")
    assert resumed.files.read("/home/user/r.txt") == "r"
    assert boot_id(resumed) != before_boot


def test_auto_pause_on_timeout_then_connect(make_sandbox):
    sbx = make_sandbox(timeout=4, lifecycle={"on_timeout": "pause"})
    sbx.files.write("/home/user/auto.txt", "auto")
    handle = sbx.commands.run("sleep 900", background=True)
    assert wait_until(lambda: state_of(sbx.sandbox_id) == SandboxState.PAUSED, timeout=30), "never auto-paused"
    lifecycle = sbx.get_info().lifecycle
    assert lifecycle is not None and lifecycle["on_timeout"] == "pause", lifecycle
    resumed = Sandbox.connect(sbx.sandbox_id, timeout=120)
    assert resumed.files.read("/home/user/auto.txt") == "auto"
    assert handle.pid in {p.pid for p in resumed.commands.list()}


def test_auto_resume_on_traffic(make_sandbox):
    sbx = make_sandbox(timeout=60, lifecycle={"on_timeout": "pause", "auto_resume": True})
    sbx.files.write("/home/user/wake.txt", "awake")
    assert pause(sbx) is True
    assert state_of(sbx.sandbox_id) == SandboxState.PAUSED
    # Plain envd traffic on the old object wakes it.
    assert sbx.files.read("/home/user/wake.txt") == "awake"
    assert state_of(sbx.sandbox_id) == SandboxState.RUNNING


def test_traffic_does_not_wake_a_sandbox_without_auto_resume(make_sandbox):
    sbx = make_sandbox(timeout=60)
    assert pause(sbx) is True
    assert not sbx.is_running()
    assert state_of(sbx.sandbox_id) == SandboxState.PAUSED


def test_kill_of_a_paused_sandbox_removes_it(e2e, make_sandbox):
    for mode in ("full", "filesystem"):
        sbx = make_sandbox(timeout=60)
        assert pause(sbx, mode) is True
        assert Sandbox.kill(sbx.sandbox_id) is True
        with pytest.raises(NotFoundException):
            Sandbox.get_info(sbx.sandbox_id)
        if e2e.data_dir is not None:
            assert not (e2e.data_dir / "sandboxes" / sbx.sandbox_id).exists(), "its files were kept"


def test_pause_of_unknown_sandbox_is_not_found():
    with pytest.raises(NotFoundException):
        Sandbox.pause("a" * 20)
    with pytest.raises(NotFoundException):
        Sandbox.connect("b" * 20)


def test_paused_sandboxes_survive_a_server_restart(e2e, make_sandbox):
    require(e2e, "SOULBOX_SERVERCTL (a restart hook)", e2e.serverctl is not None)
    full = make_sandbox(timeout=120)
    full.files.write("/home/user/a.txt", "full")
    proc = full.commands.run("sleep 900", background=True)
    fs = make_sandbox(timeout=120)
    fs.files.write("/home/user/b.txt", "fs")
    assert pause(full) is True
    assert pause(fs, "filesystem") is True

    e2e.restart_server()

    assert state_of(full.sandbox_id) == SandboxState.PAUSED
    assert state_of(fs.sandbox_id) == SandboxState.PAUSED
    a = Sandbox.connect(full.sandbox_id)
    assert a.files.read("/home/user/a.txt") == "full"
    assert proc.pid in {p.pid for p in a.commands.list()}
    b = Sandbox.connect(fs.sandbox_id)
    assert b.files.read("/home/user/b.txt") == "fs"


def test_snapshots_make_templates_of_live_sandboxes(make_sandbox, tracker):
    if not hasattr(Sandbox, "delete_snapshot"):
        pytest.skip("this SDK has no delete_snapshot")
    sbx = make_sandbox(timeout=120, envs={"FROM_CREATE": "kept"})
    sbx.files.write("/home/user/snap.txt", "in the snapshot")
    sbx.commands.run("mkdir -p /opt/snap && echo by-root > /opt/snap/f", user="root")
    unnamed = sbx.create_snapshot()
    named = sbx.create_snapshot(name=f"snap-{sbx.sandbox_id}")
    assert named.snapshot_id == f"snap-{sbx.sandbox_id}:default"
    assert named.names == [named.snapshot_id]
    # The source keeps running, unchanged.
    assert sbx.commands.run("cat /home/user/snap.txt").stdout == "in the snapshot"
    listed = [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id).next_items()]
    assert set(listed) == {unnamed.snapshot_id, named.snapshot_id}

    for snap in (unnamed, named):
        child = Sandbox.create(snap.snapshot_id, timeout=60)
        tracker.add(child.sandbox_id)
        assert child.sandbox_id != sbx.sandbox_id
        assert child.files.read("/home/user/snap.txt") == "in the snapshot"
        out = child.commands.run("cat /opt/snap/f; echo $FROM_CREATE; stat -c %U /home/user/snap.txt; hostname")
        assert out.stdout.split() == ["by-root", "kept", "user", child.sandbox_id]
        child.kill()

    # A paused sandbox can be snapshotted too; deleting a snapshot forgets it.
    assert pause(sbx) is True
    paused_snap = Sandbox.create_snapshot(sbx.sandbox_id)
    assert Sandbox.delete_snapshot(paused_snap.snapshot_id) is True
    assert Sandbox.delete_snapshot(unnamed.snapshot_id) is True
    assert Sandbox.delete_snapshot(named.snapshot_id) is True
    assert Sandbox.delete_snapshot(named.snapshot_id) is False
    assert Sandbox.list_snapshots(sandbox_id=sbx.sandbox_id).next_items() == []
    with pytest.raises(NotFoundException):
        Sandbox.create_snapshot("c" * 20)


def test_fork_answers_not_implemented(make_sandbox):
    """Fork copies memory, which needs checkpoints SoulBox cannot take yet (docs/persistence.md)."""
    sbx = make_sandbox(timeout=60)
    with pytest.raises(Exception, match="501"):
        sbx.fork(count=1)
