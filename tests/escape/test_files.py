"""`/files`, `Stat` and `ListDir` against hostile paths: symlinks planted in /home/user that
point at host paths, FIFOs and devices, and a 100 GB sparse file. The agent resolves every path
inside the sandbox, so a symlink can only ever name the sandbox's own files (asserted by
content); special files get a clear error at once; big files stream with flat memory."""

from __future__ import annotations

import http.client
import time
from pathlib import Path

import pytest
from e2b import FileType, InvalidArgumentException, NotFoundException, Sandbox

from conftest import record, rss_kb, run, sandbox_row


def sandbox_file(sbx: Sandbox, path: str) -> str:
    return run(sbx, f"cat {path}", "root").stdout


def test_symlink_download_reads_the_sandboxs_own_file(attacker, plants):
    run(attacker, "ln -sfn /etc/passwd ~/pw && ln -sfn /etc/shadow ~/sh && "
        f"ln -sfn {plants.victim_file} ~/victim && ln -sfn /proc/1/root/etc/passwd ~/p1 && "
        "ln -sfn ../../../../../../etc/passwd ~/rel")
    host_passwd = Path("/etc/passwd").read_text()
    own = sandbox_file(attacker, "/etc/passwd")
    problems, seen = [], []
    for link in ("pw", "p1", "rel"):
        got = attacker.files.read(f"/home/user/{link}")
        if got != own:
            problems.append(f"~/{link} did not give the sandbox's /etc/passwd")
        if got == host_passwd:
            problems.append(f"~/{link} gave the host's /etc/passwd")
        seen.append(f"~/{link}: sandbox's passwd ({len(got)} B)")
    shadow = attacker.files.read("/home/user/sh")  # the agent reads as sandbox root, as envd
    if shadow == Path("/etc/shadow").read_text():
        problems.append("~/sh gave the host's /etc/shadow")
    try:
        victim = attacker.files.read("/home/user/victim")
        if plants.secret in victim:
            problems.append("read the host's secret")
    except NotFoundException:
        seen.append("~/victim -> host path: not found")
    record("symlink in /home/user tricks /files download into a host path", "user", problems, "; ".join(seen))


def test_symlink_upload_writes_inside_the_sandbox(attacker, plants):
    run(attacker, f"ln -sfn {plants.victim_file} ~/up && ln -sfn /etc/hostname ~/up-hostname")
    problems, seen = [], []
    try:
        attacker.files.write("/home/user/up", "written through a symlink")
        inside = sandbox_file(attacker, str(plants.victim_file))
        if inside != "written through a symlink":
            problems.append(f"the upload went somewhere else than the sandbox's {plants.victim_file}")
        seen.append("~/up -> host path: created inside the sandbox")
    except NotFoundException:
        seen.append("~/up -> host path: 404 (its directory exists only on the host)")
    attacker.files.write("/home/user/up-hostname", "pwned-hostname\n")
    if plants.secret not in plants.victim_file.read_text():
        problems.append("the host's file changed")
    if sandbox_file(attacker, "/etc/hostname") != "pwned-hostname\n":
        problems.append("~/up-hostname did not write the sandbox's /etc/hostname")
    if Path("/etc/hostname").read_text() == "pwned-hostname\n":
        problems.append("the host's /etc/hostname changed")
    # Put the sandbox's own hostname back for the tests that read it.
    run(attacker, f"echo {attacker.sandbox_id} > /etc/hostname", "root")
    seen.append("~/up-hostname -> /etc/hostname: the sandbox's file")
    record("symlink in /home/user tricks /files upload into a host path", "user", problems, "; ".join(seen))


