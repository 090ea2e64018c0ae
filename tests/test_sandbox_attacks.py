"""The attack corpus: hostile completions scored through the code reward, as training scores them, with the
sandbox's interpreter in its usual place and in a virtual environment under ``/tmp``.

With a venv under ``/tmp`` the sandbox used to fail to build its minimal root (its own ``/tmp`` collided
with the interpreter's install) and fell back, with a warning only, to rlimits and the Python guard; a
short program then switched the guard off through ``gc``, listed host processes, read ``/etc/passwd``, the
repository and the dataset (its path taken from another process's ``/proc/*/cmdline``), reached a
listener on 127.0.0.1 and left 194 MiB in ``/dev/shm``. Every completion here must score 0 (the correct
program in the same batch 1.0, so the batch really ran), no run may be an infrastructure failure, and the
host must show no effect: no file left, no connection, no surviving process, no host text in any output.

A layer the host cannot give skips these tests with the missing kernel feature named; in CI (run as root)
it is a failure instead, since there every layer is available.
"""

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import venv
from pathlib import Path

import pytest
from sandbox_layers import live_processes_of_uid, missing_layer
from test_reward_integrity import ATTACKS, FORGE, SECRET

from gdsd_jax.tasks import code as K
from gdsd_jax.tasks import score_batch
from gdsd_jax.tasks.sandbox import Sandbox, SandboxConfig, SandboxUnavailable

pytestmark = [pytest.mark.timeout(300), pytest.mark.skipif(not sys.platform.startswith("linux"),
                                                            reason="the sandbox targets Linux")]

TEST = f"assert f(3) == {SECRET}"
MARK = f"gdsd-attack-{os.getpid()}"  # names of the files the attacks try to leave on the host
HOST_TEXT = "host-secret-31337"      # in a world-readable host file the attacks try to read


def _make_venv(parent: str) -> str:
    """A virtual environment under ``parent`` (symlinks to this interpreter); returns its ``python``."""
    root = tempfile.mkdtemp(prefix="gdsd-venv-", dir=parent)
    venv.create(root, symlinks=True, with_pip=False)
    return os.path.join(root, "bin", "python")


@pytest.fixture(scope="module")
def tmp_venv_python():
    return _make_venv("/tmp")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    """A dataset, a host file, a loopback listener and a host process whose command line names the dataset
    (as ``gdsd-jax train task.kwargs.train_file=...`` would)."""
    root = tmp_path_factory.mktemp("host")
    os.chmod(root, 0o755)
    dataset = root / "code_train.jsonl"
    dataset.write_text('{"question": "f", "test_cases": ["%s"]}\n' % TEST)
    host_file = root / "host.txt"
    host_file.write_text(HOST_TEXT)
    for p in (dataset, host_file):
        os.chmod(p, 0o644)  # world-readable: only the sandbox's file system view can hide them
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    received = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    received.append(conn.recv(1024) or b"<connected>")
                except OSError:
                    received.append(b"<connected>")

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    witness = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)",
                                f"task.kwargs.train_file={dataset}"])
    yield {"root": root, "dataset": dataset, "host_file": host_file, "port": listener.getsockname()[1],
           "received": received}
    witness.kill()
    witness.wait()
    stop.set()
    thread.join(timeout=5)
    listener.close()


# Switches the Python guard off (the OS layers must hold without it): clears its refused events and makes its
# ``deny`` a no-op through the hook's closure, both reached with ``gc``.
GUARD_OFF = '''
import gc as _gc, os, re, socket
def _guard_off():
    for o in _gc.get_objects():
        if isinstance(o, set) and "os.system" in o:
            o.clear()
        if callable(o) and getattr(o, "__name__", "") == "hook" and getattr(o, "__closure__", None):
            for cell in o.__closure__:
                try:
                    if getattr(cell.cell_contents, "__name__", "") == "deny":
                        cell.cell_contents = lambda what: None
                except ValueError:
                    pass
_guard_off()
def _expected_in(text):
    found = re.findall(r"== (\\d+)", text)
    return int(found[0]) if found else 0
'''


