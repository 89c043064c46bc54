"""Helpers shared by the SoulBox e2e tests: configuration, raw HTTP, a recording proxy, host probes."""

from __future__ import annotations

import http.client
import http.server
import importlib.metadata
import inspect
import os
import re
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from e2b import NotFoundException, Sandbox
from packaging.version import Version

E2B_VERSION = Version(importlib.metadata.version("e2b"))
# SDK >= 2.51 creates with POST /v2/sandboxes and connects with POST /v2/sandboxes/{id}/connect;
# 2.6 - 2.50 use the v1 routes (protocol doc §0.1).
USES_V2_ROUTES = E2B_VERSION >= Version("2.51.0")

SANDBOX_ID_RE = re.compile(r"^[a-z0-9]{20}$")
ENVD_PORT = "49983"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


@dataclass
class E2EEnv:
    """What the harness (scripts/test or a person) tells the suite about the server under test."""

    api_url: str
    sandbox_url: str
    api_key: str
    data_dir: Path | None
    serverctl: str | None
    strict: bool
    run_id: str = field(default_factory=lambda: f"r{int(time.time() * 1000)}")

    @classmethod
    def from_environ(cls) -> E2EEnv:
        missing = [n for n in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_API_KEY") if not os.environ.get(n)]
        if missing:
            raise RuntimeError(
                f"{', '.join(missing)} not set: point the suite at a running `soulbox serve` "
                "(paste the export lines it prints) or run scripts/test"
            )
        data_dir = os.environ.get("SOULBOX_DATA_DIR")
        return cls(
            api_url=os.environ["E2B_API_URL"].rstrip("/"),
            sandbox_url=os.environ["E2B_SANDBOX_URL"].rstrip("/"),
            api_key=os.environ["E2B_API_KEY"],
            data_dir=Path(data_dir) if data_dir else None,
            serverctl=os.environ.get("SOULBOX_SERVERCTL") or None,
            strict=env_flag("SOULBOX_E2E_STRICT"),
        )

    def api_headers(self, key: str | None = None) -> dict[str, str]:
        return {"X-API-Key": self.api_key if key is None else key}

    def restart_server(self) -> None:
        """Stops `soulbox serve` by PID and starts it again on the same data dir (tests/e2e/serverctl)."""
        if not self.serverctl:
            raise RuntimeError("SOULBOX_SERVERCTL is not set")
        subprocess.run([self.serverctl, "restart"], check=True, timeout=600)

    def crash_server(self) -> None:
        """SIGKILLs `soulbox serve` (no shutdown runs), then starts it again."""
        if not self.serverctl:
            raise RuntimeError("SOULBOX_SERVERCTL is not set")
        subprocess.run([self.serverctl, "crash"], check=True, timeout=60)
        subprocess.run([self.serverctl, "start"], check=True, timeout=600)


def pause(sbx: Sandbox, mode: str = "full") -> bool:
    """`sbx.pause(mode=...)`; SDKs before `mode` (2.50) spell it `keep_memory`."""
    if "mode" in inspect.signature(sbx._cls_pause).parameters:
        return sbx.pause(mode=mode)
    return sbx.pause(keep_memory=mode == "full")


def envd_headers(sandbox_id: str, access_token: str | None) -> dict[str, str]:
    """Headers the SDK puts on envd traffic in URL mode (protocol doc §2.4)."""
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": ENVD_PORT}
    if access_token is not None:
        headers["X-Access-Token"] = access_token
    return headers


def gone_from_api(sandbox_id: str) -> bool:
    """True once the control plane answers 404 for the sandbox."""
    try:
        Sandbox.get_info(sandbox_id)
    except NotFoundException:
        return True
    return False


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
}


class RecordingProxy:
    """A forwarding HTTP/1.1 proxy in front of the control plane that records (method, path).

    Used to prove which REST routes a given SDK version really calls (v1 vs v2 create/connect):
    the SDK is pointed at the proxy with ``api_url=proxy.url``; every request is forwarded
    unchanged to the real server and the real answer is returned.
    """

    def __init__(self, target: str):
        parsed = urllib.parse.urlsplit(target)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"RecordingProxy only forwards to http:// targets, got {target!r}")
        self.target_host = parsed.hostname
        self.target_port = parsed.port or 80
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args) -> None:
                return

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with proxy._lock:
                    proxy.requests.append((self.command, urllib.parse.urlsplit(self.path).path))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                conn = http.client.HTTPConnection(proxy.target_host, proxy.target_port, timeout=120)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP_BY_HOP:
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _forward

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def seen(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self.requests)


def read_text(path: Path) -> str | None:
    """Reads a host file that may vanish or be unreadable (a process that just exited)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def host_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def require(e2e: E2EEnv, what: str, available: bool) -> None:
    """Skips a test that needs harness support, or fails it when the harness promised it (strict)."""
    if available:
        return
    message = f"needs {what} (set by scripts/test)"
    if e2e.strict:
        pytest.fail(message)
    pytest.skip(message)
