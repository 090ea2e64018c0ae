"""Cost of the training-state digests against the checkpoint save they protect.

Two states: the tiny default's (``configs/sudoku_tiny.yaml``: parameters + AdamW moments + counters, as the
trainer builds them) and a synthetic fp32 state of ``--mb`` megabytes (three equal leaves, like parameters
and two moments). For each: the digest pass (``state_digests``, compiled once, median of ``--repeat``), a
durable save (``RunCheckpointer.save`` with ``async_save=False``, which includes the digest pass) and a
verified restore (``RunCheckpointer.restore``: Orbax restore + digest pass + comparison).

    python benchmarks/checkpoint_digest.py [--mb 256] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from gdsd_jax.checkpoint.integrity import state_digests
from gdsd_jax.checkpoint.train_state import RunCheckpointer, abstract_like


def tiny_default_state() -> dict:
    from gdsd_jax.config_io import load_config
    from gdsd_jax.rl.trainer import RLTrainer
    from gdsd_jax.training.config import TrainConfig
    from gdsd_jax.training.setup import build_mesh, build_model

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(TrainConfig, repo / "configs/sudoku_tiny.yaml").validate()
    mesh = build_mesh(cfg)
    model_cfg, params = build_model(cfg, mesh)
    return RLTrainer(cfg, model_cfg, params, mesh, adapter=None, task=None).init_state()[0]


def synthetic_state(mb: int) -> dict:
    n = mb * 2**20 // 4 // 3
    keys = jax.random.split(jax.random.key(0), 3)
    return {name: jax.random.normal(k, (n,), jnp.float32) for name, k in zip(("params", "mu", "nu"), keys)}


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, state: dict, repeat: int) -> None:
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    state_digests(state)                                   # compile
    digest = median_seconds(lambda: state_digests(state), repeat)
    with tempfile.TemporaryDirectory() as d:
        ck = RunCheckpointer(Path(d) / "ck", keep=repeat + 1, async_save=False)
        steps = iter(range(1, 100))
        save = median_seconds(lambda: ck.save(next(steps), state, None, {}), repeat)
        target = abstract_like(state)
        ck.restore(1, target)                              # compile the restore-side pass
        restore = median_seconds(lambda: ck.restore(1, target), repeat)
        ck.close()
    print(f"| {name} | {nbytes / 2**20:.1f} MiB | {digest * 1e3:.1f} ms | {nbytes / digest / 2**30:.2f} GiB/s | "
          f"{save * 1e3:.0f} ms | {digest / save:.1%} | {restore * 1e3:.0f} ms |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256, help="size of the synthetic state in MiB")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} x {jax.device_count()}")
    print("| state | size | digest pass | digest throughput | durable save (incl. digest) | digest share | "
          "verified restore |")
    print("|---|---|---|---|---|---|---|")
    measure("tiny default (params + AdamW)", tiny_default_state(), args.repeat)
    measure("synthetic fp32, 3 leaves", synthetic_state(args.mb), args.repeat)


if __name__ == "__main__":
    main()
