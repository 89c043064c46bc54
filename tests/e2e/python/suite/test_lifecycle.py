"""Sandbox lifecycle through the SDK: create (v1/v2 routes), info, list + metadata filter, timeout, kill."""

from __future__ import annotations

import datetime as dt

import httpx
import pytest
from e2b import NotFoundException, Sandbox, SandboxQuery, SandboxState
from packaging.version import Version

from helpers import SANDBOX_ID_RE, USES_V2_ROUTES, RecordingProxy, gone_from_api, wait_until

UNKNOWN_ID = "zzzzzzzzzzzzzzzzzzzz"  # well-formed, never issued


def test_create_and_connect_use_the_routes_of_this_sdk_version(e2e, tracker):
    """SDK >= 2.51 must create/connect via /v2; older ones via the v1 routes; both must work."""
    with RecordingProxy(e2e.api_url) as proxy:
        sbx = Sandbox.create(timeout=120, api_url=proxy.url, metadata={"e2e-run": e2e.run_id})
        tracker.add(sbx.sandbox_id)
        try:
            assert SANDBOX_ID_RE.match(sbx.sandbox_id), sbx.sandbox_id
            again = Sandbox.connect(sbx.sandbox_id, api_url=proxy.url)
            # The connected handle got its own access token from the API and can talk to envd.
            assert again.commands.run("echo connected").stdout == "connected\n"
            seen = proxy.seen()
        finally:
            Sandbox.kill(sbx.sandbox_id)

    prefix = "/v2" if USES_V2_ROUTES else ""
    assert ("POST", f"{prefix}/sandboxes") in seen, seen
    assert ("POST", f"{prefix}/sandboxes/{sbx.sandbox_id}/connect") in seen, seen
    other = "" if USES_V2_ROUTES else "/v2"
    assert ("POST", f"{other}/sandboxes") not in seen, seen


@pytest.mark.parametrize("route", ["/sandboxes", "/v2/sandboxes"])
def test_create_response_on_both_routes(e2e, tracker, route):
    """Both create routes answer 201 with the fields the SDK parsers require (protocol doc §3.4)."""
    body = {"templateID": "base", "timeout": 60, "metadata": {"e2e-run": e2e.run_id}, "envVars": {}}
    if route == "/sandboxes":
        body["secure"] = True
    r = httpx.post(f"{e2e.api_url}{route}", json=body, headers=e2e.api_headers(), timeout=120)
    assert r.status_code == 201, r.text
    data = r.json()
    tracker.add(data["sandboxID"])
    try:
        assert SANDBOX_ID_RE.match(data["sandboxID"])
        for key in ("templateID", "clientID", "envdVersion", "envdAccessToken"):
            assert isinstance(data.get(key), str) and data[key], (key, data)
        assert Version(data["envdVersion"]) >= Version("0.6.4"), data["envdVersion"]
        assert "domain" in data
    finally:
        d = httpx.delete(f"{e2e.api_url}/sandboxes/{data['sandboxID']}", headers=e2e.api_headers())
        assert d.status_code == 204, d.text


def test_get_info(make_sandbox):
    before = dt.datetime.now(dt.UTC)
    sbx = make_sandbox(timeout=200, metadata={"purpose": "info"})
    try:
        info = sbx.get_info()
        static_info = Sandbox.get_info(sbx.sandbox_id)
        assert info.sandbox_id == static_info.sandbox_id == sbx.sandbox_id
        assert "base" in (info.template_id, info.name)
        assert info.metadata["purpose"] == "info"
        assert info.state == SandboxState.RUNNING
        assert info.cpu_count == 2 and info.memory_mb == 512  # the skeleton's default limits
        assert before - dt.timedelta(seconds=5) <= info.started_at <= dt.datetime.now(dt.UTC)
        lifetime = (info.end_at - info.started_at).total_seconds()
        assert 195 <= lifetime <= 205, lifetime
        assert Version(info.envd_version) >= Version("0.6.4")
    finally:
        sbx.kill()


def test_set_timeout_moves_end_at(make_sandbox):
    sbx = make_sandbox(timeout=300)
    try:
        sbx.set_timeout(30)
        end_at = sbx.get_info().end_at
        remaining = (end_at - dt.datetime.now(dt.UTC)).total_seconds()
        assert 20 <= remaining <= 31, remaining
    finally:
        sbx.kill()


