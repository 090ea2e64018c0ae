"""``gdsd-jax plot RUN_DIR``: PNG curves of a run (reward, test reward, KL, time split)."""

from __future__ import annotations

HELP = "PNG curves of a run directory"


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="output directory (default: RUN_DIR/plots)")


def run(args) -> int:
    from gdsd_jax.experiments.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0
