"""Countdown: generator (independent exhaustive search), split, shipped file regeneration, arithmetic parser
(differential test against CPython on the allowed alphabet), official reward branches, compact format."""

import random
import subprocess
import sys
import warnings
from fractions import Fraction

import pytest

from gdsd_jax.tasks import arith, get_task, score_batch
from gdsd_jax.tasks import countdown as C
from gdsd_jax.tasks.files import DataError


def _reachable(numbers):
    """Independent exhaustive search: every value reachable using ALL numbers once with + - * /."""
    nums = [Fraction(n) for n in numbers]
    if len(nums) == 1:
        return {nums[0]}
    out = set()
    for i in range(len(nums)):
        for j in range(len(nums)):
            if i == j:
                continue
            rest = [nums[k] for k in range(len(nums)) if k not in (i, j)]
            a, b = nums[i], nums[j]
            for v in [a + b, a - b, a * b] + ([a / b] if b != 0 else []):
                out |= _reachable(rest + [v])
    return out


def test_shipped_test_set_is_solvable_and_regenerates(tmp_path):
    rows = C.load_file(C.shipped_test_path())
    assert len(rows) == 256
    assert len({C.instance_key(r) for r in rows}) == 256
    for r in rows:
        assert len(r["numbers"]) == 3 and all(1 <= n <= 99 for n in r["numbers"])
        assert 1 <= r["target"] <= 99
        assert Fraction(r["target"]) in _reachable(r["numbers"])
        assert C.reward_countdown([f"<answer>{r['solution']}</answer>"], [r]) == [1.0]
    out = tmp_path / "cd.jsonl"
    subprocess.run([sys.executable, "-m", "gdsd_jax.tasks.countdown", "--regenerate", "--out", str(out)],
                   check=True, capture_output=True, timeout=120)
    assert out.read_bytes() == C.shipped_test_path().read_bytes()


def test_train_set_solvable_disjoint_and_deterministic():
    task = get_task("countdown", num_train=3000)
    train, test = task.examples("train"), task.examples("test")
    assert len(train) == 3000
    test_keys = {C.instance_key(e) for e in test}
    assert not any(C.instance_key(e) in test_keys for e in train)
    assert len({C.instance_key(e) for e in train}) == 3000
    for e in train[::10]:
        assert Fraction(e["target"]) in _reachable(e["numbers"])
        assert 1 <= e["target"] <= 99 and all(1 <= n <= 99 for n in e["numbers"])
    for e in train:  # the recorded solution uses the numbers and hits the target
        assert C.score_expression(e["solution"], e["numbers"], e["target"]) == 1.0
    assert C.make_train_set(n=3000, exclude=test)[:20] == train[:20]


def test_validation_set_is_disjoint_from_test_and_train(tmp_path):
    # The full 20,000: excluding only the test pairs, 9 of them would be validation pairs.
    task = get_task("countdown")
    valid, test, train = task.examples("validation"), task.examples("test"), task.examples("train")
    keys = lambda rows: {C.instance_key(e) for e in rows}  # noqa: E731
    assert len(valid) == 256 and len(keys(valid)) == 256
    assert not keys(valid) & keys(test)
    assert not keys(valid) & keys(train) and not keys(test) & keys(train)
    for r in valid[::5]:
        assert Fraction(r["target"]) in _reachable(r["numbers"])
        assert C.score_expression(r["solution"], r["numbers"], r["target"]) == 1.0
    out = tmp_path / "valid.jsonl"
    subprocess.run([sys.executable, "-m", "gdsd_jax.tasks.countdown", "--regenerate", "--split", "validation",
                    "--out", str(out)], check=True, capture_output=True, timeout=120)
    assert out.read_bytes() == C.shipped_validation_path().read_bytes()


# ---- arithmetic parser vs. CPython on the official alphabet ----

def _python_value(expr):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "'int' object is not callable" SyntaxWarning for "(1)(2)"
            return eval(expr, {"__builtins__": None}, {})  # reference only: trusted, generated strings
    except Exception:
        return None


