"""``gdsd-jax experiment CONFIG``: GDSD against the baselines over tasks, learning rates and seeds.

Runs the learning-rate selection, then every method at its chosen point for every seed, then the studies,
and writes ``OUT/results.md`` with PNG curves (see :mod:`gdsd_jax.experiments.runner`). Finished runs are
skipped, so the command resumes after an interruption.
"""

from __future__ import annotations

from gdsd_jax.errors import UserError

HELP = "multi-run experiment: lr selection, seeds, studies, aggregated results.md and curves"


def add_arguments(p) -> None:
    p.add_argument("config", help="experiment YAML, e.g. configs/experiments/tiny_baselines.yaml")
    p.add_argument("--only", action="append", default=None, metavar="TASK/METHOD",
                   help="restrict to matching groups (glob; repeatable): 'sudoku', 'countdown/spg', '*/gdsd*', "
                        "'sudoku/clip_band'")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs in parallel (each in its own process when > 1); default 1 (in-process)")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and an estimated runtime")
    p.add_argument("--output-dir", default=None, help="run directory root (default: the file's output_dir)")
    p.add_argument("--results-dir", default=None,
                   help="where results.md, selection.json and the PNGs go (default: the run directory root)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished run's checkpoints (default: delete them, the results need metrics only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from gdsd_jax.experiments.runner import run_experiment

    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    only = [x for item in (args.only or []) for x in item.split(",") if x]
    return run_experiment(args.config, only=only or None, jobs=args.jobs, dry_run=args.dry_run,
                          output_dir=args.output_dir, results_dir=args.results_dir, progress=not args.no_progress,
                          keep_checkpoints=args.keep_checkpoints)
