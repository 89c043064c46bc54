# Behaviour of `soulbox interpreter` as seen through the official Python SDK (sync and async).
# Run: E2B_DEBUG=true pytest crates/soulbox-interpreter/tests/sdk (service on localhost:49999).
import datetime
import time

import httpx
import pytest
from e2b import InvalidArgumentException, NotFoundException, SandboxException, TimeoutException
from e2b_code_interpreter import Sandbox

URL = "http://localhost:49999"
HAS_CONTEXT_LISTING = hasattr(Sandbox, "list_code_contexts")


def require(sandbox, language):
    """Skips the test when the service has no kernel for `language`."""
    try:
        sandbox.run_code("", language=language)
    except SandboxException as err:
        if "Unsupported language" in str(err):
            pytest.skip(f"no {language} kernel")
        raise


# --- basics ---------------------------------------------------------------------------


def test_one_plus_one(sandbox):
    execution = sandbox.run_code("1+1")
    assert execution.text == "2"
    assert execution.error is None
    assert isinstance(execution.execution_count, int)


def test_state_persists(sandbox):
    sandbox.run_code("soulbox_state = 41")
    assert sandbox.run_code("soulbox_state += 1; soulbox_state").text == "42"


def test_execution_count_increments(sandbox):
    first = sandbox.run_code("pass").execution_count
    assert sandbox.run_code("!true").execution_count == first + 1


def test_string_result_is_unquoted(sandbox):
    assert sandbox.run_code("'hello'").text == "hello"


def test_callbacks_stream_each_kind(sandbox):
    out, err, results = [], [], []
    execution = sandbox.run_code(
        "import sys\nprint('to stdout')\nprint('to stderr', file=sys.stderr)\n7",
        on_stdout=out.append,
        on_stderr=err.append,
        on_result=results.append,
    )
    assert [m.line for m in out] == ["to stdout\n"]
    assert [m.line for m in err] == ["to stderr\n"]
    assert out[0].error is False and err[0].error is True
    assert out[0].timestamp
    assert [r.text for r in results] == ["7"]
    assert execution.logs.stdout == ["to stdout\n"]


def test_output_arrives_while_code_runs(sandbox):
    arrivals = []
    sandbox.run_code(
        "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.5)",
        on_stdout=lambda m: arrivals.append(time.monotonic()),
    )
    assert len(arrivals) == 3
    assert arrivals[-1] - arrivals[0] > 0.7, "output must be streamed, not buffered"


def test_error_then_next_call_works(sandbox):
    errors = []
    execution = sandbox.run_code("undefined_name", on_error=errors.append)
    assert execution.error.name == "NameError"
    assert execution.error.value == "name 'undefined_name' is not defined"
    assert "undefined_name" in execution.error.traceback
    assert "\x1b[" not in execution.error.traceback, "tracebacks are plain text"
    assert len(errors) == 1
    assert sandbox.run_code("2*3").text == "6"


def test_syntax_error(sandbox):
    assert sandbox.run_code("def (").error.name == "SyntaxError"


def test_shell_escape_runs_in_cwd(sandbox):
    execution = sandbox.run_code("!pwd")
    assert "".join(execution.logs.stdout).strip() == sandbox.run_code("import os; os.getcwd()").text


# --- rich output ----------------------------------------------------------------------

LINE_CHART = """
import datetime
import matplotlib.pyplot as plt
import numpy as np
days = [datetime.date(2024, 1, 1) + datetime.timedelta(days=i) for i in range(30)]
plt.figure()
plt.plot(days, np.sin(np.arange(30) / 5), label="signal")
plt.plot(days, np.cos(np.arange(30) / 5), label="carrier")
plt.xlabel("Day (d)")
plt.ylabel("Level [dB]")
plt.title("Two waves")
plt.show()
"""


def test_line_chart(sandbox):
    execution = sandbox.run_code(LINE_CHART)
    assert execution.error is None
    result = execution.results[0]
    assert result.png and result.text
    assert not result.extra
    chart = result.chart
    assert chart.type == "line"
    assert chart.title == "Two waves"
    assert (chart.x_label, chart.x_unit) == ("Day (d)", "d")
    assert (chart.y_label, chart.y_unit) == ("Level [dB]", "dB")
    assert chart.x_scale == "datetime" and chart.y_scale == "linear"
    assert [e.label for e in chart.elements] == ["signal", "carrier"]
    points = chart.elements[0].points
    assert len(points) == 30
    assert datetime.datetime.fromisoformat(points[0][0]).date() == datetime.date(2024, 1, 1)
    assert points[0][1] == 0.0
    assert all(isinstance(t, str) for t in chart.x_ticks)
    assert all(isinstance(t, float) for t in chart.y_ticks)
    assert len(chart.y_ticks) == len(chart.y_tick_labels)


