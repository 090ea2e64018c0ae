"""``gdsd-jax train``: RL post-training. Without arguments: the embedded tiny 4x4 Sudoku default."""

from __future__ import annotations

from gdsd_jax.commands._common import add_config_arguments, load_train_config
from gdsd_jax.config_io import ConfigError

HELP = "RL post-training (GDSD and baselines)"


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run directory")
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
    try:
        cfg = load_train_config(args).validate()
    except ConfigError as e:
        raise SystemExit(f"config error: {e}")
    run_train(cfg, resume=args.resume, progress=not args.no_progress)
    return 0
