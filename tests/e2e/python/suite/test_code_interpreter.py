"""The unmodified `e2b-code-interpreter` SDK against `soulbox serve` and the shipped
`code-interpreter-v1` template (issue 6): run_code results, state, streaming callbacks, errors,
charts, DataFrames, contexts, the bash and JavaScript kernels, env vars and interrupts.

Runs in the venvs that have the code-interpreter SDK (`tests/e2e/.venv-ci-*`, made by
setup-clients; scripts/test runs this file with them): 2.x in URL mode, 1.x (which only speaks
`https://49999-<id>.<domain>`) against a server in domain mode. Needs the template built
(`soulbox template build code-interpreter-v1`; scripts/test does it).
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from collections.abc import Iterator

import pytest
from packaging.version import Version

pytest.importorskip(
    "e2b_code_interpreter",
    reason="e2b-code-interpreter is not installed here: run with tests/e2e/.venv-ci-* (scripts/test does)",
)

from e2b_code_interpreter import Sandbox

CI_VERSION = Version(importlib.metadata.version("e2b-code-interpreter"))
V1 = CI_VERSION.major < 2
TEMPLATE = "code-interpreter-v1"


def create(e2e, tracker, **kwargs) -> Sandbox:
    """A code-interpreter sandbox tagged with this run; the session kills it if a test does not."""
    metadata = {"e2e-run": e2e.run_id, "sdk": f"python-ci-{CI_VERSION}"}
    kwargs.setdefault("timeout", 300)
    if V1:
        # 1.x creates in the constructor and has no Sandbox.create.
        sbx = Sandbox(template=TEMPLATE, metadata=metadata, **kwargs)
    else:
        sbx = Sandbox.create(TEMPLATE, metadata=metadata, **kwargs)
    tracker.add(sbx.sandbox_id)
    return sbx


@pytest.fixture(scope="module")
def ci(e2e, tracker) -> Iterator[Sandbox]:
    if V1 and not os.environ.get("E2B_DOMAIN"):
        message = "e2b-code-interpreter 1.x needs domain mode (E2B_DOMAIN): it only speaks https://<port>-<id>.<domain>"
        if e2e.strict:
            pytest.fail(message)
        pytest.skip(message)
    sbx = create(e2e, tracker, envs={"CI_CREATE_VAR": "from-create"})
    yield sbx
    sbx.kill()


def test_template_has_the_data_stack(ci):
    # Issue 5's check, as a user types it (commands.run is a login shell).
    assert ci.commands.run('python -c "import pandas, matplotlib"').exit_code == 0
    r = ci.commands.run("python -c 'import numpy, scipy, seaborn, plotly, openpyxl, requests, ipykernel'")
    assert r.exit_code == 0, r.stderr
    assert ci.commands.run("pip --version").stdout.split()[3].startswith("/opt/python/")
    assert ci.commands.run("node --version").stdout.startswith("v")


def test_one_plus_one(ci):
    execution = ci.run_code("1+1")
    assert execution.text == "2"
    assert execution.error is None
    assert execution.results[0].is_main_result
    assert isinstance(execution.execution_count, int)


def test_state_persists_between_calls(ci):
    ci.run_code("e2e_counter = 41")
    assert ci.run_code("e2e_counter += 1\ne2e_counter").text == "42"


def test_callbacks_stream_in_order(ci):
    stdout, stderr, results = [], [], []
    t0 = time.monotonic()
    arrivals = []

    def on_stdout(msg):
        stdout.append(msg.line)
        arrivals.append(time.monotonic() - t0)

    execution = ci.run_code(
        "import sys, time\nprint('first')\nsys.stdout.flush()\ntime.sleep(1.5)\n"
        "print('oops', file=sys.stderr)\nprint('second')\n'done'",
        on_stdout=on_stdout,
        on_stderr=lambda m: stderr.append(m.line),
        on_result=results.append,
    )
    assert stdout == ["first\n", "second\n"]
    assert stderr == ["oops\n"]
    assert [r.text for r in results] == ["done"]
    assert execution.logs.stdout == ["first\n", "second\n"]
    # Streamed: the first line arrived before the sleep was over.
    assert arrivals[1] - arrivals[0] > 1.0, arrivals


def test_errors_are_reported_and_the_kernel_goes_on(ci):
    errors = []
    execution = ci.run_code("def f():\n    raise ValueError('bad value')\nf()", on_error=errors.append)
    assert execution.error is not None
    assert execution.error.name == "ValueError"
    assert execution.error.value == "bad value"
    assert "raise ValueError" in execution.error.traceback
    assert len(errors) == 1 and errors[0].name == "ValueError"
    assert ci.run_code("2 * 21").text == "42"


def test_matplotlib_line_chart(ci):
    code = """
