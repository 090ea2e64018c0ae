"""Sandbox supervisor: runs inside the sandbox process (``python -I -B sandbox_child.py``), never imported by
the host process. See :mod:`gdsd_jax.tasks.sandbox` for the design; the order of steps here matters:

1. read the first part of the job (length-prefixed JSON on stdin: the program, the probes of each check,
   limits); the judgements are not read yet, so they are not in any memory the program's process copies;
2. join the run's cgroups (memory and process caps of the whole run), then, inside new mount and PID
   namespaces, build a minimal root: a read-only tmpfs holding read-only bind mounts of the interpreter's
   install and the system libraries, ``/dev/{null,zero,random,urandom}``, a fresh ``/proc`` (of the new PID
   namespace: it shows only the run's processes) and a size-limited tmpfs ``/tmp`` (the work directory);
   ``pivot_root`` into it and detach the host's tree;
3. become a child subreaper, make itself non-dumpable (no ``ptrace`` or ``/proc/1/mem`` by the program),
   and fork the worker, which points stdin at /dev/null, drops to an unprivileged uid (when started as root)
   or drops every capability (user-namespace root), sets ``no_new_privs``, its resource limits and the
   Python guard, runs the program, then the test's steps: each check's probes are evaluated there and their
   values sent back as plain data on a pipe;
4. read the judgements (second part of the job), wait for the worker with the wall-clock timeout (draining
   the value pipe), kill every process of the run, then judge: a run passes only if the worker exited 0 and
   sent exactly one well-formed record per check, and every judgement holds on those values. The verdict is
   computed here, by code the program cannot reach; one JSON status line goes to the status descriptor.

Exit codes: 0 passed, 1 failed, 124 timed out, 125 sandbox set-up failed.
"""

import json
import math  # imported before the program runs: the judge needs it whatever the program does
import os
import resource
import signal
import sys
import time

# Only the standard library, and nothing imported lazily that the program could need after privileges drop.

_status = {"layers": {}}
_status_fd = None
_MAX_RECORD_BYTES = 8 << 20  # all probe values of one run, as JSON
_MAX_DEPTH = 64  # nesting of a probe value
_BUILTIN_BASES = (bool, int, float, complex, str, bytes, list, tuple, set, frozenset, dict)


def _report(outcome, **extra):
    _status.update(extra)
    _status["outcome"] = outcome
    if _status_fd is not None:
        try:
            os.write(_status_fd, (json.dumps(_status) + "\n").encode())
        except OSError:
            pass


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _read_exactly(fd, n):
    data = bytearray()
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            raise EOFError("the job ended early")
        data.extend(chunk)
    return bytes(data)


def _read_rest(fd):
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def _join_cgroups(job):
    """Move this process (and so everything it starts) into the run's cgroups, made by the host."""
    for procs in job.get("cgroup_procs") or ():
        with open(procs, "w") as f:
            f.write("0")
    _status["layers"]["cgroup"] = bool(job.get("cgroup_procs"))


def _set_oom_score_adj(value):
    """The supervisor shares the run's memory cap: keep the kernel's OOM killer on the program (best effort:
    lowering needs privileges the user-namespace root may lack; raising is always allowed)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError:
        pass


_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = (
    1, 2, 4, 8, 32, 4096, 0x4000, 1 << 18)
_KEEP_FLAGS = 2 | 4 | 8 | 1024 | 2048 | 4096  # statvfs ST_* bits that equal the MS_* bits (locked on remount)
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}


def _mount(libc, ctypes, source, target, fstype, flags, data=None):
    source, target, fstype, data = (v.encode() if isinstance(v, str) else v for v in (source, target, fstype, data))
    if libc.mount(source, target, fstype, flags, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _bind_read_only(libc, ctypes, src, dst):
    _mount(libc, ctypes, src, dst, None, _MS_BIND | _MS_REC)
    locked = os.statvfs(dst).f_flag & _KEEP_FLAGS
    _mount(libc, ctypes, None, dst, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV | locked)


def _visible_paths():
    """What a program needs to see: the interpreter's install (prefixes), the system's shared libraries and
    the dynamic loader's cache. Symlinks (``/lib -> usr/lib``) are kept as symlinks, their targets bound."""
    wanted = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
              "/lib", "/lib64", "/lib32", "/usr/lib", "/usr/lib64", "/usr/lib32", "/etc/ld.so.cache"]
    links, binds = {}, []
    for path in wanted:
        path = os.path.abspath(path)
        if os.path.islink(path):
            links[path] = os.readlink(path)
            path = os.path.realpath(path)
        if os.path.exists(path) and path != "/":
            binds.append(path)
    binds = sorted(set(binds), key=len)
    kept = []
    for path in binds:  # a path inside one already bound is visible through it
        if not any(path.startswith(k + "/") for k in kept):
            kept.append(path)
    return kept, links


