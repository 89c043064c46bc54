"""Leak check: create/kill churn leaves no mounts, cgroups, processes, dirs or rows behind.

Runs on the host as root, next to the server: it reads /proc, /sys/fs/cgroup, the data dir and the
SQLite database directly. Checks are keyed by the churned sandbox IDs (and, for paths under our own
data dir, by the set of sandboxes the API still lists), so other SoulBox servers on the same
machine cannot make it fail.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from e2b import Sandbox

from helpers import host_pids, read_text, require, wait_until

CYCLES = int(os.environ.get("SOULBOX_LEAK_CYCLES", "200"))
WORKERS = int(os.environ.get("SOULBOX_LEAK_WORKERS", "4"))


def listed_ids() -> set[str]:
    paginator = Sandbox.list()
    ids: set[str] = set()
    while paginator.has_next:
        ids.update(s.sandbox_id for s in paginator.next_items())
    return ids


def pool_members() -> tuple[set[str], int]:
    """Idle warm-pool members (SoulBox's own report; they are never listed) and how many are being made."""
    req = urllib.request.Request(
        os.environ["E2B_API_URL"].rstrip("/") + "/soulbox/pools",
        headers={"X-API-Key": os.environ["E2B_API_KEY"]},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        pools = json.load(resp)
    return {i for p in pools for i in p["idle"]}, sum(p["starting"] for p in pools)


def cycle(run_id: str, i: int, churned: set[str]) -> None:
    sbx = Sandbox.create(timeout=120, metadata={"leak": run_id, "i": str(i)})
    churned.add(sbx.sandbox_id)
    try:
        # Touch every kind of resource: the upper dir, a process, a file the agent writes.
        sbx.files.write("/home/user/churn.txt", str(i))
        assert sbx.commands.run("cat /home/user/churn.txt").stdout == str(i)
    finally:
        assert sbx.kill() is True


def _mentions(text: str | None, ids: set[str]) -> set[str]:
    if not text:
        return set()
    return {i for i in ids if i in text}


def cgroup_dirs(max_depth: int = 4) -> list[Path]:
    """Every cgroup directory down to max_depth, on v1 controllers and the v2 (unified) tree."""
    found: list[Path] = []
    root = Path("/sys/fs/cgroup")
    stack = [(p, 1) for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    while stack:
        path, depth = stack.pop()
        try:
            children = [c for c in path.iterdir() if c.is_dir() and not c.is_symlink()]
        except OSError:
            continue
        for child in children:
            found.append(child)
            if depth < max_depth:
                stack.append((child, depth + 1))
    return found


def db_rows_mentioning(db: Path, ids: set[str]) -> list[str]:
    """Every row of every table whose text mentions one of the IDs (schema-independent)."""
    hits: list[str] = []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in conn.execute(f'SELECT * FROM "{table}"'):
                text = " ".join(str(c) for c in row)
                if _mentions(text, ids):
                    hits.append(f"{table}: {text[:200]}")
    finally:
        conn.close()
    return hits


def state_entries(sandboxes_dir: Path, live: set[str]) -> set[str]:
    """Paths under the per-sandbox state dir, two levels deep, outside live sandboxes' own dirs."""
    entries: set[str] = set()
    if not sandboxes_dir.is_dir():
        return entries
    for top in os.listdir(sandboxes_dir):
        if top in live:
            continue
        entries.add(top)
        sub = sandboxes_dir / top
        if sub.is_dir() and not sub.is_symlink():
            entries.update(f"{top}/{child}" for child in os.listdir(sub))
    return entries


def host_mounts_under(sandboxes_dir: Path) -> set[str]:
    prefix = f"{sandboxes_dir}/"
    lines = (read_text(Path("/proc/self/mountinfo")) or "").splitlines()
    # Without the mount and parent IDs, which change when the same thing is mounted again.
    return {line.split(" ", 3)[-1] for line in lines if prefix in line}


def find_leaks(data: Path, churned: set[str], baseline: dict[str, set[str]]) -> dict[str, list[str]]:
    leaks: dict[str, list[str]] = {}
    # Warm-pool members are the server's, like listed sandboxes; one being made is not settled.
    members, starting = pool_members()
    live = listed_ids() | members
    if starting:
        leaks.setdefault("pool members still being made", []).append(str(starting))

    def add(kind: str, what: str) -> None:
        leaks.setdefault(kind, []).append(what)

    for sid in churned & live:
        add("listed by the API", sid)

    sandboxes_dir = data / "sandboxes"
    for entry in sorted(state_entries(sandboxes_dir, live) - baseline["state"]):
        add(f"entries under {sandboxes_dir}", entry)

    for mount in sorted(host_mounts_under(sandboxes_dir) - baseline["mounts"]):
        sid = mount.split(f"{sandboxes_dir}/", 1)[-1].split("/", 1)[0]
        if sid not in live:
            add("host mounts", mount)
    for line in (read_text(Path("/proc/self/mountinfo")) or "").splitlines():
        if _mentions(line, churned):
            add("host mounts", line)

    for pid in host_pids():
        proc = Path("/proc") / str(pid)
        for what in ("cgroup", "mountinfo", "environ"):
            hit = _mentions(read_text(proc / what), churned)
            if hit:
                cmd = (read_text(proc / "cmdline") or "").replace("\0", " ").strip()
                add("processes", f"pid {pid} ({cmd!r}): {what} mentions {sorted(hit)}")
                break

    for path in cgroup_dirs():
        if _mentions(path.name, churned):
            add("cgroups", str(path))

    db = data / "soulbox.db"
    if db.exists():
        for row in db_rows_mentioning(db, churned):
            add("database rows", row)
    else:
        add("database rows", f"{db} is missing: cannot check")
    return leaks


def test_no_leaks_after_create_kill_churn(e2e):
    require(e2e, "SOULBOX_DATA_DIR", e2e.data_dir is not None)
    require(e2e, "root (to read every process's /proc entries)", os.geteuid() == 0)
    data = e2e.data_dir.resolve()
    # Shared infrastructure the server keeps (e.g. the runtime's attach point) is not a leak.
    live_before = listed_ids() | pool_members()[0]
    baseline = {
        "state": state_entries(data / "sandboxes", live_before),
        "mounts": host_mounts_under(data / "sandboxes"),
    }

    started = time.monotonic()
    errors: list[str] = []
    churned: set[str] = set()

    def one(i: int) -> None:
        try:
            cycle(e2e.run_id, i, churned)
        except Exception as err:
            errors.append(f"cycle {i}: {type(err).__name__}: {err}")

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        list(pool.map(one, range(CYCLES)))
    elapsed = time.monotonic() - started
    print(
        f"{CYCLES} create/write/exec/kill cycles with {WORKERS} workers in {elapsed:.1f}s "
        f"({CYCLES / elapsed:.1f} cycles/s)"
    )
    assert not errors, f"{len(errors)} of {CYCLES} cycles failed:\n" + "\n".join(errors[:20])
    assert len(churned) == CYCLES

    # Kill is allowed to finish reclaiming shortly after it answers.
    wait_until(lambda: not find_leaks(data, churned, baseline), timeout=30, interval=1)
    leaks = find_leaks(data, churned, baseline)
    assert not leaks, "leftovers after churn:\n" + json.dumps(
        {k: v[:20] + ([f"... {len(v) - 20} more"] if len(v) > 20 else []) for k, v in leaks.items()}, indent=2
    )