import matplotlib.pyplot as plt
fig, ax = plt.subplots()
ax.plot([1, 2, 3, 4], [10, 20, 15, 30], label="sales")
ax.set_title("Sales")
ax.set_xlabel("Week")
ax.set_ylabel("Units")
plt.show()
"""
    execution = ci.run_code(code)
    assert execution.error is None, execution.error
    result = execution.results[0]
    assert result.png, result
    assert result.png.startswith("iVBORw0KGgo")  # base64 of the PNG signature
    chart = result.chart
    assert chart is not None
    assert chart.type.value == "line"
    assert chart.title == "Sales"
    assert chart.x_label == "Week" and chart.y_label == "Units"
    (series,) = chart.elements
    assert series.label == "sales"
    assert [tuple(map(float, p)) for p in series.points] == [(1, 10), (2, 20), (3, 15), (4, 30)]


def test_matplotlib_bar_chart(ci):
    code = """
import matplotlib.pyplot as plt
fig, ax = plt.subplots()
ax.bar(["red", "green", "blue"], [3, 7, 5], label="votes")
ax.set_title("Colours")
plt.show()
"""
    execution = ci.run_code(code)
    assert execution.error is None, execution.error
    chart = execution.results[0].chart
    assert chart.type.value == "bar"
    assert [(b.label, b.value) for b in chart.elements] == [("red", 3), ("green", 7), ("blue", 5)]
    assert execution.results[0].png


def test_dataframe(ci):
    execution = ci.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    assert execution.error is None, execution.error
    result = execution.results[0]
    assert "<table" in result.html
    assert result.data == {"a": [1, 2], "b": ["x", "y"]}
    assert "a" in result.text and "x" in result.text


def test_contexts_keep_their_own_state(ci):
    first = ci.create_code_context(cwd="/tmp")
    second = ci.create_code_context()
    ci.run_code("ctx_value = 'one'", context=first)
    assert ci.run_code("ctx_value", context=first).text == "one"
    missing = ci.run_code("ctx_value", context=second)
    assert missing.error is not None and missing.error.name == "NameError"
    assert ci.run_code("import os; os.getcwd()", context=first).text == "/tmp"
    if V1:
        return
    ids = {c.id for c in ci.list_code_contexts()}
    assert {first.id, second.id} <= ids
    ci.restart_code_context(first)
    assert ci.run_code("ctx_value", context=first).error.name == "NameError"
    ci.remove_code_context(second)
    assert second.id not in {c.id for c in ci.list_code_contexts()}


def test_bash_kernel(ci):
    execution = ci.run_code('X=from-bash; echo "$X $((6 * 7))"', language="bash")
    assert execution.error is None, execution.error
    assert "".join(execution.logs.stdout).strip() == "from-bash 42"
    assert "".join(ci.run_code('echo "$X"', language="bash").logs.stdout).strip() == "from-bash"


def test_javascript_kernel(ci):
    execution = ci.run_code("const jsValue = 20; jsValue + 22", language="javascript")
    assert execution.error is None, execution.error
    assert execution.text == "42"
    thrown = ci.run_code("throw new Error('js failure')", language="javascript")
    assert thrown.error is not None and "js failure" in thrown.error.value


def test_env_vars(ci):
    assert ci.run_code("import os; os.environ['CI_CREATE_VAR']").text == "from-create"
    scoped = ci.run_code("import os; os.environ.get('CI_RUN_VAR')", envs={"CI_RUN_VAR": "per-run"})
    assert scoped.text == "per-run"
    # Per-call variables do not outlive the call.
    assert ci.run_code("import os; os.environ.get('CI_RUN_VAR', 'unset')").text == "unset"


def test_timeout_interrupts_and_keeps_state(ci):
    ci.run_code("kept = 'still here'")
    t0 = time.monotonic()
    with pytest.raises(Exception) as err:
        ci.run_code("import time\nwhile True:\n    time.sleep(0.1)", timeout=3)
    assert time.monotonic() - t0 < 30
    assert "timeout" in type(err.value).__name__.lower() or "timed out" in str(err.value).lower(), err.value
    # The kernel was interrupted, not replaced: the next call runs at once with the state kept.
    t1 = time.monotonic()
    assert ci.run_code("kept").text == "still here"
    assert time.monotonic() - t1 < 10
