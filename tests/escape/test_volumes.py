"""Volumes (docs/volumes.md): a sandbox plants symlinks in its volume, pointing at host paths and
at another volume's directory, then the volume content API (which runs on the host, as root) is
driven through them. It must never follow one: reads, writes, listings, metadata changes and
removals through a link fail or act on the link itself, and the host and the other volume are
unchanged. A sandbox that did not mount a volume cannot reach it, and a volume gives no setuid
and no way around its size limit."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest

from conftest import record, run

try:
    from e2b import Volume
except ImportError:  # pragma: no cover - the battery pins an SDK with volumes
    pytest.skip("this e2b SDK has no Volume class", allow_module_level=True)


@pytest.fixture(scope="module")
def volumes(env):
    os.environ.setdefault("E2B_VOLUME_API_URL", env.api_url)
    tag = uuid.uuid4().hex[:8]
    own = Volume.create(f"esc-own-{tag}")
    other = Volume.create(f"esc-other-{tag}")
    other.write_file("/secret.txt", f"other volume secret {tag}")
    yield own, other, tag
    for v in (own, other):
        try:
            Volume.destroy(v.volume_id)
        except Exception:
            pass


@pytest.fixture
def mounted(sandboxes):
    """Sandboxes with volumes, killed after the test even when it fails (so that the module's
    volumes can be deleted: a mounted volume cannot)."""
    made = []

    def make(**kw):
        sbx = sandboxes.make(**kw)
        made.append(sbx)
        return sbx

    yield make
    for sbx in made:
        try:
            sandboxes.kill(sbx)
        except Exception:
            pass


def host_volume_dir(env, vol) -> Path:
    return env.data_dir / "sandboxes" / "volumes" / vol.volume_id


def test_content_api_never_follows_planted_symlinks(env, plants, mounted, volumes):
    own, other, tag = volumes
    sbx = mounted(volume_mounts={"/data": own})
    other_dir = host_volume_dir(env, other)
    assert (other_dir / "secret.txt").exists(), "the other volume is not where the test expects it"
    links = {
        "etc": "/etc",
        "shadow": "/etc/shadow",
        "victim": str(plants.victim_file),
        "victimdir": str(plants.victim_dir),
        "other": str(other_dir),
        "otherfile": str(other_dir / "secret.txt"),
        "rel": f"../{other.volume_id}",
        "up": "..",
        "p1": "/proc/1/root",
    }
    script = " && ".join(f"ln -sfn {t} /data/{name}" for name, t in links.items())
    r = run(sbx, f"{script} && mkdir -p /data/d && ln -sfn /etc /data/d/inner && echo planted", "root")
    assert "planted" in r.stdout, r.stderr
    shadow_mode = os.stat("/etc/shadow").st_mode
    secret_before = (other_dir / "secret.txt").read_text()
    victim_before = plants.victim_file.read_text()
    problems, seen = [], []

    def refused(what: str, fn) -> None:
        try:
            got = fn()
        except Exception as e:  # the SDK raises for every non-2xx answer
            seen.append(f"{what}: {type(e).__name__}")
            return
        text = got if isinstance(got, str) else repr(got)
        if plants.secret in text or "root:" in text or tag in text:
            problems.append(f"{what} returned host or other-volume content")
        else:
            problems.append(f"{what} succeeded: {text[:120]}")

    for name in ("etc", "shadow", "victim", "other", "otherfile", "rel", "p1"):
        refused(f"read /{name}", lambda n=name: own.read_file(f"/{n}"))
    for path in ("/etc/passwd", "/other/secret.txt", "/rel/secret.txt", "/victimdir/x", "/d/inner/passwd",
                 "/up/" + other.volume_id + "/secret.txt", "/p1/etc/passwd"):
        refused(f"read {path}", lambda p=path: own.read_file(p))
        refused(f"list {path}", lambda p=path: own.list(p))
        refused(f"stat {path}", lambda p=path: own.get_info(p))
    for path in ("/victim", "/otherfile", "/other/pwn.txt", "/etc/pwn", "/d/inner/pwn", "/victimdir/pwn"):
        refused(f"write {path}", lambda p=path: own.write_file(p, "pwned", force=True))
    for path in ("/etc/x", "/other/x", "/victimdir/x"):
        refused(f"mkdir {path}", lambda p=path: own.make_dir(p, force=True))
    refused("chmod /shadow", lambda: own.update_metadata("/shadow", mode=0o777))
    refused("chmod /etc/shadow", lambda: own.update_metadata("/etc/shadow", mode=0o777))
    refused("chown /otherfile", lambda: own.update_metadata("/otherfile", uid=1000))
    refused("remove /other/secret.txt", lambda: own.remove("/other/secret.txt"))
    refused("remove /etc/hostname", lambda: own.remove("/etc/hostname"))

    # A deep listing shows the links as links and never descends through them.
    listed = own.list("/", depth=5)
    outside = [e.path for e in listed if e.path.startswith(("/etc/", "/other/", "/p1/", "/victimdir/"))]
    if outside:
        problems.append(f"listing descended through links: {outside[:5]}")
    kinds = {e.name: e.type.value for e in listed if e.path.count("/") == 1}
    if any(kinds.get(name) != "symlink" for name in links):
        problems.append(f"links not listed as symlinks: {kinds}")
    # Removing a link removes the link only; removing a directory holding one leaves its target.
    own.remove("/other")
    own.remove("/d")
    seen.append("removed /other and /d: links only")

    if (other_dir / "secret.txt").read_text() != secret_before or not list(other_dir.iterdir()):
        problems.append("the other volume changed")
    if plants.victim_file.read_text() != victim_before:
        problems.append("the host's victim file changed")
    if os.stat("/etc/shadow").st_mode != shadow_mode:
        problems.append("/etc/shadow's mode changed")
    for p in (Path("/etc/pwn"), plants.victim_dir / "pwn", plants.victim_dir / "x", Path("/etc/x")):
        if p.exists():
            problems.append(f"{p} was created on the host")
    # `..` never reaches the file system either.
    refused("read ../<other>/secret.txt", lambda: own.read_file(f"../{other.volume_id}/secret.txt"))
    record("volume content API through symlinks planted by the sandbox", "root", problems, "; ".join(seen))


def test_unmounted_volume_is_out_of_reach(env, mounted, volumes, attacker):
    own, other, tag = volumes
    sbx = mounted(volume_mounts={"/data": own})
    problems, seen = [], []
    for who, box in (("root (mounts another volume)", sbx), ("root (no volume)", attacker)):
        r = run(
            box,
            f"grep -c {other.volume_id} /proc/self/mountinfo; "
            f"find / -xdev -name secret.txt 2>/dev/null | wc -l; "
            f"ls /data/../{other.volume_id} 2>&1 | head -1; "
            f"grep -rl '{tag}' /data /tmp /home 2>/dev/null | wc -l",
            "root",
        )
        out = r.stdout.split("\n")
        if out[0].strip() != "0":
            problems.append(f"{who}: the other volume is in its mount table")
        if out[1].strip() != "0":
            problems.append(f"{who}: found a secret.txt")
        if out[3].strip() != "0":
            problems.append(f"{who}: read the other volume's secret")
        seen.append(f"{who}: not in mountinfo, not found")
    record("reach a volume the sandbox did not mount", "root", problems, "; ".join(seen))


def test_volume_gives_no_setuid_and_no_way_around_its_limit(env, mounted, volumes):
    own, _, _ = volumes
    sbx = mounted(volume_mounts={"/data": own})
    problems, seen = [], []
    r = run(sbx, "cp /usr/bin/id /data/suid-id && chmod 4755 /data/suid-id && "
                 "mknod /data/null c 1 3 2>&1; ls -l /data/suid-id", "root")
    out = run(sbx, "/data/suid-id -u", "user").stdout.strip()
    if out != "1000":
        problems.append(f"a setuid-root binary in the volume ran as uid {out}")
    seen.append(f"setuid binary in the volume runs as {out}")
    if "Operation not permitted" not in r.stdout:
        problems.append(f"mknod in the volume: {r.stdout.strip()[:120]}")
    # On the host, the file is owned by uid 0 with the setuid bit, inside a 0700 directory.
    host = host_volume_dir(env, own) / "suid-id"
    st = os.stat(host)
    parent = os.stat(env.data_dir / "sandboxes" / "volumes")
    if stat.S_IMODE(parent.st_mode) & 0o077:
        problems.append("the volumes directory is reachable by other host users")
    seen.append(f"host copy mode {oct(st.st_mode)} under a 0700 dir")
    # A subvolume or snapshot inside the volume would have no quota: the filter refuses both.
    code = (
        "import fcntl,os\n"
        "fd=os.open('/data',os.O_RDONLY)\n"
        "for req in (0x5000940e, 0x50009401):\n"
        "  a=bytearray(4096); a[8:11]=b'sub'\n"
        "  try: fcntl.ioctl(fd,req,a); print('made')\n"
        "  except OSError as e: print(e.errno)\n"
    )
    own.write_file("/subvol.py", code)
    got = run(sbx, "python3 /data/subvol.py", "root").stdout.split()
    if "made" in got:
        problems.append("made a btrfs subvolume inside the volume")
    seen.append(f"btrfs subvolume/snapshot ioctls: errno {got}")
    record("setuid, device nodes and subvolumes in a volume", "root", problems, "; ".join(seen))
