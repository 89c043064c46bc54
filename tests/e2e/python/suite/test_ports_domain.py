"""Domain mode (issue 8) with the SDK of this venv and nothing but E2B_DOMAIN: create, commands,
files, get_host(port) over HTTPS and WebSocket, the closed-port and dead-sandbox 502s, and, in
the code-interpreter venvs, run_code. Every SDK version speaks this mode (1.x only this one).

The flow runs in a fresh interpreter of this venv (ports_fixtures/domain_flow.py) whose
environment has E2B_DOMAIN, SSL_CERT_FILE and E2B_API_KEY but no E2B_API_URL/E2B_SANDBOX_URL,
so every request takes https://api.<domain> or https://<port>-<id>.<domain>. Needs the server
in domain mode with *.localhost resolving (scripts/test: --domain, scripts/localhost-dns) and,
in the code-interpreter venvs, the code-interpreter-v1 template built.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import require

FLOW = Path(__file__).parent / "ports_fixtures" / "domain_flow.py"
CI_TEMPLATE = "code-interpreter-v1"
HAS_CI = importlib.util.find_spec("e2b_code_interpreter") is not None


@pytest.fixture(scope="module")
def domain_env(e2e) -> dict[str, str]:
    domain = os.environ.get("E2B_DOMAIN")
    cert = os.environ.get("SSL_CERT_FILE")
    require(e2e, "a server in domain mode (E2B_DOMAIN, SSL_CERT_FILE)", bool(domain and cert))
    env = {k: v for k, v in os.environ.items() if k not in ("E2B_API_URL", "E2B_SANDBOX_URL")}
    env.update({"E2B_DOMAIN": domain, "SSL_CERT_FILE": cert, "E2B_API_KEY": e2e.api_key})
    return env


def run_flow(e2e, env: dict[str, str], *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(FLOW), e2e.run_id, *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"domain flow failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_core_flow(out: dict, domain: str) -> None:
    sid = out["sandbox_id"]
    assert out["domain"] == domain
    assert out["echo"] == "42 true\n"
    assert out["read"] == "written in domain mode"
    assert "domain.txt" in out["listed"]
    assert out["host"] == f"8000-{sid}.{domain}"
    assert out["hello"] == [200, "hello from the sandbox"]
    assert out["ws_status"] == 101
    assert out["ws_echoed"] == [True, True]
    status, body = out["closed_port"]
    assert status == 502
    assert body == {
        "sandboxId": sid,
        "message": "The sandbox is running but port is not open",
        "port": 8001,
        "code": 502,
    }
    status, body = out["after_kill"]
    assert status == 502
    assert body["sandboxId"] == sid
    assert "was not found" in body["message"]


@pytest.mark.skipif(HAS_CI, reason="the code-interpreter venvs run the flow with run_code")
def test_core_flow_in_domain_mode(e2e, domain_env):
    out = run_flow(e2e, domain_env)
    check_core_flow(out, domain_env["E2B_DOMAIN"])


@pytest.mark.skipif(not HAS_CI, reason="needs e2b-code-interpreter (tests/e2e/.venv-ci-*)")
def test_core_flow_and_run_code_in_domain_mode(e2e, domain_env):
    out = run_flow(e2e, domain_env, "--code-interpreter", CI_TEMPLATE)
    check_core_flow(out, domain_env["E2B_DOMAIN"])
    assert out["run_code"] == {"text": "42", "stdout": ["streamed\n"], "error": None}
