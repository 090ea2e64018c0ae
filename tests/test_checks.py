"""Test splitting (probes vs judgements) and the two comparison modes, judged in the sandbox.

``"python"`` mode is checked against Python itself running ``program + test`` in this process (the official
assert rule; the programs here are benign); ``"strict"`` against hand-written expectations.
"""

import sys

import pytest

from gdsd_jax.tasks import code as K
from gdsd_jax.tasks.checks import Step, split_test
from gdsd_jax.tasks.sandbox import Sandbox, SandboxConfig

pytestmark = [pytest.mark.timeout(120), pytest.mark.skipif(not sys.platform.startswith("linux"),
                                                            reason="the sandbox targets Linux")]


@pytest.mark.parametrize("test, probes, strict, python", [
    ("assert f(3) == [1, 2]", ("f(3)",), "_eq(_p0, [1, 2])", "_p0 == [1, 2]"),
    ("assert abs(f(0.5) - 0.25) < 1e-9", ("f(0.5)",), "abs(_p0 - 0.25) < 1e-09", "abs(_p0 - 0.25) < 1e-09"),
    ("assert math.isclose(f(1), 2.0)", ("f(1)",), "math.isclose(_p0, 2.0)", "math.isclose(_p0, 2.0)"),
    ("assert f(1) is None", ("f(1)",), "_p0 is None", "_p0 is None"),
    ("assert f('a') not in ['b']", ("f('a')",), "not _in(_p0, ['b'])", "_p0 not in ['b']"),
    ("assert f(1)[0] != g(2), 'msg'", ("f(1)[0]", "g(2)"), "not _eq(_p0, _p1)", "_p0 != _p1"),
    ("assert 1 < f(2) == 3", ("f(2)",), "1 < _p0 and _eq(_p0, 3)", "1 < _p0 == 3"),
    ("assert all(x > 0 for x in f(3))", ("[x > 0 for x in f(3)]",), "all(_p0)", "all(_p0)"),
    ("assert sorted(f([3, 1])) == [1, 3]", ("f([3, 1])",), "_eq(sorted(_p0), [1, 3])", "sorted(_p0) == [1, 3]"),
])
def test_split(test, probes, strict, python):
    assert split_test(test, "strict") == [Step(probes=probes, judgement=strict)]
    assert split_test(test, "python") == [Step(probes=probes, judgement=python)]


def test_split_keeps_setup_statements_in_order():
    steps = split_test("s = Solution()\nassert s.add(1, 2) == 3\nt = 1")
    assert steps == [Step(run="s = Solution()"), Step(probes=("s.add(1, 2)",), judgement="_eq(_p0, 3)"),
                     Step(run="t = 1")]


def test_split_rejects_unknown_mode_and_bad_source():
    with pytest.raises(ValueError, match="comparison must be one of"):
        split_test("assert 1", "loose")
    with pytest.raises(SyntaxError):
        split_test("assert (")


# (program, test, passes in strict mode)
CASES = [
    ("def f(x):\n    return x + 1", "assert f(1) == 2", True),
    ("def f(x):\n    return 2.0", "assert f(1) == 2", False),                      # float for int
    ("def f(x):\n    return True", "assert f(1) == 1", False),                     # bool for int
    ("def f(x):\n    return (1, 2)", "assert f(1) == [1, 2]", False),               # tuple for list (Python: False too)
    ("def f(x):\n    return [1, 2.0]", "assert f(1) == [1, 2]", False),             # nested float
    ("def f(x):\n    return {'a': [1]}", "assert f(1) == {'a': [1]}", True),
    ("def f(x):\n    return {1, 2}", "assert f(1) == {2, 1}", True),
    ("def f(x):\n    return {1.0}", "assert f(1) == {1}", False),
    ("def f(x):\n    return 3", "assert f(1) != 3.0", True),                       # strict: 3 != 3.0
    ("def f(x):\n    return 1", "assert f(1) in [1.0, 2]", False),
    ("def f(x):\n    return 2", "assert f(1) in [1, 2]", True),
    ("def f(x):\n    return 'ab'", "assert f(1) in 'xaby'", True),
    ("def f(x):\n    return 0.1 + 0.2", "assert abs(f(1) - 0.3) < 1e-9", True),
    ("def f(x):\n    return None", "assert f(1) is None", True),
    ("def f(x):\n    return []", "assert not f(1)", True),
    ("def f(x):\n    return b'\\x00\\xff'", "assert f(1) == b'\\x00\\xff'", True),
    ("import math\ndef f(n):\n    return math.factorial(n)", "assert f(3000) == math.factorial(3000)", True),
    ("class Solution:\n    def add(self, a, b):\n        return a + b",
     "s = Solution()\nassert s.add(1, 2) == 3", True),
    ("def f(x):\n    return float('nan')", "assert f(1) != f(1)", True),
    ("def f(x):\n    return x", "assert f(1) == 1\nassert f(2) == 2", True),
    ("def f(x):\n    return x", "assert f(1) == 1\nassert f(2) == 3", False),
    ("class A:\n    def __eq__(self, o):\n        return True\ndef f(x):\n    return A()", "assert f(1) == 5", False),
    ("class I(int):\n    def __eq__(self, o):\n        return True\n    __hash__ = int.__hash__\ndef f(x):\n    return I(0)",
     "assert f(1) == 5", False),                                                     # its content (0) is compared
    # subclasses of built-in types: their built-in content in python mode, refused in strict mode
    ("from collections import Counter\ndef f(x):\n    return Counter('aab')",
     "assert f(1) == {'a': 2, 'b': 1}", False),
    ("from collections import OrderedDict\ndef f(x):\n    return OrderedDict(a=[1])", "assert f(1) == {'a': [1]}",
     False),
    ("from collections import defaultdict\ndef f(x):\n    d = defaultdict(list)\n    d[1].append(2)\n    return d",
     "assert f(1) != {1: [3]}", False),
]


def _python_rule(program, test):
    """The official rule: the test's asserts, run by Python after the program."""
    try:
        exec(compile(program + "\n" + test, "<case>", "exec"), {"__name__": "__main__"})  # noqa: S102
        return True
    except Exception:  # noqa: BLE001 - any exception is a failed test
        return False


@pytest.fixture(scope="module")
def sandbox():
    return Sandbox(SandboxConfig(timeout_s=2.0, num_workers=2))


def test_comparison_modes(sandbox):
    programs, tests, strict = zip(*CASES)
    strict_results = sandbox.run_many(programs, tests, "strict")
    python_results = sandbox.run_many(programs, tests, "python")
    assert [r.passed for r in strict_results] == list(strict), [r.output for r in strict_results]
    # python mode is the official rule, except that no object of the program decides a comparison
    official = [_python_rule(p, t) and "__eq__" not in p for p, t in zip(programs, tests)]
    assert [r.passed for r in python_results] == official, [r.output for r in python_results]
    assert official != list(strict)  # the cases do tell the modes apart


def test_code_task_comparison_option():
    example = {"question": "f", "test_cases": ["assert f(1) == 2"]}
    text = "```python\ndef f(x):\n    return 2.0\n```"
    config = SandboxConfig(timeout_s=2.0, num_workers=1)
    assert K.CodeTask(sandbox_config=config).pass_rate([text], [example]) == [0.0]  # strict by default
    assert K.CodeTask(sandbox_config=config, comparison="python").pass_rate([text], [example]) == [1.0]
    with pytest.raises(ValueError, match="comparison must be one of"):
        K.CodeTask(comparison="exact")