def _host_attacks(host) -> dict[str, str]:
    """Attacks on the host, each after switching the guard off; ``f`` returns whatever it could steal."""
    files = [str(host["dataset"]), str(host["host_file"]), "/etc/passwd", str(Path(K.__file__).resolve())]
    shm = f"/dev/shm/{MARK}"
    return {
        "dataset_from_proc_cmdline": '''
def f(x):
    for pid in os.listdir("/proc"):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        for arg in cmd.split("\\0"):
            path = arg.split("=", 1)[-1]
            if path.endswith(".jsonl"):
                try:
                    return _expected_in(open(path).read())
                except OSError:
                    pass
    return 0
''',
        "dataset_and_host_files_by_path": f'''
def f(x):
    for path in {files!r}:
        try:
            text = open(path).read()
            print("READ", path, text[:300])
            if _expected_in(text):
                return _expected_in(text)
        except OSError as e:
            print("refused", path, type(e).__name__)
    return 0
''',
        "host_processes": '''
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print("PIDS", pids)
for p in pids:
    try:
        print("CMD", open(f"/proc/{p}/cmdline", "rb").read().replace(b"\\0", b" ").decode())
    except OSError:
        pass
def f(x):
    return 0
''',
        "network_to_loopback": f'''
def f(x):
    for family, addr in ((socket.AF_INET, ("127.0.0.1", {host["port"]})), (socket.AF_INET6, ("::1", {host["port"]}))):
        try:
            s = socket.socket(family)
            s.settimeout(0.3)
            s.connect(addr)
            s.sendall(b"LEAK")
            print("CONNECTED", addr)
        except OSError as e:
            print("no network", type(e).__name__)
    return 0
''',
        "files_in_tmp_and_dev_shm": f'''
def f(x):
    for path in ("/tmp/{MARK}", "{host["root"]}/{MARK}", "/var/tmp/{MARK}"):
        try:
            open(path, "w").write("left behind")
        except OSError as e:
            print("refused", path, type(e).__name__)
    try:
        with open("{shm}", "wb") as out:
            for _ in range(194):
                out.write(b"x" * (1 << 20))
    except OSError as e:
        print("refused /dev/shm", type(e).__name__)
    return 0
''',
        "fork_bomb": '''
def f(x):
    while True:
        try:
            os.fork()
        except OSError:
            pass
''',
        "memory_hog": '''
def f(x):
    hoard = []
    while True:
        hoard.append(b"x" * (256 << 20))
''',
    }


def _corpus(host) -> dict[str, str]:
    """Every attack as a completion (a fenced block), plus the correct program last."""
    programs = {f"verdict/{name}": FORGE + source for name, source in ATTACKS.items()}
    programs.update({f"host/{name}": GUARD_OFF + source for name, source in _host_attacks(host).items()})
    # Values the judge once could not print in its failure message (ValueError beyond 4300 digits): a failed
    # test, not an infrastructure error.
    programs["judge/huge_integer"] = "def f(x):\n    return 7 ** 20000\n"
    programs["judge/huge_integer_in_a_list"] = "def f(x):\n    return [7 ** 20000, 'x' * 10 ** 6]\n"
    for name, program in programs.items():
        assert str(SECRET) not in program, name
    texts = {name: f"```python\n{program}\n```" for name, program in programs.items()}
    texts["correct"] = f"```python\ndef f(x):\n    return {SECRET} + x - 3\n```"
    return texts


@pytest.mark.parametrize("location", ["usual", "venv_under_tmp"])
def test_attack_corpus_scores_zero_and_leaves_the_host_alone(location, host, request):
    python = sys.executable if location == "usual" else request.getfixturevalue("tmp_venv_python")
    config = {"python": python, "timeout_s": 1.0, "num_workers": 2}
    try:
        task = K.CodeTask(train_file=str(host["dataset"]), sandbox_config=config)
    except SandboxUnavailable as e:
        missing_layer(str(e))
    caps = task.pass_rate.sandbox.capabilities()
    assert all(caps.values()), caps  # every layer, the namespaces included, also for a venv under /tmp
    task.pass_rate.banned = ()  # the official banned substrings ("import os") would stop most attacks unrun
    texts = _corpus(host)
    examples = task.examples("train") * len(texts)
    start = time.monotonic()
    _, per_fn, failures = score_batch(task, list(texts.values()), examples)
    elapsed = time.monotonic() - start
    results = task.pass_rate.last_results
    rates = dict(zip(texts, per_fn["code_pass_rate"].tolist()))
    assert rates.pop("correct") == 1.0
    assert rates == {name: 0.0 for name in rates}, {n: r for n, r in rates.items() if r}
    assert failures == 0, [r.output for r in results if r.infrastructure_failure]
    assert all(r.layers.get("minimal_root") and r.layers.get("private_proc") for r in results)
    time.sleep(0.1)
    for r in results:
        uid = r.layers.get("unprivileged_uid")
        if uid is not None:
            assert live_processes_of_uid(uid) == [], "processes of a run survived it"
    outputs = "\n".join(r.output for r in results)
    # host text, /etc/passwd, the repository's source, the witness's command line, a connection
    for leaked in (HOST_TEXT, "root:x:0:0", "class CodeTask", "task.kwargs.train_file", "CONNECTED"):
        assert leaked not in outputs, leaked
    pids_lines = [line for line in outputs.splitlines() if line.startswith("PIDS")]
    assert pids_lines and all(line == "PIDS [1, 2]" for line in pids_lines), pids_lines
    found = [line for line in outputs.splitlines() if line.startswith("FOUND")]
    assert not any(str(SECRET) in line for line in found), found
    assert host["received"] == []
    for path in (f"/tmp/{MARK}", host["root"] / MARK, f"/var/tmp/{MARK}", f"/dev/shm/{MARK}"):
        assert not os.path.exists(path), path
    print(f"{location}: {len(texts)} completions scored in {elapsed:.1f}s")


