#!/usr/bin/python3
"""Test agent for the runtime's tests (not the real agent).

Started by the runtime as PID 1 of a sandbox, as `/.soulbox/bin/soulbox agent --fd 3`, with the
listening socket on fd 3. Per connection it reads one JSON line {"cmd": str, "uid": int|null},
runs the command with /bin/sh (as that uid/gid if given), and answers with one JSON object
{"code", "stdout", "stderr"}; a command killed by signal N gets code -N.
"""
import json
import os
import socket
import subprocess
import sys


def handle(conn):
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(65536)
        if not chunk:
            return
        buf += chunk
    req = json.loads(buf)
    uid = req.get("uid")
    kwargs = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    try:
        r = subprocess.run(["/bin/sh", "-c", req["cmd"]], capture_output=True, timeout=60, **kwargs)
        out = {"code": r.returncode, "stdout": r.stdout.decode(errors="replace"),
               "stderr": r.stderr.decode(errors="replace")}
    except Exception as e:  # report, never die: the agent is PID 1
        out = {"code": -1000, "stdout": "", "stderr": repr(e)}
    conn.sendall(json.dumps(out).encode())


def main():
    assert sys.argv[1:] == ["agent", "--fd", "3"], sys.argv
    srv = socket.socket(fileno=3)
    os.set_inheritable(3, False)
    while True:
        conn, _ = srv.accept()
        with conn:
            handle(conn)


main()
