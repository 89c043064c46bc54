"""Starving the machine: fork bomb, memory bomb, disk and inode fill, /dev/shm fill, descriptor
exhaustion, an output flood nobody reads. Each runs in its own sandbox; the limit must hit
inside that sandbox only, while the API and a canary sandbox keep answering."""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

import pytest
from e2b import CommandExitException, NotEnoughSpaceException, Sandbox

from conftest import SMALL_DISK_MB, SMALL_MEMORY_MB, probe, record, rss_kb, run, sandbox_row


def cgroup_file(sandbox_id: str, controller: str, name: str) -> Path | None:
    """The sandbox's cgroup file on the host (v1 hierarchy, else the v2 one)."""
    for pattern in (f"/sys/fs/cgroup/{controller}/*/{sandbox_id}/{name}", f"/sys/fs/cgroup/*/{sandbox_id}/{name}",
                    f"/sys/fs/cgroup/unified/*/{sandbox_id}/{name}"):
        hits = glob.glob(pattern)
        if hits:
            return Path(hits[0])
    return None


def oom_kills(sandbox_id: str) -> int:
    for name in ("memory.oom_control", "memory.events"):
        f = cgroup_file(sandbox_id, "memory", name)
        if f:
            for line in f.read_text().splitlines():
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    return -1


def processes_of(uid_base: int) -> list[int]:
    """Host pids running as any uid of the sandbox's range."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            uid = int((d / "status").read_text().split("\nUid:\t", 1)[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
        if uid_base <= uid < uid_base + 65536:
            out.append(int(d.name))
    return out


def free_mb(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize >> 20


def test_fork_bomb(sandboxes, env, responsiveness):
    sbx = sandboxes.make()
    row = sandbox_row(env, sbx.sandbox_id)
    pids_max = cgroup_file(sbx.sandbox_id, "pids", "pids.max")
    with responsiveness() as resp:
        sbx.commands.run("bomb() { bomb | bomb & }; bomb", background=True, user="user")
        time.sleep(20)
        current = cgroup_file(sbx.sandbox_id, "pids", "pids.current")
        peak = int(current.read_text()) if current else -1
    problems = resp.problems()
    limit = int(pids_max.read_text()) if pids_max else -1
    if peak < 0 or peak > limit:
        problems.append(f"pids {peak} over the limit {limit}")
    t = time.monotonic()
    sandboxes.kill(sbx)
    kill_s = time.monotonic() - t
    left = processes_of(row["uid_base"])
    if left:
        problems.append(f"{len(left)} processes of the bomb survived the kill")
    record("fork bomb", "user", problems, f"pids peaked at {peak}/{limit}; {resp.summary()}; killed in {kill_s:.2f} s")


def test_memory_bomb(sandboxes, env, small_template, responsiveness):
    """OOM kills inside the sandbox only; the process's end reports the kill; the agent lives."""
    sbx = sandboxes.make(small_template)
    agent_pid = sandbox_row(env, sbx.sandbox_id)["pid"]
    bomb = "python3 -c \"a = []\nwhile True: a.append(bytearray(16 << 20))\""
    with responsiveness() as resp:
        try:
            sbx.commands.run(bomb, user="user", timeout=120)
            end = "exited normally"
        except CommandExitException as e:
            end = f"exit {e.exit_code}, error {e.error!r}"
    problems = resp.problems()
    if "killed" not in end:
        problems.append(f"the bomb's end does not report the kill: {end}")
    kills = oom_kills(sbx.sandbox_id)
    if kills < 1:
        problems.append(f"no OOM kill in the sandbox's cgroup ({kills})")
    if run(sbx, "echo alive").stdout.strip() != "alive":
        problems.append("the agent did not survive")
    if not Path(f"/proc/{agent_pid}").exists():
        problems.append("the agent process is gone")
    record(f"memory bomb ({SMALL_MEMORY_MB} MiB sandbox)", "user", problems,
           f"end event: {end}; cgroup oom_kill={kills}; agent alive; {resp.summary()}")
    sandboxes.kill(sbx)


def test_shm_fill(sandboxes, env, small_template, canary, responsiveness):
    """/dev/shm is tmpfs as large as the memory limit and its pages are charged to the sandbox:
    filling it exhausts that sandbox's memory only."""
    sbx = sandboxes.make(small_template)
    with responsiveness() as resp:
        r = run(sbx, "dd if=/dev/zero of=/dev/shm/fill bs=1M count=1024 2>&1", timeout=120)
    problems = resp.problems()
    if "1073741824 bytes" in (r.stdout or ""):
        problems.append("wrote 1 GiB into /dev/shm of a 256 MiB sandbox")
    if run(canary, "echo alive").stdout.strip() != "alive":
        problems.append("the canary stopped answering")
    record("fill /dev/shm (tmpfs) past the memory limit", "user", problems,
           f"dd exit {r.exit_code} {getattr(r, 'error', None) or ''}: {(r.stdout or '').strip()[:70]}; {resp.summary()}")
    sandboxes.kill(sbx)


