"""Generated tokens per second of the jitted samplers against the plain per-step loop.

The baseline is the per-step reference of the tests (``tests/sampling_reference.py``): a Python loop that
calls a jitted model forward every step and does the rest in NumPy, the way the upstream PyTorch samplers
are written. Both run the same model (fp32, random weights) with the same settings at temperature 0, so the
benchmark also checks that they produce the same tokens.

Compile time (lowering + XLA compilation of the whole sampler; for the loop, the first forward call) is
reported separately from the steady-state time (best of ``--repeats`` runs after a warm-up run: the machine may be shared).

Usage::

    python benchmarks/sampling_throughput.py                     # tiny and mid, both samplers
    python benchmarks/sampling_throughput.py --configs mid --samplers llada --batch 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# Timings are taken under tcmalloc when the machine has it, as the CLI runs (gdsd_jax/allocator.py);
# GDSD_JAX_ALLOCATOR=system measures glibc's malloc instead. Must run before JAX is imported.
from gdsd_jax.allocator import active_allocator, preload_tcmalloc  # noqa: E402

preload_tcmalloc()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from sampling_reference import dream_reference, jax_logits_fn, llada_reference, random_params  # noqa: E402

from gdsd_jax.models.config import DenoiserConfig, tiny_dream, tiny_llada  # noqa: E402
from gdsd_jax.sampling import SamplingConfig, generate_jit  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def mid_config(family: str) -> DenoiserConfig:
    """8 layers, width 512, 8 heads of 64, SwiGLU 1536, a 32k vocabulary (fp32)."""
    base = tiny_llada if family == "llada" else tiny_dream
    return base(vocab_size=32768, hidden_size=512, num_layers=8, num_heads=8,
                num_kv_heads=8 if family == "llada" else 2, head_dim=64, mlp_dim=1536,
                mask_token_id=32000, eos_token_id=32001, pad_token_id=32001, max_seq_len=4096)


def settings(name: str, family: str) -> tuple[DenoiserConfig, SamplingConfig, int]:
    """(model config, sampling config, prompt length)."""
    if name == "tiny":
        cfg = tiny_llada() if family == "llada" else tiny_dream()
        scfg = SamplingConfig(gen_length=64, steps=32, block_length=16 if family == "llada" else None,
                              alg="entropy")
        return cfg, scfg, 16
    cfg = mid_config(family)
    scfg = SamplingConfig(gen_length=256, steps=64, block_length=32 if family == "llada" else None, alg="entropy")
    return cfg, scfg, 32


def best_time(run, repeats: int) -> tuple[float, object]:
    """The shortest wall time of ``repeats`` calls of ``run`` after one untimed call (compilation, caches),
    and the last call's result."""
    out = run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    return min(times), out


def bench_one(name: str, family: str, batch: int, repeats: int) -> dict:
    cfg, scfg, lp = settings(name, family)
    params = jax.device_put(random_params(cfg, seed=0, std=0.05 if name == "mid" else 0.3))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(cfg.mask_token_id, 240 if name == "tiny" else 32000), size=(batch, lp)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[0, :lp // 4], mask[0, :lp // 4] = cfg.pad_token_id, 0      # one left-padded row
    key = jax.random.key(0)
    new_tokens = batch * scfg.gen_length

    # -- jitted sampler
    t0 = time.perf_counter()
    compiled = generate_jit.lower(params, cfg, jnp.asarray(ids), jnp.asarray(mask), key, scfg).compile()
    compile_s = time.perf_counter() - t0
    run = lambda: jax.block_until_ready(compiled(params, jnp.asarray(ids), jnp.asarray(mask), key))  # noqa: E731
    ours_s, out = best_time(run, repeats)

    # -- per-step loop (jitted forward per step, NumPy for the rest)
    fn = jax_logits_fn(params, cfg)
    full = np.concatenate([ids, np.full((batch, scfg.gen_length), cfg.mask_token_id, np.int32)], 1)
    full_mask = np.concatenate([mask, np.ones((batch, scfg.gen_length), np.int32)], 1)
    t0 = time.perf_counter()
    fn(full, full_mask)
    loop_compile_s = time.perf_counter() - t0

    def loop():
        if family == "llada":
            return llada_reference(fn, ids, mask, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
                                   gen_length=scfg.gen_length, steps=scfg.steps, block_length=scfg.llada_block_length)
        return dream_reference(fn, ids, mask, mask_id=cfg.mask_token_id, gen_length=scfg.gen_length,
                               steps=scfg.steps, alg=scfg.alg)

    loop_s, ref = best_time(loop, repeats)
    same = bool(np.array_equal(np.asarray(out.sequences), ref))
    return {
        "config": name, "sampler": family, "batch": batch, "prompt_length": lp, "gen_length": scfg.gen_length,
        "steps": scfg.steps, "block_length": scfg.llada_block_length if family == "llada" else None,
        "params_M": round(cfg.num_params() / 1e6, 2),
        "compile_s": round(compile_s, 2), "run_s": round(ours_s, 3), "tokens_per_s": round(new_tokens / ours_s, 1),
        "loop_compile_s": round(loop_compile_s, 2), "loop_run_s": round(loop_s, 3),
        "loop_tokens_per_s": round(new_tokens / loop_s, 1), "speedup": round(loop_s / ours_s, 2),
        "same_tokens": same,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,mid")
    ap.add_argument("--samplers", default="llada,dream")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    print(f"# jax {jax.__version__}, {jax.devices()[0].platform}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, allocator {active_allocator()}, "
          f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
    rows = []
    header = ("| config | sampler | B | Lp+Lg | steps | compile s | run s | tokens/s | loop compile s | "
              "loop run s | loop tokens/s | speedup | same tokens |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name in args.configs.split(","):
        for family in args.samplers.split(","):
            r = bench_one(name, family, args.batch, args.repeats)
            rows.append(r)
            print(f"| {r['config']} ({r['params_M']}M) | {r['sampler']} | {r['batch']} | "
                  f"{r['prompt_length']}+{r['gen_length']} | {r['steps']} | {r['compile_s']} | {r['run_s']} | "
                  f"{r['tokens_per_s']} | {r['loop_compile_s']} | {r['loop_run_s']} | {r['loop_tokens_per_s']} | "
                  f"{r['speedup']}x | {r['same_tokens']} |", flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
