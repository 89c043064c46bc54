"""The core SDK flow in pure domain mode, run by test_ports_domain.py in a fresh interpreter of
the venv under test, whose environment has E2B_DOMAIN, SSL_CERT_FILE and E2B_API_KEY but no
E2B_API_URL / E2B_SANDBOX_URL: every request goes to https://api.<domain> or
https://<port>-<id>.<domain>. Works with e2b 1.x and 2.x, and with e2b-code-interpreter (then
also run_code). Prints one JSON object with what it saw; the test asserts on it.

    python domain_flow.py RUN_ID [--code-interpreter TEMPLATE]
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wsclient  # noqa: E402

APP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "app.py")
run_id = sys.argv[1]
ci_template = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--code-interpreter" else None

if ci_template:
    from e2b_code_interpreter import Sandbox
else:
    from e2b import Sandbox

out: dict = {"e2b": importlib.metadata.version("e2b")}
ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


kwargs = {"timeout": 300, "metadata": {"e2e-run": run_id, "sdk": f"domain-{out['e2b']}"}}
if ci_template:
    kwargs["template"] = ci_template
sbx = Sandbox.create(**kwargs) if hasattr(Sandbox, "create") else Sandbox(**kwargs)
try:
    out["sandbox_id"] = sbx.sandbox_id
    out["domain"] = sbx.sandbox_domain
    out["echo"] = sbx.commands.run("echo $((6 * 7)) $E2B_SANDBOX").stdout
    sbx.files.write("/home/user/domain.txt", "written in domain mode")
    out["read"] = sbx.files.read("/home/user/domain.txt")
    out["listed"] = sorted(e.name for e in sbx.files.list("/home/user"))
    with open(APP) as f:
        sbx.files.write("/home/user/app.py", f.read())
    sbx.commands.run("python3 /home/user/app.py 8000", background=True)

    host = sbx.get_host(8000)
    out["host"] = host
    deadline = time.monotonic() + 30
    while True:
        status, body = get(f"https://{host}/hello")
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    out["hello"] = [status, body.decode(errors="replace")]

    name, port = host.rsplit(":", 1) if ":" in host else (host, "443")
    ws = wsclient.connect((name, int(port)), host, tls=True, cafile=os.environ["SSL_CERT_FILE"])
    out["ws_status"] = ws.status
    echoed = []
    for msg in (b"over tls", b"x" * 70_000):
        ws.send(msg)
        echoed.append(ws.recv() == (0x2, msg))
    ws.close()
    out["ws_echoed"] = echoed

    status, body = get(f"https://{sbx.get_host(8001)}/")
    out["closed_port"] = [status, json.loads(body or b"null")]

    if ci_template:
        execution = sbx.run_code("x = 20\nprint('streamed')\nx * 2 + 2")
        out["run_code"] = {
            "text": execution.text,
            "stdout": execution.logs.stdout,
            "error": None if execution.error is None else execution.error.name,
        }
finally:
    sbx.kill()

status, body = get(f"https://{out.get('host', sbx.get_host(8000))}/hello")
out["after_kill"] = [status, json.loads(body or b"null")]
print(json.dumps(out))
