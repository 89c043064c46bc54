"""Drives the agent with the real E2B Python SDK (sync API).

Development agent: target/debug/soulbox agent --listen 127.0.0.1:49983 &  (or crates/soulbox-agent/tests/sdk/sandboxed_agent.py)
                   E2B_DEBUG=true E2B_API_KEY=e2b_$(printf '0%.0s' {1..40}) python sync_api.py
Real server:       E2B_API_URL=... E2B_SANDBOX_URL=... E2B_API_KEY=... python sync_api.py
"""

import hashlib
import inspect
import os
import threading
import time
import uuid

import e2b
from e2b import (
    CommandExitException,
    InvalidArgumentException,
    NotFoundException,
    Sandbox,
    SandboxException,
)
from e2b.sandbox.commands.command_handle import PtySize

# e2b 1.x raises NotFoundException where 2.x raises its subclass FileNotFoundException.
FileNotFoundException = getattr(e2b, "FileNotFoundException", NotFoundException)

def supports(fn, arg):
    """Whether this SDK version's `fn` takes `arg` (older ones lack gzip, metadata, ...)."""
    return arg in inspect.signature(fn).parameters


# With E2B_DEBUG=true: a development agent on localhost:49983 (e2b 1.x has no Sandbox.create
# and reads E2B_DEBUG only through the `debug` argument). Otherwise: a real sandbox from the
# server in E2B_API_URL / E2B_SANDBOX_URL, killed at the end.
DEBUG = os.environ.get("E2B_DEBUG", "").lower() == "true"
opts = {"debug": True} if DEBUG else {}
sbx = Sandbox.create(**opts) if hasattr(Sandbox, "create") else Sandbox(**opts)
base = f"/tmp/soulbox-sdk-{uuid.uuid4().hex[:8]}"
checks = 0


def check(cond, what):
    global checks
    if not cond:
        raise AssertionError(what)
    checks += 1


# --- commands -------------------------------------------------------------------------------
r = sbx.commands.run("echo hi; echo err >&2")
check(r.stdout == "hi\n" and r.stderr == "err\n" and r.exit_code == 0, f"run: {r}")

try:
    sbx.commands.run("echo out; exit 7")
    check(False, "non-zero exit must raise")
except CommandExitException as e:
    check(e.exit_code == 7 and e.stdout == "out\n" and "exit status 7" in (e.error or ""), f"exit: {e}")

r = sbx.commands.run("echo $FOO-$E2B_SANDBOX", envs={"FOO": "bar"})
check(r.stdout == "bar-true\n", f"envs: {r.stdout!r}")
r = sbx.commands.run("echo ${FOO:-unset}")
check(r.stdout == "unset\n", "per-command env must not leak")

r = sbx.commands.run("pwd", cwd="/tmp")
check(r.stdout == "/tmp\n", f"cwd: {r.stdout!r}")
try:
    sbx.commands.run("pwd", cwd="/definitely/not/here")
    check(False, "missing cwd must fail")
except InvalidArgumentException as e:
    check("does not exist" in str(e), f"cwd error: {e}")

r = sbx.commands.run("whoami; echo $HOME", user="root")
check(r.stdout == "root\n/root\n", f"root: {r.stdout!r}")
r = sbx.commands.run("id -u", user="nobody")
check(r.stdout == "65534\n", f"nobody: {r.stdout!r}")
try:
    sbx.commands.run("true", user="no-such-user-x")
    check(False, "unknown user must fail")
except Exception as e:
    check("Authentication" in type(e).__name__, f"unknown user: {type(e).__name__} {e}")

# 1 MiB of output, intact.
r = sbx.commands.run("head -c 1048576 /dev/zero | tr '\\0' 'x'")
check(len(r.stdout) == 1048576 and set(r.stdout) == {"x"}, f"1MiB: {len(r.stdout)}")

