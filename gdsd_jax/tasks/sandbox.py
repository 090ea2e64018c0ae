"""Running untrusted Python programs (model-written code) with a test, in a sandbox.

Each run is a separate process tree started in its own session (process group) with:

* **wall-clock timeout**: measured by the in-sandbox supervisor from the moment the program starts
  (``timeout_s``), and again by the host around the whole process (``timeout_s + startup_grace_s``); on
  expiry the whole process group is killed with SIGKILL; the group is killed at the end of every run anyway;
* **resource limits** (``setrlimit`` in the program's process before it starts): CPU seconds, address space,
  file size, number of processes, open files, no core files;
* **a fresh temporary working directory**, removed afterwards;
* **Linux namespaces where the kernel allows them** (probed once with ``unshare``): a new network namespace
  (no interface except a down loopback: no network at all); a new PID namespace with its own ``/proc``
  mounted (the supervisor is PID 1, so when it exits every process the program started dies with it, and
  the program sees only the run's processes); a new mount namespace with a minimal root (``pivot_root``
  into a read-only tmpfs holding read-only bind mounts of the interpreter's install and the system's shared
  libraries, four ``/dev`` nodes, the private ``/proc`` and a size-limited tmpfs ``/tmp`` as the work
  directory: no other host file, the task's dataset included, exists for the program). As root, ``unshare``
  works directly; as another user it needs unprivileged user namespaces (``unshare --user
  --map-root-user``), and then the program's process drops all capabilities;
* **a cgroup per run** where one can be made (:mod:`~gdsd_jax.tasks.sandbox_cgroup`: cgroup v2, or the v1
  ``memory`` and ``pids`` controllers): ``memory_bytes`` caps the memory of every process of the run
  together, ``max_processes`` their number (without it a run could hold ``max_processes x memory_bytes``);
* **an unprivileged uid** when the host process runs as root: root is exempt from ``RLIMIT_NPROC``, so a
  fork bomb would not be contained otherwise. Each run gets a fresh random uid (no other process has it),
  which makes the process limit count exactly the program's processes, and file permissions deny writes to
  anything not world-writable;
* **a Python guard** (an audit hook installed before the program runs; on by default, defence in depth):
  it refuses ``fork``/``exec``/``subprocess``/``os.system``, sockets, ``ctypes``, and file access outside the
  work directory except reading the interpreter's own library directories.

**Fail closed.** Every layer is required by default: a sandbox whose namespaces or cgroup cannot be set up
raises :class:`SandboxUnavailable` when it is created (one line naming the layer, the cause and the setting
that accepts weaker isolation), so untrusted code never runs with fewer layers than configured.
``SandboxConfig(namespaces="auto")`` / ``cgroup="auto"`` accept the fallbacks below explicitly, each
announced once by a warning naming the missing layer: without usable namespaces
(``unshare`` missing, user namespaces disabled for non-root users, or a first trivial run in them failing,
e.g. because mounting is refused) there is no network namespace, no
private ``/proc`` and no minimal root: network access and reading host files are then blocked only by the
Python guard (and, as root, file permissions against the run's uid), files the program writes land in a
host temporary directory (bounded by the file-size limit and the guard's limit on files opened for
writing), and leftover processes are found and killed by uid (root) or by process group. Without a cgroup
(no delegated controllers, e.g. an unprivileged user under cgroup v2 without a delegated subtree) memory is
bounded per process only. ``"off"`` skips a layer without a word. :meth:`Sandbox.capabilities` and every :class:`RunResult` say which layers were active.

**The verdict.** :meth:`Sandbox.run` takes the program and its test separately. The test is split
(:mod:`~gdsd_jax.tasks.checks`) into probes, the expressions the program's process evaluates (``f(3)``),
and judgements, evaluated by the supervisor on the probe values sent back as plain data
(``_p0 == [1, 2]``). The judgements reach the supervisor only after the program's process was forked from
it, the supervisor is not dumpable (no ``ptrace`` or ``/proc/1/mem``) and keeps its privileges while the
program's process drops them. So nothing in the program's reach holds an expected value or can write a
verdict: at most it can report values, which is what solving the task means. Exiting early leaves checks
without values: a failure.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gdsd_jax.errors import UserError
from gdsd_jax.tasks.checks import (
    PROBE_PREFIX,
    STRICT_EQ,
    STRICT_IN,
    TRUSTED_NAMES,
    Step,
    split_test,
)
from gdsd_jax.tasks.sandbox_cgroup import CgroupManager, cgroup_manager

log = logging.getLogger(__name__)

_CHILD = str(Path(__file__).with_name("sandbox_child.py"))
_UID_RANGE = (200_000, 2_000_000_000)  # random per-run uids, far from real accounts


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation of one sandboxed run.

    Attributes:
      timeout_s: wall-clock seconds the program may run (the official code reward uses 1 s per test).
      startup_grace_s: extra wall-clock seconds the host allows for interpreter start-up and set-up.
      cpu_s: CPU-seconds limit (default ``ceil(timeout_s) + 1``).
      memory_bytes: address-space limit of each of the program's processes, and memory cap of the whole run
        (every process together) where a cgroup is available.
      file_size_bytes: largest file the program may write (beyond: SIGXFSZ kills it).
      max_processes: process limit of the run (its cgroup, and the run's uid; supervisor and program included).
      max_open_files: open file descriptors.
      tmpfs_bytes: size of the tmpfs work directory (namespace mode).
      max_write_files: files the Python guard lets the program open for writing.
      num_workers: programs run in parallel by :meth:`Sandbox.run_many`.
      namespaces: ``"require"`` (default: :class:`SandboxUnavailable` if they cannot be set up), ``"auto"``
        (accept running without them: weaker isolation, one warning) or ``"off"``.
      cgroup: per-run memory (``memory_bytes``) and process (``max_processes``) caps of the whole run in a
        cgroup (v2, or the v1 ``memory`` and ``pids`` controllers): ``"require"`` (default), ``"auto"`` or
        ``"off"``, as for ``namespaces``.
      drop_uid: ``"auto"`` (when running as root), True (error if not root) or False.
      python_guard: install the audit-hook guard.
      max_output_bytes: program output kept in :class:`RunResult` (the rest is read and discarded).
      python: interpreter running the programs (default: the current one).
    """

    timeout_s: float = 1.0
    startup_grace_s: float = 5.0
    cpu_s: int | None = None
    memory_bytes: int = 1 << 30
    file_size_bytes: int = 16 << 20
    max_processes: int = 16
    max_open_files: int = 64
    tmpfs_bytes: int = 64 << 20
    max_write_files: int = 64
    num_workers: int = 4
    namespaces: str = "require"
    cgroup: str = "require"
    drop_uid: str | bool = "auto"
    python_guard: bool = True
    max_output_bytes: int = 64 << 10
    python: str = ""

    def __post_init__(self):
        if self.timeout_s <= 0 or self.startup_grace_s < 0:
            raise ValueError(f"SandboxConfig: timeout_s must be > 0 and startup_grace_s >= 0, got "
                             f"{self.timeout_s}, {self.startup_grace_s}")
        for name in ("namespaces", "cgroup"):
            if getattr(self, name) not in ("auto", "require", "off"):
                raise ValueError(f"SandboxConfig.{name} must be 'auto', 'require' or 'off', "
                                 f"got {getattr(self, name)!r}")
        if self.drop_uid not in ("auto", True, False):
            raise ValueError(f"SandboxConfig.drop_uid must be 'auto', True or False, got {self.drop_uid!r}")
        for name in ("memory_bytes", "file_size_bytes", "max_processes", "max_open_files", "tmpfs_bytes",
                     "num_workers", "max_write_files"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxConfig.{name} must be positive, got {getattr(self, name)}")
        if self.max_processes < 2:
            raise ValueError("SandboxConfig.max_processes must be >= 2 (supervisor + program)")


class SandboxUnavailable(UserError):
    """A required isolation layer cannot be set up on this host (the message names the layer, the cause and
    the setting that accepts weaker isolation)."""


def _unavailable(layer: str, setting: str, cause: str) -> SandboxUnavailable:
    return SandboxUnavailable(
        f"code sandbox: the {layer} layer cannot be set up here ({cause}); untrusted code is not run with weaker "
        f"isolation unless the sandbox setting {setting}='auto' accepts it explicitly")


@dataclasses.dataclass
class RunResult:
    """Outcome of one run. ``status``: ``passed``, ``failed``, ``timeout``, ``setup_error`` (the sandbox
    could not start the program) or ``error`` (the host could not run the sandbox)."""

    passed: bool
    status: str
    returncode: int | None
    output: str
    duration_s: float
    layers: dict

    @property
    def infrastructure_failure(self) -> bool:
        return self.status in ("setup_error", "error")


_PROBE_LOCK = threading.Lock()
_PROBE_CACHE: dict[tuple, list[str] | None] = {}
_SELF_TEST: dict[tuple, str] = {}  # (euid, interpreter, drop_uid) -> "" or why the namespaces do not work


def _unshare_flags(python: str) -> list[str] | None:
    """``unshare`` command prefix that works here, or None. Probed once per (euid, interpreter)."""
    key = (os.geteuid(), python)
    with _PROBE_LOCK:
        if key in _PROBE_CACHE:
            return _PROBE_CACHE[key]
        exe = shutil.which("unshare")
        result = None
        if exe and sys.platform.startswith("linux"):
            base = ["--net", "--pid", "--fork", "--mount"]
            if os.geteuid() != 0:
                base = ["--user", "--map-root-user"] + base
            for extra in (["--kill-child"], []):
                cmd = [exe, *base, *extra]
                try:
                    ok = subprocess.run([*cmd, python, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30,
                                        start_new_session=True).returncode == 0
                except (OSError, subprocess.TimeoutExpired):
                    ok = False
                if ok:
                    result = cmd
                    break
        _PROBE_CACHE[key] = result
        if result is None:
            log.warning("sandbox: Linux namespaces unavailable (unshare missing or not permitted): no network "
                        "namespace, no PID namespace with a private /proc, no minimal filesystem view; falling "
                        "back to rlimits + process groups + the Python guard")
        return result


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Log a missing isolation layer once per process (every Sandbox shares the host's capabilities)."""
    with _PROBE_LOCK:
        if message in _WARNED:
            return
        _WARNED.add(message)
    log.warning(message)


def _kill_uid(uid: int) -> int:
    """SIGKILL every process whose real uid is ``uid`` (the per-run uid; host process is root). Returns count."""
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            if int(fields["Uid"].split()[0]) != uid or fields["State"].split()[0] in ("Z", "X"):
                continue  # zombies are already dead; their parent (or init) reaps them
            os.kill(int(entry), signal.SIGKILL)
            killed += 1
        except (OSError, ValueError, KeyError, IndexError):
            continue
    return killed


def _rmtree(path: str) -> None:
    def onerror(func, p, exc_info):
        try:
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


class Sandbox:
    """Runs programs under :class:`SandboxConfig` (see module docstring)."""

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        self.python = self.config.python or sys.executable
        is_root = os.geteuid() == 0
        if self.config.drop_uid is True and not is_root:
            raise ValueError("SandboxConfig.drop_uid=True needs the host process to run as root")
        self.drop_uid = is_root if self.config.drop_uid == "auto" else bool(self.config.drop_uid)
        self.unshare = None if self.config.namespaces == "off" else _unshare_flags(self.python)
        if self.config.namespaces == "require" and self.unshare is None:
            raise _unavailable("namespaces (network, PID, mount)", "namespaces",
                               "unshare is missing or not permitted: unprivileged user namespaces disabled?")
        self.cgroups = self._per_run_cgroups()
        if self.unshare is not None and (failure := self._namespace_self_test()):
            if self.config.namespaces == "require":
                raise _unavailable("minimal filesystem view and private /proc", "namespaces",
                                   f"setting up the namespaces failed: {failure}")
            _warn_once(f"sandbox: namespaces are permitted but setting them up failed ({failure}): no network "
                       "namespace, no private /proc, no minimal filesystem view; falling back to rlimits + "
                       "process groups + the Python guard")
            self.unshare = None

    def _per_run_cgroups(self) -> CgroupManager | None:
        """The cgroup manager, or None (off, or not possible here: a warning once, or an error if required)."""
        if self.config.cgroup == "off":
            return None
        manager = cgroup_manager()
        if manager.kind is not None:
            return manager
        if self.config.cgroup == "require":
            raise _unavailable("per-run cgroup (memory and process caps)", "cgroup", str(manager.error))
        _warn_once(f"sandbox: no per-run memory and process cap ({manager.error}); each process is still limited "
                   f"(address space {self.config.memory_bytes} bytes, {self.config.max_processes} processes of "
                   f"the run's uid), so a run may hold up to {self.config.max_processes} x "
                   f"{self.config.memory_bytes} bytes")
        return None

    def _namespace_self_test(self) -> str:
        """'' if a trivial program runs in the namespaces here, else why not. Once per (uid, interpreter):
        ``unshare`` may be permitted while mounting inside it is not (e.g. an LSM policy on user namespaces)."""
        key = (os.geteuid(), self.python, self.drop_uid)
        with _PROBE_LOCK:
            known = _SELF_TEST.get(key)
        if known is None:
            try:
                result = self._run("pass", [])
                missing = [k for k in ("private_proc", "minimal_root") if not result.layers.get(k)]
                if result.passed and missing:
                    known = f"the trial run reported no {' and no '.join(missing)}"
                else:
                    known = "" if result.passed else (result.output.strip().splitlines() or [result.status])[-1]
            except Exception as exc:  # a host-side failure is reported like a failed run
                known = f"{type(exc).__name__}: {exc}"
            with _PROBE_LOCK:
                _SELF_TEST[key] = known
        return known

    def visible_paths(self) -> list[str]:
        """The host directories every program sees, read-only, inside the minimal root (the interpreter's
        install and the system's shared libraries, as the supervisor computes them); [] without namespaces.
        A file inside one of them (a dataset kept in the venv) is readable by every program."""
        if self.unshare is None:
            return []
        key = (self.python, "visible")
        with _PROBE_LOCK:
            if key not in _PROBE_CACHE:
                out = subprocess.run([self.python, "-I", "-B", _CHILD, "--visible-paths"], capture_output=True,
                                     text=True, timeout=30, check=True, stdin=subprocess.DEVNULL)
                _PROBE_CACHE[key] = json.loads(out.stdout)
            return list(_PROBE_CACHE[key])

    def capabilities(self) -> dict:
        """Which isolation layers this sandbox uses."""
        return {
            "namespaces": self.unshare is not None,
            "network_namespace": self.unshare is not None,
            "pid_namespace": self.unshare is not None,
            "mount_namespace": self.unshare is not None,
            "private_proc": self.unshare is not None,
            "minimal_root": self.unshare is not None,
            "per_run_cgroup": self.cgroups is not None,
            "unprivileged_uid": self.drop_uid,
            "python_guard": self.config.python_guard,
            "rlimits": True,
        }

    # ---- one run ----

    def run(self, program: str, test: str = "", comparison: str = "strict") -> RunResult:
        """Run ``program``, then ``test`` (Python source, usually ``assert`` statements), and report whether
        it passed: the program ran, every step of the test ran, and every check held when judged by the
        supervisor (see :mod:`gdsd_jax.tasks.checks`; ``comparison``: ``"strict"`` or ``"python"``). With no
        test, a run passes when the program runs to its end without an exception (a claim the program could
        make itself: use a test to decide anything)."""
        try:
            steps = split_test(test, comparison)
        except SyntaxError as exc:
            return RunResult(False, "failed", None, f"the test does not parse: {exc}", 0.0, {})
        try:
            return self._run(program, steps, exact_types=comparison == "strict")
        except Exception as exc:  # never let the host crash on a sandbox problem; report it
            log.warning("sandbox run failed on the host side: %r", exc)
            return RunResult(False, "error", None, f"{type(exc).__name__}: {exc}", 0.0, {})

    def _run(self, program: str, steps: list[Step], exact_types: bool = True) -> RunResult:
        cfg = self.config
        start = time.monotonic()
        workdir = tempfile.mkdtemp(prefix="gdsd-sbx-")
        uid = secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0] if self.drop_uid else None
        status_r, status_w = os.pipe()
        proc = None
        cgroup = None
        try:
            if self.cgroups is not None:
                cgroup = self.cgroups.make(cfg.memory_bytes, cfg.max_processes)
            os.chmod(workdir, 0o700)
            if uid is not None:
                os.chown(workdir, uid, uid)
            # Sent in two parts: the supervisor reads the judgements only after it started the program's
            # process, so they are never in memory that process holds.
            verdict = {"judgements": [s.judgement for s in steps if s.run is None], "trusted": sorted(TRUSTED_NAMES),
                       "names": {"probe": PROBE_PREFIX, "eq": STRICT_EQ, "in": STRICT_IN}, "exact_types": exact_types}
            job = {
                "source": program,
                "steps": [{"run": s.run} if s.run is not None else {"probes": list(s.probes)} for s in steps],
                "cgroup_procs": cgroup.procs_files if cgroup is not None else [],
                "workdir": workdir,
                "timeout_s": cfg.timeout_s,
                "status_fd": status_w,
                "uid": uid,
                "namespaces": self.unshare is not None,
                "drop_caps": self.unshare is not None and os.geteuid() != 0,
                "tmpfs_bytes": cfg.tmpfs_bytes,
                "guard": cfg.python_guard,
                "max_write_files": cfg.max_write_files,
                "limits": {
                    "cpu_s": cfg.cpu_s if cfg.cpu_s is not None else math.ceil(cfg.timeout_s) + 1,
                    "memory_bytes": cfg.memory_bytes,
                    "file_size_bytes": cfg.file_size_bytes,
                    "max_processes": cfg.max_processes,
                    "max_open_files": cfg.max_open_files,
                },
            }
            cmd = [*(self.unshare or []), self.python, "-I", "-B", _CHILD]
            env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": workdir,
                   "TMPDIR": workdir, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    pass_fds=(status_w,), start_new_session=True, env=env, cwd=workdir)
            os.close(status_w)
            status_w = -1
            first = json.dumps(job).encode("utf-8")
            try:
                proc.stdin.write(b"%016d" % len(first) + first + json.dumps(verdict).encode("utf-8"))
                proc.stdin.close()
            except BrokenPipeError:
                pass
            output, timed_out = self._collect(proc, start + cfg.timeout_s + cfg.startup_grace_s)
        finally:
            if proc is not None:
                self._cleanup(proc, uid)
            if status_w >= 0:
                os.close(status_w)
            status_line = self._read_status(status_r)
            os.close(status_r)
            if cgroup is not None:
                cgroup.remove()
            _rmtree(workdir)
        duration = time.monotonic() - start
        status = status_line.get("outcome") or ("timeout" if timed_out else "error")
        if timed_out and status not in ("passed", "failed"):
            status = "timeout"
        passed = status == "passed" and proc.returncode == 0
        if status == "passed" and not passed:
            status = "failed"
        layers = dict(status_line.get("layers", {}))
        if status_line.get("detail"):
            output = (output + "\n" + status_line["detail"]).strip()
        if status == "setup_error":
            log.warning("sandbox set-up failed: %s", status_line.get("detail"))
        return RunResult(passed, status, proc.returncode, output, duration, layers)

    def _collect(self, proc: subprocess.Popen, deadline: float) -> tuple[str, bool]:
        """Read the program's output (keeping ``max_output_bytes``) until it exits or the deadline passes."""
        keep = bytearray()
        limit = self.config.max_output_bytes
        fd = proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        timed_out = False

        def read_once(timeout: float) -> bool:
            """Read one chunk if available within ``timeout``; False at end of file or nothing ready."""
            if not sel.select(timeout=timeout):
                return False
            chunk = os.read(fd, 65536)
            if len(keep) < limit:
                keep.extend(chunk[: limit - len(keep)])
            return bool(chunk)

        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = proc.poll() is None
                    break
                if proc.poll() is not None:
                    # Exited: drain what is already buffered; descendants holding the pipe are not waited for.
                    while read_once(0.01):
                        pass
                    break
                read_once(min(remaining, 0.05))
        finally:
            sel.close()
        return keep.decode("utf-8", errors="replace"), timed_out

    def _cleanup(self, proc: subprocess.Popen, uid: int | None) -> None:
        # The whole process group dies at the end of every run, whatever happened.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("sandbox process %d did not die after SIGKILL", proc.pid)
        if uid is not None and self.unshare is None:
            # Without a PID namespace a process that left the group (setsid) could survive: find it by uid,
            # repeatedly, since a survivor may fork while we scan (the process limit bounds how many).
            for _ in range(100):
                if _kill_uid(uid) == 0:
                    break
                time.sleep(0.01)
            else:
                log.error("sandbox: processes of uid %d survived 100 kill rounds", uid)
        for stream in (proc.stdout, proc.stdin):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass

    @staticmethod
    def _read_status(fd: int) -> dict:
        os.set_blocking(fd, False)
        data = b""
        try:
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                data += chunk
        except BlockingIOError:
            pass
        for line in reversed(data.decode("utf-8", errors="replace").splitlines()):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
        return {}

    # ---- many runs ----

    def run_many(self, programs: Sequence[str], tests: Sequence[str] | None = None,
                 comparison: str = "strict") -> list[RunResult]:
        """:meth:`run` on every (program, test) pair, ``num_workers`` at a time; results in input order."""
        if not programs:
            return []
        tests = [""] * len(programs) if tests is None else list(tests)
        if len(tests) != len(programs):
            raise ValueError(f"run_many: {len(programs)} programs but {len(tests)} tests")
        run = functools.partial(self.run, comparison=comparison)
        workers = max(1, min(self.config.num_workers, len(programs)))
        if workers == 1:
            return [run(p, t) for p, t in zip(programs, tests)]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
            return list(pool.map(run, programs, tests))


@functools.cache
def default_sandbox() -> Sandbox:
    """A process-wide sandbox with the default configuration (created on first use)."""
    return Sandbox()