def _close(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return a == b  # exact (and possibly too large for floats)
    return abs(a - b) <= 1e-12 * max(1.0, abs(b))


@pytest.mark.parametrize("expr", [
    "1+2*3", "(1+2)*3", "7/2", "7//2", "-7//2", "2**3", "2**-1", "-2**2", "2**3**2", "(-8)**0.5", "1.5+.5",
    "3.", "00", "07", "1..2", "1 2", "()", "(1)(2)", "1/0", "0**-1", "((((3))))", "+-+-3", "1 +\n2", "(1 +\n2)", "1+\r2", "1+\x0c2", "1+\x0b2", "1+2\n", "\n1+2", "1\r\n+2", "(1\r\n+2)",
    " 4 * ( 3 - 1 ) ", "8/(3-8/3)", "5--5", "2*/3", "", "   ", "1.2.3", "9**9", "4//0.0",
])
def test_parser_matches_python(expr):
    ref = _python_value(expr) if expr.strip() else None
    got = arith.evaluate(expr)
    if ref is None or isinstance(ref, tuple):
        assert got is None
    else:
        assert got is not None and _close(got, ref) and type(got) is type(ref)


def test_parser_differential_random():
    rng = random.Random(0)
    alphabet = ["1", "2", "3", "7", "12", "0", "+", "-", "*", "/", "//", "(", ")", " ", ".", "**", "\n"]
    checked = 0
    for _ in range(4000):
        # stripped, as the reward passes the answer (CPython's indentation rules for leading blanks after a line
        # break are not modelled)
        expr = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))).strip()
        if expr.count("**") > 1:
            continue  # keep CPython's work bounded (towers of powers)
        ref = _python_value(expr)
        got = arith.evaluate(expr)
        if ref is None or isinstance(ref, tuple) or callable(ref):
            assert got is None, expr
        else:
            assert got is not None, expr
            assert _close(got, ref), expr
            checked += 1
    assert checked > 500


def test_parser_refuses_astronomical_powers():
    assert arith.evaluate("9**9**9") is None


# ---- official reward ----

EX = {"numbers": [3, 5, 7], "target": 22}


@pytest.mark.parametrize("completion, expected", [
    ("<answer>3*5+7</answer>", 1.0),
    ("<reasoning>...</reasoning>\n<answer>\n 7 + 5 * 3 \n</answer>", 1.0),     # whitespace and newlines
    ("<answer>(3*5)+7</answer>", 1.0),
    ("3*5+7", 0.0),                                                            # no tag
    ("<answer>3*5+7", 0.0),                                                    # unclosed tag
    ("<answer>3*5+7=22</answer>", 0.1),                                        # extra number (the target)
    ("<answer>3*5+8</answer>", 0.1),                                           # wrong numbers
    ("<answer>3*5</answer>", 0.1),                                             # a number missing
    ("<answer>3*5+7+7</answer>", 0.1),                                         # a number twice
    ("<answer>3+5+7</answer>", 0.1),                                           # right numbers, wrong value
    ("<answer>7/(5-5)*3</answer>", 0.1),                                       # wrong numbers anyway
    ("<answer>x=3*5+7</answer>", 0.1),                                         # letters
    ("<answer>3*5+7.</answer>", 1.0),                                          # "7." is the float 7.0
    ("<answer>3 5 7</answer>", 0.1),                                           # not an expression
    ("<answer>1</answer><answer>3*5+7</answer>", 1.0),                         # the last tag counts
    ("<answer>3*5+7</answer><answer>1</answer>", 0.1),                         # the last tag counts
    ("<answer></answer>", 0.1),                                                # empty answer: numbers differ
])
def test_countdown_reward_branches(completion, expected):
    assert C.reward_countdown([completion], [EX]) == [expected]


def test_countdown_reward_division_and_tolerance():
    ex = {"numbers": [3, 3, 8], "target": 24}
    assert C.reward_countdown(["<answer>8/(3-3)</answer>"], [ex]) == [0.0 + 0.1]   # division by zero
    ex2 = {"numbers": [1, 3, 3], "target": 1}
    assert C.reward_countdown(["<answer>(1/3)*3</answer>"], [ex2]) == [1.0]        # float within 1e-5
    ex3 = {"numbers": [7, 10, 2], "target": 24}
    assert C.reward_countdown(["<answer>07+10*2</answer>"], [ex3]) == [0.1]        # Python rejects "07"
    assert C.reward_countdown([None, 5], [ex, ex]) == [0.0, 0.0]                   # total on junk input