# streaming callbacks see output before the end
seen = []
r = sbx.commands.run("for i in 1 2 3; do echo $i; sleep 0.1; done", on_stdout=lambda s: seen.append((s, time.time())))
check("".join(s for s, _ in seen) == "1\n2\n3\n" and seen[-1][1] - seen[0][1] > 0.15, f"streaming: {seen}")

# background + list + kill
h = sbx.commands.run("sleep 30", background=True)
procs = sbx.commands.list()
mine = [p for p in procs if p.pid == h.pid]
check(mine and mine[0].cmd == "/bin/bash" and mine[0].args == ["-l", "-c", "sleep 30"], f"list: {procs}")
check(sbx.commands.kill(h.pid), "kill existing")
try:
    h.wait()
    check(False, "killed command must raise")
except CommandExitException as e:
    check(e.exit_code == -1 and "signal: killed" in (e.error or ""), f"killed: {e}")
check(not sbx.commands.kill(h.pid), "kill of ended pid is False")
check(not sbx.commands.kill(999999), "kill of unknown pid is False")

# stdin (always open in e2b 1.x, which has no `stdin` argument)
def with_stdin(cmd):
    try:
        return sbx.commands.run(cmd, background=True, stdin=True)
    except TypeError:
        return sbx.commands.run(cmd, background=True)

if hasattr(sbx.commands, "close_stdin"):  # e2b >= 2
    h = with_stdin("cat")
    sbx.commands.send_stdin(h.pid, "hello ")
    sbx.commands.send_stdin(h.pid, b"world\n")
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    check(r.stdout == "hello world\n", f"stdin: {r.stdout!r}")
else:
    h = with_stdin("head -c 12")
    sbx.commands.send_stdin(h.pid, "hello ")
    sbx.commands.send_stdin(h.pid, "world\n")
    r = h.wait()
    check(r.stdout == "hello world\n", f"stdin: {r.stdout!r}")
if hasattr(sbx.commands, "stream_input"):  # e2b >= 2.51
    h = with_stdin("cat")
    sbx.commands.stream_input(h.pid, [b"a", b"b", b"c\n"])
    sbx.commands.close_stdin(h.pid)
    check(h.wait().stdout == "abc\n", "stream_input")
if "stdin" in sbx.commands.run.__code__.co_varnames:
    h = sbx.commands.run("sleep 5", background=True)
    try:
        sbx.commands.send_stdin(h.pid, "x")
        check(False, "stdin to a process without stdin must fail")
    except SandboxException:
        checks += 1
    h.kill()

# disconnect does not kill; connect sees live output and the end
h = sbx.commands.run("sleep 1; echo late", background=True)
h.disconnect()
time.sleep(0.2)
h2 = sbx.commands.connect(h.pid)
r = h2.wait()
check(r.stdout == "late\n", f"connect after disconnect: {r.stdout!r}")
h3 = sbx.commands.connect(h.pid)  # ended < 30 s ago: start + end
check(h3.wait().exit_code == 0, "connect to recently ended process")
try:
    sbx.commands.connect(424242)
    check(False, "connect to unknown pid must fail")
except NotFoundException:
    checks += 1

# timeout = process lifetime
t0 = time.time()
try:
    sbx.commands.run("sleep 10", timeout=1)
    check(False, "timeout must raise")
except Exception as e:
    check(time.time() - t0 < 5, f"timeout took too long: {e}")
time.sleep(0.3)
check(all(p.args[-1:] != ["sleep 10"] for p in sbx.commands.list()), "timed-out process must be killed")

# --- pty ------------------------------------------------------------------------------------
term = sbx.pty.create(PtySize(rows=24, cols=80))
term_out = []
def typist():
    sbx.pty.send_stdin(term.pid, b"stty size; echo $TERM\n")
    # Resize only after the first answer (a slow login profile may delay the shell).
    for _ in range(100):
        if b"24 80" in b"".join(term_out):
            break
        time.sleep(0.05)
    sbx.pty.resize(term.pid, PtySize(rows=40, cols=100))
    sbx.pty.send_stdin(term.pid, b"stty size\n")
    time.sleep(0.5)
    sbx.pty.send_stdin(term.pid, b"exit\n")
