"""Measures create → first command latency and memory per idle sandbox, from the Python SDK.

Not a test: a measurement to reproduce the closing numbers of issue 2. Run it against a running
server with the export lines set (or through scripts/latency, which sets up the venv):

    tests/e2e/.venv-latest/bin/python tests/e2e/python/latency.py --runs 50 --idle 20 [--json out.json]

Latency: each run times Sandbox.create() followed by commands.run("true") (what a user waits for
before their first command returns), sequentially, then kills the sandbox outside the timing.
Memory: creates --idle sandboxes, lets them settle, and reports the drop in the host's
MemAvailable per sandbox and the average memory charged to each sandbox's cgroup (cgroup v1 memory
controller or v2), split into process memory, page cache and kernel memory. Other activity on the
machine adds noise to the MemAvailable figure; the cgroup figure is per sandbox and exact, but does
not include what is shared between sandboxes (the agent binary's pages, the template's page cache).
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import time
from pathlib import Path

from e2b import Sandbox

from stats import summary


def mem_available_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def cgroup_memory(sandbox_id: str) -> dict[str, int] | None:
    """Memory charged to the sandbox's cgroup (v1 memory controller or v2), with a breakdown.

    The runtime names each sandbox's group by its ID under a per-server parent group. Returns bytes:
    `charged` (everything the cgroup is charged, kernel memory included), `anon` (process memory),
    `file` (page cache) and `kernel` (slab, page tables, ...), or None when no group is found.
    """
    for group in glob.glob(f"/sys/fs/cgroup/memory/*/{sandbox_id}"):  # v1
        try:
            stat = dict(line.split() for line in Path(group, "memory.stat").read_text().splitlines())
            kmem = Path(group, "memory.kmem.usage_in_bytes")
            return {
                "charged": int(Path(group, "memory.usage_in_bytes").read_text()),
                "anon": int(stat["total_rss"]),
                "file": int(stat["total_cache"]),
                "kernel": int(kmem.read_text()) if kmem.exists() else 0,
            }
        except (OSError, ValueError, KeyError):
            continue
    for current in glob.glob(f"/sys/fs/cgroup/*/{sandbox_id}/memory.current"):  # v2
        group = Path(current).parent
        try:
            stat = dict(line.split() for line in Path(group, "memory.stat").read_text().splitlines())
            return {
                "charged": int(Path(current).read_text()),
                "anon": int(stat["anon"]),
                "file": int(stat["file"]),
                "kernel": int(stat.get("kernel", 0)),
            }
        except (OSError, ValueError, KeyError):
            continue
    return None


def measure_latency(runs: int) -> dict[str, dict[str, float]]:
    create_ms: list[float] = []
    first_cmd_ms: list[float] = []
    total_ms: list[float] = []
    # One warm-up so connection set-up and first-use costs are not in the numbers.
    Sandbox.create(timeout=60).kill()
    for _ in range(runs):
        t0 = time.perf_counter()
        sbx = Sandbox.create(timeout=60)
        t1 = time.perf_counter()
        sbx.commands.run("true")
        t2 = time.perf_counter()
        sbx.kill()
        create_ms.append((t1 - t0) * 1000)
        first_cmd_ms.append((t2 - t1) * 1000)
        total_ms.append((t2 - t0) * 1000)
    return {
        "create_to_first_command_ms": summary(total_ms),
        "create_ms": summary(create_ms),
        "first_command_ms": summary(first_cmd_ms),
    }


def measure_idle_memory(count: int, settle_s: float) -> dict[str, float | int | None]:
    before = mem_available_kib()
    sandboxes = [Sandbox.create(timeout=600) for _ in range(count)]
    try:
        for sbx in sandboxes:
            sbx.commands.run("true")  # every sandbox has served a command: really usable
        time.sleep(settle_s)
        after = mem_available_kib()
        groups = [g for g in (cgroup_memory(s.sandbox_id) for s in sandboxes) if g is not None]
        result: dict[str, float | int | None] = {
            "sandboxes": count,
            "mem_available_drop_per_sandbox_kib": (before - after) / count,
            "cgroups_found": len(groups),
        }
        for key in ("charged", "anon", "file", "kernel"):
            mean = statistics.fmean(g[key] for g in groups) / 1024 if groups else None
            result[f"cgroup_{key}_per_sandbox_kib"] = mean
        return result
    finally:
        for sbx in sandboxes:
            sbx.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="sequential create → first command runs")
    parser.add_argument("--idle", type=int, default=20, help="idle sandboxes for the memory figure (0: skip it)")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds to let idle sandboxes settle")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    results = {"latency": measure_latency(args.runs)}
    if args.idle > 0:
        results["idle_memory"] = measure_idle_memory(args.idle, args.settle)

    for name, s in results["latency"].items():
        print(
            f"{name:28} n={s['n']:<3} p50={s['p50']:8.1f}  p90={s['p90']:8.1f}  "
            f"p99={s['p99']:8.1f}  min={s['min']:8.1f}  max={s['max']:8.1f}"
        )
    mem = results.get("idle_memory")
    if mem:
        line = f"idle memory ({mem['sandboxes']} sandboxes): "
        line += f"MemAvailable drop {mem['mem_available_drop_per_sandbox_kib']:.0f} KiB/sandbox (noisy: whole host)"
        print(line)
        if mem["cgroups_found"]:
            print(
                f"  cgroup-charged {mem['cgroup_charged_per_sandbox_kib']:.0f} KiB/sandbox = "
                f"anon {mem['cgroup_anon_per_sandbox_kib']:.0f} + page cache {mem['cgroup_file_per_sandbox_kib']:.0f} "
                f"+ kernel {mem['cgroup_kernel_per_sandbox_kib']:.0f} ({mem['cgroups_found']} cgroups)"
            )
        else:
            print("  per-sandbox cgroup memory not found (run as root on the server's machine)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
