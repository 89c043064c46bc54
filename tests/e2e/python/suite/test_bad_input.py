"""Bad input gets the status code and error body the SDKs expect (protocol doc §2.6, §3.2, §4.1)."""

from __future__ import annotations

import os

import httpx
import pytest
from e2b import AuthenticationException, NotFoundException, Sandbox, SandboxException

from helpers import envd_headers, require

WRONG_KEY = "e2b_" + "0" * 40
UNKNOWN_ID = "zzzzzzzzzzzzzzzzzzzz"


def assert_api_error(r: httpx.Response, status: int) -> dict:
    """Control-plane error: status plus `{"code": status, "message": str}` (JS keys on body.code)."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert body.get("code") == status, body
    assert isinstance(body.get("message"), str) and body["message"], body
    return body


def sandbox_dirs(e2e) -> set[str]:
    root = e2e.data_dir / "sandboxes"
    return set(os.listdir(root)) if root.is_dir() else set()


@pytest.mark.parametrize("route", ["/sandboxes", "/v2/sandboxes"])
def test_malformed_json_is_400(e2e, route):
    r = httpx.post(
        f"{e2e.api_url}{route}",
        content=b'{"templateID": "base", "timeout": ',
        headers={**e2e.api_headers(), "Content-Type": "application/json"},
    )
    assert_api_error(r, 400)


def test_wrong_field_type_is_400(e2e):
    r = httpx.post(
        f"{e2e.api_url}/v2/sandboxes",
        json={"templateID": "base", "timeout": "ten"},
        headers=e2e.api_headers(),
    )
    assert_api_error(r, 400)


@pytest.mark.parametrize("route", ["/sandboxes", "/v2/sandboxes"])
def test_negative_timeout_is_400_raw(e2e, route):
    r = httpx.post(f"{e2e.api_url}{route}", json={"templateID": "base", "timeout": -5}, headers=e2e.api_headers())
    assert_api_error(r, 400)


def test_negative_timeout_through_the_sdk(e2e):
    with pytest.raises(SandboxException) as info:
        Sandbox.create(timeout=-5, metadata={"e2e-run": e2e.run_id})
    assert info.value.status_code == 400


def test_unknown_template(e2e):
    with pytest.raises(SandboxException) as info:
        Sandbox.create("no-such-template-e2e", metadata={"e2e-run": e2e.run_id})
    assert info.value.status_code == 404, info.value
    assert "no-such-template-e2e" in str(info.value)
    r = httpx.post(
        f"{e2e.api_url}/v2/sandboxes", json={"templateID": "no-such-template-e2e"}, headers=e2e.api_headers()
    )
    assert "no-such-template-e2e" in assert_api_error(r, 404)["message"]


def test_failed_creates_leave_nothing_behind(e2e):
    require(e2e, "SOULBOX_DATA_DIR", e2e.data_dir is not None)
    before = sandbox_dirs(e2e)
    for body in ({"templateID": "no-such-template-e2e"}, {"templateID": "base", "timeout": -1}):
        r = httpx.post(f"{e2e.api_url}/v2/sandboxes", json=body, headers=e2e.api_headers())
        assert r.status_code >= 400, r.text
    assert sandbox_dirs(e2e) == before


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/v2/sandboxes"),
        ("POST", "/sandboxes"),
        ("GET", "/v2/sandboxes"),
        ("GET", "/sandboxes"),
        ("GET", f"/sandboxes/{UNKNOWN_ID}"),
        ("DELETE", f"/sandboxes/{UNKNOWN_ID}"),
        ("POST", f"/sandboxes/{UNKNOWN_ID}/timeout"),
    ],
)
@pytest.mark.parametrize("key", [None, WRONG_KEY, "not-even-a-key"])
def test_missing_or_wrong_api_key_is_401(e2e, method, path, key):
    headers = {} if key is None else e2e.api_headers(key)
    body = {"templateID": "base"} if method == "POST" else None
    r = httpx.request(method, f"{e2e.api_url}{path}", json=body, headers=headers)
    assert_api_error(r, 401)


def test_wrong_api_key_through_the_sdk(e2e):
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key=WRONG_KEY)
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key=WRONG_KEY).next_items()
    with pytest.raises(AuthenticationException):
        Sandbox.kill(UNKNOWN_ID, api_key=WRONG_KEY)


def test_unknown_sandbox_id(e2e):
    with pytest.raises(NotFoundException):
        Sandbox.get_info(UNKNOWN_ID)
    with pytest.raises(NotFoundException):
        Sandbox.set_timeout(UNKNOWN_ID, 30)
    assert Sandbox.kill(UNKNOWN_ID) is False
    assert_api_error(httpx.get(f"{e2e.api_url}/sandboxes/{UNKNOWN_ID}", headers=e2e.api_headers()), 404)
    assert_api_error(httpx.delete(f"{e2e.api_url}/sandboxes/{UNKNOWN_ID}", headers=e2e.api_headers()), 404)


@pytest.mark.parametrize("bad_id", [UNKNOWN_ID, "UPPER", "has-dash", "a" * 300, "..%2f..%2fetc"])
def test_gateway_unknown_sandbox_is_502_was_not_found(e2e, bad_id):
    health = httpx.get(f"{e2e.sandbox_url}/health", headers=envd_headers(bad_id, None))
    rpc = httpx.post(
        f"{e2e.sandbox_url}/filesystem.Filesystem/Stat",
        json={"path": "/"},
        headers={**envd_headers(bad_id, "whatever"), "Connect-Protocol-Version": "1"},
    )
    for r in (health, rpc):
        assert r.status_code == 502, (r.request.url, r.status_code, r.text)
        body = r.json()
        assert "was not found" in body["message"] and body["code"] == 502, body


def test_wrong_or_missing_access_token_is_401(e2e, shared_sandbox):
    stat = f"{e2e.sandbox_url}/filesystem.Filesystem/Stat"
    rpc_headers = {"Connect-Protocol-Version": "1", "Content-Type": "application/json"}
    for token in ("wrong-token", None):
        r = httpx.post(
            stat, json={"path": "/home/user"}, headers={**rpc_headers, **envd_headers(shared_sandbox.sandbox_id, token)}
        )
        assert r.status_code == 401, (token, r.status_code, r.text)
        assert "code" in r.json(), r.text
        # /files without a token needs a valid signature instead.
        f = httpx.get(
            f"{e2e.sandbox_url}/files",
            params={"path": "/etc/hostname", "signature": "v1_bogus"},
            headers=envd_headers(shared_sandbox.sandbox_id, token),
        )
        assert f.status_code == 401, (token, f.status_code, f.text)
    # Health needs no token (the SDK's is_running() relies on it).
    h = httpx.get(f"{e2e.sandbox_url}/health", headers=envd_headers(shared_sandbox.sandbox_id, None))
    assert h.status_code == 204, h.text


def test_another_sandboxes_token_is_rejected(e2e, make_sandbox):
    a, b = make_sandbox(), make_sandbox()
    try:
        r = httpx.post(
            f"{e2e.sandbox_url}/filesystem.Filesystem/Stat",
            json={"path": "/home/user"},
            headers={
                "Connect-Protocol-Version": "1",
                **envd_headers(a.sandbox_id, b._envd_access_token),
            },
        )
        assert r.status_code == 401, r.text
    finally:
        a.kill()
        b.kill()


def test_server_still_serves_after_bad_input(make_sandbox):
    sbx = make_sandbox()
    try:
        assert sbx.commands.run("echo still-fine").stdout == "still-fine\n"
    finally:
        sbx.kill()