@pytest.mark.parametrize("layout", ["venv_under_tmp", "symlink_to_venv_under_tmp", "venv_under_dev_shm"])
def test_interpreter_location_keeps_every_layer(layout, tmp_venv_python):
    """The minimal root is built wherever the interpreter lives (the old code failed for a venv under /tmp
    and fell back silently); a run reports the namespaces' layers and passes."""
    if layout == "venv_under_tmp":
        python = tmp_venv_python
    elif layout == "symlink_to_venv_under_tmp":
        link = tempfile.mkdtemp(prefix="gdsd-link-", dir="/tmp") + "/env"
        os.symlink(os.path.dirname(os.path.dirname(tmp_venv_python)), link)
        python = link + "/bin/python"
    else:
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm on this host")
        python = _make_venv("/dev/shm")
    try:
        sandbox = Sandbox(SandboxConfig(python=python, timeout_s=2.0))
    except SandboxUnavailable as e:
        missing_layer(str(e))
    assert sandbox.capabilities()["namespaces"] and sandbox.capabilities()["minimal_root"]
    result = sandbox.run("import sys\nprint(sys.prefix)\ndef f(x):\n    return x + 1", "assert f(1) == 2")
    assert result.passed, result.output
    assert result.layers["minimal_root"] and result.layers["private_proc"]


def test_install_covering_the_sandbox_tmp_fails_closed(monkeypatch, tmp_path):
    """An interpreter whose install would cover the sandbox's own /tmp gives a set-up error naming it: with
    namespaces required the sandbox is refused at creation, never run with a weaker view."""
    import gdsd_jax.tasks.sandbox as sandbox_module

    child = Path(sandbox_module._CHILD).read_text()
    marker = "    binds, links = _visible_paths()\n"
    assert marker in child
    patched = tmp_path / "sandbox_child.py"
    patched.write_text(child.replace(marker, marker + '    binds = binds + ["/tmp"]\n'))
    monkeypatch.setattr(sandbox_module, "_CHILD", str(patched))
    monkeypatch.setattr(sandbox_module, "_SELF_TEST", {})
    probe = Sandbox(SandboxConfig(namespaces="off", cgroup="auto"))
    if sandbox_module._unshare_flags(probe.python) is None:
        missing_layer("no usable Linux namespaces (unshare missing or not permitted)")
    with pytest.raises(SandboxUnavailable, match="overlaps the sandbox's own /tmp"):
        Sandbox(SandboxConfig(timeout_s=2.0))


def test_a_dataset_inside_what_the_sandbox_shows_is_refused(tmp_venv_python):
    """The minimal root shows the interpreter's install read-only: a dataset kept inside it (here in the venv
    under /tmp) would hand the test asserts to every program, so the code task refuses it at construction."""
    from gdsd_jax.tasks.base import TaskError

    venv_root = Path(tmp_venv_python).parent.parent
    data = venv_root / "code_train.jsonl"
    data.write_text('{"question": "f", "test_cases": ["%s"]}\n' % TEST)
    try:
        sandbox = Sandbox(SandboxConfig(python=tmp_venv_python))
    except SandboxUnavailable as e:
        missing_layer(str(e))
    assert str(venv_root) in sandbox.visible_paths()
    with pytest.raises(TaskError, match=f"the train file {data} lies inside {venv_root}, which the sandbox shows"):
        K.CodeTask(train_file=str(data), sandbox=sandbox)