def test_set_timeout_zero_expires_now(e2e, make_sandbox):
    """E2B takes `set_timeout(0)` (schema `minimum: 0`) and expires the sandbox at once; E2B's own
    SDK tests use it to end a sandbox now (docs/e2b-compatibility.md)."""
    sbx = make_sandbox(timeout=300)
    assert sbx.commands.run("echo alive").stdout == "alive\n"
    sbx.set_timeout(0)
    assert wait_until(lambda: not sbx.is_running(), timeout=30), "still running 30 s after set_timeout(0)"
    assert wait_until(lambda: gone_from_api(sbx.sandbox_id), timeout=10), "API still lists it"
    # Below 0 is still refused (E2B's request validation), before the sandbox is looked up.
    r = httpx.post(
        f"{e2e.api_url}/sandboxes/{UNKNOWN_ID}/timeout", json={"timeout": -1}, headers=e2e.api_headers()
    )
    assert r.status_code == 400, r.text
    r = httpx.post(f"{e2e.api_url}/sandboxes/{UNKNOWN_ID}/timeout", json={"timeout": 0}, headers=e2e.api_headers())
    assert r.status_code == 404, r.text


# Values that break naive query-string handling (protocol doc §3.5).
TRICKY_VALUES = [
    "plain",
    "with spaces in it",
    "slash/and/more",
    "percent%20not-an-escape%",
    "equals=sign==",
    "ünïcødé ✓ 日本",
    "amp-free mix: a b/c%d=e",
]


def _list_ids(**query) -> list[str]:
    paginator = Sandbox.list(query=SandboxQuery(**query))
    ids: list[str] = []
    while paginator.has_next:
        ids.extend(s.sandbox_id for s in paginator.next_items())
    return ids


def test_list_with_metadata_filter(e2e, make_sandbox):
    group = f"{e2e.run_id}-list"
    sandboxes = [make_sandbox(metadata={"group": group, "value": v}) for v in TRICKY_VALUES]
    try:
        by_value = dict(zip(TRICKY_VALUES, sandboxes, strict=True))
        assert sorted(_list_ids(metadata={"group": group})) == sorted(s.sandbox_id for s in sandboxes)
        for value, sbx in by_value.items():
            assert _list_ids(metadata={"group": group, "value": value}) == [sbx.sandbox_id], value
        assert _list_ids(metadata={"group": group, "value": "no such value"}) == []
        # The info a list returns carries the metadata back unchanged.
        listed = Sandbox.list(query=SandboxQuery(metadata={"group": group, "value": TRICKY_VALUES[5]}))
        (item,) = listed.next_items()
        assert item.metadata["value"] == TRICKY_VALUES[5]
        assert item.state == SandboxState.RUNNING
    finally:
        for sbx in sandboxes:
            sbx.kill()


def test_list_pagination(e2e, make_sandbox):
    group = f"{e2e.run_id}-page"
    sandboxes = [make_sandbox(metadata={"group": group}) for _ in range(3)]
    try:
        paginator = Sandbox.list(query=SandboxQuery(metadata={"group": group}), limit=2)
        first = paginator.next_items()
        assert len(first) == 2 and paginator.has_next
        second = paginator.next_items()
        assert len(second) == 1 and not paginator.has_next
        assert sorted(s.sandbox_id for s in first + second) == sorted(s.sandbox_id for s in sandboxes)
    finally:
        for sbx in sandboxes:
            sbx.kill()


def test_kill(make_sandbox):
    sbx = make_sandbox()
    assert sbx.is_running()
    assert sbx.kill() is True
    assert not sbx.is_running()
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)
    assert sbx.sandbox_id not in _list_ids()
    # Killing again, or killing an ID that never existed, reports "not found" as False.
    assert Sandbox.kill(sbx.sandbox_id) is False
    assert Sandbox.kill(UNKNOWN_ID) is False


def test_timeout_expiry(make_sandbox):
    sbx = make_sandbox(timeout=3)
    assert sbx.commands.run("echo alive").stdout == "alive\n"
    assert wait_until(lambda: not sbx.is_running(), timeout=30), "sandbox still running 30 s after a 3 s timeout"
    # The gateway notices first; the API forgets the sandbox once reclaiming is done.
    assert wait_until(lambda: gone_from_api(sbx.sandbox_id), timeout=10), "API still lists an expired sandbox"
    assert sbx.sandbox_id not in _list_ids()
    assert Sandbox.kill(sbx.sandbox_id) is False


def test_connect_to_unknown_sandbox_is_not_found():
    with pytest.raises(NotFoundException):
        Sandbox.connect(UNKNOWN_ID)