typing = threading.Thread(target=typist, daemon=True)
typing.start()
term.wait(on_pty=lambda data: term_out.append(bytes(data)))
typing.join(timeout=10)
text = b"".join(term_out).decode(errors="replace")
check("24 80" in text and "xterm-256color" in text and "40 100" in text, f"pty output: {text!r}")
try:
    sbx.commands.send_stdin(424242, "x")
    check(False, "stdin to unknown pid")
except NotFoundException:
    checks += 1

# --- files ----------------------------------------------------------------------------------
info = sbx.files.write(f"{base}/a/b.txt", "hello")
check(info.path == f"{base}/a/b.txt" and info.name == "b.txt", f"write: {info}")
check(sbx.files.read(f"{base}/a/b.txt") == "hello", "read")
check(bytes(sbx.files.read(f"{base}/a/b.txt", format="bytes")) == b"hello", "read bytes")
if supports(sbx.files.read, "gzip"):
    check(sbx.files.read(f"{base}/a/b.txt", gzip=True) == "hello", "read gzip")
    sbx.files.write(f"{base}/gz.bin", b"\x00\x01" * 1000, gzip=True)
else:
    sbx.files.write(f"{base}/gz.bin", b"\x00\x01" * 1000)
check(bytes(sbx.files.read(f"{base}/gz.bin", format="bytes")) == b"\x00\x01" * 1000, "gzip upload")
many = [{"path": f"{base}/m1.txt", "data": "1"}, {"path": f"{base}/m/2.txt", "data": b"2"}]
# e2b 1.x writes several files through `write(list)`.
infos = sbx.files.write_files(many) if hasattr(sbx.files, "write_files") else sbx.files.write(many)
check(sorted(i.path for i in infos) == [f"{base}/m/2.txt", f"{base}/m1.txt"], f"write_files: {infos}")
try:
    sbx.files.read(f"{base}/missing.txt")
    check(False, "missing read")
except FileNotFoundException:
    checks += 1
try:
    sbx.files.read(base)
    check(False, "reading a dir")
except InvalidArgumentException as e:
    check("is a directory" in str(e), str(e))
sbx.files.write("rel-soulbox-test.txt", "r", "root")  # third positional = user in 1.x and 2.x
check(sbx.files.read("/root/rel-soulbox-test.txt") == "r", "relative path against home")
sbx.files.remove("/root/rel-soulbox-test.txt")
os_fifo = sbx.commands.run(f"mkfifo {base}/fifo && echo ok").stdout
try:
    sbx.files.read(f"{base}/fifo")
    check(False, "fifo read must fail")
except InvalidArgumentException as e:
    check("not a regular file" in str(e), str(e))

