# The official e2b-code-interpreter SDK in debug mode against a `soulbox interpreter` on
# localhost:49999 (see docs/code-interpreter.md, "Testing against the real SDKs").
import os

import pytest

os.environ.setdefault("E2B_DEBUG", "true")
os.environ.setdefault("E2B_API_KEY", "e2b_" + "0" * 40)

from e2b_code_interpreter import AsyncSandbox, Sandbox  # noqa: E402


@pytest.fixture
def sandbox():
    # 1.x SDKs create sandboxes with the constructor and ignore E2B_DEBUG there.
    return Sandbox.create() if hasattr(Sandbox, "create") else Sandbox(debug=True)


@pytest.fixture
async def async_sandbox():
    return await AsyncSandbox.create(debug=True)
