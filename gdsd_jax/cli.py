"""``gdsd-jax`` command line: one sub-command per module in :mod:`gdsd_jax.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``gdsd-jax --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from gdsd_jax.allocator import preload_tcmalloc

COMMANDS: dict[str, str] = {
    "train": "RL post-training (GDSD and baselines); default: the embedded tiny 4x4 Sudoku run",
    "sft": "masked-diffusion supervised fine-tuning (warm starts)",
    "eval": "evaluate a checkpoint on a task's test set",
    "sample": "generate completions with the LLaDA / Dream diffusion samplers",
    "convert": "Hugging Face safetensors -> gdsd-jax (Orbax) checkpoint",
    "export": "gdsd-jax checkpoint or a run's policy -> Hugging Face safetensors + config.json (or params)",
    "plot": "PNG curves of a run directory",
    "experiment": "multi-run experiment: lr selection, seeds, studies, aggregated results and curves",
    "plan": "per-device memory plan of a recipe on an abstract mesh",
    "smoke": "tiny end-to-end check: build a tiny HF checkpoint, convert it, print logits",
}


def _module(name: str):
    return importlib.import_module(f"gdsd_jax.commands.{name}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gdsd-jax", description="GDSD RL post-training of diffusion LMs in JAX")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is None or name == only:
            try:
                mod = _module(name)
            except ModuleNotFoundError as e:  # a command whose module is not installed in this build
                if e.name != f"gdsd_jax.commands.{name}":
                    raise
                p.set_defaults(_missing=name)
                continue
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # a real process start (not a call from Python): choose the allocator before JAX loads
        preload_tcmalloc()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Default command: `gdsd-jax` alone runs the embedded default training job.
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train"] + argv
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        parser.error(f"command {args._missing!r} is not available in this build")
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
