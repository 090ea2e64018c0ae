"""``gdsd-jax train``: RL post-training. Without arguments: the embedded tiny 4x4 Sudoku default."""

from __future__ import annotations

from gdsd_jax.commands._common import add_config_arguments, load_train_config, no_empty_run_directory

HELP = "RL post-training (GDSD and baselines)"


def add_arguments(p) -> None:
    add_config_arguments(p)
    earlier = p.add_mutually_exclusive_group()
    earlier.add_argument("--resume", action="store_true",
                         help="continue from the latest checkpoint in the run directory")
    earlier.add_argument("--overwrite", action="store_true",
                         help="the run directory holds an earlier run: delete its files and start afresh")
    p.add_argument("--coordinator-address", default=None, help="multi-host: coordinator host:port (not needed on TPU VMs)")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's id")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    from gdsd_jax.rl.run import run_train

    extra = []
    for flag, key in (("coordinator_address", "distributed.coordinator_address"),
                      ("num_processes", "distributed.num_processes"), ("process_id", "distributed.process_id")):
        if getattr(args, flag) is not None:
            extra.append(f"{key}={getattr(args, flag)}")
    args.overrides = list(args.overrides) + extra
    cfg = load_train_config(args).validate()
    with no_empty_run_directory(cfg.output_dir):
        run_train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    return 0
