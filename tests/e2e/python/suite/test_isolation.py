"""Ten sandboxes at once: created concurrently, none can see another's files, processes or loopback."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from e2b import Sandbox

from helpers import wait_until

N = 10


@pytest.fixture(scope="module")
def fleet(make_sandbox):
    with ThreadPoolExecutor(max_workers=N) as pool:
        futures = [pool.submit(make_sandbox, metadata={"fleet": str(i)}) for i in range(N)]
        sandboxes = [f.result() for f in futures]
    yield sandboxes
    with ThreadPoolExecutor(max_workers=N) as pool:
        killed = list(pool.map(lambda s: Sandbox.kill(s.sandbox_id), sandboxes))
    assert all(killed)


def _each(fleet, fn):
    """Runs fn on every sandbox concurrently and returns the results in fleet order."""
    with ThreadPoolExecutor(max_workers=N) as pool:
        return list(pool.map(fn, fleet))


def test_ids_are_distinct(fleet):
    assert len({s.sandbox_id for s in fleet}) == N


def test_files_are_private(fleet):
    def plant(sbx):
        sbx.files.write(f"/tmp/marker-{sbx.sandbox_id}", sbx.sandbox_id)
        sbx.files.write(f"/home/user/marker-{sbx.sandbox_id}", sbx.sandbox_id)
        sbx.commands.run(f"echo {sbx.sandbox_id} > /root/marker-{sbx.sandbox_id}", user="root")

    _each(fleet, plant)

    def look(sbx):
        out = sbx.commands.run(
            "ls -1 /tmp /home/user /root 2>/dev/null | grep '^marker-' | sort -u", user="root"
        ).stdout
        return sbx, out.split()

    for sbx, markers in _each(fleet, look):
        assert markers == [f"marker-{sbx.sandbox_id}"], (sbx.sandbox_id, markers)
        for other in fleet:
            if other is not sbx:
                assert not sbx.files.exists(f"/tmp/marker-{other.sandbox_id}")


def test_processes_are_private(fleet):
    def spawn(sbx):
        # A process whose argv names its sandbox; `exec -a` keeps it identifiable in ps.
        sbx.commands.run(f"exec -a proc-marker-{sbx.sandbox_id} sleep 600", background=True)

    _each(fleet, spawn)

    def look(sbx):
        ps = sbx.commands.run("ps aux", user="root").stdout
        proc = sbx.commands.run(
            "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' | grep -o 'proc-marker-[a-z0-9]\\{20\\}' | sort -u",
            user="root",
        ).stdout
        count = sbx.commands.run("ls -d /proc/[0-9]* | wc -l").stdout
        return sbx, ps, proc.split(), int(count)

    for sbx, ps, proc_markers, count in _each(fleet, look):
        assert f"proc-marker-{sbx.sandbox_id}" in ps, ps
        assert proc_markers == [f"proc-marker-{sbx.sandbox_id}"], (sbx.sandbox_id, proc_markers)
        for other in fleet:
            if other is not sbx:
                assert other.sandbox_id not in ps
        # Only the sandbox's own handful of processes exist: no host processes are visible.
        assert "soulbox serve" not in ps
        assert count < 20, ps


def test_hostnames_are_private(fleet):
    names = _each(fleet, lambda s: s.commands.run("hostname").stdout.strip())
    assert names == [s.sandbox_id for s in fleet]


def test_loopback_is_private(fleet):
    server, client = fleet[0], fleet[1]
    server.commands.run("python3 -m http.server 18123 --bind 127.0.0.1", background=True)
    # Reachable inside its own sandbox...
    probe = "curl -s -o /dev/null -w '%{http_code}' --max-time 2 http://127.0.0.1:18123/ || true"
    assert wait_until(lambda: server.commands.run(probe).stdout == "200", timeout=15)
    # ...and not from the next one.
    assert client.commands.run(probe).stdout in ("000", "")
