"""The code sandbox: hostile programs score 0 and leave the host unharmed; every test is bounded in time.

Each hostile program is run twice where possible: with the Python guard (the default) and without it, so the
OS-level layers (namespaces, unprivileged uid, rlimits) are checked on their own. The fork bomb runs only
when a process limit really binds (not as root without a uid change).
"""

import os
import socket
import sys
import time
from pathlib import Path

import pytest
from sandbox_layers import live_processes_of_uid, missing_layer

from gdsd_jax.tasks.sandbox import Sandbox, SandboxConfig

pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(not sys.platform.startswith("linux"),
                                                            reason="the sandbox targets Linux")]

TIMEOUT = 1.0
BOUND = TIMEOUT + 5.0 + 3.0  # sandbox timeout + start-up grace + host slack: a run never takes longer


# The tests below check each layer on its own, so their sandboxes accept a missing layer explicitly (the
# default refuses to run without one: test_defaults_fail_closed); a test of one layer skips, naming it, where
# the host lacks it, and fails instead in CI as root.
WEAKER_ACCEPTED = {"namespaces": "auto", "cgroup": "auto"}


@pytest.fixture(scope="module")
def guarded():
    return Sandbox(SandboxConfig(timeout_s=TIMEOUT, num_workers=2, **WEAKER_ACCEPTED))


@pytest.fixture(scope="module")
def unguarded():
    return Sandbox(SandboxConfig(timeout_s=TIMEOUT, python_guard=False, num_workers=2, **WEAKER_ACCEPTED))


@pytest.fixture(scope="module")
def fallback():
    """No namespaces: the documented fallback (rlimits, uid, process groups, Python guard)."""
    return Sandbox(SandboxConfig(timeout_s=TIMEOUT, namespaces="off", cgroup="auto", num_workers=2))


@pytest.fixture(scope="module")
def fallback_unguarded():
    """No namespaces and no guard: only rlimits, the uid change and process-group / uid clean-up."""
    return Sandbox(SandboxConfig(timeout_s=TIMEOUT, namespaces="off", cgroup="auto", python_guard=False,
                                 num_workers=2))


def _run(sandbox, source, test=""):
    start = time.monotonic()
    result = sandbox.run(source, test)
    elapsed = time.monotonic() - start
    assert elapsed < BOUND, f"run took {elapsed:.1f}s"
    uid = result.layers.get("unprivileged_uid")
    if uid is not None:
        time.sleep(0.05)
        assert live_processes_of_uid(uid) == [], "processes of the run survived it"
    return result


def test_capabilities_and_layers(guarded):
    caps = guarded.capabilities()
    result = _run(guarded, "assert 1 + 1 == 2")
    assert result.passed and result.status == "passed"
    if os.geteuid() == 0:
        assert caps["unprivileged_uid"] and result.layers["unprivileged_uid"] >= 200_000
    if caps["namespaces"]:
        assert result.layers["pid_namespace"] and result.layers["tmpfs_workdir"]
        assert result.layers["read_only_root"]


def test_legit_programs_pass_and_failures_fail(guarded):
    ok = ("import math, collections, itertools, functools, heapq, bisect, re, json, fractions, random\n"
          "def solve(xs):\n    return sorted(xs)[::-1]\n"
          "open('scratch.txt', 'w').write('work dir is writable')\n"
          "assert open('scratch.txt').read().startswith('work')\n"
          "print('hello from the sandbox')\n"
          "\nassert solve([1, 3, 2]) == [3, 2, 1]")
    results = guarded.run_many([ok, "assert 1 == 2", "raise ValueError('x')", "def f(:\n pass", ok])
    assert [r.status for r in results] == ["passed", "failed", "failed", "failed", "passed"]
    assert "hello from the sandbox" in results[0].output


@pytest.mark.parametrize("source", ["import os\nos._exit(0)", "import sys\nsys.exit(0)", "raise SystemExit"])
def test_early_exit_cannot_fake_a_pass(guarded, source):
    assert not _run(guarded, source, "assert False").passed


@pytest.mark.parametrize("box", ["guarded", "unguarded", "fallback", "fallback_unguarded"])
def test_infinite_loop_times_out(box, request):
    result = _run(request.getfixturevalue(box), "while True:\n    pass")
    assert result.status == "timeout" and not result.passed


@pytest.mark.parametrize("box", ["guarded", "unguarded", "fallback", "fallback_unguarded"])
def test_memory_hog(box, request):
    result = _run(request.getfixturevalue(box), "x = bytearray(4 * 1024 ** 3)\nassert len(x) > 0")
    assert not result.passed


