"""Arguments shared by the run commands (train, sft, eval): a YAML config plus key=value overrides."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

from gdsd_jax.config_io import DEFAULT_CONFIG, load_config, resolve_config_path


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help=f"run config YAML, or the path of a shipped one (configs/NAME.yaml) "
                        f"(default: {DEFAULT_CONFIG}, the embedded tiny Sudoku run)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the config, e.g. rl.total_steps=50 objective.psi=2.0")
    p.add_argument("--output-dir", default=None, help="run directory (overrides output_dir)")


def load_train_config(args):
    from gdsd_jax.training.config import TrainConfig

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(TrainConfig, resolve_config_path(args.config), overrides)


@contextlib.contextmanager
def no_empty_run_directory(path: str) -> Iterator[None]:
    """On an error, remove the (local) run directory again if this command created it and it holds no file."""
    if "://" in path:
        yield
        return
    root = Path(path)
    existed = root.exists()
    try:
        yield
    except BaseException:
        if not existed and root.is_dir() and not any(p.is_file() for p in root.rglob("*")):
            for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                d.rmdir()
            root.rmdir()
        raise
