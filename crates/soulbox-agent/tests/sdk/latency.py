"""commands.run("true") round trip through the real SDK against a development agent.

Run: E2B_DEBUG=true E2B_API_KEY=e2b_$(printf '0%.0s' {1..40}) python latency.py [N] [USER]
(`bash -l` reads the user's profile: on a development host pick a user with an empty home,
e.g. `nobody`, to measure the agent rather than the host's dotfiles.)
"""

import statistics
import sys
import time

from e2b import Sandbox

n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
user = sys.argv[2] if len(sys.argv) > 2 else None
import os

opts = {"debug": True} if os.environ.get("E2B_DEBUG", "").lower() == "true" else {}
sbx = Sandbox.create(**opts) if hasattr(Sandbox, "create") else Sandbox(**opts)
for _ in range(10):
    sbx.commands.run("true", user=user)
samples = []
for _ in range(n):
    t0 = time.perf_counter()
    sbx.commands.run("true", user=user)
    samples.append((time.perf_counter() - t0) * 1000)
samples.sort()
p = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))]
if not opts:
    sbx.kill()
print(f"commands.run('true', user={user!r}) x{n}: p50={p(0.5):.2f} ms p90={p(0.9):.2f} ms p99={p(0.99):.2f} ms mean={statistics.mean(samples):.2f} ms")
