"""Runs `soulbox agent --fd 3` the way the runtime does, for SDK tests without a server.

The agent is PID 1 of a bubblewrap sandbox (own pid/ipc/uts namespaces, a throwaway overlay
over a Debian rootfs, users `root` and `user`), serves the listening unix socket it inherits
as fd 3, and gets `/_soulbox/init` like core sends it. A TCP bridge on 127.0.0.1:PORT makes
it reachable by the SDKs' debug mode (`E2B_DEBUG=true` talks to localhost:49983).

Run: python3 sandboxed_agent.py target/debug/soulbox [--rootfs /tmp/rootfs-trial/root] [--port 49983]
Stop with Ctrl-C / SIGTERM.
"""

import argparse
import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile

ap = argparse.ArgumentParser()
ap.add_argument("binary")
ap.add_argument("--rootfs", default="/tmp/rootfs-trial/root")
ap.add_argument("--port", type=int, default=49983)
args = ap.parse_args()

work = tempfile.mkdtemp(prefix="soulbox-sbx-agent-")
with open(os.path.join(args.rootfs, "etc/passwd")) as f:
    passwd = [l for l in f.read().splitlines() if not l.startswith("user:")]
with open(os.path.join(args.rootfs, "etc/group")) as f:
    group = [l for l in f.read().splitlines() if not l.startswith("user:")]
passwd.append("user:x:1000:1000::/home/user:/bin/bash")
group.append("user:x:1000:")
for name, lines in (("passwd", passwd), ("group", group)):
    with open(os.path.join(work, name), "w") as f:
        f.write("\n".join(lines) + "\n")

# A throwaway overlay over the (read-only) rootfs.
merged = os.path.join(work, "root")
for d in ("upper", "work", "root"):
    os.mkdir(os.path.join(work, d))
subprocess.run(
    ["mount", "-t", "overlay", "overlay", "-o",
     f"lowerdir={args.rootfs},upperdir={work}/upper,workdir={work}/work", merged],
    check=True,
)

sock_path = os.path.join(work, "agent.sock")
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sock_path)
listener.listen(512)
os.dup2(listener.fileno(), 3, inheritable=True)

cmd = [
    "bwrap",
    "--bind", merged, "/",
    "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/run",
    "--ro-bind", os.path.abspath(args.binary), "/.soulbox/bin/soulbox",
    "--ro-bind", os.path.join(work, "passwd"), "/etc/passwd",
    "--ro-bind", os.path.join(work, "group"), "/etc/group",
    "--dir", "/home/user", "--chmod", "0777", "/home/user",
    "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", "sbxdev",
    "--as-pid-1", "--die-with-parent",
    "--setenv", "PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "/.soulbox/bin/soulbox", "agent", "--fd", "3",
]
agent = subprocess.Popen(cmd, pass_fds=[3])
os.close(3)


class UnixConnection(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sock_path)


init = {"sandboxId": "sbxdev", "templateId": "trial", "envVars": {"FROM_INIT": "yes"},
        "defaultUser": "user", "defaultWorkdir": "/home/user"}
c = UnixConnection("agent")
c.request("POST", "/_soulbox/init", body=json.dumps(init), headers={"content-type": "application/json"})
status = c.getresponse().status
assert status == 204, f"init failed: {status}"


async def bridge(reader, writer):
    try:
        ur, uw = await asyncio.open_unix_connection(sock_path)
    except OSError:
        writer.close()
        return

    async def pipe(r, w):
        try:
            while data := await r.read(1 << 16):
                w.write(data)
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                w.write_eof()
            except (OSError, RuntimeError):
                pass

    await asyncio.gather(pipe(reader, uw), pipe(ur, writer))
    writer.close()
    uw.close()


async def main():
    server = await asyncio.start_server(bridge, "127.0.0.1", args.port)
    print(f"agent pid {agent.pid} (PID 1 inside) on {sock_path}, bridged to 127.0.0.1:{args.port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await stop
    server.close()


try:
    asyncio.run(main())
finally:
    agent.kill()
    agent.wait()
    subprocess.run(["umount", "-l", merged], check=False)
    subprocess.run(["rm", "-rf", "--one-file-system", work], check=False)
    sys.exit(0)
