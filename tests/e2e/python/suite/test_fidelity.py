"""A sandbox looks like its own machine: the tools code sizes itself with report its limits.

The default `base` sandbox has 512 MiB, 2 CPUs and a 10 GiB disk (templates/base/Dockerfile).
Code written for E2B's small VMs reads these figures (free, nproc, psutil, the JVM, Node) and
sizes caches and worker pools from them; the host's 24 GiB and all its CPUs would make it
allocate far past the limit and die by OOM kill.
"""

from __future__ import annotations

import json

import pytest

MEMORY = 512 * 1024 * 1024
CPUS = 2
DISK = 10240 * 1024 * 1024


def sh(sbx, cmd: str, user: str = "user") -> str:
    return sbx.commands.run(cmd, user=user, timeout=120).stdout


@pytest.fixture(scope="module")
def box(shared_sandbox):
    return shared_sandbox


def test_free_reports_the_memory_limit(box):
    mem = next(line.split() for line in sh(box, "free -b").splitlines() if line.startswith("Mem:"))
    assert int(mem[1]) == MEMORY, mem
    meminfo = dict(line.split(":", 1) for line in sh(box, "cat /proc/meminfo").splitlines())
    assert int(meminfo["MemTotal"].split()[0]) * 1024 == MEMORY, meminfo["MemTotal"]


def test_nproc_and_cpuinfo_report_the_cpu_limit(box):
    assert int(sh(box, "nproc")) == CPUS
    assert int(sh(box, "grep -c ^processor /proc/cpuinfo")) == CPUS
    assert int(sh(box, "python3 -c 'import os; print(os.cpu_count())'")) == CPUS


def test_psutil_sees_the_sandbox(box):
    out = sh(
        box,
        "python3 -c 'import json, os, psutil; "
        'print(json.dumps({"total": psutil.virtual_memory().total, "cpus": psutil.cpu_count(), '
        '"affinity": len(os.sched_getaffinity(0)), "boot": psutil.boot_time()}))\'',
    )
    got = json.loads(out)
    assert got["total"] == MEMORY, got
    assert got["cpus"] == CPUS, got
    assert got["affinity"] == CPUS, got


def test_own_cgroup_limits_under_sys(box):
    v2 = sh(box, "cat /sys/fs/cgroup/memory.max 2>/dev/null || true").strip()
    v1 = sh(box, "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || true").strip()
    assert MEMORY in {int(v) for v in (v2, v1) if v.isdigit()}, (v2, v1)
    online = sh(box, "cat /sys/devices/system/cpu/online").strip()
    assert online == f"0-{CPUS - 1}", online


def test_sys_is_read_only(box):
    r = box.commands.run("touch /sys/fs/cgroup/x 2>&1; echo 1 > /sys/kernel/mm/ksm/run 2>&1; echo done", user="root")
    assert "Read-only file system" in r.stdout, r.stdout


def test_uptime_starts_at_the_sandboxs_boot(box):
    # The host's first: in a shared time namespace the sandbox's, read later, could not be less.
    with open("/proc/uptime") as f:
        host_up = float(f.read().split()[0])
    up = float(sh(box, "cut -d' ' -f1 /proc/uptime"))
    assert up < host_up - 1, (up, host_up)
    assert "up" in sh(box, "uptime")


def test_boot_id_is_the_sandboxs_own(box, make_sandbox):
    with open("/proc/sys/kernel/random/boot_id") as f:
        host = f.read().strip()
    ours = sh(box, "cat /proc/sys/kernel/random/boot_id").strip()
    other = make_sandbox()
    theirs = sh(other, "cat /proc/sys/kernel/random/boot_id").strip()
    other.kill()
    assert len({host, ours, theirs}) == 3, (host, ours, theirs)


def test_df_reports_the_disk_quota_and_its_use(box):
    def df():
        size, used = sh(box, "df -B1 --output=size,used / | tail -1").split()
        return int(size), int(used)

    size, before = df()
    assert size == DISK, size
    sh(box, "head -c 67108864 /dev/zero > /home/user/df-probe && sync")
    _, after = df()
    sh(box, "rm /home/user/df-probe")
    assert after - before >= 60 * 1024 * 1024, (before, after)
    usage = json.loads(sh(box, "python3 -c 'import json, shutil; print(json.dumps(shutil.disk_usage(\"/\")._asdict()))'"))
    assert usage["total"] == DISK, usage


def test_allocating_what_is_reported_available_is_not_oom_killed(box):
    """Take the reported available memory less 48 MiB, touching every page: the program runs
    to its end; with the host's figures it would be killed by the OOM killer."""
    prog = (
        "import mmap\n"
        "avail = int(next(l for l in open('/proc/meminfo') if l.startswith('MemAvailable')).split()[1]) * 1024\n"
        "size = avail - 48 * 1024 * 1024\n"
        "assert 0 < size < 600 * 1024 * 1024, avail\n"
        "m = mmap.mmap(-1, size)\n"
        "for off in range(0, size, 4096):\n"
        "    m[off] = 1\n"
        "print('allocated', size)\n"
    )
    box.files.write("/tmp/fill.py", prog)
    r = box.commands.run("python3 /tmp/fill.py", timeout=120)
    assert r.exit_code == 0 and "allocated" in r.stdout, (r.exit_code, r.stdout, r.stderr)
