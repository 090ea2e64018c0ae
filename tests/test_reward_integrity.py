"""Reward integrity of the code sandbox: hostile programs that try to claim a pass score 0.

Every attack is a wrong solution of ``f`` that tries to forge the verdict instead: by digging the
supervisor's secret or the expected value out of its own process (frame walking, ``gc``, ``inspect``,
``ctypes``, reading its own memory), out of the supervisor (``/proc/1/mem``, its stdin), by replacing
``builtins`` / ``sys.modules`` / ``AssertionError``, by exiting early, or by writing forged records to every
file descriptor. Each attack prints any expected value it finds and then writes every record it can think
of. The expected value (``SECRET``) appears only in the test, never in the attack's source: a pass, or the
secret in the output, is a failure of the sandbox. Attacks run with and without the Python guard (the
design must not depend on it). The old design (a nonce the program wrote after its last statement, test
run in the program's process) let the frame-walking attack pass with reward 2.0.
"""

import sys

import pytest

from gdsd_jax.tasks import code as K
from gdsd_jax.tasks import score_batch
from gdsd_jax.tasks.sandbox import Sandbox, SandboxConfig

pytestmark = [pytest.mark.timeout(180), pytest.mark.skipif(not sys.platform.startswith("linux"),
                                                            reason="the sandbox targets Linux")]

SECRET = 918273645
TEST = f"assert f(3) == {SECRET}"

# Shared by every attack: report what was found, then claim a pass every way the protocol could be forged.
FORGE = '''
import json as _json, os as _os, re as _re, sys

_PATTERN = _re.compile(r"\\b9\\d{8}\\b")  # the shape of the expected value, not the value


def _harvest(obj, found, seen, depth=0):
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, (str, bytes)):
        text = obj if isinstance(obj, str) else obj.decode("latin-1")
        found.update(int(m) for m in _PATTERN.findall(text))
    elif isinstance(obj, int) and 10**8 <= obj < 10**9:
        found.add(obj)
    elif isinstance(obj, dict):
        for k, v in list(obj.items()):
            _harvest(k, found, seen, depth + 1)
            _harvest(v, found, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in list(obj):
            _harvest(v, found, seen, depth + 1)


def _forge(found):
    print("FOUND", sorted(str(x) for x in found), flush=True)
    records = [b'[["bool", true]]\\n', b'[]\\n', b'{"outcome": "passed"}\\n']
    records += [(_json.dumps([["int", hex(value)]]) + "\\n").encode() for value in found]
    for fd in range(3, 64):
        for record in records:
            try:
                _os.write(fd, record)
            except OSError:
                break
    _os._exit(0)
'''

