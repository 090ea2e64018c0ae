"""Arguments shared by the run commands (train, sft, eval): a YAML config plus key=value overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from gdsd_jax.config_io import load_config

DEFAULT_CONFIG = "configs/sudoku_tiny.yaml"


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help=f"run config YAML (default: {DEFAULT_CONFIG}, the embedded tiny Sudoku run)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the config, e.g. rl.total_steps=50 objective.psi=2.0")
    p.add_argument("--output-dir", default=None, help="run directory (overrides output_dir)")


def resolve_config_path(path: str | None) -> Path:
    """The given path, or the default config from the working directory or the source checkout."""
    if path is not None:
        return Path(path)
    here = Path(DEFAULT_CONFIG)
    if here.is_file():
        return here
    repo = Path(__file__).resolve().parents[2] / DEFAULT_CONFIG
    if repo.is_file():
        return repo
    raise SystemExit(f"default config {DEFAULT_CONFIG} not found; pass --config FILE")


def load_train_config(args) :
    from gdsd_jax.training.config import TrainConfig

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(TrainConfig, resolve_config_path(args.config), overrides)
