"""Drives the agent with the real E2B Python SDK (async API): a development agent in debug mode
(E2B_DEBUG=true) or, with E2B_API_URL/E2B_SANDBOX_URL instead, a sandbox of a real server.

Run: target/debug/soulbox agent --listen 127.0.0.1:49983 &
     E2B_DEBUG=true E2B_API_KEY=e2b_$(printf '0%.0s' {1..40}) python async_api.py
"""

import asyncio
import hashlib
import inspect
import os
import uuid

import e2b
from e2b import AsyncSandbox, CommandExitException, NotFoundException

# e2b 1.x raises NotFoundException where 2.x raises its subclass FileNotFoundException.
FileNotFoundException = getattr(e2b, "FileNotFoundException", NotFoundException)
from e2b.sandbox.commands.command_handle import PtySize

checks = 0


def check(cond, what):
    global checks
    if not cond:
        raise AssertionError(what)
    checks += 1


async def main():
    global checks
    debug = os.environ.get("E2B_DEBUG", "").lower() == "true"
    sbx = await AsyncSandbox.create(**({"debug": True} if debug else {}))
    base = f"/tmp/soulbox-sdk-async-{uuid.uuid4().hex[:8]}"

    r = await sbx.commands.run("echo hi; echo err >&2", envs={"A": "1"})
    check((r.stdout, r.stderr) == ("hi\n", "err\n"), f"run: {r}")
    try:
        await sbx.commands.run("exit 4")
        check(False, "exit 4 must raise")
    except CommandExitException as e:
        check(e.exit_code == 4, str(e))

    # ten concurrent commands
    rs = await asyncio.gather(*[sbx.commands.run(f"echo {i}") for i in range(10)])
    check([x.stdout for x in rs] == [f"{i}\n" for i in range(10)], "concurrent runs")

    h = await sbx.commands.run("sleep 0.5; echo done", background=True)
    await h.disconnect()
    h2 = await sbx.commands.connect(h.pid)
    check((await h2.wait()).stdout == "done\n", "async connect")

    if hasattr(sbx.commands, "close_stdin"):  # e2b >= 2
        h = await sbx.commands.run("cat", background=True, stdin=True)
        await sbx.commands.send_stdin(h.pid, "abc")
        await sbx.commands.close_stdin(h.pid)
    else:  # e2b 1.x: stdin is always open and cannot be closed
        h = await sbx.commands.run("head -c 3", background=True)
        await sbx.commands.send_stdin(h.pid, "abc")
    check((await h.wait()).stdout == "abc", "async stdin")

    out = []
    term = await sbx.pty.create(PtySize(rows=10, cols=50), on_data=lambda d: out.append(bytes(d)))
    await sbx.pty.send_stdin(term.pid, b"stty size\n")
    # Resize only after the first answer (a slow login profile may delay the shell).
    for _ in range(100):
        if b"10 50" in b"".join(out):
            break
        await asyncio.sleep(0.05)
    await sbx.pty.resize(term.pid, PtySize(rows=33, cols=77))
    await sbx.pty.send_stdin(term.pid, b"stty size; exit\n")
    await term.wait()
    text = b"".join(out).decode(errors="replace")
    check("10 50" in text and "33 77" in text, f"pty: {text!r}")

    # two PTYs at once
    a_out, b_out = [], []
    ta = await sbx.pty.create(PtySize(rows=5, cols=20), on_data=lambda d: a_out.append(bytes(d)))
    tb = await sbx.pty.create(PtySize(rows=6, cols=30), on_data=lambda d: b_out.append(bytes(d)))
    await sbx.pty.send_stdin(ta.pid, b"stty size; exit\n")
    await sbx.pty.send_stdin(tb.pid, b"stty size; exit\n")
    await ta.wait()
    await tb.wait()
    check(b"5 20" in b"".join(a_out) and b"6 30" in b"".join(b_out), "two PTYs")
    check(await sbx.pty.kill(999999) is False, "pty kill unknown")

    await sbx.files.make_dir(f"{base}/w")
    events = []
    entries = "include_entry" in inspect.signature(sbx.files.watch_dir).parameters  # e2b >= 2
    extra = {"include_entry": True} if entries else {}
    wh = await sbx.files.watch_dir(f"{base}/w", lambda e: events.append(e), recursive=True, **extra)
    await sbx.files.write(f"{base}/w/x.txt", "1")
    await sbx.files.make_dir(f"{base}/w/d")
    await asyncio.sleep(0.2)
    await sbx.files.write(f"{base}/w/d/y.txt", "2")
    await sbx.files.rename(f"{base}/w/x.txt", f"{base}/w/z.txt")
    await sbx.files.remove(f"{base}/w/z.txt")
    await asyncio.sleep(0.3)
    await wh.stop()
    kinds = {(e.name, e.type.value) for e in events}
    for want in [("x.txt", "create"), ("x.txt", "write"), ("d", "create"), ("d/y.txt", "create"), ("x.txt", "rename"), ("z.txt", "create"), ("z.txt", "remove")]:
        check(want in kinds, f"watch {want} missing in {kinds}")
    if entries:
        created = [e for e in events if e.name == "x.txt" and e.type.value == "create"]
        check(created and created[0].entry is not None and created[0].entry.path == f"{base}/w/x.txt", f"include_entry: {created}")

    blob = os.urandom(1 << 20) * 20
    await sbx.files.write(f"{base}/big", blob)
    got = await sbx.files.read(f"{base}/big", format="bytes")
    check(hashlib.sha256(got).digest() == hashlib.sha256(blob).digest(), "20 MiB async round trip")
    try:
        await sbx.files.read(f"{base}/nope")
        check(False, "missing")
    except FileNotFoundException:
        checks += 1
    lst = await sbx.files.list(base)
    check(sorted(e.name for e in lst) == ["big", "w"], f"list {lst}")
    await sbx.files.remove(base)
    if not debug:
        await sbx.kill()
    print(f"async API: {checks} checks passed", flush=True)


asyncio.run(main())
# Every check has passed; skip interpreter finalization, where the SDK's HTTP transport
# (pyqwest: reqwest with its own native threads) has aborted the process ("PyGILState_Release:
# thread state ... must be current").
os._exit(0)