@pytest.mark.parametrize("box", ["guarded", "unguarded", "fallback", "fallback_unguarded"])
def test_large_file_write(box, request):
    src = "with open('big.bin', 'wb') as f:\n    for _ in range(200):\n        f.write(b'x' * (1 << 20))\n"
    result = _run(request.getfixturevalue(box), src)
    assert not result.passed  # 200 MiB > the 16 MiB file-size limit (and the 64 MiB tmpfs)


@pytest.mark.parametrize("box", ["guarded", "unguarded", "fallback", "fallback_unguarded"])
def test_fork_bomb_is_contained(box, request):
    sandbox = request.getfixturevalue(box)
    if not sandbox.config.python_guard and os.geteuid() == 0 and not sandbox.drop_uid:
        pytest.skip("root without a uid change: RLIMIT_NPROC does not bind")
    for src in ["import os\nwhile True:\n    os.fork()\n",
                "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"]:
        result = _run(sandbox, src)  # bounded in time, and no process of the run left behind
        if "while" in src:
            assert not result.passed


@pytest.mark.parametrize("box", ["guarded", "unguarded"])
def test_no_network(box, request):
    sandbox = request.getfixturevalue(box)
    if not sandbox.config.python_guard and not sandbox.capabilities()["network_namespace"]:
        pytest.skip("no network namespace here: only the guard blocks sockets (see the guarded case)")
    # A listener on the host's loopback: the program must not reach it (loopback only; nothing leaves the host).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.2)
        port = server.getsockname()[1]
        src = ("import socket\n"
               f"c = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\n"
               "c.sendall(b'hello')\n")
        assert not _run(sandbox, src).passed
        with pytest.raises(socket.timeout):
            server.accept()


def test_guard_blocks_sockets_in_fallback(fallback):
    assert not _run(fallback, "import socket\nsocket.socket()").passed


@pytest.mark.parametrize("box", ["guarded", "unguarded", "fallback"])
def test_no_writes_outside_the_work_dir(box, request, tmp_path):
    sandbox = request.getfixturevalue(box)
    if not sandbox.config.python_guard and os.geteuid() != 0 and not sandbox.capabilities()["namespaces"]:
        pytest.skip("same uid, no mount namespace, no guard: nothing stops the write (documented)")
    target = tmp_path / "escaped.txt"
    result = _run(sandbox, f"open({str(target)!r}, 'w').write('escaped')")
    assert not result.passed and not target.exists()


@pytest.mark.parametrize("box", ["guarded", "unguarded", "fallback"])
def test_no_reads_outside_the_work_dir(box, request, tmp_path):
    sandbox = request.getfixturevalue(box)
    if not sandbox.config.python_guard and os.geteuid() != 0:
        pytest.skip("same uid and no guard: the host user's own files stay readable (documented)")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    os.chmod(secret, 0o600)
    result = _run(sandbox, f"assert open({str(secret)!r}).read() == 's3cret'")
    assert not result.passed and "s3cret" not in result.output


@pytest.mark.parametrize("box", ["guarded", "fallback"])
def test_os_system_and_subprocess_blocked(box, request, tmp_path):
    sandbox = request.getfixturevalue(box)
    marker = tmp_path / "ran"
    sources = [
        f"import os\nassert os.system('touch {marker}') == 0",
        f"import subprocess\nsubprocess.run(['touch', {str(marker)!r}], check=True)",
        f"import os\nos.execv('/usr/bin/touch', ['touch', {str(marker)!r}])",
        f"import os\nos.posix_spawn('/usr/bin/touch', ['touch', {str(marker)!r}], {{}})",
        "import _posixsubprocess",
        "import ctypes\nctypes.CDLL(None).fork()",
    ]
    for src in sources:
        assert not _run(sandbox, src).passed, src
    assert not marker.exists()


def test_unguarded_subprocess_stays_inside(unguarded, tmp_path):
    # Without the guard a child process may run, but it inherits every OS layer: it cannot write outside.
    if os.geteuid() != 0 and not unguarded.capabilities()["namespaces"]:
        pytest.skip("same uid, no namespaces: nothing OS-level stops it (documented)")
    marker = tmp_path / "ran"
    _run(unguarded, f"import os\nos.system('touch {marker}')")
    assert not marker.exists()


def test_output_is_capped(guarded):
    sandbox = Sandbox(SandboxConfig(timeout_s=TIMEOUT, max_output_bytes=1000, **WEAKER_ACCEPTED))
    result = _run(sandbox, "print('x' * 100000)")
    assert result.passed and len(result.output) <= 1000