entries = sbx.files.list(base)
check(sorted(e.name for e in entries) == ["a", "fifo", "gz.bin", "m", "m1.txt"] or sorted(e.name for e in entries) == ["a", "gz.bin", "m", "m1.txt"], f"list: {[e.name for e in entries]}")
deep = sbx.files.list(base, depth=2)
check(f"{base}/a/b.txt" in [e.path for e in deep], "list depth 2")
sbx.commands.run(f"ln -s {base}/a {base}/link")
deep = sbx.files.list(base, depth=3)
check(not any(e.path.startswith(f"{base}/link/") for e in deep), "symlinked dirs not descended")
link = sbx.files.get_info(f"{base}/link")
# e2b 1.x has no symlink FileType and maps it to None.
want_type = "symlink" if hasattr(e2b.FileType, "SYMLINK") else None
check(getattr(link.type, "value", None) == want_type, f"symlink type: {link}")
check(getattr(link, "symlink_target", f"{base}/a") == f"{base}/a", f"symlink target: {link}")
fi = sbx.files.get_info(f"{base}/a/b.txt")
me = sbx.commands.run("whoami").stdout.strip()
check(fi.size == 5 and fi.permissions == "-rw-r--r--" and fi.owner == me and fi.mode == 0o644, f"info: {fi}")
check(sbx.files.exists(f"{base}/a") and not sbx.files.exists(f"{base}/zz"), "exists")
check(sbx.files.make_dir(f"{base}/new/deep"), "make_dir")
check(not sbx.files.make_dir(f"{base}/new/deep"), "make_dir existing is False")
moved = sbx.files.rename(f"{base}/a/b.txt", f"{base}/moved/c.txt")
check(moved.path == f"{base}/moved/c.txt" and sbx.files.read(moved.path) == "hello", "rename")
try:
    sbx.files.rename(f"{base}/nope", f"{base}/x")
    check(False, "rename missing")
except FileNotFoundException:
    checks += 1
sbx.files.remove(f"{base}/moved")
check(not sbx.files.exists(f"{base}/moved"), "remove")
sbx.files.remove(f"{base}/does-not-exist")

if supports(sbx.files.write, "metadata"):
    sbx.files.write(f"{base}/meta.txt", "m", metadata={"owner": "alice", "kind": "note"})
    mi = sbx.files.get_info(f"{base}/meta.txt")
    check(mi.metadata == {"owner": "alice", "kind": "note"}, f"metadata: {mi.metadata}")

# 200 MiB streamed round trip
blob = os.urandom(1 << 20) * 200
sbx.files.write(f"{base}/big.bin", blob)
got = sbx.files.read(f"{base}/big.bin", format="bytes")
check(hashlib.sha256(got).digest() == hashlib.sha256(blob).digest(), "200 MiB round trip")
chunks = b"".join(sbx.files.read(f"{base}/big.bin", format="stream"))
check(len(chunks) == len(blob), "stream read")
# A file-like object is streamed (octet-stream upload on SDKs that have it).
import io
sbx.files.write(f"{base}/filelike.bin", io.BytesIO(b"streamed" * 1000))
check(bytes(sbx.files.read(f"{base}/filelike.bin", format="bytes")) == b"streamed" * 1000, "file-like upload")

# --- watch (sync = polling watcher) ---------------------------------------------------------
sbx.files.make_dir(f"{base}/w")
wh = sbx.files.watch_dir(f"{base}/w", recursive=True)
sbx.files.write(f"{base}/w/f.txt", "1")
sbx.files.make_dir(f"{base}/w/sub")
time.sleep(0.2)
sbx.files.write(f"{base}/w/sub/g.txt", "2")
sbx.files.rename(f"{base}/w/f.txt", f"{base}/w/h.txt")
sbx.files.remove(f"{base}/w/h.txt")
time.sleep(0.3)
events = wh.get_new_events()
kinds = {(e.name, e.type.value) for e in events}
for want in [("f.txt", "create"), ("f.txt", "write"), ("sub", "create"), ("sub/g.txt", "create"), ("f.txt", "rename"), ("h.txt", "create"), ("h.txt", "remove")]:
    check(want in kinds, f"watch event {want} missing from {kinds}")
check(wh.get_new_events() == [], "events are drained")
wh.stop()
try:
    sbx.files.watch_dir(f"{base}/nope")
    check(False, "watch missing dir")
except (FileNotFoundException, NotFoundException):
    checks += 1

sbx.files.remove(base)
if not DEBUG:
    sbx.kill()
print(f"sync API: {checks} checks passed", flush=True)
# Every check has passed; skip interpreter finalization, where the SDK's HTTP transport
# (pyqwest: reqwest with its own native threads) has aborted the process ("PyGILState_Release:
# thread state ... must be current").
os._exit(0)
