"""JAX's persistent compilation cache for every gdsd-jax process: a program compiles once per machine.

Why: every start of a run compiles the same programs again (rollout sampler, log-likelihood statistics,
update step, evaluation). On the tiny default that is a few tens of seconds; for an 8B step on a TPU slice it
is minutes, paid again on every restart after a pre-emption, every ``eval`` and every ``sample``. JAX can
store compiled executables on disk and load them on the next start instead of compiling.

Where the entries go, in order:

* ``GDSD_JAX_COMPILATION_CACHE=off`` (or the command-line flag ``--no-compilation-cache``): no cache;
* ``GDSD_JAX_COMPILATION_CACHE=DIR``: that directory (local, or ``gs://...`` for a pod sharing one);
* ``JAX_COMPILATION_CACHE_DIR`` already set by the user: JAX's own setting is left alone;
* otherwise ``$XDG_CACHE_HOME/gdsd-jax/xla/<key>`` (default ``~/.cache/gdsd-jax/xla/<key>``).

``<key>`` names the JAX and jaxlib versions and the host CPU. JAX's own cache key already covers the
program, the jaxlib version, the XLA flags, the devices and the compile options; the directory adds the host
CPU because XLA:CPU compiles for the host's vector instructions, and a home directory shared between machines
must never hand a program built for AVX-512 to an AVX2 host. It also keeps each version's entries apart, so an
old version's directory can simply be deleted.

Every program is cached (no minimum compile time, no minimum size): the tiny default and the tests compile
hundreds of programs of well under a second each, which together are most of a start. A cached program is
the same executable, so results are bitwise those of a fresh compile (``tests/test_compile_cache.py``). The
cache is a speed-up, not a correctness layer: when its directory cannot be created, the process says so in
one line and runs without it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys
from collections.abc import MutableMapping
from pathlib import Path

CACHE_ENV = "GDSD_JAX_COMPILATION_CACHE"
OFF = "off"
#: JAX's own settings, as environment variables (read when JAX is imported, inherited by child processes).
JAX_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
_JAX_SETTINGS = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": ("jax_persistent_cache_min_compile_time_secs", 0.0),
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": ("jax_persistent_cache_min_entry_size_bytes", -1),
}


def host_cpu_fingerprint() -> str:
    """12 hex digits naming the host CPU model and its instruction-set flags (what XLA:CPU compiles for)."""
    text = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    text += line
                elif not line.strip() and text:  # the first processor's block is enough
                    break
    except OSError:
        pass
    text = text or f"{platform.machine()} {platform.processor()}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_key() -> str:
    """The cache's subdirectory name: JAX and jaxlib versions and the host CPU, e.g. ``jax0.10.2-...``."""
    versions = []
    for dist in ("jax", "jaxlib"):
        try:
            versions.append(f"{dist}{importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist}-unknown")
    return "-".join(versions + [f"cpu{host_cpu_fingerprint()}"])


def cache_directory(environ: MutableMapping[str, str] | None = None) -> str | None:
    """The directory the cache uses under ``environ`` (default ``os.environ``), or None when it is off.

    A user's own ``JAX_COMPILATION_CACHE_DIR`` is returned as it is (JAX manages that one).
    """
    environ = os.environ if environ is None else environ
    explicit = environ.get(CACHE_ENV, "").strip()
    if explicit.lower() == OFF:
        return None
    if explicit:
        return explicit
    if environ.get(JAX_DIR_ENV):
        return environ[JAX_DIR_ENV]
    root = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "gdsd-jax", "xla", cache_key())


def enable_compilation_cache(environ: MutableMapping[str, str] | None = None) -> str | None:
    """Turn the persistent compilation cache on (or off, as :func:`cache_directory` says) for this process
    and the processes it starts; returns the directory in use, or None.

    Call it before the first compilation. Before JAX is imported it only sets environment variables (JAX
    reads them at import, child processes inherit them); after, it also updates ``jax.config``.
    """
    environ = os.environ if environ is None else environ
    directory = cache_directory(environ)
    if directory is not None and "://" not in directory:
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"gdsd-jax: note: compilation cache off: cannot create {directory} ({e.strerror}); "
                  f"set {CACHE_ENV}=DIR to a writable directory", file=sys.stderr)
            directory = None
    settings: dict[str, object] = {}
    if directory is None:
        environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
        settings["jax_enable_compilation_cache"] = False
    else:
        environ[JAX_DIR_ENV] = directory
        settings["jax_compilation_cache_dir"] = directory
        for env_name, (option, value) in _JAX_SETTINGS.items():
            environ.setdefault(env_name, str(value))
            settings[option] = type(value)(environ[env_name])
    _update_jax(settings, environ is os.environ)
    return directory


def _update_jax(settings: dict[str, object], this_process: bool) -> None:
    """Apply ``settings`` to ``jax.config`` when JAX is already imported in this process."""
    if this_process and "jax" in sys.modules:
        import jax

        for option, value in settings.items():
            jax.config.update(option, value)
