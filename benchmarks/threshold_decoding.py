"""Forwards per completion and test reward of confidence-aware parallel decoding on trained tiny policies.

For each trained run (a ``gdsd-jax train`` output directory) the policy of one saved step is decoded on the
run's evaluation set (``eval.split``, the project protocol, the run's own prompt format and its greedy
evaluation settings: ``sampling`` merged with ``eval.sampling``), once with the exact sampler and once per
(parallel-decoding rule, ``cache``) setting, the rule a ``threshold`` or Fast-dLLM's ``factor``. Reported per
setting:

* ``test_reward`` / ``accuracy``: the project's evaluation (:func:`gdsd_jax.training.evaluate.evaluate`, the
  function the trainer's test evaluations call);
* ``nfe``: mean model forwards per completion (``SampleOutput.nfe``), ``positions``: mean positions run
  through the layers per completion (``SampleOutput.tokens_processed``: a cached step runs only its window);
* ``gen_s`` / ``gen_cpu_s``: wall and process CPU time of generating the whole set with the compiled
  sampler (best of ``--repeats``; compile time excluded, reported apart).

The second pass (the one that reads NFE) must reproduce the evaluation's completions token for token; the
script checks it, so the forwards belong to the decoding that was scored.

Usage::

    python benchmarks/threshold_decoding.py --runs RUN_SUDOKU RUN_COUNTDOWN --step 200
    python benchmarks/threshold_decoding.py --runs RUN --step 200 --thresholds 0.9 --caches none dual
    python benchmarks/threshold_decoding.py --runs RUN --step 200 --thresholds --factors 0.3 1.0 --caches none
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

from gdsd_jax.allocator import preload_tcmalloc  # noqa: E402

preload_tcmalloc()

import jax  # noqa: E402
from report import machine_line, print_table, save_rows  # noqa: E402

from gdsd_jax.checkpoint.policy import run_config  # noqa: E402
from gdsd_jax.config_io import build, parse_override  # noqa: E402
from gdsd_jax.loading import load_denoiser  # noqa: E402
from gdsd_jax.sampling import SamplingConfig, generate_jit  # noqa: E402
from gdsd_jax.training.config import TrainConfig  # noqa: E402
from gdsd_jax.training.evaluate import evaluate  # noqa: E402
from gdsd_jax.training.setup import build_eval_adapter, build_mesh, build_task_and_adapter, eval_examples  # noqa: E402


def padded_batches(examples: list[dict], batch_size: int):
    """``(start, batch, real)`` in the evaluation's layout: fixed-size batches, the last one padded by
    repeating its last example."""
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        real = len(chunk)
        yield start, chunk + [chunk[-1]] * (batch_size - real), real


def decode_cost(params, model_cfg, adapter, examples, scfg: SamplingConfig, batch_size: int, repeats: int):
    """Completions, forwards and positions per completion, and the best generation time of the whole set."""
    key = jax.random.key(0)
    encoded = [(start, *adapter.encode(chunk), real) for start, chunk, real in padded_batches(examples, batch_size)]
    t0 = time.perf_counter()
    compiled = {ids.shape: generate_jit.lower(params, model_cfg, ids, mask, key, scfg).compile()
                for _, ids, mask, _ in encoded}
    compile_s = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(repeats):
        comps, nfe, positions = [], [], []
        w0, c0 = time.perf_counter(), time.process_time()
        for start, ids, mask, real in encoded:
            out = jax.block_until_ready(compiled[ids.shape](params, ids, mask, jax.random.fold_in(key, start)))
            comps.append(np.asarray(out.sequences)[:real, ids.shape[1]:])
            nfe.append(np.asarray(out.nfe)[:real])
            positions.append(np.asarray(out.tokens_processed)[:real])
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return (np.concatenate(comps), float(np.concatenate(nfe).mean()), float(np.concatenate(positions).mean()),
            min(walls), min(cpus), compile_s)


def settings(base: SamplingConfig, thresholds: list[float], factors: list[float], caches: list[str],
             refresh: int | None = None) -> list[SamplingConfig]:
    """The exact sampler, then every (rule, cache) pair other than (no rule, "none"), the rules being no
    parallel decoding, each threshold, each factor; cached settings refresh their cache every ``refresh``
    steps of a block."""
    rules = [{}] + [{"threshold": t} for t in thresholds] + [{"factor": f} for f in factors]
    out = [base]
    for rule in rules:
        for cache in caches:
            if not rule and cache == "none":
                continue
            out.append(base.replace(**{"threshold": None, "factor": None, **rule}, cache=cache,
                                    cache_refresh_every=None if cache == "none" else refresh))
    return out


def rule_name(scfg: SamplingConfig) -> str:
    """``"exact"``, ``"threshold 0.9"`` or ``"factor 1.0"``."""
    if scfg.threshold is not None:
        return f"threshold {scfg.threshold}"
    return f"factor {scfg.factor}" if scfg.factor is not None else "exact"


def run_one(run: str, step: int | None, args) -> list[dict]:
    cfg = build(TrainConfig, run_config(run))
    mesh = build_mesh(cfg)
    # --policy: other weights (e.g. the run's cached SFT warm start) decoded with this run's settings.
    model = load_denoiser(args.policy, mesh=mesh) if args.policy else load_denoiser(run, mesh=mesh, step=step)
    params, model_cfg = model.params(), model.config
    task, adapter, tokenizer = build_task_and_adapter(cfg, model_cfg)
    eval_adapter = build_eval_adapter(cfg, task, adapter, model_cfg, tokenizer)
    examples = eval_examples(task, cfg)
    batch_size = cfg.eval.batch_size
    base = cfg.eval_sampling_config()
    if args.block_length:
        base = base.replace(block_length=args.block_length)
    if args.sampling:
        base = base.replace(**{".".join(path): value for path, value in map(parse_override, args.sampling)})
    weights = f"policy {args.policy}" if args.policy else f"step {step}"
    print(f"# {run} {weights}: task {task.name} ({cfg.task.format}), {len(examples)} {cfg.eval.split} examples, "
          f"gen_length {base.gen_length}, steps {base.steps}, block_length {base.block_length}, "
          f"temperature {base.temperature}, ban_mask_token {base.ban_mask_token}", flush=True)
    rows = []
    for scfg in settings(base, args.thresholds, args.factors, args.caches, args.cache_refresh_every):
        w0 = time.perf_counter()
        res = evaluate(params, model_cfg, eval_adapter, examples, scfg, mesh, batch_size=batch_size)
        eval_s = time.perf_counter() - w0
        comps, nfe, positions, gen_s, gen_cpu_s, compile_s = decode_cost(
            params, model_cfg, eval_adapter, examples, scfg, batch_size, args.repeats)
        scored = np.asarray([r["completion_ids"] for r in res.records])
        if not np.array_equal(scored, comps):
            raise RuntimeError(f"{run}: the timing pass of {scfg} did not reproduce the evaluated completions")
        row = {"run": Path(run).name, "step": None if args.policy else step, "policy": args.policy,
               "task": task.name, "examples": len(examples),
               "gen_length": base.gen_length, "steps": base.steps, "block_length": base.block_length,
               "ban_mask_token": base.ban_mask_token, "rule": rule_name(scfg), "threshold": scfg.threshold,
               "factor": scfg.factor, "cache": scfg.cache,
               "cache_refresh_every": scfg.cache_refresh_every,
               "test_reward": round(res.mean_reward, 4), "accuracy": round(res.accuracy, 4),
               "nfe": round(nfe, 3), "positions": round(positions, 1),
               "gen_s": round(gen_s, 3), "gen_cpu_s": round(gen_cpu_s, 3), "compile_s": round(compile_s, 1),
               "eval_s_incl_compile": round(eval_s, 1), "load_average": os.getloadavg()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    exact = rows[0]
    for row in rows:
        row["nfe_ratio"] = round(exact["nfe"] / row["nfe"], 2)
        row["positions_ratio"] = round(exact["positions"] / row["positions"], 2)
        row["reward_delta"] = round(row["test_reward"] - exact["test_reward"], 4)
    return rows


def table_cells(r: dict) -> list:
    return [r["run"], r["rule"], r["cache"],
            f"{r['test_reward']:.4f} ({r['reward_delta']:+.4f})", f"{r['accuracy']:.4f}",
            f"{r['nfe']:.2f} ({r['nfe_ratio']}x)", f"{r['positions']:.1f} ({r['positions_ratio']}x)",
            f"{r['gen_s']:.2f}", f"{r['gen_cpu_s']:.2f}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="gdsd-jax train output directories")
    ap.add_argument("--step", type=int, default=None, help="saved step of every run (default: the latest)")
    ap.add_argument("--policy", default=None,
                    help="a params checkpoint to decode instead of the runs' own weights (e.g. a run's SFT warm "
                         "start under .cache/warm_starts), with the runs' task and evaluation settings")
    ap.add_argument("--thresholds", nargs="*", type=float, default=[0.7, 0.8, 0.9, 0.95])
    ap.add_argument("--factors", nargs="*", type=float, default=[],
                    help="Fast-dLLM factor rules to try as well (rank i must reach 1 - factor / (i + 1))")
    ap.add_argument("--caches", nargs="+", default=["none", "prefix", "dual"], choices=["none", "prefix", "dual"])
    ap.add_argument("--cache-refresh-every", type=int, default=None,
                    help="cached settings recompute the cache every k steps of a block (default: once per block)")
    ap.add_argument("--block-length", type=int, default=None,
                    help="decode in blocks of this size instead of the run's own layout (a different sampler)")
    ap.add_argument("--sampling", nargs="+", default=[], metavar="KEY=VALUE",
                    help="settings over the run's own, e.g. ban_mask_token=true for runs made when the sampler "
                         "banned the mask token")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    print(machine_line(), flush=True)
    rows = [row for run in args.runs for row in run_one(run, args.step, args)]
    print_table(["run", "rule", "cache", "test reward (delta)", "accuracy",
                 "forwards / completion (exact / this)", "positions / completion", "generation wall s", "CPU s"],
                [table_cells(r) for r in rows])
    save_rows(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
