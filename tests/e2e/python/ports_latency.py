"""Not a test: the latency the port tunnel adds (issue 8). A small HTTP GET (`/hello`, 22 bytes)
to the test app in a sandbox, N times over one kept-alive connection each way:

* inside the sandbox, from a Python client to 127.0.0.1:8000 (the floor);
* through the gateway in URL mode (plain HTTP, E2b-Sandbox-Id/-Port headers);
* through get_host(8000) in domain mode (TLS), when E2B_DOMAIN and SSL_CERT_FILE are set;
* the same through a new connection per request (TCP, or TCP + TLS handshake, + a new tunnel).

    E2B_API_URL=… E2B_SANDBOX_URL=… E2B_API_KEY=… [E2B_DOMAIN=… SSL_CERT_FILE=…] \\
        ../.venv-latest/bin/python ports_latency.py [N]
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

from e2b import Sandbox

from stats import summary

N = int(sys.argv[1]) if len(sys.argv) > 1 else 500
APP = (Path(__file__).parent / "suite" / "ports_fixtures" / "app.py").read_text()

INSIDE = """
import http.client, json, sys, time
n = int(sys.argv[1])
c = http.client.HTTPConnection("127.0.0.1", 8000)
ts = []
for _ in range(n):
    t0 = time.perf_counter()
    c.request("GET", "/hello")
    c.getresponse().read()
    ts.append(time.perf_counter() - t0)
print(json.dumps(ts))
"""


def report(name: str, seconds: list[float]) -> None:
    s = summary([t * 1e3 for t in seconds])
    print(f"{name:<44} p50 {s['p50']:7.3f} ms   p90 {s['p90']:7.3f} ms   p99 {s['p99']:7.3f} ms")


def timed(conn_factory, headers: dict[str, str], reuse: bool) -> list[float]:
    ts = []
    conn = conn_factory() if reuse else None
    for _ in range(N):
        t0 = time.perf_counter()
        c = conn or conn_factory()
        c.request("GET", "/hello", headers=headers)
        body = c.getresponse().read()
        if not reuse:
            c.close()
        ts.append(time.perf_counter() - t0)
        assert body == b"hello from the sandbox", body
    return ts


def main() -> None:
    sbx = Sandbox.create(timeout=600, metadata={"purpose": "ports-latency"})
    try:
        sbx.files.write("/home/user/app.py", APP)
        sbx.files.write("/home/user/inside.py", INSIDE)
        sbx.commands.run("python3 /home/user/app.py 8000", background=True)
        gw = urllib.parse.urlsplit(os.environ["E2B_SANDBOX_URL"])
        routed = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "8000"}
        plain = lambda: http.client.HTTPConnection(gw.hostname, gw.port, timeout=30)  # noqa: E731
        for _ in range(100):
            try:
                timed_ok = timed(plain, routed, True)
                break
            except (AssertionError, ConnectionError):
                time.sleep(0.2)
        inside = json.loads(sbx.commands.run(f"python3 /home/user/inside.py {N}").stdout)
        print(f"{N} GET /hello each, sandbox {sbx.sandbox_id}")
        report("inside the sandbox (127.0.0.1:8000)", inside)
        report("URL mode, kept-alive connection", timed_ok)
        report("URL mode, new connection each", timed(plain, routed, False))
        domain = os.environ.get("E2B_DOMAIN")
        if domain and os.environ.get("SSL_CERT_FILE"):
            host = sbx.get_host(8000)
            name, port = host.rsplit(":", 1) if ":" in host else (host, "443")
            ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
            tls = lambda: http.client.HTTPSConnection(name, int(port), context=ctx, timeout=30)  # noqa: E731
            report("domain mode (TLS), kept-alive connection", timed(tls, {}, True))
            report("domain mode (TLS), new connection each", timed(tls, {}, False))
        print(
            f"added by the tunnel (URL mode, kept alive): p50 "
            f"{(statistics.median(timed_ok) - statistics.median(inside)) * 1e3:.3f} ms"
        )
    finally:
        sbx.kill()


if __name__ == "__main__":
    main()
