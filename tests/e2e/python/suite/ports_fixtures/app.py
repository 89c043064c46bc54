"""A test web server to run inside a sandbox, on the standard library only.

    python3 app.py PORT [HOST]      (HOST defaults to 127.0.0.1: reachable only through the tunnel)

GET  /hello          "hello from the sandbox"
GET  /headers        the request headers as JSON
GET  /big?n=N        N bytes (default 4 MiB) of a repeating pattern
GET  /sse?gate=PATH  server-sent events: "data: 0", then waits (up to 60 s) for PATH to exist,
                     then "data: 1" and "data: 2"; proves the proxy streams instead of buffering
POST /echo           the request body
GET  /ws             WebSocket (RFC 6455) echo of text and binary messages; answers pings
"""

import base64
import hashlib
import http.server
import json
import os
import socketserver
import struct
import sys
import time
import urllib.parse

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PATTERN = bytes(range(256))


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body go out in separate writes: without this, Nagle holds the body back until
    # the client's delayed ACK (~40 ms per response).
    disable_nagle_algorithm = True

    def log_message(self, *args):
        return

    def reply(self, status, body, content_type="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path == "/hello":
            self.reply(200, b"hello from the sandbox")
        elif url.path == "/headers":
            self.reply(200, json.dumps({k.lower(): v for k, v in self.headers.items()}).encode(), "application/json")
        elif url.path == "/big":
            n = int(query.get("n", [4 << 20])[0])
            self.send_response(200)
            self.send_header("Content-Length", str(n))
            self.end_headers()
            sent = 0
            while sent < n:
                chunk = (PATTERN * 256)[: n - sent]
                self.wfile.write(chunk)
                sent += len(chunk)
        elif url.path == "/sse":
            self.sse(query.get("gate", [""])[0])
        elif url.path == "/ws":
            self.websocket()
        else:
            self.reply(404, b"not found")

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.reply(200, self.rfile.read(n), self.headers.get("Content-Type", "application/octet-stream"))

    def sse(self, gate):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        for i in range(3):
            self.wfile.write(f"data: {i}\n\n".encode())
            self.wfile.flush()
            if i == 0 and gate:
                deadline = time.monotonic() + 60
                while not os.path.exists(gate) and time.monotonic() < deadline:
                    time.sleep(0.05)

    def websocket(self):
        key = self.headers.get("Sec-WebSocket-Key")
        if not key or self.headers.get("Upgrade", "").lower() != "websocket":
            self.reply(400, b"send a WebSocket upgrade")
            return
        accept = base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        try:
            while True:
                opcode, payload = self.read_frame()
                if opcode == 0x8:
                    self.send_frame(0x8, payload[:2])
                    return
                if opcode == 0x9:
                    self.send_frame(0xA, payload)
                elif opcode in (0x1, 0x2):
                    self.send_frame(opcode, payload)
        except (EOFError, ConnectionError):
            return

    def read_exact(self, n):
        data = self.rfile.read(n)
        if len(data) != n:
            raise EOFError
        return data

    def read_frame(self):
        b0, b1 = self.read_exact(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", self.read_exact(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", self.read_exact(8))[0]
        mask = self.read_exact(4) if b1 & 0x80 else b"\0\0\0\0"
        data = self.read_exact(n)
        return b0 & 0x0F, bytes(c ^ mask[i % 4] for i, c in enumerate(data))

    def send_frame(self, opcode, payload):
        n = len(payload)
        if n < 126:
            head = struct.pack(">BB", 0x80 | opcode, n)
        elif n < 65536:
            head = struct.pack(">BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack(">BBQ", 0x80 | opcode, 127, n)
        self.wfile.write(head + payload)
        self.wfile.flush()


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024


if __name__ == "__main__":
    port = int(sys.argv[1])
    host = sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1"
    Server((host, port), Handler).serve_forever()
