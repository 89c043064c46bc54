"""Each sandbox has its own time namespace (uptime starts at its boot), and sandbox code can
neither move its clocks' offsets nor make a time namespace of its own."""

from __future__ import annotations

import os

import pytest
from conftest import WHO, record, run

# Tries to rewrite the offsets of the caller's time namespace (only possible before a process
# enters it) and to make a new one; prints one "step: result" line each.
ATTACK = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
try:
    with open("/proc/self/timens_offsets", "w") as f:
        f.write("monotonic 86400 0\n")
    print("write timens_offsets: ok")
except OSError as e:
    print(f"write timens_offsets: {type(e).__name__}")
CLONE_NEWTIME = 0x80
rc = libc.unshare(CLONE_NEWTIME)
print("unshare(CLONE_NEWTIME): " + ("ok" if rc == 0 else os.strerror(ctypes.get_errno())))
"""


@pytest.mark.parametrize("who", WHO)
def test_own_time_namespace_and_fixed_offsets(attacker, who):
    ours = os.readlink("/proc/self/ns/time")
    theirs = run(attacker, "readlink /proc/self/ns/time", who).stdout.strip()
    with open("/proc/uptime") as f:
        host_up = float(f.read().split()[0])
    up = float(run(attacker, "cut -d' ' -f1 /proc/uptime", who).stdout)
    attacker.files.write("/tmp/timens_attack.py", ATTACK)
    out = run(attacker, "python3 /tmp/timens_attack.py", who).stdout
    problems = []
    if not theirs.startswith("time:") or theirs == ours:
        problems.append(f"shares the host's time namespace ({theirs} vs host {ours})")
    if up >= host_up:
        problems.append(f"uptime {up} is the host's ({host_up})")
    problems += [line for line in out.splitlines() if line.endswith(": ok")]
    record("move the clocks' offsets or make a time namespace", who, problems, out.strip().replace("\n", "; "))
