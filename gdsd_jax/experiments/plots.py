"""Curves of a run from its ``metrics.jsonl``: rollout reward and greedy test reward (``reward.png``); loss,
learning rate, the objective's diagnostics and the time split (``diagnostics.png``).

Run and output directories may be local or ``gs://`` (figures are rendered into an open file object).
"""

from __future__ import annotations

import json
import os

import numpy as np
from etils import epath

from gdsd_jax.checkpoint.params_io import storage_path
from gdsd_jax.checkpoint.policy import RUN_CONFIG_FILE
from gdsd_jax.experiments.report import series, smooth
from gdsd_jax.training.metrics import read_metrics


def _save(fig, path: epath.Path) -> None:
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=120)


#: Per-step objective diagnostics, in plotting order; :func:`diagnostic_keys` keeps those the run's objective uses.
DIAGNOSTICS = ("kl", "mean_abs_delta", "inside_clip_frac", "clip_frac", "grad_norm")


def _run_objective(run_dir: epath.Path) -> dict | None:
    """The ``objective`` section of the run's ``config.json`` (None for a directory without one, e.g. SFT)."""
    path = run_dir / RUN_CONFIG_FILE
    return json.loads(path.read_text()).get("objective") if path.exists() else None


def diagnostic_keys(records: list[dict], objective: dict | None) -> list[str]:
    """The :data:`DIAGNOSTICS` to plot: those logged, without the ones the run's objective does not use (the
    clip fractions when it clips nothing: ``clip_mode: none`` or no clip band; the KL with ``beta`` 0)."""
    skip = set()
    if objective is not None:
        if objective.get("clip_mode") == "none" or "epsilon_low" not in objective:
            skip |= {"inside_clip_frac", "clip_frac"}
        if not objective.get("beta"):
            skip.add("kl")
    return [k for k in DIAGNOSTICS if k not in skip and len(series(records, k)[0])]


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[epath.Path]:
    """Write ``reward.png`` and ``diagnostics.png`` to ``out_dir`` (default ``<run_dir>/plots``); returns their
    paths. Diagnostics the run's objective does not use are left out (:func:`diagnostic_keys`)."""
    import matplotlib  # lazy: heavy, and only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = storage_path(run_dir)
    records = read_metrics(run_dir)
    out = storage_path(out_dir) if out_dir else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []

    objective = _run_objective(run_dir)
    title = run_dir.name + (f" ({objective['name']})" if objective else "")
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
    ax.set_title(f"{title}: rewards")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    written.append(out / "reward.png")
    _save(fig, written[-1])
    plt.close(fig)

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, key, name in ((axes[0, 0], "loss", "loss"), (axes[0, 1], "lr", "learning rate")):
        s, v = series(records, key)
        if len(s):
            ax.plot(s, v, color="C0")
        ax.set_title(name)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    ax = axes[1, 0]
    for key in diagnostic_keys(records, objective):
        s, v = series(records, key)
        ax.plot(s, v, label=key)
    ax.set_title("objective diagnostics (per step)")
    ax.set_xlabel("RL step")
    ax.set_yscale("symlog", linthresh=1e-4)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    ax.grid(alpha=0.3)
    keys = ("time_generation", "time_reward", "time_scoring", "time_update")
    parts = [np.mean(series(records, k)[1]) if len(series(records, k)[1]) else 0.0 for k in keys]
    axes[1, 1].bar([k.replace("time_", "") for k in keys], parts, color=["C0", "C1", "C2", "C3"])
    axes[1, 1].set_title("time split")
    axes[1, 1].set_ylabel("seconds per step (mean)")
    fig.suptitle(title)
    fig.tight_layout()
    written.append(out / "diagnostics.png")
    _save(fig, written[-1])
    plt.close(fig)
    return written