def test_eval_metrics_prefer_boxed():
    task = get_task("countdown")
    texts = ["<reasoning>r</reasoning><answer>\\boxed{3*5+7}</answer>", "\\boxed{3+5+7} <answer>3*5+7</answer>",
             "<answer>3*5+7</answer>"]
    assert task.eval_metrics(texts, [EX] * 3) == {"accuracy": [1.0, 0.0, 1.0]}
    rewards, per_fn, failures = score_batch(task, ["<answer>3*5+7</answer>", "x"], [EX, EX])
    assert rewards.tolist() == [1.0, 0.0] and failures == 0


def test_prompts_train_and_eval():
    task = get_task("countdown")
    train = task.prompt_messages(EX, split="train")[0]["content"]
    assert "Using only the numbers [3, 5, 7], create an arithmetic expression that evaluates to exactly 22." in train
    assert train.startswith("\nRespond in the following format:\n<reasoning>\n")
    evalp = task.prompt_messages(EX, split="test")[0]["content"]
    assert "<answer>\n2*4-3\n</answer>" in evalp and "\\boxed" not in evalp and evalp != train
    assert task.prompt_prefill(split="test") == "<reasoning>"


# ---- compact format ----

def test_compact_ids_and_reward():
    tok = C.countdown_tokenizer()
    assert tok.vocab_size == 20 and (tok.sep_id, tok.mask_id, tok.eos_id, tok.pad_id) == (17, 18, 19, 19)
    assert [tok.encode(ch)[0] for ch in "0123456789+-*/()," ] == list(range(17))
    task = get_task("countdown")
    ex = {"numbers": [25, 3, 7], "target": 82, "solution": "(25*3)+7"}
    assert task.compact_prompt(ex) == [2, 5, 16, 3, 16, 7, 17, 8, 2, 17]
    sol = task.compact_solution(ex)
    assert sol == [14, 2, 5, 12, 3, 15, 10, 7, 19, 19, 19, 19] and len(sol) == task.compact_completion_length
    assert task.compact_reward(sol, ex) == 1.0
    assert task.compact_reward([19] * 12, ex) == 0.0                        # empty expression
    assert task.compact_reward(tok.encode("25+3+7$$$$$$"), ex) == 0.1        # wrong value
    assert task.compact_reward(tok.encode("25*3+7?$$$$$"), ex) == 0.1        # MASK left inside
    assert task.compact_reward(tok.encode("25*3+7|$$$$$"), ex) == 0.1        # SEP inside
    assert task.compact_reward(tok.encode("25*3+7") , ex) == 1.0             # no EOS at all
    assert task.compact_reward([100, -3], ex) == 0.1                         # out-of-vocabulary ids
    # the chat-template stand-in reproduces the compact prompt from text
    assert tok.encode(tok.apply_chat_template([{"role": "user", "content": "25,3,7|82"}])) == task.compact_prompt(ex)
    for e in task.examples("test"):
        assert len(task.compact_prompt(e)) <= task.compact_prompt_length
        assert task.compact_reward(task.compact_solution(e), e) == 1.0


def test_load_file_errors(tmp_path):
    p = tmp_path / "cd.jsonl"
    p.write_text('{"nums": [1, 2, 3], "target": 6}\n{"nums": [1, "2", 3], "target": 6}\n')
    with pytest.raises(DataError, match=r"row 2, column 'nums'"):
        C.load_file(p)
    p.write_text('{"nums": [1, 2, 3]}\n')
    with pytest.raises(DataError, match=r"row 1, column 'target': missing"):
        C.load_file(p)
    p.write_text('{"nums": [1, 2, 3], "target": 6}\nnot json\n')
    with pytest.raises(DataError, match=r"row 2.*invalid JSON"):
        C.load_file(p)
