"""Fixtures for the SoulBox e2e suite: the server under test and sandboxes that are always killed."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from e2b import Sandbox

from helpers import E2B_VERSION, E2EEnv


def pytest_report_header(config) -> list[str]:
    return [f"e2b SDK {E2B_VERSION}"]


@pytest.fixture(scope="session")
def e2e() -> E2EEnv:
    try:
        return E2EEnv.from_environ()
    except RuntimeError as err:
        pytest.exit(str(err), returncode=2)


class SandboxTracker:
    """Every sandbox a test creates, so the session can kill leftovers of failed tests."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self._lock = threading.Lock()

    def add(self, sandbox_id: str) -> None:
        with self._lock:
            self.ids.add(sandbox_id)


@pytest.fixture(scope="session")
def tracker(e2e: E2EEnv) -> Iterator[SandboxTracker]:
    t = SandboxTracker()
    yield t
    for sandbox_id in sorted(t.ids):
        try:
            Sandbox.kill(sandbox_id)
        except Exception:
            pass


@pytest.fixture(scope="session")
def make_sandbox(e2e: E2EEnv, tracker: SandboxTracker) -> Callable[..., Sandbox]:
    """Creates a sandbox tagged with this run's metadata; the session kills it if a test does not."""

    def make(**kwargs) -> Sandbox:
        metadata = {"e2e-run": e2e.run_id, "sdk": f"python-{E2B_VERSION}"}
        metadata.update(kwargs.pop("metadata", None) or {})
        kwargs.setdefault("timeout", 300)
        sbx = Sandbox.create(metadata=metadata, **kwargs)
        tracker.add(sbx.sandbox_id)
        return sbx

    return make


@pytest.fixture
def sandbox(make_sandbox: Callable[..., Sandbox]) -> Iterator[Sandbox]:
    sbx = make_sandbox()
    yield sbx
    Sandbox.kill(sbx.sandbox_id)


@pytest.fixture(scope="module")
def shared_sandbox(make_sandbox: Callable[..., Sandbox]) -> Iterator[Sandbox]:
    """One sandbox for a module of read-mostly tests (each test uses its own paths)."""
    sbx = make_sandbox(envs={"SBX_CREATE_VAR": "from create"})
    yield sbx
    Sandbox.kill(sbx.sandbox_id)