def test_symlink_stat_and_list(attacker, plants):
    run(attacker, "ln -sfn /var/lib ~/varlib && ln -sfn / ~/root")
    problems = []
    info = attacker.files.get_info("/home/user/varlib")
    if info.type != FileType.DIR and getattr(info, "symlink_target", None) != "/var/lib":
        problems.append(f"Stat gave {info}")
    names = {e.name for e in attacker.files.list("/home/user/varlib")}
    if plants.victim_dir.name in names:
        problems.append("ListDir through the symlink shows the host's /var/lib")
    names = {e.name for e in attacker.files.list("/home/user/root")}
    if ".soulbox" not in names:
        problems.append(f"ListDir of ~/root is not the sandbox's root: {sorted(names)}")
    if not attacker.files.exists("/home/user/root/.soulbox/bin/soulbox"):
        problems.append("the sandbox's root has no agent")
    if attacker.files.exists(f"/home/user/root{plants.victim_file}"):
        problems.append("the host's secret exists through the symlink")
    record("symlinks trick Stat / ListDir into host paths", "user", problems,
           f"Stat: {info.type.value if info.type else info}; ListDir shows the sandbox's /var/lib and /")


@pytest.mark.parametrize("path", ["/home/user/fifo", "/dev/zero", "/dev/urandom", "/dev/tty", "/home/user/sock"])
def test_special_files_are_refused_at_once(attacker, path):
    run(attacker, "rm -f ~/fifo ~/sock; mkfifo ~/fifo; "
        "python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('/home/user/sock')\"")
    problems, seen = [], []
    for op in ("read", "write"):
        t = time.monotonic()
        try:
            if op == "read":
                attacker.files.read(path, request_timeout=20)
            else:
                attacker.files.write(path, "x", request_timeout=20)
            problems.append(f"{op} of {path} succeeded")
        except InvalidArgumentException as e:
            seen.append(f"{op}: 400 '{e}'"[:60])
        except Exception as e:  # a hang or another error class is a failure too
            problems.append(f"{op} of {path}: {type(e).__name__}: {e}"[:200])
        if time.monotonic() - t > 10:
            problems.append(f"{op} of {path} took {time.monotonic() - t:.1f} s")
    record(f"serve a FIFO/device/socket through /files ({path})", "user", problems, "; ".join(seen))


def test_sparse_100g_download_streams_with_flat_memory(sandboxes, env):
    """Download 1 GiB of a 100 GB sparse file through the gateway, then stall the reader: the
    server's and the agent's memory stay flat (nothing buffers the file)."""
    sbx = sandboxes.make()
    run(sbx, "truncate -s 100G /home/user/sparse")
    agent_pid = sandbox_row(env, sbx.sandbox_id)["pid"]
    headers = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
    token = getattr(sbx, "_envd_access_token", None)
    if token:
        headers["X-Access-Token"] = token
    base = {"server": rss_kb(env.server_pid), "agent": rss_kb(agent_pid)}
    peak = dict(base)
    conn = http.client.HTTPConnection("127.0.0.1", env.gateway_port, timeout=60)
    conn.request("GET", "/files?path=/home/user/sparse&username=user", headers=headers)
    resp = conn.getresponse()
    length = int(resp.getheader("content-length") or 0)
    got = 0
    while got < (1 << 30):
        chunk = resp.read(1 << 20)
        if not chunk:
            break
        got += len(chunk)
        if got % (64 << 20) == 0:
            peak = {"server": max(peak["server"], rss_kb(env.server_pid)), "agent": max(peak["agent"], rss_kb(agent_pid))}
    time.sleep(3)  # a reader that stops: the writers must wait, not buffer
    peak = {"server": max(peak["server"], rss_kb(env.server_pid)), "agent": max(peak["agent"], rss_kb(agent_pid))}
    conn.close()
    problems = []
    if resp.status != 200 or got < (1 << 30):
        problems.append(f"status {resp.status}, got {got} bytes")
    for who in ("server", "agent"):
        if peak[who] - base[who] > 64 * 1024:
            problems.append(f"{who} memory grew by {(peak[who] - base[who]) // 1024} MiB")
    if run(sbx, "echo alive").stdout.strip() != "alive":
        problems.append("the sandbox stopped answering")
    record("100 GB sparse file download (must stream, never buffer)", "user", problems,
           f"Content-Length {length}, read {got >> 20} MiB then stalled; RSS growth server "
           f"{(peak['server'] - base['server']) // 1024} MiB, agent {(peak['agent'] - base['agent']) // 1024} MiB")
    sandboxes.kill(sbx)
