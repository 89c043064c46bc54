#!/usr/bin/python3
"""Test agent for the runtime's tests (not the real agent).

Started by the runtime as PID 1 of a sandbox, as `/.soulbox/bin/soulbox agent --fd 3
--statfs-fd 4`, with the listening socket on fd 3 and the seccomp listener for statfs/fstatfs on
fd 4 (answered here by letting every call through to the kernel; the real agent answers those on
the root with the disk quota). Per connection it reads one JSON line {"cmd": str, "uid": int|null},
runs the command with /bin/sh (as that uid/gid if given), and answers with one JSON object
{"code", "stdout", "stderr"}; a command killed by signal N gets code -N.
"""
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import threading

# _IOWR('!', 0, struct seccomp_notif) and _IOWR('!', 1, struct seccomp_notif_resp).
NOTIF_RECV = 0xC0502100
NOTIF_SEND = 0xC0182101
USER_NOTIF_FLAG_CONTINUE = 1


def let_statfs_through(fd):
    """Answers every notification with 'continue' (a caller waits until someone answers)."""
    while True:
        req = bytearray(80)
        try:
            fcntl.ioctl(fd, NOTIF_RECV, req)
        except OSError:
            continue
        (notif_id,) = struct.unpack_from("=Q", req)
        try:
            fcntl.ioctl(fd, NOTIF_SEND, bytearray(struct.pack("=QqiI", notif_id, 0, 0, USER_NOTIF_FLAG_CONTINUE)))
        except OSError:
            pass


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
    assert sys.argv[1:] == ["agent", "--fd", "3", "--statfs-fd", "4"], sys.argv
    os.set_inheritable(4, False)
    threading.Thread(target=let_statfs_through, args=(4,), daemon=True).start()
    srv = socket.socket(fileno=3)
    os.set_inheritable(3, False)
    while True:
        conn, _ = srv.accept()
        with conn:
            handle(conn)


main()
