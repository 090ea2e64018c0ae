"""Arguments and checks shared by the commands: a YAML config plus key=value overrides (train, sft), input and
output paths, and the one spelling of dtypes (convert, export, sample)."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

from gdsd_jax.config_io import DEFAULT_CONFIG, load_config, resolve_config_path
from gdsd_jax.errors import UserError

#: The dtype spelling of every command's ``--dtype``; the NumPy names are accepted as aliases.
DTYPES = ("bf16", "fp16", "fp32")
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def dtype_arg(allowed: tuple[str, ...] = DTYPES):
    """An argparse ``type`` for ``--dtype``: one of ``allowed`` (``bf16|fp16|fp32`` spelling) or its NumPy
    name (``bfloat16``, ``float16``, ``float32``), returned in the short spelling."""
    def parse(text: str) -> str:
        name = _DTYPE_ALIASES.get(text.lower(), text.lower())
        if name not in allowed:
            raise argparse.ArgumentTypeError(f"{text!r}: expected one of {', '.join(allowed)} (or "
                                             f"{', '.join(k for k, v in _DTYPE_ALIASES.items() if v in allowed)})")
        return name
    parse.__name__ = "dtype"
    return parse


def require_existing(path: str, flag: str) -> None:
    """A local input path must exist (remote ``scheme://`` paths are checked when read)."""
    if "://" not in path and not Path(path).exists():
        raise UserError(f"{flag} {path}: no such file or directory")


def refuse_existing_output(path: str, overwrite: bool, flag: str = "--out") -> None:
    """An output that exists is replaced only with ``--overwrite``; said before anything is read or written."""
    if not overwrite and Path(path).exists():
        raise UserError(f"{flag} {path} already exists; choose another output or pass --overwrite to replace it")


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