def test_bar_chart(sandbox):
    execution = sandbox.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.bar(['north', 'south', 'east'], [3, 5, 2], label='sales')\n"
        "plt.title('Regions'); plt.ylabel('Units')\n"
        "plt.show()"
    )
    chart = execution.results[0].chart
    assert chart.type == "bar"
    assert chart.title == "Regions" and chart.y_label == "Units" and chart.x_label is None
    assert [(b.label, b.group, b.value) for b in chart.elements] == [
        ("north", "sales", 3),
        ("south", "sales", 5),
        ("east", "sales", 2),
    ]


def test_grouped_horizontal_bars(sandbox):
    execution = sandbox.run_code(
        "import matplotlib.pyplot as plt\nimport numpy as np\n"
        "y = np.arange(2)\n"
        "plt.barh(y - 0.2, [1, 2], height=0.4, label='2023')\n"
        "plt.barh(y + 0.2, [3, 4], height=0.4, label='2024')\n"
        "plt.yticks(y, ['a', 'b'])\nplt.show()"
    )
    chart = execution.results[0].chart
    assert chart.type == "bar"
    assert [(b.label, b.group, b.value) for b in chart.elements] == [
        ("a", "2023", 1),
        ("b", "2023", 2),
        ("a", "2024", 3),
        ("b", "2024", 4),
    ]


def test_pie_chart(sandbox):
    chart = sandbox.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.pie([75, 25], labels=['yes', 'no'], startangle=90)\nplt.title('Vote')\nplt.show()"
    ).results[0].chart
    assert chart.type == "pie" and chart.title == "Vote"
    assert [(e.label, e.angle, e.radius) for e in chart.elements] == [("yes", 270, 1), ("no", 90, 1)]


def test_scatter_log_and_categorical(sandbox):
    chart = sandbox.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.scatter([1, 10, 100], [2, 4, 8], label='growth')\nplt.xscale('log')\nplt.show()"
    ).results[0].chart
    assert chart.type == "scatter" and chart.x_scale == "log"
    assert chart.elements[0].label == "growth"
    assert chart.elements[0].points == [(1.0, 2.0), (10.0, 4.0), (100.0, 8.0)]
    chart = sandbox.run_code(
        "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], ['low', 'mid', 'high'])\nplt.show()"
    ).results[0].chart
    assert chart.y_scale == "categorical"
    assert [p[1] for p in chart.elements[0].points] == ["low", "mid", "high"]
    assert chart.elements[0].label == ""


def test_box_and_whisker(sandbox):
    chart = sandbox.run_code(
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots()\n"
        "ax.boxplot([[1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 30]], patch_artist=True)\n"
        "ax.set_xticks([1, 2], ['first', 'second'])\n"
        "ax.set_title('Spread')\nplt.show()"
    ).results[0].chart
    assert chart.type == "box_and_whisker" and chart.title == "Spread"
    first, second = chart.elements
    assert (first.label, first.min, first.first_quartile, first.median, first.third_quartile, first.max) == (
        "first", 1, 2, 3, 4, 5
    )
    assert first.outliers == []
    assert second.label == "second" and second.outliers == [30] and second.max == 6


def test_superchart_and_unknown(sandbox):
    chart = sandbox.run_code(
        "import matplotlib.pyplot as plt\n"
        "fig, (a, b) = plt.subplots(1, 2)\nfig.suptitle('Both')\n"
        "a.plot([0, 1], [0, 1]); a.set_title('left')\n"
        "b.add_patch(plt.Circle((0, 0), 1)); b.set_title('right')\nplt.show()"
    ).results[0].chart
    assert chart.type == "superchart" and chart.title == "Both"
    assert [(c.type, c.title) for c in chart.elements] == [("line", "left"), ("unknown", "right")]


def test_figure_as_last_expression_and_blank_figure(sandbox):
    execution = sandbox.run_code(
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2])\nplt.close(fig)\nfig"
    )
    main = [r for r in execution.results if r.is_main_result]
    assert len(main) == 1 and main[0].png and main[0].chart.type == "line"
    blank = sandbox.run_code("import matplotlib.pyplot as plt\nplt.figure()\nplt.show()")
    assert all(r.chart is None for r in blank.results)


