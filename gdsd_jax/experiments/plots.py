"""Curves of a run from its ``metrics.jsonl``: rollout reward, greedy test reward, KL/clip, time split.

Run and output directories may be local or ``gs://`` (figures are rendered into an open file object).
"""

from __future__ import annotations

import os

import numpy as np
from etils import epath

from gdsd_jax.checkpoint.params_io import storage_path
from gdsd_jax.experiments.report import series, smooth
from gdsd_jax.training.metrics import read_metrics


def _save(fig, path: epath.Path) -> None:
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=120)


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[epath.Path]:
    """Write ``reward.png`` and ``diagnostics.png`` to ``out_dir`` (default ``<run_dir>/plots``); returns their paths."""
    import matplotlib  # lazy: heavy, and only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = storage_path(run_dir)
    records = read_metrics(run_dir)
    out = storage_path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    s, v = series(records, "reward_mean")
    if len(s):
        ax.plot(s, v, alpha=0.3, color="C0")
        ax.plot(s, smooth(v, 10), color="C0", label="rollout reward (T=1, smoothed)")
    s, v = series(records, "test_reward")
    if len(s):
        ax.plot(s, v, "o-", color="C1", label="greedy test reward")
    ax.set_xlabel("RL step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out / "reward.png")
    _save(fig, written[-1])
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("kl", "mean_abs_delta", "inside_clip_frac", "grad_norm"):
        s, v = series(records, key)
        if len(s):
            axes[0].plot(s, v, label=key)
    axes[0].set_xlabel("RL step")
    axes[0].set_yscale("symlog", linthresh=1e-4)
    axes[0].legend()
    axes[0].grid(alpha=0.3)
    keys = ("time_generation", "time_reward", "time_scoring", "time_update")
    parts = [np.mean(series(records, k)[1]) if len(series(records, k)[1]) else 0.0 for k in keys]
    axes[1].bar([k.replace("time_", "") for k in keys], parts, color=["C0", "C1", "C2", "C3"])
    axes[1].set_ylabel("seconds per step (mean)")
    fig.tight_layout()
    written.append(out / "diagnostics.png")
    _save(fig, written[-1])
    plt.close(fig)
    return written
