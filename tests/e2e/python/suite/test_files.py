"""`sbx.files`: write/read (text and bytes), list, exists, make_dir, rename, remove, errors."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest
from e2b import FileNotFoundException, FileType, InvalidArgumentException

from helpers import envd_headers


@pytest.fixture
def d(shared_sandbox, request):
    """A fresh directory per test, so tests sharing a sandbox never see each other's files."""
    path = f"/home/user/t-{request.node.name[:60]}"
    shared_sandbox.commands.run(f"rm -rf '{path}' && mkdir -p '{path}'")
    return path


def test_write_and_read_text(shared_sandbox, d):
    text = "hello ünïcødé ✓\nsecond line\n"
    info = shared_sandbox.files.write(f"{d}/hello.txt", text)
    assert info.path == f"{d}/hello.txt" and info.name == "hello.txt"
    assert shared_sandbox.files.read(f"{d}/hello.txt") == text
    # What the API wrote is what a process inside sees.
    assert shared_sandbox.commands.run(f"cat {d}/hello.txt").stdout == text


def test_write_and_read_bytes(shared_sandbox, d):
    data = bytes(range(256)) * 64 + b"\x00\xff\r\n"
    shared_sandbox.files.write(f"{d}/blob.bin", data)
    assert bytes(shared_sandbox.files.read(f"{d}/blob.bin", format="bytes")) == data
    sha = shared_sandbox.commands.run(f"sha256sum {d}/blob.bin").stdout.split()[0]
    assert sha == hashlib.sha256(data).hexdigest()


def test_large_file_round_trip(shared_sandbox, d):
    data = os.urandom(8 * 1024 * 1024)
    shared_sandbox.files.write(f"{d}/big.bin", data)
    back = bytes(shared_sandbox.files.read(f"{d}/big.bin", format="bytes"))
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(data).hexdigest()


def test_file_written_by_a_process_is_readable(shared_sandbox, d):
    shared_sandbox.commands.run(f"printf 'from-process' > {d}/p.txt")
    assert shared_sandbox.files.read(f"{d}/p.txt") == "from-process"


def test_write_overwrites(shared_sandbox, d):
    shared_sandbox.files.write(f"{d}/o.txt", "a much longer first version")
    shared_sandbox.files.write(f"{d}/o.txt", "short")
    assert shared_sandbox.files.read(f"{d}/o.txt") == "short"


def test_write_creates_parent_dirs_owned_by_the_user(shared_sandbox, d):
    shared_sandbox.files.write(f"{d}/a/b/c/deep.txt", "deep")
    assert shared_sandbox.files.read(f"{d}/a/b/c/deep.txt") == "deep"
    owners = shared_sandbox.commands.run(f"stat -c %U {d}/a {d}/a/b/c {d}/a/b/c/deep.txt").stdout
    assert owners.split() == ["user", "user", "user"]


def test_write_as_root(shared_sandbox, d):
    shared_sandbox.files.write("/root/by-root.txt", "r", user="root")
    assert shared_sandbox.commands.run("stat -c %U /root/by-root.txt", user="root").stdout == "root\n"
    assert shared_sandbox.files.read("/root/by-root.txt", user="root") == "r"


def test_relative_path_resolves_against_home(shared_sandbox, d):
    name = os.path.basename(d)
    shared_sandbox.files.write(f"{name}/rel.txt", "relative")
    assert shared_sandbox.files.read(f"{d}/rel.txt") == "relative"


def test_write_many_files(shared_sandbox, d):
    entries = [{"path": f"{d}/multi/{i}.txt", "data": f"file {i}"} for i in range(5)]
    infos = shared_sandbox.files.write_files(entries)
    assert sorted(i.path for i in infos) == sorted(e["path"] for e in entries)
    for e in entries:
        assert shared_sandbox.files.read(e["path"]) == e["data"]


def test_list(shared_sandbox, d):
    shared_sandbox.files.write(f"{d}/f1.txt", "12345")
    shared_sandbox.files.make_dir(f"{d}/sub")
    shared_sandbox.files.write(f"{d}/sub/inner.txt", "x")
    entries = {e.name: e for e in shared_sandbox.files.list(d)}
    assert set(entries) == {"f1.txt", "sub"}
    assert entries["f1.txt"].type == FileType.FILE
    assert entries["f1.txt"].size == 5
    assert entries["f1.txt"].path == f"{d}/f1.txt"
    assert entries["f1.txt"].owner == "user"
    assert entries["sub"].type == FileType.DIR
    deep = {e.path for e in shared_sandbox.files.list(d, depth=2)}
    assert deep == {f"{d}/f1.txt", f"{d}/sub", f"{d}/sub/inner.txt"}


def test_exists(shared_sandbox, d):
    shared_sandbox.files.write(f"{d}/here.txt", "x")
    assert shared_sandbox.files.exists(f"{d}/here.txt") is True
    assert shared_sandbox.files.exists(d) is True
    assert shared_sandbox.files.exists(f"{d}/nothere.txt") is False


def test_get_info(shared_sandbox, d):
    shared_sandbox.files.write(f"{d}/info.txt", "abc")
    info = shared_sandbox.files.get_info(f"{d}/info.txt")
    assert info.type == FileType.FILE and info.size == 3 and info.name == "info.txt"
    assert info.permissions.startswith("-")


