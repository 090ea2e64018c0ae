"""Per-program cost of the code reward's sandbox (the RL hot path): sequential latency and parallel throughput.

    python benchmarks/sandbox_overhead.py [--programs 32] [--workers 4]

Scores ``--programs`` correct completions, each against two test cases, through ``CodePassRate`` (the
code task's reward) with the default sandbox configuration, once with one worker (latency per program) and
once with ``--workers`` workers (throughput). Prints the layers the sandbox used.
"""

from __future__ import annotations

import argparse
import time

from gdsd_jax.tasks.code import CodePassRate
from gdsd_jax.tasks.sandbox import Sandbox, SandboxConfig

COMPLETION = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```"
EXAMPLE = {"question": "add", "test_cases": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}


def measure(workers: int, programs: int) -> float:
    """Seconds per sandboxed test run, averaged over ``programs`` completions x 2 tests."""
    reward = CodePassRate(Sandbox(SandboxConfig(num_workers=workers)))
    reward([COMPLETION], [EXAMPLE])  # warm-up: namespace probe, imports
    start = time.perf_counter()
    scores = reward([COMPLETION] * programs, [EXAMPLE] * programs)
    elapsed = time.perf_counter() - start
    if scores != [1.0] * programs:
        raise SystemExit(f"a correct program did not score 1.0: {scores}")
    return elapsed / (2 * programs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--programs", type=int, default=32)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    print("layers:", Sandbox().run("pass").layers)
    seq = measure(1, max(4, args.programs // 4))
    par = measure(args.workers, args.programs)
    print(f"sequential: {seq * 1000:.0f} ms per test run")
    print(f"{args.workers} workers: {par * 1000:.0f} ms per test run ({1 / par:.1f} runs/s)")


if __name__ == "__main__":
    main()