def test_dataframe(sandbox):
    execution = sandbox.run_code(
        "import pandas as pd, numpy as np\n"
        "pd.DataFrame({'n': [1, 2, None], 'when': pd.to_datetime(['2024-01-01', None, '2024-01-03']),"
        " 's': ['a', 'b', 'c']})"
    )
    result = execution.results[0]
    assert result.is_main_result
    assert "<table" in result.html
    assert result.data == {
        "n": [1.0, 2.0, None],
        "when": ["2024-01-01T00:00:00", None, "2024-01-03T00:00:00"],
        "s": ["a", "b", "c"],
    }


def test_display_and_custom_repr(sandbox):
    execution = sandbox.run_code(
        "from IPython.display import display, Markdown\n"
        "class Thing:\n"
        "    def _repr_html_(self): return '<b>thing</b>'\n"
        "display(Markdown('# hi'))\n"
        "display({'text/latex': r'\\alpha'}, raw=True)\n"
        "Thing()"
    )
    markdown, latex, thing = execution.results
    assert markdown.markdown == "# hi" and not markdown.is_main_result
    assert list(latex.formats()) == ["latex"]
    assert thing.html == "<b>thing</b>" and thing.is_main_result


def test_pil_show_and_save(sandbox, tmp_path):
    execution = sandbox.run_code(
        "from PIL import Image\nimg = Image.new('RGB', (4, 4), 'red')\n"
        f"img.show()\nimg.save({str(tmp_path / 'x.png')!r})\nprint('done')"
    )
    assert len([r for r in execution.results if r.png]) == 2
    assert execution.logs.stdout == ["done\n"]


# --- contexts and languages -----------------------------------------------------------


def test_contexts_are_independent(sandbox):
    context = sandbox.create_code_context()
    assert context.language == "python"
    sandbox.run_code("only_in_default = 1")
    execution = sandbox.run_code("only_in_default", context=context)
    assert execution.error.name == "NameError"
    sandbox.run_code("x = 5", context=context)
    assert sandbox.run_code("x", context=context).text == "5"


def test_context_with_cwd(sandbox, tmp_path):
    cwd = str(tmp_path / "work")
    context = sandbox.create_code_context(cwd=cwd, language="python")
    assert context.cwd == cwd
    assert sandbox.run_code("import os; os.getcwd()", context=context).text == cwd


@pytest.mark.skipif(not HAS_CONTEXT_LISTING, reason="SDK has no context listing")
def test_list_restart_remove(sandbox):
    context = sandbox.create_code_context()
    listed = sandbox.list_code_contexts()
    assert listed[-1].id == context.id
    assert {"python"} <= {c.language for c in listed}
    sandbox.run_code("kept = 1", context=context)
    sandbox.restart_code_context(context)
    assert sandbox.run_code("kept", context=context).error.name == "NameError"
    sandbox.remove_code_context(context.id)
    with pytest.raises(NotFoundException):
        sandbox.run_code("1", context=context)
    with pytest.raises(NotFoundException):
        sandbox.restart_code_context(context.id)


def test_context_and_language_together_are_refused(sandbox):
    context = sandbox.create_code_context()
    with pytest.raises(InvalidArgumentException):
        sandbox.run_code("1", context=context, language="python")
    response = httpx.post(f"{URL}/execute", json={"code": "1", "context_id": context.id, "language": "python"})
    assert response.status_code == 400


def test_unknown_language_and_context(sandbox):
    with pytest.raises(SandboxException, match="Unsupported language"):
        sandbox.run_code("1", language="cobol")
    response = httpx.post(f"{URL}/execute", json={"code": "1", "context_id": "nope"})
    assert (response.status_code, response.text) == (404, "Context nope not found")


def test_bash(sandbox):
    require(sandbox, "bash")
    execution = sandbox.run_code("echo hello; echo oops >&2; false", language="bash")
    # bash_kernel runs bash on a terminal, so stderr arrives merged into stdout.
    assert "".join(execution.logs.stdout) == "hello\noops\n"
    assert execution.error.value == "1", "the exit status of a failing last command"
    assert sandbox.run_code("X=3", language="bash").error is None
    assert sandbox.run_code("echo $X", language="bash").logs.stdout == ["3\n"]


def test_javascript(sandbox):
    require(sandbox, "javascript")
    execution = sandbox.run_code("console.log('Hello, World!')", language="js")
    assert execution.logs.stdout == ["Hello, World!\n"]
    sandbox.run_code("const jsValue = 20", language="javascript")
    assert sandbox.run_code("jsValue + 1", language="javascript").text == "21"
    assert sandbox.run_code("process.cwd()", language="js").text == sandbox.run_code("import os; os.getcwd()").text
    assert sandbox.run_code("throw new Error('bad')", language="js").error.value == "bad"