def test_defaults_fail_closed():
    """Every isolation layer is required unless a setting accepts weaker isolation explicitly."""
    config = SandboxConfig()
    assert (config.namespaces, config.cgroup, config.python_guard) == ("require", "require", True)


def test_config_validation():
    with pytest.raises(ValueError, match="namespaces"):
        SandboxConfig(namespaces="sometimes")
    with pytest.raises(ValueError, match="timeout_s"):
        SandboxConfig(timeout_s=0)
    with pytest.raises(ValueError, match="max_processes"):
        SandboxConfig(max_processes=1)


# ---- the OS layers on their own (no Python guard): private /proc, minimal filesystem view, per-run caps ----

def _skip_without(sandbox, layer):
    if not sandbox.capabilities()[layer]:
        reason = sandbox.cgroups.error if layer == "per_run_cgroup" and sandbox.cgroups else "no usable namespaces"
        missing_layer(f"this host cannot provide the {layer} layer ({reason})")


def test_proc_shows_only_the_runs_processes(unguarded):
    _skip_without(unguarded, "private_proc")
    src = ("import os\n"
           "pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())\n"
           "print('PIDS', pids)\n"
           "for p in pids:\n"
           "    print('CMD', open(f'/proc/{p}/cmdline', 'rb').read().replace(b'\\0', b' ').decode())\n")
    result = _run(unguarded, src)
    assert result.passed, result.output
    pids = eval(next(line for line in result.output.splitlines() if line.startswith("PIDS"))[5:])
    assert pids == [1, 2], pids  # the supervisor and the program, nothing of the host
    assert "pytest" not in result.output and str(os.getpid()) not in pids


@pytest.mark.parametrize("box", ["guarded", "unguarded"])
def test_host_files_and_the_dataset_are_not_visible(box, request, tmp_path):
    sandbox = request.getfixturevalue(box)
    _skip_without(sandbox, "minimal_root")
    from gdsd_jax.tasks.code import CodeTask

    dataset = tmp_path / "code_train.jsonl"
    dataset.write_text('{"question": "q", "test_cases": ["assert f(1) == 424242"]}\n')
    host_file = tmp_path / "host.txt"
    host_file.write_text("host-secret-777")
    for p in (tmp_path, dataset, host_file):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)  # world-readable: only the filesystem view can hide them
    task = CodeTask(train_file=str(dataset))
    targets = [task.files["train"], str(host_file), __file__]
    src = "import sys\n" + "".join(
        f"try:\n    print(open({t!r}).read()[:200])\nexcept OSError as e:\n    print('refused', type(e).__name__)\n"
        for t in targets)
    result = _run(sandbox, src)
    assert "424242" not in result.output and "host-secret-777" not in result.output
    assert "gdsd_jax" not in result.output  # this test file's own text
    assert result.output.count("refused") == 3, result.output


def _alloc_in_children(children, mib, hold_s):
    return ("import os, time\n"
            "pids = []\n"
            f"for _ in range({children}):\n"
            "    try:\n"
            "        pid = os.fork()\n"
            "    except OSError:\n"
            "        break\n"
            "    if pid == 0:\n"
            f"        block = b'x' * ({mib} << 20)  # written, so resident\n"
            f"        time.sleep({hold_s})\n"
            "        os._exit(0)\n"
            "    pids.append(pid)\n"
            "ok = sum(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0 for s in (os.waitpid(p, 0)[1] for p in pids))\n"
            "print('STARTED', len(pids), 'HELD', ok)\n")


def _counts(output):
    line = next(line for line in output.splitlines() if line.startswith("STARTED"))
    _, started, _, held = line.split()
    return int(started), int(held)


def test_memory_cap_is_per_run_not_per_process():
    """6 processes x 150 MiB, each under the 256 MiB per-process limit: the run's cap stops all but one."""
    sandbox = Sandbox(SandboxConfig(timeout_s=6.0, python_guard=False, memory_bytes=256 << 20, **WEAKER_ACCEPTED))
    _skip_without(sandbox, "per_run_cgroup")
    result = _run(sandbox, _alloc_in_children(6, 150, 1))
    started, held = _counts(result.output)
    assert started == 6 and held <= 1, result.output


def test_process_cap_is_per_run_even_without_a_uid_change():
    """Without the per-run uid, root is exempt from RLIMIT_NPROC: the run's pids cgroup still caps it."""
    sandbox = Sandbox(SandboxConfig(timeout_s=6.0, python_guard=False, drop_uid=False, max_processes=8,
                                    **WEAKER_ACCEPTED))
    _skip_without(sandbox, "per_run_cgroup")
    result = _run(sandbox, _alloc_in_children(40, 1, 1))
    started, _ = _counts(result.output)
    assert started <= 8 - 2, result.output  # the supervisor and the program count too


