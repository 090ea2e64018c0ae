"""``gdsd-jax`` command line: one sub-command per module in :mod:`gdsd_jax.commands`.

Each command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
Modules are imported only when their command runs, so ``gdsd-jax --help`` stays fast.

Errors the user can fix (a :class:`~gdsd_jax.errors.UserError`, a missing or existing path, a full disk)
are printed as one line and exit with status 1; ``--debug`` anywhere on the command line (or
``GDSD_JAX_DEBUG=1``) lets them raise with their traceback. Any other exception is a bug and keeps its
traceback.

Every command runs with JAX's persistent compilation cache (:mod:`gdsd_jax.compile_cache`);
``--no-compilation-cache`` anywhere on the command line (or ``GDSD_JAX_COMPILATION_CACHE=off``) turns it off.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import re
import sys
from collections.abc import Iterator

from gdsd_jax.allocator import preload_tcmalloc
from gdsd_jax.compile_cache import CACHE_ENV, OFF, enable_compilation_cache
from gdsd_jax.errors import UserError, error_line

DEBUG_ENV = "GDSD_JAX_DEBUG"
NO_CACHE_FLAG = "--no-compilation-cache"
#: OS errors about a path the user gave (their message names it).
_PATH_ERRORS = (FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)

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
    parser = argparse.ArgumentParser(
        prog="gdsd-jax", description="GDSD RL post-training of diffusion LMs in JAX",
        epilog=f"Errors are printed as one line; --debug (anywhere on the command line) or {DEBUG_ENV}=1 shows "
               f"the traceback. Compiled programs are cached on disk for the next start; {NO_CACHE_FLAG} "
               f"(anywhere) or {CACHE_ENV}={OFF} turns that off, {CACHE_ENV}=DIR moves it.")
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


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during, outermost first."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _disk_full(exc: BaseException) -> str | None:
    """The file being written when the disk filled up (``""`` if unknown), or None if that is not the error.

    Python reports ENOSPC as an ``OSError``; TensorStore (Orbax's array writer) as a ``ValueError`` whose text
    carries the OS message and the path, which is all there is to recognise it by.
    """
    for e in _causes(exc):
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return e.filename or ""
        if any(os.strerror(code) in str(e) for code in _DISK_FULL):
            path = re.search(r'(?:Failed writing|local file): "([^"]+)"', str(e))
            return path.group(1) if path else ""
    return None


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of an error the user can fix, or None for anything else (a bug)."""
    path = _disk_full(exc)
    if path is not None:
        where = f" while writing {path}" if path else ""
        return (f"no space left on the device{where}; free some space and run the same command again (a "
                f"training run: with --resume, from its last complete checkpoint)")
    if isinstance(exc, (UserError, *_PATH_ERRORS)):
        return " ".join(str(exc).split("\n"))
    return None


def _quiet_disk_full_logs(record: logging.LogRecord) -> bool:
    """Orbax logs a failed background write from each of its threads; the command reports it once."""
    if record.exc_info and record.exc_info[1] is not None and _disk_full(record.exc_info[1]) is not None:
        return False
    return not any(os.strerror(code) in record.getMessage() for code in _DISK_FULL)


def main(argv: list[str] | None = None) -> int:
    start = argv is None    # a real process start, not a call from Python
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if NO_CACHE_FLAG in argv:
        os.environ[CACHE_ENV] = OFF
    argv = [a for a in argv if a not in ("--debug", NO_CACHE_FLAG)]
    command = argv[0] if argv and argv[0] in COMMANDS else "train"
    if start and not debug:
        logging.getLogger("absl").addFilter(_quiet_disk_full_logs)
    try:
        return _main(argv, start)
    except Exception as exc:
        message = user_error_message(exc)
        if debug or message is None:
            raise
        print(error_line(command, message), file=sys.stderr)
        if start and _disk_full(exc) is not None:
            # Orbax's abandoned background writes print a traceback each while the interpreter tears down.
            # Everything the run wrote is on disk already (metrics are appended and closed line by line,
            # checkpoints are atomic), so leave without the teardown.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1


def _main(argv: list[str], start: bool) -> int:
    wants_help = "-h" in argv or "--help" in argv
    if start:  # choose the allocator before JAX loads
        try:
            preload_tcmalloc()
        except UserError:
            if not wants_help:   # a bad setting must not hide the help that may explain it
                raise
    if not wants_help:
        enable_compilation_cache()
    # Default command: `gdsd-jax` alone runs the embedded default training job.
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["train"] + argv
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args, rest = parser.parse_known_args(argv)
    if rest:
        # KEY=VALUE overrides may stand anywhere, also after a flag (argparse keeps only the first run of them).
        if hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in rest):
            args.overrides = list(args.overrides) + rest
        else:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "_missing", None):
        parser.error(f"command {args._missing!r} is not available in this build")
    if not hasattr(args, "_run"):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