# --- environment variables ------------------------------------------------------------


def test_env_vars_python(sandbox):
    os_default = sandbox.run_code("import os; os.environ.get('HOME')").text
    tricky = "it's \"x\" \\ $HOME\n"
    printed = sandbox.run_code("print(os.getenv('SOULBOX_X'), end='')", envs={"SOULBOX_X": tricky})
    assert printed.logs.stdout == [tricky]
    assert sandbox.run_code("os.getenv('SOULBOX_X', 'unset')").text == "unset"
    assert sandbox.run_code("os.environ['HOME']", envs={"HOME": "/elsewhere"}).text == "/elsewhere"
    assert sandbox.run_code("os.environ['HOME']").text == os_default
    assert sandbox.run_code("import subprocess; subprocess.check_output(['printenv', 'SUB']).decode()", envs={"SUB": "v"}).text == "v\\n"


def test_env_vars_bash(sandbox):
    require(sandbox, "bash")
    assert sandbox.run_code("echo $FOO", envs={"FOO": "a'b c"}, language="bash").logs.stdout == ["a'b c\n"]
    assert sandbox.run_code("echo ${FOO:-default}", language="bash").logs.stdout == ["default\n"]


def test_env_vars_javascript(sandbox):
    require(sandbox, "javascript")
    assert sandbox.run_code("process.env.FOO", envs={"FOO": "bar"}, language="js").text == "bar"
    assert sandbox.run_code("process.env.FOO || 'default'", language="js").text == "default"


def test_bad_env_var_name(sandbox):
    with pytest.raises(SandboxException, match="invalid environment variable name"):
        sandbox.run_code("1", envs={"NOT-VALID": "x"})


# --- bad input ------------------------------------------------------------------------


def test_timeout_interrupts_the_kernel(sandbox):
    context = sandbox.create_code_context()
    sandbox.run_code("survivor = 'still here'", context=context)
    start = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.run_code("import time\nwhile True: time.sleep(0.1)", context=context, timeout=2)
    execution = sandbox.run_code("survivor", context=context, timeout=15)
    assert execution.text == "still here", "the kernel was interrupted, not restarted"
    assert time.monotonic() - start < 15


def test_busy_loop_in_python_is_interrupted(sandbox):
    context = sandbox.create_code_context()
    with pytest.raises(TimeoutException):
        sandbox.run_code("while True: pass", context=context, timeout=2)
    assert sandbox.run_code("1+1", context=context, timeout=15).text == "2"


def test_kernel_death_is_reported_and_recovered(sandbox):
    context = sandbox.create_code_context()
    execution = sandbox.run_code("import os; os._exit(3)", context=context)
    assert execution.error.name == "ContextRestarting"
    assert "exit status 3" in execution.error.value
    assert sandbox.run_code("1+1", context=context).text == "2"


def test_huge_output_is_streamed(sandbox):
    received = []
    execution = sandbox.run_code(
        "import sys\nfor i in range(100_000):\n    sys.stdout.write('x' * 99 + '\\n')",
        on_stdout=lambda m: received.append(len(m.line)),
        timeout=120,
    )
    assert execution.error is None
    assert sum(received) == 10_000_000
    assert len(received) > 1


# --- async ----------------------------------------------------------------------------


async def test_async_run_code_and_callbacks(async_sandbox):
    out = []
    execution = await async_sandbox.run_code(
        "print('async'); 40 + 2", on_stdout=lambda message: out.append(message.line)
    )
    assert execution.text == "42"
    assert out == ["async\n"]


async def test_async_contexts_errors_and_charts(async_sandbox):
    context = await async_sandbox.create_code_context()
    await async_sandbox.run_code("value = 'a'", context=context)
    assert (await async_sandbox.run_code("value", context=context)).text == "a"
    assert (await async_sandbox.run_code("value")).error.name == "NameError"
    chart = (await async_sandbox.run_code(LINE_CHART)).results[0].chart
    assert chart.type == "line" and len(chart.elements[1].points) == 30
    with pytest.raises(TimeoutException):
        await async_sandbox.run_code("import time; time.sleep(30)", context=context, timeout=2)
    assert (await async_sandbox.run_code("value", context=context, timeout=15)).text == "a"
    assert (await async_sandbox.run_code("import os; os.getenv('A')", envs={"A": "1"})).text == "1"