def test_missing_cgroup_layer_fails_closed_unless_accepted(monkeypatch, caplog):
    """By default a missing cgroup stops the sandbox at creation with one line naming the layer, the cause
    and the setting; ``cgroup="auto"`` accepts the weaker isolation with one warning for any number of
    sandboxes, and runs still work."""
    import gdsd_jax.tasks.sandbox as sandbox_module

    class NoCgroup:
        kind, error = None, "cgroup v2 controllers ['memory'] are not enabled (test)"

    monkeypatch.setattr(sandbox_module, "cgroup_manager", lambda: NoCgroup())
    monkeypatch.setattr(sandbox_module, "_WARNED", set())
    with pytest.raises(sandbox_module.SandboxUnavailable) as refused:
        Sandbox(SandboxConfig(timeout_s=TIMEOUT))
    message = str(refused.value)
    assert "\n" not in message and "per-run cgroup" in message and "not enabled (test)" in message
    assert "cgroup='auto'" in message
    with caplog.at_level("WARNING", logger="gdsd_jax.tasks.sandbox"):
        first = Sandbox(SandboxConfig(timeout_s=TIMEOUT, cgroup="auto"))
        Sandbox(SandboxConfig(timeout_s=TIMEOUT, cgroup="auto"))
    warnings = [r.getMessage() for r in caplog.records if "per-run memory" in r.getMessage()]
    assert len(warnings) == 1 and "not enabled (test)" in warnings[0]
    assert not first.capabilities()["per_run_cgroup"]
    assert _run(first, "pass", "assert 1 + 1 == 2").passed


def test_namespace_setup_failure_fails_closed_unless_accepted(monkeypatch, caplog, tmp_path, guarded):
    """``unshare`` permitted but mounting refused (e.g. an LSM policy): by default an error at creation naming
    the layer and the cause; with ``namespaces="auto"`` one warning, then the fallback."""
    import gdsd_jax.tasks.sandbox as sandbox_module

    _skip_without(guarded, "minimal_root")
    child = Path(sandbox_module._CHILD).read_text()
    marker = '_mount(libc, ctypes, "none", "/", None, _MS_REC | _MS_PRIVATE)'
    assert marker in child
    broken = tmp_path / "sandbox_child.py"
    broken.write_text(child.replace(marker, 'raise PermissionError(1, "mount refused (test)")'))
    monkeypatch.setattr(sandbox_module, "_CHILD", str(broken))
    monkeypatch.setattr(sandbox_module, "_SELF_TEST", {})
    monkeypatch.setattr(sandbox_module, "_WARNED", set())
    with pytest.raises(sandbox_module.SandboxUnavailable, match="mount refused \\(test\\).*namespaces='auto'"):
        Sandbox(SandboxConfig(timeout_s=TIMEOUT))
    with caplog.at_level("WARNING", logger="gdsd_jax.tasks.sandbox"):
        boxes = [Sandbox(SandboxConfig(timeout_s=TIMEOUT, namespaces="auto")) for _ in range(2)]
    warnings = [r.getMessage() for r in caplog.records if "setting them up failed" in r.getMessage()]
    assert len(warnings) == 1 and "mount refused (test)" in warnings[0] and "private /proc" in warnings[0]
    assert not boxes[0].capabilities()["minimal_root"]
    assert _run(boxes[1], "def f(x):\n    return x", "assert f(1) == 1").passed


def test_stale_cgroups_of_dead_hosts_are_removed(guarded):
    """A host killed with SIGKILL leaves its empty base cgroups behind; the next host removes them."""
    from gdsd_jax.tasks import sandbox_cgroup

    _skip_without(guarded, "per_run_cgroup")
    stale_pid = 9_999_999  # above the kernel's largest pid_max (2**22): no process has it
    parents = [os.path.dirname(b) for b in sandbox_cgroup.cgroup_manager().bases]
    stale = [os.path.join(p, f"gdsd-sandbox-{stale_pid}") for p in parents]
    for d in stale:
        os.makedirs(os.path.join(d, "run-0123456789ab"))
    assert all(os.path.isdir(d) for d in stale)
    assert sandbox_cgroup.CgroupManager().kind is not None  # shares this process's bases; removed at exit
    assert not any(os.path.exists(d) for d in stale)
