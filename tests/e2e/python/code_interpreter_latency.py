"""Measures the code interpreter from the unmodified `e2b-code-interpreter` SDK (issue 6's and
issue 5's closing numbers). Not a test: run it against a server that has code-interpreter-v1
built, with the export lines set, in the venv that has the SDK:

    tests/e2e/.venv-ci-latest/bin/python tests/e2e/python/code_interpreter_latency.py \\
        [--runs 20] [--steady 100] [--compare base,code-interpreter-v1,TEMPLATE...] [--json out.json]

* first run_code: per run, `Sandbox.create()` (timed on its own), then the first
  `run_code("1+1")` on the new sandbox (timed on its own: what a user waits for after create),
  sequentially; the sandbox is killed outside the timing.
* steady: `--steady` calls of `run_code("1+1")` on one sandbox after a warm-up call.
* compare: create → first `commands.run("true")` for each named template, alternating templates
  run by run so that machine load hits them alike (layers are stacked, not copied, so templates
  of different sizes should match apart from their start and ready commands).
"""

from __future__ import annotations

import argparse
import json
import time

from e2b import Sandbox as PlainSandbox
from e2b_code_interpreter import Sandbox

from stats import summary


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def first_run_code(runs: int) -> dict[str, dict[str, float]]:
    create_ms, first_ms = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        sbx = Sandbox.create(timeout=120)
        create_ms.append(ms_since(t0))
        try:
            t1 = time.perf_counter()
            execution = sbx.run_code("1+1")
            first_ms.append(ms_since(t1))
            assert execution.text == "2", execution
        finally:
            sbx.kill()
    return {"create": summary(create_ms, 1), "first_run_code": summary(first_ms, 1)}


def steady(calls: int) -> dict[str, float]:
    sbx = Sandbox.create(timeout=300)
    try:
        sbx.run_code("1+1")
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            sbx.run_code("1+1")
            samples.append(ms_since(t0))
        return summary(samples, 1)
    finally:
        sbx.kill()


def compare(templates: list[str], runs: int) -> dict[str, dict[str, float]]:
    samples: dict[str, list[float]] = {t: [] for t in templates}
    for _ in range(runs):
        for template in templates:
            t0 = time.perf_counter()
            sbx = PlainSandbox.create(template, timeout=120)
            try:
                sbx.commands.run("true")
                samples[template].append(ms_since(t0))
            finally:
                sbx.kill()
    return {t: summary(v, 1) for t, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--steady", type=int, default=100)
    parser.add_argument("--compare", default="base,code-interpreter-v1")
    parser.add_argument("--json")
    args = parser.parse_args()
    out = {
        "first": first_run_code(args.runs),
        "steady_1_plus_1": steady(args.steady),
        "create_to_first_command": compare([t for t in args.compare.split(",") if t], args.runs),
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