_OWN_DIRS = ("/dev", "/proc", "/tmp")  # made by the sandbox itself in the new root


def _check_visible(binds):
    """Refuse a visible path that would hide or expose one of the sandbox's own directories.

    An install *inside* ``/tmp`` or ``/dev`` (a venv under ``/tmp``, an interpreter under ``/dev/shm``) is
    bound inside the run's own tmpfs or ``/dev``; one that *is* or *contains* them (an install at ``/tmp``)
    would put a host directory where the run's private one belongs: an error, never a weaker view.
    """
    for path in binds:
        for own in _OWN_DIRS:
            if own == path or own.startswith(path + "/") or (own == "/proc" and path.startswith("/proc/")):
                raise OSError(f"the interpreter's install path {path} overlaps the sandbox's own {own}")


def _build_root(job):
    """A minimal root in our own mount namespace (see the module docstring); returns the visible paths.

    The sandbox's own directories (``/tmp``, ``/dev``, ``/proc``) are made first and the interpreter's install
    is bound after them, so an install below ``/tmp`` (a venv made there) is bound, read-only, inside the
    run's tmpfs rather than hidden by it.
    """
    ctypes, libc = _libc()
    # Never let mount events travel back to the host: make the whole tree private first.
    _mount(libc, ctypes, "none", "/", None, _MS_REC | _MS_PRIVATE)
    new = job["workdir"]
    _mount(libc, ctypes, "tmpfs", new, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=1024,mode=0755")
    binds, links = _visible_paths()
    _check_visible(binds + list(links))
    os.makedirs(new + "/tmp", mode=0o700)
    opts = f"size={int(job['tmpfs_bytes'])},mode=0700,nr_inodes=4096"
    if job.get("uid") is not None:
        opts += f",uid={int(job['uid'])},gid={int(job['uid'])}"
    _mount(libc, ctypes, "tmpfs", new + "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, opts)
    _status["layers"]["tmpfs_workdir"] = True
    os.makedirs(new + "/dev", mode=0o755)
    for dev in ("null", "zero", "random", "urandom"):
        open(f"{new}/dev/{dev}", "w").close()
        _mount(libc, ctypes, f"/dev/{dev}", f"{new}/dev/{dev}", None, _MS_BIND)
    os.makedirs(new + "/proc", mode=0o555)
    _mount(libc, ctypes, "proc", new + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    _status["layers"]["private_proc"] = True
    for link, target in links.items():
        os.makedirs(new + os.path.dirname(link), mode=0o755, exist_ok=True)
        if not os.path.lexists(new + link):
            os.symlink(target, new + link)
    for path in binds:
        dst = new + path
        if os.path.isdir(path):
            os.makedirs(dst, mode=0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), mode=0o755, exist_ok=True)
            open(dst, "w").close()
        _bind_read_only(libc, ctypes, path, dst)
    _mount(libc, ctypes, None, new, None, _MS_REMOUNT | _MS_RDONLY | _MS_NOSUID | _MS_NODEV)
    os.chdir(new)
    if libc.syscall(_SYS_PIVOT_ROOT[os.uname().machine], b".", b".") != 0:
        raise OSError(ctypes.get_errno(), "pivot_root failed")
    MNT_DETACH = 2
    if libc.umount2(b".", MNT_DETACH) != 0:
        raise OSError(ctypes.get_errno(), "detaching the host's root failed")
    os.chdir("/")
    _status["layers"]["minimal_root"] = True
    _status["layers"]["read_only_root"] = True
    return binds


def _import_dirs_by_handle():
    """Replace sys.path entries (and package __path__s) by /proc/self/fd/N handles opened now.

    After the uid change the interpreter may sit under a directory the new uid cannot traverse (e.g. a
    pyenv install under a private home); a path through /proc/self/fd/N starts at the open directory and
    skips the ancestors' permission checks, and still only reads what the new uid may read below it.
    """
    mapping = {}
    new_path = []
    for entry in sys.path:
        if not entry or not os.path.isdir(entry):
            continue
        real = os.path.realpath(entry)
        if real not in mapping:
            fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY)
            mapping[real] = f"/proc/self/fd/{fd}"
        new_path.append(mapping[real])

    def remap(d):
        r = os.path.realpath(d)
        for src in sorted(mapping, key=len, reverse=True):
            if r == src or r.startswith(src + os.sep):
                return mapping[src] + r[len(src):]
        return d

    for mod in list(sys.modules.values()):
        p = getattr(mod, "__path__", None)
        if isinstance(p, list):
            p[:] = [remap(x) for x in p]
    sys.path[:] = new_path
    sys.path_importer_cache.clear()
    import importlib

    importlib.invalidate_caches()
    return sorted(mapping)


def _drop_privileges(job):
    """In the worker: an unprivileged uid, or no capability (user-namespace root); ``no_new_privs``. Raises if
    a step fails (the run then fails): the supervisor reports these layers as they were asked for."""
    ctypes, libc = _libc()
    uid = job.get("uid")
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise OSError("uid drop did not take effect")
    elif job.get("drop_caps"):
        # Root inside a user namespace: drop every capability so it cannot undo the mounts.
        PR_SET_SECUREBITS, PR_CAPBSET_DROP = 28, 24
        # SECBIT_NOROOT|_LOCKED, SECBIT_NO_SETUID_FIXUP|_LOCKED, SECBIT_KEEP_CAPS_LOCKED
        libc.prctl(PR_SET_SECUREBITS, 0x2F, 0, 0, 0)
        for cap in range(64):
            libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
        data = (Data * 2)()
        if libc.capset(ctypes.byref(header), ctypes.byref(data)) != 0:
            raise OSError(ctypes.get_errno(), "dropping capabilities failed")
    PR_SET_NO_NEW_PRIVS = 38
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")


def _install_guard(workdir, read_roots, max_write_files):
    """Python-level guard (defence in depth; the OS layers are the boundary): refuse process creation,
    sockets, native-code loading and file access outside the work directory."""
    import posixpath

    realpath = posixpath.realpath
    fsdecode = os.fsdecode
    getcwd = os.getcwd
    sep = os.sep
    path_types = (str, bytes, os.PathLike)  # captured: the program may rebind names in this module
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    work = realpath(workdir)
    roots = tuple(realpath(r) for r in read_roots)
    devices = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
    blocked = {
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg",
        "os.startfile", "subprocess.Popen", "pty.spawn", "socket.__new__", "socket.bind", "socket.connect",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg",
        "resource.setrlimit", "resource.prlimit", "sys.addaudithook", "os.chroot", "mmap.__new__",
        "os.add_dll_directory", "sys.remote_exec",
    }
    # ctypes may be imported (NumPy does, and ctypes opens the interpreter's own symbols at import), but no
    # foreign function can be looked up or called and no raw memory read: every other ctypes event is refused.
    allowed_ctypes = {"ctypes.dlopen"}
    blocked_modules = {"_posixsubprocess", "cffi", "_cffi_backend", "_xxsubinterpreters", "_interpreters",
                       "_posixshmem"}
    # listing is reading (the import system lists its directories); everything else changes the file system
    list_events = {"os.listdir", "os.scandir", "glob.glob", "glob.glob/2", "os.getxattr", "os.listxattr"}
    change_events = {
        "os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.chown", "os.symlink", "os.link",
        "os.truncate", "os.utime", "os.chdir", "os.chflags", "os.lchflags", "os.mkfifo", "os.mknod",
        "os.setxattr", "os.removexattr", "shutil.copyfile", "shutil.copymode", "shutil.copystat",
        "shutil.copytree", "shutil.move", "shutil.rmtree", "shutil.chown", "shutil.make_archive",
        "shutil.unpack_archive", "tempfile.mkstemp", "tempfile.mkdtemp",
    }
    writes = [0]

    def resolve(path):
        p = fsdecode(path)
        if not p.startswith(sep):
            p = getcwd() + sep + p
        return realpath(p)

    def inside(p, root):
        return p == root or p.startswith(root + sep)

    def deny(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def hook(event, args):
        if event in blocked or event.startswith(("_winapi.", "winreg.", "msvcrt.")):
            deny(event)
        if event.startswith("ctypes.") and event not in allowed_ctypes:
            deny(event)
        if event == "import":
            name = args[0] if args else ""
            if isinstance(name, str) and name.split(".")[0] in blocked_modules:
                deny(f"import {name}")
            return
        if event == "object.__setattr__" and len(args) >= 2 and args[1] in ("__code__", "__globals__"):
            deny("replacing code objects")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            if path is None or isinstance(path, int):
                return  # file descriptors were opened before (or are pipes handed to the program)
            p = resolve(path)
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if inside(p, work):
                if writing:
                    writes[0] += 1
                    if writes[0] > max_write_files:
                        deny(f"opening more than {max_write_files} files for writing")
                return
            if writing:
                deny(f"writing {p}")
            if p in devices or any(inside(p, r) for r in roots):
                return
            deny(f"reading {p}")
            return
        if event in list_events or event in change_events:
            for a in args:
                if isinstance(a, path_types):
                    p = resolve(a)
                    if inside(p, work):
                        continue
                    if event in list_events and any(inside(p, r) for r in roots):
                        continue
                    deny(f"{event} outside the work directory")

    sys.addaudithook(hook)


def _encode(value, depth=0):
    """A probe value as JSON-able tagged data: built-in values, and subclasses of built-in types as their
    built-in content tagged with the subclass's name; anything else raises (the check fails)."""
    t = type(value)
    if depth > _MAX_DEPTH:
        raise ValueError("the value is nested too deeply")
    if value is None:
        return ["none"]
    if t is bool:
        return ["bool", value]
    if t is int:
        return ["int", hex(value)]  # hexadecimal: no limit on the number of digits
    if t is float or t is complex:
        return [t.__name__, repr(value)]
    if t is str:
        return ["str", value]
    if t is bytes:
        return ["bytes", value.hex()]
    if t is list or t is tuple or t is set or t is frozenset:
        return [t.__name__, [_encode(x, depth + 1) for x in value]]
    if t is dict:
        return ["dict", [[_encode(k, depth + 1), _encode(x, depth + 1)] for k, x in value.items()]]
    for base in _BUILTIN_BASES:  # a subclass (collections.Counter, NumPy's float64): its built-in content
        if isinstance(value, base):
            return ["sub", f"{t.__module__}.{t.__qualname__}", _encode(base(value), depth + 1)]
    raise TypeError(f"a tested value must be plain data, got an object of type {t.__module__}.{t.__qualname__}")


def _run_program(job, result_w):
    """Run the program, then the test's steps, sending each check's probe values (one JSON line each)."""
    import builtins

    namespace = {"__name__": "__main__", "__builtins__": builtins}
    exec(compile(job["source"], "<program>", "exec"), namespace)
    for step in job["steps"]:
        if step.get("run") is not None:
            exec(compile(step["run"], "<test>", "exec"), namespace)
            continue
        values = [_encode(eval(compile(p, "<test>", "eval"), namespace)) for p in step["probes"]]
        line = (json.dumps(values) + "\n").encode()
        while line:
            line = line[os.write(result_w, line):]


def _worker(job, result_w):
    """The program's process."""
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)  # the supervisor's stdin still carries the judgements
    os.close(null)
    os.close(_status_fd)  # the program must not be able to write a status line
    os.setpgid(0, 0)
    _set_oom_score_adj(0)
    read_roots = job["read_roots"]
    if job.get("uid") is not None and not job.get("namespaces"):
        read_roots = sorted(set(read_roots) | set(_import_dirs_by_handle()))
    _drop_privileges(job)
    lim = job["limits"]
    for name, value in (("RLIMIT_CPU", lim["cpu_s"]), ("RLIMIT_AS", lim["memory_bytes"]),
                        ("RLIMIT_FSIZE", lim["file_size_bytes"]), ("RLIMIT_NPROC", lim["max_processes"]),
                        ("RLIMIT_NOFILE", lim["max_open_files"]), ("RLIMIT_CORE", 0)):
        resource.setrlimit(getattr(resource, name), (int(value), int(value)))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # exceeding the file size limit kills the program
    if job.get("guard", True):
        _install_guard(job["workdir"], read_roots, int(job.get("max_write_files", 64)))
    exit_, flush = os._exit, _flush  # bound now: the program may rebind names of this module
    try:
        _run_program(job, result_w)
    except BaseException:  # noqa: BLE001 - any exception or SystemExit means the tests did not all pass
        try:
            import traceback

            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
        flush()
        exit_(1)
    flush()
    exit_(0)


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def _supervise(timeout_s, pid, result_r):
    """Wait for the worker (reading its values as they come); returns (wait status or None, value bytes)."""
    import select

    deadline = time.monotonic() + timeout_s
    os.set_blocking(result_r, False)
    data = bytearray()

    def drain():
        try:
            while len(data) <= _MAX_RECORD_BYTES and (chunk := os.read(result_r, 1 << 16)):
                data.extend(chunk)
        except BlockingIOError:
            pass

    status = None
    while True:
        got, st = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            status = st
            break
        if time.monotonic() >= deadline:
            break
        select.select([result_r], [], [], 0.002)
        drain()
    _kill_all(pid)  # the program may have left children behind
    drain()
    return status, bytes(data)


def _decode(item, exact, depth=0):
    """Inverse of :func:`_encode`, accepting nothing else (the bytes come from the untrusted process). With
    ``exact`` a subclass of a built-in type is refused; otherwise it decodes to its built-in content."""
    if depth > _MAX_DEPTH or not isinstance(item, list) or not item or not isinstance(item[0], str):
        raise ValueError("malformed value")
    tag, rest = item[0], item[1:]
    if tag == "none" and not rest:
        return None
    if tag == "sub" and len(rest) == 2 and type(rest[0]) is str:
        if exact:
            raise ValueError(f"a value of type {rest[0]}: strict comparison needs exact built-in types")
        return _decode(rest[1], exact, depth + 1)
    (arg,) = rest
    if tag == "bool" and type(arg) is bool:
        return arg
    if tag in ("int", "float", "complex", "str", "bytes") and type(arg) is str:
        return {"int": lambda s: int(s, 16), "float": float, "complex": complex, "str": str,
                "bytes": bytes.fromhex}[tag](arg)
    if tag in ("list", "tuple", "set", "frozenset") and type(arg) is list:
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[tag](
            _decode(x, exact, depth + 1) for x in arg)
    if tag == "dict" and type(arg) is list:
        return {_decode(k, exact, depth + 1): _decode(v, exact, depth + 1) for k, v in arg}
    raise ValueError(f"malformed value of tag {tag!r}")


def _strict_key(value):
    """Type and value, deeply: two plain values are strictly equal when their keys are equal."""
    t = type(value)
    if t is list or t is tuple:
        return t.__name__, tuple(_strict_key(x) for x in value)
    if t is set or t is frozenset:
        return t.__name__, frozenset(_strict_key(x) for x in value)
    if t is dict:
        return "dict", frozenset((_strict_key(k), _strict_key(v)) for k, v in value.items())
    return t.__name__, value


def _strict_eq(a, b):
    return _strict_key(a) == _strict_key(b)


def _strict_in(item, container):
    if type(container) in (list, tuple, set, frozenset, dict):
        return any(_strict_eq(item, x) for x in container)
    return item in container


def _bounded_repr(value, limit=160):
    """``repr`` for a failure message, never raising and never long: a huge integer (beyond the interpreter's
    digit limit, where ``repr`` raises) is described by its size, anything unprintable by its type."""
    try:
        if type(value) is int and value.bit_length() > 1024:
            text = f"<int of {value.bit_length()} bits>"
        else:
            text = repr(value)
    except Exception as exc:  # noqa: BLE001 - e.g. ValueError: exceeds the limit for integer string conversion
        text = f"<{type(value).__name__} that cannot be shown: {type(exc).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _judge(verdict, data):
    """(passed, detail): every judgement evaluated on the decoded probe values of its record."""
    import builtins

    judgements, trusted, names = verdict["judgements"], verdict["trusted"], verdict["names"]
    if len(data) > _MAX_RECORD_BYTES:
        return False, f"the tested values exceed {_MAX_RECORD_BYTES} bytes"
    try:
        lines = data.decode("ascii").splitlines()  # json.dumps writes ASCII
    except UnicodeDecodeError:
        return False, "malformed value records"
    if len(lines) != len(judgements):
        return False, f"{len(lines)} value records for {len(judgements)} checks (the test did not run to its end)"
    builtins_ = {n: getattr(builtins, n) for n in trusted if hasattr(builtins, n)}
    base = {"__builtins__": builtins_, names["eq"]: _strict_eq, names["in"]: _strict_in}
    if "math" in trusted:
        base["math"] = math
    for i, (judgement, line) in enumerate(zip(judgements, lines)):
        try:
            values = [_decode(v, verdict["exact_types"]) for v in json.loads(line)]
        except (ValueError, TypeError, RecursionError) as exc:
            return False, f"check {i}: malformed values ({exc})"
        env = dict(base, **{f"{names['probe']}{j}": v for j, v in enumerate(values)})
        try:
            ok = bool(eval(compile(judgement, "<judgement>", "eval"), env))
        except Exception as exc:  # noqa: BLE001 - a judgement that raises is a failed check
            return False, f"check {i}: {judgement} raised {type(exc).__name__}: {exc}"[:500]
        if not ok:
            shown = ", ".join(f"{names['probe']}{j} = {_bounded_repr(v)}" for j, v in enumerate(values))
            return False, f"check {i} failed: {judgement} with {shown}"[:1000]
    return True, ""


def _children_by_proc():
    """Pids whose parent is this process (host PID namespace only: /proc shows host pids)."""
    me = str(os.getpid())
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # the command name may contain spaces and parentheses: fields after the last ')'
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[1] == me and fields[0] not in ("Z", "X"):
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def _kill_all(pid):
    """Kill the program and every process it started, and reap them all.

    The supervisor is a child subreaper, so descendants that lose their parent (or leave the process group
    with setsid) are re-parented to it: killing our children until none is left gets all of them.
    """
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    in_own_pid_ns = os.getpid() == 1
    deadline = time.monotonic() + 5.0
    while True:
        if in_own_pid_ns:
            # PID 1 of our own PID namespace: kill(-1) reaches exactly the processes of this namespace.
            try:
                os.kill(-1, signal.SIGKILL)
            except OSError:
                pass
        else:
            for child in _children_by_proc():
                try:
                    os.kill(child, signal.SIGKILL)
                except OSError:
                    pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0] != 0:
                pass
        except ChildProcessError:
            return  # no child left, dead or alive
        if time.monotonic() > deadline:
            return
        time.sleep(0.002)