@pytest.mark.parametrize("who", ("user", "sudo"))
def test_disk_fill(sandboxes, env, small_template, canary, who):
    sbx = sandboxes.make(small_template)
    before = free_mb(env.data_dir)
    r = run(sbx, "dd if=/dev/zero of=/tmp/fill bs=1M count=1024 conv=fsync 2>&1", who, timeout=300)
    used = before - free_mb(env.data_dir)
    problems = []
    if "Disk quota exceeded" not in r.stdout and "No space left" not in r.stdout:
        problems.append(f"dd did not hit the quota: {r.stdout[-200:]}")
    if used > SMALL_DISK_MB * 3:
        problems.append(f"the host lost {used} MiB for a {SMALL_DISK_MB} MiB sandbox")
    try:
        sbx.files.write("/home/user/upload.bin", os.urandom(4 << 20))
        problems.append("an upload into the full sandbox succeeded")
        upload = "accepted"
    except NotEnoughSpaceException as e:
        upload = f"507 ({e})"[:80]
    try:
        sbx.files.make_dir("/home/user/more/and/more")
        mkdir = "accepted"
    except Exception as e:  # resource_exhausted: the SDK calls it a RateLimitException
        mkdir = f"{type(e).__name__} ({e})"[:70]
    if run(canary, "head -c 8M /dev/urandom > /tmp/canary.bin && echo ok").stdout.strip() != "ok":
        problems.append("the canary could not write")
    record(f"disk fill ({SMALL_DISK_MB} MiB quota) + upload", who, problems,
           f"dd: {r.stdout.strip().splitlines()[0][:70] if r.stdout.strip() else r.stderr[:70]}; upload: {upload}; "
           f"MakeDir: {mkdir}; host used {used} MiB")
    sandboxes.kill(sbx)


def test_inode_fill(sandboxes, env, small_template, canary):
    sbx = sandboxes.make(small_template)
    script = (
        "import os\nos.mkdir('/tmp/many')\nn = 0\ntry:\n    while n < 5000000:\n"
        "        open(f'/tmp/many/{n}', 'w').close(); n += 1\nexcept OSError as e:\n    print(n, e)\n"
    )
    sbx.files.write("/home/user/inodes.py", script)
    r = run(sbx, "python3 /home/user/inodes.py", timeout=900)
    problems = []
    if "Disk quota exceeded" not in r.stdout and "No space left" not in r.stdout:
        problems.append(f"creating files did not hit the quota: {r.stdout[-200:]}")
    if run(canary, "touch /tmp/canary-inode && echo ok").stdout.strip() != "ok":
        problems.append("the canary could not create a file")
    record(f"inode fill ({SMALL_DISK_MB} MiB quota)", "user", problems, f"stopped after: {r.stdout.strip()[:80]}")
    sandboxes.kill(sbx)


@pytest.mark.parametrize("who", ("user", "root"))
def test_fd_exhaustion(attacker, env, who):
    nr_before = int(Path("/proc/sys/fs/file-nr").read_text().split()[0])
    r = probe(attacker, "fd_exhaustion", who)
    problems = [k for k, v in r["steps"].items() if v == "ok"]
    d = r["data"]
    if run(attacker, "echo alive").stdout.strip() != "alive":
        problems.append("the agent stopped answering")
    file_max = int(Path("/proc/sys/fs/file-max").read_text())
    if d["opened"] > file_max // 10:
        problems.append(f"one sandbox held {d['opened']} files, a tenth of the host's file-max")
    record("file-descriptor exhaustion (RLIMIT_NOFILE)", who, problems,
           f"opened {d['opened']} (soft {d['soft']}, hard {d['hard']}) then {d['error']}; host file-nr before {nr_before}")


def test_output_flood_without_reader(sandboxes, env):
    """A background process writing as fast as it can with no client reading: the agent must
    drop or apply back-pressure, not queue it in memory."""
    sbx = sandboxes.make()
    agent_pid = sandbox_row(env, sbx.sandbox_id)["pid"]
    base, server_base = rss_kb(agent_pid), rss_kb(env.server_pid)
    handle = sbx.commands.run("yes escape-flood-escape-flood-escape-flood", background=True, user="user")
    handle.disconnect()
    peak, server_peak = base, server_base
    for _ in range(15):
        time.sleep(1)
        peak, server_peak = max(peak, rss_kb(agent_pid)), max(server_peak, rss_kb(env.server_pid))
    sbx.commands.kill(handle.pid)
    problems = []
    if peak - base > 64 * 1024:
        problems.append(f"agent memory grew by {(peak - base) >> 10} MiB")
    if server_peak - server_base > 64 * 1024:
        problems.append(f"server memory grew by {(server_peak - server_base) >> 10} MiB")
    if run(sbx, "echo alive").stdout.strip() != "alive":
        problems.append("the sandbox stopped answering")
    record("output flood with no reader (15 s of `yes`)", "user", problems,
           f"agent RSS {base >> 10} -> peak {peak >> 10} MiB; server {server_base >> 10} -> {server_peak >> 10} MiB")
    sandboxes.kill(sbx)


def test_sandbox_processes_all_die_with_the_sandbox(sandboxes, env):
    """A process that double-forks, changes session and ignores every catchable signal still
    dies with its sandbox (nothing of it survives on the host)."""
    sbx = sandboxes.make()
    row = sandbox_row(env, sbx.sandbox_id)
    run(sbx, "setsid sh -c 'trap \"\" HUP INT TERM USR1 USR2; (sleep 3600 &) ; sleep 3600' >/dev/null 2>&1 &", "root")
    time.sleep(0.5)
    before = processes_of(row["uid_base"])
    Sandbox.kill(sbx.sandbox_id)
    sandboxes.ids.discard(sbx.sandbox_id)
    left = processes_of(row["uid_base"])
    record("processes that detach and ignore signals outlive their sandbox", "root",
           [f"{len(left)} processes left on the host"] if left else [],
           f"{len(before)} processes before kill, {len(left)} after")