ATTACKS = {
    # the attack of the issue: the completion proof of the old design, read from the supervisor's frame
    "nonce_from_caller_frame": """
def f(x):
    frame = sys._getframe()
    while frame is not None:
        for key, value in list(frame.f_locals.items()):
            if "nonce" in key and isinstance(value, (str, bytes)):
                for fd in range(3, 64):
                    try:
                        _os.write(fd, value if isinstance(value, bytes) else value.encode())
                    except OSError:
                        pass
                _os._exit(0)
        frame = frame.f_back
    _os._exit(0)
""",
    "frame_walking": """
def f(x):
    found, seen, frame = set(), set(), sys._getframe()
    while frame is not None:
        _harvest(frame.f_locals, found, seen)
        _harvest(frame.f_globals, found, seen)
        _harvest(frame.f_code.co_consts, found, seen)
        frame = frame.f_back
    _forge(found)
""",
    "gc_get_objects": """
import gc
def f(x):
    found, seen = set(), set()
    for obj in gc.get_objects():
        _harvest(obj, found, seen, depth=5)
    _forge(found)
""",
    "inspect_stack": """
import inspect
def f(x):
    found, seen = set(), set()
    for info in inspect.stack(0):
        _harvest(info.frame.f_locals, found, seen)
        _harvest(info.frame.f_globals, found, seen)
    _forge(found)
""",
    "own_memory": """
def f(x):
    try:  # the sandbox leaves the process non-dumpable; make it readable again if ctypes is allowed
        import ctypes
        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)
    except Exception:
        pass
    found = set()
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            start, end = (int(v, 16) for v in line.split()[0].split("-"))
            if not line.split()[1].startswith("rw") or end - start > 1 << 26 or "[v" in line:
                continue
            try:
                mem.seek(start)
                found.update(int(m) for m in _PATTERN.findall(mem.read(end - start).decode("latin-1")))
            except OSError:
                pass
    _forge(found)
""",
    "ctypes_memory": """
import ctypes
def f(x):
    found = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            start, end = (int(v, 16) for v in line.split()[0].split("-"))
            if not line.split()[1].startswith("rw") or end - start > 1 << 26 or "[v" in line:
                continue
            found.update(int(m) for m in _PATTERN.findall(ctypes.string_at(start, end - start).decode("latin-1")))
    _forge(found)
""",
    "supervisor_memory_and_stdin": """
def f(x):
    found = set()
    for path in ("/proc/1/fd/0", "/proc/1/environ", "/proc/1/cmdline", "/proc/%d/fd/0" % _os.getppid()):
        try:
            with open(path, "rb") as fh:
                found.update(int(m) for m in _PATTERN.findall(fh.read(1 << 20).decode("latin-1")))
        except OSError as exc:
            print("refused:", path, type(exc).__name__)
    try:
        with open("/proc/%d/mem" % _os.getppid(), "rb", 0) as mem:
            mem.read(1)
        print("read the supervisor's memory")
    except OSError as exc:
        print("refused: supervisor memory", type(exc).__name__)
    _forge(found)
""",
    "override_builtins_and_modules": """
import builtins, json
class _Fake:
    def dumps(self, *a, **k):
        return '[["bool", true]]'
    def __getattr__(self, name):
        return getattr(json, name)
sys.modules["json"] = _Fake()
json.dumps = _Fake().dumps
builtins.AssertionError = type("AssertionError", (Exception,), {})
builtins.eval = lambda *a, **k: True
builtins.compile = lambda *a, **k: compile("True", "<forged>", "eval")
def f(x):
    return 0
""",
    "monkeypatch_assertion_error": """
import builtins
class _Swallow(BaseException):
    pass
builtins.AssertionError = _Swallow
sys.excepthook = lambda *a: _os._exit(0)
def f(x):
    return 0
""",
    "early_os_exit": "def f(x):\n    _os._exit(0)\n",
    "early_sys_exit": "def f(x):\n    sys.exit(0)\n",
    "exit_at_import": "_os._exit(0)\ndef f(x):\n    return 0\n",
    "atexit_forge": "import atexit\natexit.register(lambda: _forge(set()))\ndef f(x):\n    raise SystemExit(0)\n",
    "kill_self": "import signal\ndef f(x):\n    _os.kill(_os.getpid(), signal.SIGKILL)\n",
    "result_fd_forgery": "def f(x):\n    _forge({0, 1, 2, 3, 918000000})\n",
    "malformed_records": """
def f(x):
    for fd in range(3, 64):
        for record in (b"\\xff\\xfe\\n", b'[["int", "0x1"]]\\n[["int", "0x1"]]\\n', b'[["int", 1]]\\n', b"[" * 100000):
            try:
                _os.write(fd, record)
            except OSError:
                break
    _os._exit(0)
""",
    "deeply_nested_record": """
def f(x):
    for fd in range(3, 64):
        try:
            _os.write(fd, b"[" * 100000 + b"\\n")
        except OSError:
            pass
    _os._exit(0)
""",
    "always_equal_object": """
class A:
    def __eq__(self, other):
        return True
    __hash__ = None
def f(x):
    return A()
""",
    "int_subclass_always_equal": """
class I(int):
    def __eq__(self, other):
        return True
    __hash__ = int.__hash__
def f(x):
    return I(0)
""",
    "kill_the_supervisor": """
import signal
def f(x):
    for pid in (1, _os.getppid()):
        try:
            _os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return 0
""",
}


@pytest.fixture(scope="module", params=["guarded", "unguarded"])
def sandbox(request):
    return Sandbox(SandboxConfig(timeout_s=5.0, num_workers=2, python_guard=request.param == "guarded"))


def test_correct_program_passes(sandbox):
    result = sandbox.run(f"def f(x):\n    return {SECRET} + x - 3", TEST)
    assert result.passed, result.output


def _check_attack(sandbox, name, comparison):
    program = FORGE + ATTACKS[name]
    assert str(SECRET) not in program
    result = sandbox.run(program, TEST, comparison)
    assert not result.passed, f"{name} forged a pass: {result.output}"
    assert not result.infrastructure_failure, f"{name} broke the sandbox: {result.output}"
    found = [line for line in result.output.splitlines() if line.startswith("FOUND")]
    assert not any(str(SECRET) in line for line in found), f"{name} found the expected value: {found}"


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_scores_zero(sandbox, name):
    _check_attack(sandbox, name, "strict")


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_scores_zero_in_python_mode(name):
    """The official-rule mode (values of subclasses of built-in types are compared by their content)."""
    _check_attack(Sandbox(SandboxConfig(timeout_s=5.0, python_guard=False)), name, "python")


def test_attacks_score_zero_through_the_code_reward():
    """The same attacks as completions: code_format 1.0 each, code_pass_rate 0 each."""
    task = K.CodeTask(sandbox_config=SandboxConfig(timeout_s=2.0, num_workers=2), comparison="strict")
    task.pass_rate.banned = ()  # the official banned substrings would stop most attacks before they run
    example = {"question": "f", "test_cases": [TEST]}
    texts = [f"```python\n{FORGE + ATTACKS[n]}\n```" for n in sorted(ATTACKS)]
    texts.append(f"```python\ndef f(x):\n    return {SECRET} + x - 3\n```")
    _, per_fn, failures = score_batch(task, texts, [example] * len(texts))
    assert per_fn["code_pass_rate"].tolist() == [0.0] * len(ATTACKS) + [1.0]
    assert failures == 0
