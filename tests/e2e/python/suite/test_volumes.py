"""Volumes (issue 14): `/volumes` CRUD, the volume content API and `volume_mounts` at create.

The content API is served on the control plane's listener; `soulbox serve` prints
`E2B_VOLUME_API_URL`, and the suite defaults it to `E2B_API_URL` when the harness does not set it.
"""

from __future__ import annotations

import os
import urllib.parse
import uuid

import httpx
import pytest
from e2b import Sandbox

from helpers import require

try:
    from e2b import Volume
    from e2b.exceptions import VolumeNotFoundException, VolumePathNotFoundException
except ImportError:  # SDKs before volumes
    pytest.skip("this e2b SDK has no Volume class", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def volume_api_url(e2e):
    os.environ.setdefault("E2B_VOLUME_API_URL", e2e.api_url)


@pytest.fixture
def make_volume(e2e):
    made: list[str] = []

    def make(prefix: str = "vol") -> Volume:
        vol = Volume.create(f"{prefix}-{e2e.run_id}-{uuid.uuid4().hex[:8]}")
        made.append(vol.volume_id)
        return vol

    yield make
    for volume_id in made:
        try:
            Volume.destroy(volume_id)
        except Exception:
            pass


def content_url(e2e, vol: Volume, what: str, path: str) -> str:
    return f"{e2e.api_url}/volumecontent/{vol.volume_id}/{what}?path={urllib.parse.quote(path, safe='')}"


def test_volume_crud(e2e, make_volume):
    vol = make_volume()
    assert vol.token and vol.name.startswith("vol-")
    listed = {v.volume_id: v.name for v in Volume.list()}
    assert listed.get(vol.volume_id) == vol.name
    info = Volume.get_info(vol.volume_id)
    assert (info.volume_id, info.name, info.token) == (vol.volume_id, vol.name, vol.token)
    again = Volume.connect(vol.volume_id)
    assert again.token == vol.token
    # The same name twice is refused.
    with pytest.raises(Exception):
        Volume.create(vol.name)
    assert Volume.destroy(vol.volume_id) is True
    assert Volume.destroy(vol.volume_id) is False
    with pytest.raises(VolumeNotFoundException):
        Volume.get_info(vol.volume_id)
    assert vol.volume_id not in {v.volume_id for v in Volume.list()}


@pytest.mark.parametrize("name", ["a/b", "..", "../x", "a\0b", "x" * 10 * 1024, ""])
def test_bad_volume_names_are_400(e2e, name):
    r = httpx.post(f"{e2e.api_url}/volumes", json={"name": name}, headers=e2e.api_headers(), timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["code"] == 400


def test_volume_api_needs_keys_and_tokens(e2e, make_volume):
    vol = make_volume()
    assert httpx.get(f"{e2e.api_url}/volumes", timeout=30).status_code == 401
    url = content_url(e2e, vol, "dir", "/")
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer nope"}, timeout=30).status_code == 401
    # The API key is not a volume token.
    assert httpx.get(url, headers={"Authorization": f"Bearer {e2e.api_key}"}, timeout=30).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {vol.token}"}, timeout=30).status_code == 200


def test_content_api(e2e, make_volume):
    vol = make_volume()
    st = vol.write_file("/notes/a.txt", "hello volume", force=True)
    assert (st.name, st.path, st.size, st.uid, st.gid) == ("a.txt", "/notes/a.txt", 12, 1000, 1000)
    assert vol.read_file("/notes/a.txt") == "hello volume"
    assert vol.read_file("notes/a.txt", format="bytes") == b"hello volume"
    assert b"".join(vol.read_file("/notes/a.txt", format="stream")) == b"hello volume"
    vol.write_file("/notes/a.txt", b"\x00\x01binary")
    assert vol.read_file("/notes/a.txt", format="bytes") == b"\x00\x01binary"
    d = vol.make_dir("/x/y/z", force=True)
    assert d.type.value == "directory" and d.path == "/x/y/z"
    assert {e.path for e in vol.list("/")} == {"/notes", "/x"}
    assert {e.path for e in vol.list("/", depth=3)} == {"/notes", "/notes/a.txt", "/x", "/x/y", "/x/y/z"}
    assert vol.exists("/x/y") and not vol.exists("/nope")
    updated = vol.update_metadata("/notes/a.txt", uid=0, gid=0, mode=0o600)
    assert (updated.uid, updated.gid, updated.mode) == (0, 0, 0o600)
    assert vol.get_info("/notes/a.txt").mode == 0o600
    with pytest.raises(VolumePathNotFoundException):
        vol.read_file("/missing.txt")
    with pytest.raises(VolumePathNotFoundException):
        vol.write_file("/no/such/dir/f.txt", "x")
    vol.remove("/x")
    assert not vol.exists("/x/y/z")
    with pytest.raises(VolumePathNotFoundException):
        vol.remove("/x")
    # `..` and NUL never reach the file system.
    headers = {"Authorization": f"Bearer {vol.token}"}
    for bad in ["../etc/passwd", "/notes/../../x", "a\0b"]:
        r = httpx.get(content_url(e2e, vol, "file", bad), headers=headers, timeout=30)
        assert r.status_code == 400, (bad, r.status_code, r.text)


def test_volume_shared_by_two_sandboxes(e2e, make_volume, make_sandbox):
    vol = make_volume()
    vol.write_file("/from-api.txt", "written by the content API")
    a = make_sandbox(volume_mounts={"/data": vol})
    b = make_sandbox(volume_mounts={"/mnt/shared": vol.name})
    assert a.files.read("/data/from-api.txt") == "written by the content API"
    assert b.commands.run("cat /mnt/shared/from-api.txt").stdout == "written by the content API"
    # Each sandbox has its own host uid range, yet both see the same owners (idmapped mounts).
    a.commands.run("echo from-a > /data/a.txt")
    b.commands.run("echo from-b > /mnt/shared/b.txt", user="root")
    assert b.commands.run("stat -c '%U:%G %s' /mnt/shared/a.txt").stdout.strip() == "user:user 7"
    assert a.commands.run("stat -c '%U:%G' /data/b.txt").stdout.strip() == "root:root"
    assert a.commands.run("cat /data/b.txt").stdout == "from-b\n"
    assert vol.read_file("/a.txt") == "from-a\n"
    entry = vol.get_info("/b.txt")
    assert (entry.uid, entry.gid) == (0, 0)
    # Both write one file: each append lands.
    a.commands.run("for i in $(seq 50); do echo a$i >> /data/both.txt; done")
    b.commands.run("for i in $(seq 50); do echo b$i >> /mnt/shared/both.txt; done")
    lines = vol.read_file("/both.txt").split()
    assert len(lines) == 100 and set(lines) == {f"a{i}" for i in range(1, 51)} | {f"b{i}" for i in range(1, 51)}
    # nosuid, nodev and idmapped.
    opts = a.commands.run("grep ' /data ' /proc/self/mountinfo").stdout
    assert "nosuid" in opts and "nodev" in opts and "idmapped" in opts, opts
    assert {"name": vol.name, "path": "/data"} in a.get_info().volume_mounts
    # Deleting a mounted volume is refused; after the sandboxes are gone it works.
    with pytest.raises(Exception):
        Volume.destroy(vol.volume_id)
    a.kill()
    b.kill()
    assert Volume.destroy(vol.volume_id) is True


def test_unmounted_sandbox_cannot_see_the_volume(e2e, make_volume, make_sandbox):
    vol = make_volume()
    vol.write_file("/secret.txt", "only for mounters")
    other = make_sandbox()
    out = other.commands.run(
        f"grep -c {vol.volume_id} /proc/self/mountinfo; ls /data 2>&1; "
        "find / -xdev -name secret.txt 2>/dev/null | wc -l",
        user="root",
    ).stdout.split("\n")
    assert out[0] == "0", out
    assert "No such file" in out[1], out


def test_bad_volume_mounts_at_create(e2e, make_volume):
    vol = make_volume()
    with pytest.raises(Exception) as err:
        Sandbox.create(volume_mounts={"/data": f"no-such-volume-{e2e.run_id}"}, timeout=30)
    assert "not found" in str(err.value)
    for path in ["/proc/x", "relative", "/", "/a/../b", "/dev/v"]:
        with pytest.raises(Exception):
            Sandbox.create(volume_mounts={path: vol}, timeout=30)
    r = httpx.post(
        f"{e2e.api_url}/v2/sandboxes",
        json={"templateID": "base", "volumeMounts": [{"name": vol.name, "path": "/a"}, {"name": vol.name, "path": "/a/b"}]},
        headers=e2e.api_headers(),
        timeout=30,
    )
    assert r.status_code == 400, r.text


def test_volume_survives_a_server_restart(e2e, make_volume, make_sandbox):
    require(e2e, "SOULBOX_SERVERCTL (a restart hook)", e2e.serverctl is not None)
    vol = make_volume()
    vol.write_file("/kept.txt", "before restart")
    sbx = make_sandbox(volume_mounts={"/data": vol})
    e2e.restart_server()
    assert vol.volume_id in {v.volume_id for v in Volume.list()}
    assert Volume.get_info(vol.volume_id).token == vol.token
    assert vol.read_file("/kept.txt") == "before restart"
    # The adopted sandbox still has its mount, and a new one gets it too.
    sbx.commands.run("echo after > /data/after.txt")
    assert vol.read_file("/after.txt") == "after\n"
    fresh = make_sandbox(volume_mounts={"/v": vol})
    assert fresh.commands.run("cat /v/kept.txt").stdout == "before restart"
    sbx.kill()
    fresh.kill()


@pytest.mark.parametrize("mode", ["full", "filesystem"])
def test_paused_sandbox_keeps_its_volume(e2e, make_volume, make_sandbox, mode):
    vol = make_volume()
    sbx = make_sandbox(volume_mounts={"/data": vol})
    sbx.commands.run(f"echo before > /data/{mode}.txt")
    sbx.pause(mode=mode)
    # A paused sandbox still mounts it: deletion is refused.
    with pytest.raises(Exception):
        Volume.destroy(vol.volume_id)
    again = Sandbox.connect(sbx.sandbox_id)
    assert again.commands.run(f"cat /data/{mode}.txt").stdout == "before\n"
    again.commands.run("echo after > /data/after.txt")
    assert vol.read_file("/after.txt") == "after\n"
    assert again.commands.run("grep -c ' /data ' /proc/self/mountinfo").stdout.strip() == "1"
    again.kill()
