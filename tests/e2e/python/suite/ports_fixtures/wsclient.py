"""A minimal WebSocket client on the standard library (the SDK venvs have no WebSocket package):
enough to open /ws on a sandbox port through the gateway and exchange frames."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import struct


class WebSocket:
    def __init__(self, sock: socket.socket, status: int, head: str):
        self.sock = sock
        self.file = sock.makefile("rb")
        self.status = status
        self.head = head

    def send(self, payload: bytes, opcode: int = 0x2) -> None:
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
        self.sock.sendall(head + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(payload)))

    def recv(self) -> tuple[int, bytes]:
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self._read(8))[0]
        return b0 & 0x0F, self._read(n)

    def _read(self, n: int) -> bytes:
        data = self.file.read(n)
        if len(data) != n:
            raise EOFError("connection closed")
        return data

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def connect(
    address: tuple[str, int],
    host: str,
    *,
    tls: bool,
    cafile: str | None = None,
    headers: dict[str, str] | None = None,
    path: str = "/ws",
    timeout: float = 30,
) -> WebSocket:
    """Opens a WebSocket to `address` with Host `host` (TLS server name: `host` without port)."""
    sock = socket.create_connection(address, timeout=timeout)
    if tls:
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.set_alpn_protocols(["http/1.1"])
        sock = ctx.wrap_socket(sock, server_hostname=host.rsplit(":", 1)[0])
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()
    )
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            break
        head += byte
    text = head.decode("latin-1")
    status = int(text.split(" ", 2)[1]) if text.startswith("HTTP/") else 0
    return WebSocket(sock, status, text)
