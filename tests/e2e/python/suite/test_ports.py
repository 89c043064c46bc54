"""Sandbox ports (issue 8) with this venv's SDK: servers started inside a sandbox, bound to its
loopback only, reached through the gateway with the E2b-Sandbox-Id/E2b-Sandbox-Port headers
(URL mode) and through get_host(port) (domain mode: https://<port>-<id>.<domain>, trusting the
server's local CA). HTTP, streamed server-sent events, WebSockets, and the 502s the SDKs key on.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import Sandbox

from helpers import require, wait_until

sys.path.insert(0, str(Path(__file__).parent / "ports_fixtures"))
import wsclient  # noqa: E402

APP = (Path(__file__).parent / "ports_fixtures" / "app.py").read_text()
APP_PORT = 8000
HTTP_SERVER_PORT = 8001


def gateway_request(
    e2e,
    sandbox_id: str,
    port: int,
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> http.client.HTTPResponse:
    """A request to `port` of the sandbox through the plain gateway, addressed by headers."""
    url = urllib.parse.urlsplit(e2e.sandbox_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    hdrs = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port), **(headers or {})}
    conn.request(method, path, body=body, headers=hdrs)
    return conn.getresponse()


def fetch(e2e, sandbox_id: str, port: int, path: str, **kw) -> tuple[int, bytes]:
    r = gateway_request(e2e, sandbox_id, port, path, **kw)
    return r.status, r.read()


@pytest.fixture(scope="module")
def app(make_sandbox, e2e) -> Iterator[Sandbox]:
    """A sandbox running the test app on 127.0.0.1:8000 and `python3 -m http.server` on 8001."""
    sbx = make_sandbox()
    sbx.files.write("/home/user/app.py", APP)
    sbx.files.write("/home/user/www/index.txt", "served by python3 -m http.server\n")
    sbx.commands.run(f"python3 /home/user/app.py {APP_PORT}", background=True)
    sbx.commands.run(
        f"python3 -m http.server {HTTP_SERVER_PORT} --bind 127.0.0.1 --directory /home/user/www",
        background=True,
    )
    for port, path in ((APP_PORT, "/hello"), (HTTP_SERVER_PORT, "/index.txt")):
        assert wait_until(lambda: fetch(e2e, sbx.sandbox_id, port, path)[0] == 200, 30), port
    yield sbx
    Sandbox.kill(sbx.sandbox_id)


def test_python_http_server_through_headers(e2e, app):
    status, body = fetch(e2e, app.sandbox_id, HTTP_SERVER_PORT, "/index.txt")
    assert (status, body) == (200, b"served by python3 -m http.server\n")
    status, body = fetch(e2e, app.sandbox_id, HTTP_SERVER_PORT, "/")
    assert status == 200 and b"index.txt" in body


def test_requests_and_bodies_through_headers(e2e, app):
    assert fetch(e2e, app.sandbox_id, APP_PORT, "/hello") == (200, b"hello from the sandbox")
    payload = os.urandom(200_000)
    assert fetch(e2e, app.sandbox_id, APP_PORT, "/echo", method="POST", body=payload) == (200, payload)
    status, body = fetch(e2e, app.sandbox_id, APP_PORT, "/big?n=3000000")
    assert status == 200 and len(body) == 3_000_000
    status, body = fetch(e2e, app.sandbox_id, APP_PORT, "/headers")
    seen = json.loads(body)
    assert seen["x-forwarded-proto"] == "http"
    assert "x-forwarded-for" in seen


def test_server_sent_events_are_streamed(e2e, app):
    gate = f"/tmp/sse-gate-{time.monotonic_ns()}"
    r = gateway_request(e2e, app.sandbox_id, APP_PORT, f"/sse?gate={gate}")
    assert r.status == 200
    assert r.getheader("Content-Type") == "text/event-stream"
    # The first event arrives while the server waits for the gate, which only opens now.
    assert r.readline() == b"data: 0\n"
    assert r.readline() == b"\n"
    app.commands.run(f"touch {gate}")
    assert r.read() == b"data: 1\n\ndata: 2\n\n"


def test_websocket_through_headers(e2e, app):
    url = urllib.parse.urlsplit(e2e.sandbox_url)
    ws = wsclient.connect(
        (url.hostname, url.port),
        url.netloc,
        tls=False,
        headers={"E2b-Sandbox-Id": app.sandbox_id, "E2b-Sandbox-Port": str(APP_PORT)},
    )
    try:
        assert ws.status == 101, ws.head
        for msg in (b"hello", os.urandom(100_000)):
            ws.send(msg)
            assert ws.recv() == (0x2, msg)
        ws.send(b"ping", opcode=0x9)
        assert ws.recv() == (0xA, b"ping")
    finally:
        ws.close()


def test_closed_port_is_502_port_not_open(e2e, app):
    api_port = urllib.parse.urlsplit(e2e.api_url).port
    # Nothing listens on 8002 in the sandbox; the server's own API port is not the sandbox's.
    for port in (8002, api_port):
        status, body = fetch(e2e, app.sandbox_id, port, "/")
        assert status == 502
        assert json.loads(body) == {
            "sandboxId": app.sandbox_id,
            "message": "The sandbox is running but port is not open",
            "port": port,
            "code": 502,
        }


def test_bad_ports_are_400(e2e, app):
    for port in ("0", "65536", "99999", "http"):
        r = gateway_request(e2e, app.sandbox_id, 0, "/", headers={"E2b-Sandbox-Port": port})
        assert r.status == 400, port
        assert json.loads(r.read())["code"] == 400


def test_dead_sandbox_is_502_not_found(e2e, make_sandbox):
    sbx = make_sandbox()
    sandbox_id = sbx.sandbox_id
    Sandbox.kill(sandbox_id)
    status, body = fetch(e2e, sandbox_id, APP_PORT, "/hello")
    assert status == 502
    assert json.loads(body)["sandboxId"] == sandbox_id
    assert "was not found" in json.loads(body)["message"]


@pytest.fixture(scope="module")
def tls(e2e) -> ssl.SSLContext:
    cert = os.environ.get("SSL_CERT_FILE")
    require(e2e, "a server in domain mode (E2B_DOMAIN, SSL_CERT_FILE)", bool(os.environ.get("E2B_DOMAIN") and cert))
    return ssl.create_default_context(cafile=cert)


def https_get(tls: ssl.SSLContext, url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, context=tls, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_get_host_in_domain_mode(app, tls):
    domain = os.environ["E2B_DOMAIN"]
    host = app.get_host(APP_PORT)
    assert host == f"{APP_PORT}-{app.sandbox_id}.{domain}"
    assert https_get(tls, f"https://{host}/hello") == (200, b"hello from the sandbox")
    status, body = https_get(tls, f"https://{app.get_host(HTTP_SERVER_PORT)}/index.txt")
    assert (status, body) == (200, b"served by python3 -m http.server\n")
    status, body = https_get(tls, f"https://{host}/headers")
    seen = json.loads(body)
    assert seen["host"] == host, "the server sees the client's host"
    assert seen["x-forwarded-proto"] == "https"
    status, body = https_get(tls, f"https://{app.get_host(8002)}/")
    assert status == 502 and json.loads(body)["port"] == 8002


def test_websocket_through_get_host(app, tls):
    host = app.get_host(APP_PORT)
    name, port = host.rsplit(":", 1) if ":" in host else (host, "443")
    ws = wsclient.connect((name, int(port)), host, tls=True, cafile=os.environ["SSL_CERT_FILE"])
    try:
        assert ws.status == 101, ws.head
        for msg in (b"over tls", os.urandom(70_000)):
            ws.send(msg)
            assert ws.recv() == (0x2, msg)
    finally:
        ws.close()
