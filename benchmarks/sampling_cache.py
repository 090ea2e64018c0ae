"""Generated tokens per second of the exact samplers against the block KV cache (``cache=prefix|dual``).

Model: the mid config of ``benchmarks/sampling_throughput.py`` (the ``benchmarks/rl_step.py`` sizes: 8 layers,
width 512, 8 heads of 64, SwiGLU 1536, 32k vocabulary, fp32; the Dream variant has GQA with 2 KV heads),
random weights. Rollout shape: batch 8, prompt 64, completion 256 in blocks of 32.

For every (sampler, steps, temperature) the three variants are compiled ahead of time, then timed
alternately in this one process (``--repeats`` rounds of exact, prefix, dual; best time per variant), so
a shared machine's load hits them alike; the process CPU time of each run is recorded next to the wall time
(on an oversubscribed machine it is the steadier measure of the work done). At temperature 0 the fraction of completion tokens equal to the
exact sampler's is reported (random weights make no token confident, so this is a lower bound of what a
trained model gives; the cache is an approximation, see docs/sampling.md).

Usage::

    python benchmarks/sampling_cache.py                                   # both samplers, 64 and 256 steps, T 0 and 1
    python benchmarks/sampling_cache.py --samplers llada --steps 64 --temperatures 0 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from gdsd_jax.allocator import preload_tcmalloc  # noqa: E402

preload_tcmalloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from report import machine_line, print_table, save_rows  # noqa: E402
from sampling_reference import random_params  # noqa: E402
from sampling_throughput import mid_config  # noqa: E402

from gdsd_jax.sampling import SamplingConfig, generate_jit  # noqa: E402

VARIANTS = ("none", "prefix", "dual")


def run_case(family: str, steps: int, temperature: float, args, params, ids, mask) -> dict:
    cfg = mid_config(family)
    base = SamplingConfig(gen_length=args.gen_length, steps=steps, block_length=args.block_length,
                          temperature=temperature, alg="entropy")
    key = jax.random.key(0)
    compiled, compile_s = {}, {}
    for v in VARIANTS:
        t0 = time.perf_counter()
        compiled[v] = generate_jit.lower(params, cfg, ids, mask, key, base.replace(cache=v)).compile()
        compile_s[v] = time.perf_counter() - t0
    times = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    outs = {}
    if args.warmup:
        outs = {v: jax.block_until_ready(compiled[v](params, ids, mask, key)) for v in VARIANTS}
    for _ in range(args.repeats):
        for v in VARIANTS:
            t0, c0 = time.perf_counter(), time.process_time()
            outs[v] = jax.block_until_ready(compiled[v](params, ids, mask, key))
            times[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    new_tokens = ids.shape[0] * args.gen_length
    lp = ids.shape[1]
    row = {"sampler": family, "steps": steps, "temperature": temperature, "batch": int(ids.shape[0])}
    exact_tokens = np.asarray(outs["none"].sequences)[:, lp:]
    for v in VARIANTS:
        best = min(times[v])
        row[v] = {"compile_s": round(compile_s[v], 1), "run_s": round(best, 2), "times": [round(t, 2) for t in times[v]],
                  "cpu_s": round(min(cpu[v]), 2),
                  "tokens_per_s": round(new_tokens / best, 2),
                  "nfe": int(np.asarray(outs[v].nfe)[0]),
                  "tokens_processed": int(np.asarray(outs[v].tokens_processed)[0])}
        if v != "none":
            row[v]["speedup"] = round(min(times["none"]) / best, 2)
            row[v]["cpu_speedup"] = round(min(cpu["none"]) / min(cpu[v]), 2)
            if temperature == 0:
                row[v]["same_as_exact"] = round(float(np.mean(np.asarray(outs[v].sequences)[:, lp:] == exact_tokens)), 4)
    return row


def table_cells(r: dict) -> list:
    same = (f"{r['prefix'].get('same_as_exact', '-')} / {r['dual'].get('same_as_exact', '-')}"
            if r["temperature"] == 0 else "-")
    return [r["sampler"], r["steps"], f"{r['temperature']:g}", r["none"]["tokens_per_s"],
            f"{r['prefix']['tokens_per_s']} ({r['prefix']['speedup']}x)",
            f"{r['dual']['tokens_per_s']} ({r['dual']['speedup']}x)",
            f"{r['prefix']['cpu_speedup']}x / {r['dual']['cpu_speedup']}x", same]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samplers", nargs="+", default=["llada", "dream"], choices=["llada", "dream"])
    ap.add_argument("--steps", nargs="+", type=int, default=[64, 256])
    ap.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-length", type=int, default=64)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="time the first run of each compiled variant (long runs on a busy machine)")
    ap.add_argument("--json", type=str, default=None, help="also write the rows here")
    args = ap.parse_args(argv)

    print(machine_line(), flush=True)
    rows = []
    for family in args.samplers:
        cfg = mid_config(family)
        params = jax.device_put(random_params(cfg, seed=0, std=0.05))
        rng = np.random.default_rng(0)
        ids = rng.integers(0, 32000, size=(args.batch, args.prompt_length)).astype(np.int32)
        mask = np.ones_like(ids)
        ids[0, :args.prompt_length // 4], mask[0, :args.prompt_length // 4] = cfg.pad_token_id, 0
        ids, mask = jnp.asarray(ids), jnp.asarray(mask)
        for steps in args.steps:
            for t in args.temperatures:
                row = run_case(family, steps, t, args, params, ids, mask)
                row["load_average"] = os.getloadavg()
                rows.append(row)
                print(json.dumps(row), flush=True)
    print_table(["sampler", "steps", "T", "exact tok/s", "prefix tok/s (x)", "dual tok/s (x)",
                 "CPU-time ratio prefix / dual", "prefix / dual same tokens at T=0"], [table_cells(r) for r in rows])
    save_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
