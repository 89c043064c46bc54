"""Runs last: after every attack, the bystanders and the server still work."""

from __future__ import annotations

from e2b import Sandbox

from conftest import api_health_ms, record, run


def test_canary_survived_everything(canary, env):
    problems = []
    if run(canary, "echo alive").stdout.strip() != "alive":
        problems.append("the canary does not answer")
    if canary.files.read("/home/user/canary.txt") != "still here":
        problems.append("the canary's file changed")
    if "canary-sleeper" not in run(canary, "ps -eo args").stdout:
        problems.append("the canary's process is gone")
    ms = api_health_ms(env)
    info = Sandbox.get_info(canary.sandbox_id)
    record("aftermath: canary sandbox and API after the whole battery", "-", problems,
           f"canary answers, file and process intact; API /health {ms:.0f} ms; state {info.state.value}")


def test_neighbour_survived_everything(neighbour):
    assert run(neighbour.sbx, "echo alive").stdout.strip() == "alive"
    assert neighbour.sbx.files.read(f"/home/user/{neighbour.marker}") == neighbour.marker
