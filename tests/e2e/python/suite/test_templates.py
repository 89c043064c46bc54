"""Templates through the unmodified SDK's `Template` API (protocol doc §3.7): build from
another template with run_cmd, copy, set_envs, set_workdir, set_user and start/ready commands,
use it with Sandbox.create, rebuild from cache, and the errors of bad builds."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from e2b import Template, wait_for_file

CONTEXT = Path(__file__).parent / "template_context"


def sdk_template() -> Template:
    return (
        Template(file_context_path=str(CONTEXT))
        .from_template("base")
        .set_user("root")
        .run_cmd("echo built-by-sdk > /etc/sdk-marker && rm -f /etc/debian_version")
        .copy("data.txt", "/opt/sdk/", user="user")
        .set_envs({"SDK_VAR": "from-sdk"})
        .set_workdir("/opt/sdk")
        .set_user("user")
        .set_start_cmd("touch /tmp/sdk-started && sleep infinity", wait_for_file("/tmp/sdk-started"))
    )


def test_build_use_and_rebuild(e2e, make_sandbox):
    name = f"e2e-sdk-{uuid.uuid4().hex[:8]}"
    logs: list[str] = []
    info = Template.build(sdk_template(), f"{name}:v1", on_build_logs=lambda l: logs.append(str(l)))
    assert info.template_id and info.build_id
    assert Template.exists(name)
    assert not Template.exists(f"{name}-missing")
    assert any("/opt/sdk" in line for line in logs), logs

    sbx = make_sandbox(template=f"{name}:v1")
    r = sbx.commands.run(
        'cat /etc/sdk-marker /opt/sdk/data.txt; echo "$SDK_VAR"; id -un; pwd; '
        "ls /tmp/sdk-started; test ! -e /etc/debian_version && echo whiteout-ok"
    )
    assert r.stdout.split("\n")[:7] == [
        "built-by-sdk",
        "sdk file",
        "from-sdk",
        "user",
        "/opt/sdk",
        "/tmp/sdk-started",
        "whiteout-ok",
    ], r.stdout
    # The copied file belongs to the user copy() named.
    assert sbx.commands.run("stat -c %U /opt/sdk/data.txt").stdout.strip() == "user"
    sbx.kill()

    # An unchanged rebuild reuses every layer-making step.
    logs.clear()
    t0 = time.monotonic()
    Template.build(sdk_template(), f"{name}:v1", on_build_logs=lambda l: logs.append(str(l)))
    cached = [line for line in logs if "CACHED" in line]
    assert len(cached) == 3, logs  # RUN, COPY, WORKDIR
    assert time.monotonic() - t0 < 30

    tags = {t.tag for t in Template.get_tags(name)}
    assert "v1" in tags, tags


def test_failing_step_fails_with_its_output(e2e):
    bad = Template().from_template("base").run_cmd("echo about-to-fail; exit 3")
    with pytest.raises(Exception) as err:
        Template.build(bad, f"e2e-bad-{uuid.uuid4().hex[:8]}")
    assert "about-to-fail" in str(err.value)
    assert "exited with code 3" in str(err.value)


def test_registry_images_are_refused(e2e):
    with pytest.raises(Exception) as err:
        Template.build(Template().from_image("python:3.12"), f"e2e-img-{uuid.uuid4().hex[:8]}")
    assert "cannot be pulled" in str(err.value)