def test_directory_size_is_whole_blocks(shared_sandbox, d):
    """E2B's ext4 reports 4096 for a small directory (its tests: a new directory's size > 0); btrfs
    under SoulBox's overlay reports 0 for an empty one. Sizes are rounded up to whole blocks
    (docs/e2b-compatibility.md); files keep their exact size."""
    assert shared_sandbox.files.make_dir(f"{d}/empty") is True
    shared_sandbox.files.write(f"{d}/f.txt", "12345")
    assert shared_sandbox.files.get_info(f"{d}/empty").size == 4096
    entries = {e.name: e for e in shared_sandbox.files.list(d)}
    assert entries["empty"].size == 4096
    assert entries["f.txt"].size == 5
    info = shared_sandbox.files.get_info(d)
    assert info.size >= 4096 and info.size % 4096 == 0, info.size


def test_make_dir(shared_sandbox, d):
    assert shared_sandbox.files.make_dir(f"{d}/new/nested") is True
    assert shared_sandbox.files.make_dir(f"{d}/new/nested") is False  # already exists
    assert shared_sandbox.commands.run(f"test -d {d}/new/nested && stat -c %U {d}/new/nested").stdout == "user\n"


def test_rename(shared_sandbox, d):
    shared_sandbox.files.write(f"{d}/old.txt", "content")
    info = shared_sandbox.files.rename(f"{d}/old.txt", f"{d}/new.txt")
    assert info.path == f"{d}/new.txt"
    assert shared_sandbox.files.exists(f"{d}/old.txt") is False
    assert shared_sandbox.files.read(f"{d}/new.txt") == "content"
    # Directories move with their contents.
    shared_sandbox.files.write(f"{d}/dir1/x.txt", "x")
    shared_sandbox.files.rename(f"{d}/dir1", f"{d}/dir2")
    assert shared_sandbox.files.read(f"{d}/dir2/x.txt") == "x"


def test_remove(shared_sandbox, d):
    shared_sandbox.files.write(f"{d}/gone.txt", "x")
    shared_sandbox.files.remove(f"{d}/gone.txt")
    assert shared_sandbox.files.exists(f"{d}/gone.txt") is False
    shared_sandbox.files.write(f"{d}/tree/a/b.txt", "x")
    shared_sandbox.files.remove(f"{d}/tree")
    assert shared_sandbox.files.exists(f"{d}/tree") is False


def test_read_missing_file_is_file_not_found(shared_sandbox, d):
    with pytest.raises(FileNotFoundException):
        shared_sandbox.files.read(f"{d}/missing.txt")


def test_other_missing_paths_are_not_found(shared_sandbox, d):
    with pytest.raises(FileNotFoundException):
        shared_sandbox.files.list(f"{d}/missing-dir")
    with pytest.raises(FileNotFoundException):
        shared_sandbox.files.get_info(f"{d}/missing.txt")
    with pytest.raises(FileNotFoundException):
        shared_sandbox.files.rename(f"{d}/missing.txt", f"{d}/other.txt")


def test_read_a_directory_is_an_error(shared_sandbox, d):
    with pytest.raises(InvalidArgumentException):
        shared_sandbox.files.read(d)


def _fetch(method: str, url: str, sandbox_id: str | None, content: bytes | None = None) -> httpx.Response:
    """A signed URL as a third party would use it: no access token; with `sandbox_id`, the routing
    headers too (as a proxy in URL mode or a host in domain mode would name the sandbox)."""
    headers = envd_headers(sandbox_id, None) if sandbox_id else {}
    files = {"file": ("f.txt", content)} if content is not None else None
    return httpx.request(method, url, headers=headers, files=files)


def test_signed_urls_expired_or_wrong_are_envds_401(make_sandbox):
    """E2B's envd answers 401 `{"code":401,"message":"signature is already expired"}` for an expired
    signed URL (E2B's SDK tests compare the body exactly), and `invalid signature` for a wrong one.
    In URL mode the SDK's URLs name no sandbox: the gateway finds the one that signed it, expired
    or not (it answered 502 "not found" for an expired one before)."""
    sbx = make_sandbox(secure=True)
    try:
        path = "/home/user/signed.txt"
        sbx.files.write(path, "signed content")
        good = sbx.download_url(path, "user", use_signature_expiration=120)
        expired = sbx.download_url(path, "user", use_signature_expiration=-120)
        expired_up = sbx.upload_url(path, "user", use_signature_expiration=-120)
        forged = good.replace("signature=v1_", "signature=v1_x")
        for sandbox_id in (None, sbx.sandbox_id):
            r = _fetch("GET", good, sandbox_id)
            assert r.status_code == 200 and r.text == "signed content", (sandbox_id, r.status_code, r.text)
            for method, url, content in (("GET", expired, None), ("POST", expired_up, b"new")):
                r = _fetch(method, url, sandbox_id, content)
                assert r.status_code == 401, (sandbox_id, method, r.status_code, r.text)
                assert r.json() == {"code": 401, "message": "signature is already expired"}, r.text
            r = _fetch("GET", forged, sandbox_id)
            assert r.status_code == 401, (sandbox_id, r.status_code, r.text)
            assert r.json() == {"code": 401, "message": "invalid signature"}, r.text
        assert sbx.files.read(path) == "signed content"
    finally:
        sbx.kill()
