"""Disk freed inside sandboxes goes back to the host.

Sandboxes' files live on a sparse btrfs image (`$DATA/sandboxes.img`). A sandbox that fills it and
is killed must not leave the host's file holding those blocks: without trimming, a killed sandbox's
two million empty files kept ~1 GiB allocated on the host for minutes, and repeated, the image
grew to its full size (half the host's free disk). The runtime trims the image after subvolume
deletions (crates/soulbox-runtime/src/disk.rs); here the host's allocation of the image must come
back to within a few MiB of what it was before the sandbox, within a minute of the kill.
"""

from __future__ import annotations

import time
from pathlib import Path

from conftest import record, run

# What "a few MiB" allows: the live sandboxes of the run (canary, attacker, neighbour) write a
# little meanwhile (logs, btrfs's own metadata).
SLACK_MB = 8
RETURN_WITHIN_S = 60
FILL_MB = 512
FILES = 300_000


def allocated_mb(image: Path) -> float:
    """Bytes the host's filesystem holds for the sparse image, in MiB."""
    return image.stat().st_blocks * 512 / (1 << 20)


def settled_mb(image: Path, timeout: float = 90) -> float:
    """The image's allocation once it stops changing (earlier tests' kills may still be trimmed)."""
    deadline = time.monotonic() + timeout
    last = allocated_mb(image)
    steady_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(1)
        now = allocated_mb(image)
        if abs(now - last) > 1:
            last, steady_since = now, time.monotonic()
        elif time.monotonic() - steady_since >= 5:
            break
    return last


def test_freed_disk_returns_to_the_host(sandboxes, env):
    image = env.data_dir / "sandboxes.img"
    assert image.is_file(), f"no disk image at {image}: the battery's server runs with disk limits"
    before = settled_mb(image)

    sbx = sandboxes.make()
    sbx.files.write(
        "/home/user/many.py",
        "import os\n"
        "for d in range(100):\n"
        "    os.mkdir(f'/home/user/many{d}')\n"
        f"    for f in range({FILES // 100}):\n"
        "        open(f'/home/user/many{d}/{f}', 'w').close()\n",
    )
    fill = (
        f"dd if=/dev/urandom of=/home/user/fill bs=1M count={FILL_MB} conv=fsync status=none && "
        "python3 /home/user/many.py && sync && echo filled"
    )
    r = run(sbx, fill, "user", timeout=600)
    assert r.stdout.strip().endswith("filled"), f"filling failed: {r.stdout[-300:]} {r.stderr[-300:]}"
    filled = allocated_mb(image)
    problems = []
    if filled - before < FILL_MB * 0.8:
        problems.append(f"the fill did not reach the image: {before:.1f} -> {filled:.1f} MiB")

    sandboxes.kill(sbx)
    killed_at = time.monotonic()
    after = allocated_mb(image)
    while after > before + SLACK_MB and time.monotonic() - killed_at < RETURN_WITHIN_S:
        time.sleep(1)
        after = allocated_mb(image)
    took = time.monotonic() - killed_at
    if after > before + SLACK_MB:
        problems.append(
            f"{RETURN_WITHIN_S} s after the kill the image still holds {after - before:.1f} MiB more "
            f"than before ({before:.1f} -> {filled:.1f} -> {after:.1f} MiB)"
        )
    record(
        f"fill {FILL_MB} MiB + {FILES} files, then kill: host disk returned",
        "user",
        problems,
        f"image allocated {before:.1f} MiB before, {filled:.1f} filled, {after:.1f} {took:.0f} s after the kill",
    )
