"""Run the process under tcmalloc when the machine has it (CPU speed; harmless elsewhere).

Why: XLA:CPU gives every kernel's output a freshly allocated buffer. glibc's malloc serves large requests
(above its mmap threshold, at most 32 MiB, and anything a thread arena cannot hold) with ``mmap`` and
returns them with ``munmap`` when freed, so the same activation buffers are faulted in page by page again
on every step: about 1 GB of new pages per RL step of the tiny default, 22% of its CPU time in the kernel.
tcmalloc keeps freed spans and hands them out again. Measured on the 2-core CPU of the benchmarks
(``benchmarks/README.md``): the 60M-parameter update step 7.45 s -> 5.49 s (MFU 52% -> 68%), the tiny
default's update 0.174 s -> 0.130 s, minor page faults down 6-7x. It is the preload PyTorch's CPU
performance-tuning guide recommends and PyTorch/XLA's TPU VM Docker images set; it changes where buffers live,
not what is computed (the tests compare runs bitwise across the switch).

The allocator has to be chosen before the process starts (``LD_PRELOAD``), so :func:`preload_tcmalloc`
re-executes the current command once with the library preloaded; the command-line entry point and the
benchmark scripts call it first thing, before JAX is imported. It does nothing when:

* ``GDSD_JAX_ALLOCATOR=system`` (the default is ``tcmalloc``: use it when found);
* the platform is not Linux, or no tcmalloc library is installed (Debian/Ubuntu:
  ``apt-get install libtcmalloc-minimal4``; ``make setup`` installs it when it runs as root with apt);
* tcmalloc is already preloaded (the re-executed process, or a user's own ``LD_PRELOAD``).

``GDSD_JAX_TCMALLOC=/path/to/libtcmalloc*.so`` names the library explicitly.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping, Sequence

from gdsd_jax.errors import UserError

ALLOCATOR_ENV = "GDSD_JAX_ALLOCATOR"
LIBRARY_ENV = "GDSD_JAX_TCMALLOC"
CHOICES = ("tcmalloc", "system")
# Library names in order of preference: the minimal build has no heap profiler, which we do not use.
_LIBRARIES = ("tcmalloc_minimal", "tcmalloc")


class AllocatorError(UserError, ValueError):
    """``GDSD_JAX_ALLOCATOR`` holds a value other than the known choices."""


def allocator_choice(environ: Mapping[str, str] | None = None) -> str:
    """The requested allocator, ``tcmalloc`` (default) or ``system``; a clear error for anything else."""
    environ = os.environ if environ is None else environ
    choice = environ.get(ALLOCATOR_ENV, "tcmalloc").strip().lower() or "tcmalloc"
    if choice not in CHOICES:
        raise AllocatorError(f"{ALLOCATOR_ENV}={environ[ALLOCATOR_ENV]!r}: expected one of {', '.join(CHOICES)} "
                             f"(or unset)")
    return choice


def find_tcmalloc(environ: Mapping[str, str] | None = None) -> str | None:
    """Path or soname of a tcmalloc shared library, or None when none is installed."""
    environ = os.environ if environ is None else environ
    explicit = environ.get(LIBRARY_ENV)
    if explicit:
        if not os.path.isfile(explicit):
            raise FileNotFoundError(f"{LIBRARY_ENV}={explicit!r}: no such file (expected a libtcmalloc*.so)")
        return explicit
    for name in _LIBRARIES:
        found = ctypes.util.find_library(name)   # ldconfig's cache: a soname the loader resolves itself
        if found:
            return found
    return None


def _preloaded(environ: Mapping[str, str]) -> bool:
    return "tcmalloc" in environ.get("LD_PRELOAD", "")


def preload_tcmalloc(argv: Sequence[str] | None = None) -> None:
    """Re-execute this process with tcmalloc preloaded, if wanted, available and not yet loaded.

    ``argv`` is the full command line to run again (default: :data:`sys.orig_argv`, the interpreter's own,
    so ``python -m pkg``, scripts and console entry points all restart as they were started). Returns only
    when no restart is needed; otherwise the process image is replaced and this never returns.
    """
    if not sys.platform.startswith("linux") or allocator_choice() == "system" or _preloaded(os.environ):
        return
    library = find_tcmalloc()
    if library is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(p for p in (library, env.get("LD_PRELOAD", "")) if p)
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


def active_allocator() -> str:
    """What this process allocates with: the mapped tcmalloc library's file name, else ``system``."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if line.strip() else ""
                if "tcmalloc" in os.path.basename(path):
                    return os.path.basename(path)
    except OSError:  # not Linux
        pass
    return "system"
