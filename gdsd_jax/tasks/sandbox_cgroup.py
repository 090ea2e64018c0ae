"""Per-run cgroups of the code sandbox: one memory cap and one process cap for everything a run starts.

``RLIMIT_AS`` bounds each process, not their sum: a program that forks ``max_processes`` children, each
allocating just under the limit, would hold ``max_processes x memory_bytes``. A cgroup per run caps the
sum. Supported: cgroup v2 with the ``memory`` and ``pids`` controllers delegated to the host process's
cgroup (``cgroup.subtree_control``), or the cgroup v1 ``memory`` and ``pids`` hierarchies. The host
creates ``gdsd-sandbox-<pid>/run-<token>`` below its own cgroup in each hierarchy; the sandbox supervisor
moves itself into the run's cgroup before it starts the program (so every process of the run is inside
from its first instruction); the host kills what is left and removes the cgroup after the run, and removes
its base cgroups at exit (those of a host killed with SIGKILL are removed by the next host that starts).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import secrets
import signal
import time

_ROOT = "/sys/fs/cgroup"
_PREFIX = "gdsd-sandbox-"


@dataclasses.dataclass(frozen=True)
class RunCgroup:
    """The directories of one run's cgroup (one per hierarchy)."""

    dirs: tuple[str, ...]

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def remove(self) -> None:
        """Kill what is still inside and remove the directories (retrying while the kernel releases them)."""
        for d in self.dirs:
            for _ in range(200):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    _kill_members(d)
                    time.sleep(0.005)


def _kill_members(d: str) -> None:
    try:
        with open(os.path.join(d, "cgroup.procs")) as f:
            pids = [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _own_paths() -> dict[str, str]:
    """Controller (or "" for v2) -> this process's cgroup path, from /proc/self/cgroup."""
    paths = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for c in controllers.split(",") if controllers else [""]:
                paths[c] = path
    return paths


def _remove_stale(parent: str) -> None:
    """Remove the (empty) base cgroups of host processes that died without their exit handler (SIGKILL)."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for entry in entries:
        pid = entry.removeprefix(_PREFIX)
        if entry.startswith(_PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            base = os.path.join(parent, entry)
            for run in os.listdir(base) if os.path.isdir(base) else ():
                if run.startswith("run-"):
                    RunCgroup((os.path.join(base, run),)).remove()
            try:
                os.rmdir(base)
            except OSError:
                pass


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


class CgroupManager:
    """Creates per-run cgroups; ``error`` says why none can be made here (then ``make`` must not be called)."""

    def __init__(self):
        self.kind = None
        self.error = ""
        self._bases: dict[str, str] = {}  # controller -> base directory of this host process's runs
        try:
            self._setup()
        except OSError as exc:
            self.kind, self._bases = None, {}
            self.error = f"{type(exc).__name__}: {exc}"
        if self._bases:
            atexit.register(self._remove_bases)

    def _setup(self) -> None:
        own = _own_paths()
        name = f"{_PREFIX}{os.getpid()}"
        if os.path.exists(os.path.join(_ROOT, "cgroup.controllers")):  # unified (v2) hierarchy
            parent = os.path.join(_ROOT, own.get("", "/").lstrip("/"))
            _remove_stale(parent)
            base = os.path.join(parent, name)
            os.makedirs(base, exist_ok=True)
            try:
                with open(os.path.join(base, "cgroup.controllers")) as f:
                    missing = {"memory", "pids"} - set(f.read().split())
                if missing:
                    raise OSError(f"the cgroup v2 controllers {sorted(missing)} are not enabled in "
                                  f"{parent}/cgroup.subtree_control")
                # base holds no process, so it may hand the controllers down to the run cgroups
                _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids")
            except OSError:
                os.rmdir(base)
                raise
            self.kind, self._bases = "v2", {"": base}
            return
        bases = {}
        for controller in ("memory", "pids"):
            mount = os.path.join(_ROOT, controller)
            if controller not in own or not os.path.exists(os.path.join(mount, "cgroup.procs")):
                raise OSError(f"no cgroup v2 hierarchy and no cgroup v1 {controller!r} hierarchy at {mount}")
            _remove_stale(os.path.join(mount, own[controller].lstrip("/")))
            base = os.path.join(mount, own[controller].lstrip("/"), name)
            os.makedirs(base, exist_ok=True)
            bases[controller] = base
        self.kind, self._bases = "v1", bases

    @property
    def bases(self) -> list[str]:
        """This host process's base cgroup directories (one per hierarchy)."""
        return list(self._bases.values())

    def make(self, memory_bytes: int, max_processes: int) -> RunCgroup:
        """A new run cgroup with its caps set. Raises ``OSError`` if the kernel refuses."""
        token = f"run-{secrets.token_hex(6)}"
        dirs = []
        try:
            for controller, base in self._bases.items():
                d = os.path.join(base, token)
                os.mkdir(d)
                dirs.append(d)
                if self.kind == "v2":
                    _write(os.path.join(d, "memory.max"), str(memory_bytes))
                    if os.path.exists(os.path.join(d, "memory.swap.max")):
                        _write(os.path.join(d, "memory.swap.max"), "0")
                    _write(os.path.join(d, "pids.max"), str(max_processes))
                elif controller == "memory":
                    _write(os.path.join(d, "memory.limit_in_bytes"), str(memory_bytes))
                    if os.path.exists(os.path.join(d, "memory.memsw.limit_in_bytes")):  # swap counted too
                        _write(os.path.join(d, "memory.memsw.limit_in_bytes"), str(memory_bytes))
                else:
                    _write(os.path.join(d, "pids.max"), str(max_processes))
        except OSError:
            RunCgroup(tuple(dirs)).remove()
            raise
        return RunCgroup(tuple(dirs))

    def _remove_bases(self) -> None:
        for base in self._bases.values():
            try:
                os.rmdir(base)
            except OSError:
                pass


@functools.cache
def cgroup_manager() -> CgroupManager:
    """The process-wide manager (probed once)."""
    return CgroupManager()
