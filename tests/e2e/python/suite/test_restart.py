"""A restart of `soulbox serve` in the middle: existing sandboxes survive and keep answering."""

from __future__ import annotations

import datetime as dt

from e2b import NotFoundException, Sandbox, SandboxQuery

from helpers import gone_from_api, require, wait_until


def test_sandboxes_survive_a_server_restart(e2e, make_sandbox):
    require(e2e, "SOULBOX_SERVERCTL (a restart hook)", e2e.serverctl is not None)
    survivors = [make_sandbox(metadata={"restart": e2e.run_id}) for _ in range(2)]
    short = make_sandbox(timeout=25, metadata={"restart": e2e.run_id})
    before = {}
    for sbx in survivors:
        sbx.files.write("/home/user/before-restart.txt", f"kept {sbx.sandbox_id}")
        handle = sbx.commands.run("sleep 900", background=True)
        info = sbx.get_info()
        before[sbx.sandbox_id] = (handle.pid, info.end_at)

    e2e.restart_server()

    for sbx in survivors:
        # The same client objects (same access tokens) keep working against the new server process.
        assert sbx.is_running()
        assert sbx.commands.run("echo after").stdout == "after\n"
        assert sbx.files.read("/home/user/before-restart.txt") == f"kept {sbx.sandbox_id}"
        sbx.files.write("/home/user/after-restart.txt", "new")
        assert sbx.commands.run("cat /home/user/after-restart.txt").stdout == "new"
        pid, end_at = before[sbx.sandbox_id]
        assert pid in {p.pid for p in sbx.commands.list()}, "background process lost across restart"
        info = sbx.get_info()
        assert abs((info.end_at - end_at).total_seconds()) < 1, (info.end_at, end_at)
        # Connecting afresh (new token lookup through the API) works too.
        again = Sandbox.connect(sbx.sandbox_id)
        assert again.commands.run("hostname").stdout.strip() == sbx.sandbox_id

    listed = Sandbox.list(query=SandboxQuery(metadata={"restart": e2e.run_id})).next_items()
    assert {s.sandbox_id for s in survivors} <= {s.sandbox_id for s in listed}

    # New sandboxes can be made after the restart, and kill still works on adopted ones.
    fresh = make_sandbox()
    assert fresh.commands.run("echo fresh").stdout == "fresh\n"
    fresh.kill()
    for sbx in survivors:
        assert sbx.kill() is True
        assert not sbx.is_running()

    # Expiry timers of adopted sandboxes are re-armed: the short one still dies on time.
    try:
        remaining = (short.get_info().end_at - dt.datetime.now(dt.UTC)).total_seconds()
    except NotFoundException:
        remaining = 0.0
    assert wait_until(lambda: not short.is_running(), timeout=max(remaining, 0) + 30), "adopted sandbox never expired"
    assert wait_until(lambda: gone_from_api(short.sandbox_id), timeout=10), "API still lists an expired sandbox"