def main():
    global _status_fd
    try:
        job = json.loads(_read_exactly(0, int(_read_exactly(0, 16))).decode("utf-8"))
        _status_fd = int(job["status_fd"])
        _status["layers"]["pid_namespace"] = os.getpid() == 1
        _status["layers"]["namespaces"] = bool(job.get("namespaces"))
        _join_cgroups(job)
        _set_oom_score_adj(-1000)
        if job.get("namespaces"):
            read_roots = _build_root(job)
            job["workdir"] = "/tmp"
        else:
            read_roots = list(dict.fromkeys([sys.prefix, sys.base_prefix, sys.exec_prefix] + [
                os.path.realpath(p) for p in sys.path if p and os.path.isdir(p)]))
        job["read_roots"] = read_roots
        os.chdir(job["workdir"])
        os.environ.update(HOME=job["workdir"], TMPDIR=job["workdir"])
        ctypes, libc = _libc()
        PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER = 4, 36
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
        if job.get("uid") is not None:
            _status["layers"]["unprivileged_uid"] = job["uid"]
        if job.get("drop_caps"):
            _status["layers"]["capabilities_dropped"] = True
        _status["layers"]["no_new_privs"] = True
        result_r, result_w = os.pipe()
        _flush()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(result_r)
                _worker(job, result_w)
            except BaseException as exc:  # noqa: BLE001 - set-up of the program's process failed
                try:
                    os.write(2, f"sandbox worker set-up failed: {type(exc).__name__}: {exc}\n".encode())
                except BaseException:
                    pass
            finally:
                os._exit(1)
        os.close(result_w)
        verdict = json.loads(_read_rest(0).decode("utf-8"))  # read only now: the worker never held it
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
    except BaseException as exc:  # noqa: BLE001
        _report("setup_error", detail=f"{type(exc).__name__}: {exc}")
        _flush()
        os._exit(125)
    status, data = _supervise(float(job["timeout_s"]), pid, result_r)
    if status is None:
        _report("timeout")
        code = 124
    else:
        exited_ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        try:
            passed, detail = _judge(verdict, data) if exited_ok else (False, "")
        except Exception as exc:  # noqa: BLE001 - values the judge cannot handle are a failed test, not an error
            passed, detail = False, f"the tested values could not be judged ({type(exc).__name__})"
        _report("passed" if passed else "failed", detail=detail,
                exit=os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
        code = 0 if passed else 1
    _flush()
    os._exit(code)


if __name__ == "__main__":
    if sys.argv[1:] == ["--visible-paths"]:  # the host asks what a program will see (nothing else is run)
        print(json.dumps(_visible_paths()[0]))
    else:
        main()
