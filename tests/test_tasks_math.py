"""MATH: loader, the official math_xml and math (math-verify) rewards, and the answer normalisation helpers."""

import json

import pytest

from gdsd_jax.tasks import get_task, score_batch
from gdsd_jax.tasks import math as M
from gdsd_jax.tasks.files import DataError
from gdsd_jax.tasks.text import is_equiv, last_boxed, remove_boxed, strip_string

ROWS = [
    {"problem": "What is $1/2 + 1/4$?", "solution": "We add: $\\frac12+\\frac14=\\boxed{\\frac{3}{4}}$.",
     "answer": "\\frac{3}{4}"},
    {"problem": "Compute $\\sqrt{16}$.", "solution": "Since $4^2=16$, the answer is $\\boxed{4}$."},
]


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "math.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


def test_loader(path):
    ex = get_task("math", train_file=path).examples("train")
    assert [e["answer"] for e in ex] == ["\\frac{3}{4}", "4"]  # given, or extracted from the last box


@pytest.mark.parametrize("row, column, message", [
    ({"problem": "p"}, "solution", "missing"),
    ({"problem": ["p"], "solution": "\\boxed{1}"}, "problem", "string"),
    ({"problem": "p", "solution": "no box"}, "solution", "boxed"),
    ({"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}$."}, "solution", "never closes"),
    ({"problem": "p", "solution": "so $\\boxed{3", "answer": "3"}, "solution", "never closes"),
    ({"problem": "p", "solution": "\\boxed{1}", "answer": 1}, "answer", "string"),
])
def test_bad_rows(tmp_path, row, column, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message) as err:
        M.load_math(p)
    assert (err.value.row, err.value.column) == (2, column) and str(p) in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{5}", "\\boxed{5}"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\boxed{\\frac{1}{2}}"),
    ("nested \\boxed{a_{1}+b} end", "\\boxed{a_{1}+b}"),
    ("unclosed \\boxed{12", None),
    ("plain text", "plain text"),                       # no box: the text itself (official convention)
    ("\\fbox{7}", "\\fbox{7}"),
    ("$\\boxed 5$ more", "\\boxed 5"),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("raw, normalised", [
    ("\\frac12", "\\frac{1}{2}"),
    ("\\dfrac{3}{4}", "\\frac{3}{4}"),
    ("0.5", "\\frac{1}{2}"),
    ("3/4", "\\frac{3}{4}"),
    ("x = 5", "5"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("90^\\circ", "90"),
    ("50\\%", "50"),
    (".25", "0.25"),
    (".5", "\\frac{1}{2}"),                              # "0.5" is special-cased
    ("\\sqrt2", "\\sqrt{2}"),
    ("10\\text{ cm}", "10"),
    ("\\$5", "5"),
])
def test_strip_string(raw, normalised):
    assert strip_string(raw) == normalised


def test_is_equiv():
    assert is_equiv("\\frac{1}{2}", "0.5") and is_equiv("\\dfrac12", "1/2") and not is_equiv("1", "2")
    assert is_equiv(None, None) and not is_equiv(None, "1")
    assert remove_boxed("\\boxed{x}") == "x" and remove_boxed("\\boxed y") == "y" and remove_boxed(None) is None


EX = {"problem": "p", "solution": "Thus $\\boxed{\\frac{3}{4}}$.", "answer": "\\frac{3}{4}"}


@pytest.mark.parametrize("text, correct, fmt", [
    # correctness 2.0 iff the last box in the answer text is equivalent; format 0.5 * (tag + (1 if box else 0.5))
    ("<reasoning>r</reasoning><answer>\\boxed{\\frac34}</answer>", 2.0, 1.0),
    ("<answer>\\boxed{0.75}</answer>", 0.0, 1.0),                   # 0.75 is not normalised to 3/4
    ("<answer>\\boxed{3/4}</answer>", 2.0, 1.0),
    ("<answer>3/4</answer>", 2.0, 0.75),                            # no box: the answer text itself
    ("\\boxed{\\dfrac{3}{4}}", 2.0, 0.5),                           # no tag: the whole response
    ("I think 3/4", 0.0, 0.25),
    ("<answer>\\boxed{1}</answer> later \\boxed{\\frac{3}{4}}", 0.0, 1.0),  # only the answer text counts
    ("<answer>\\boxed{\\frac{3}{4}}", 2.0, 1.0),                     # unclosed answer tag: rest of the text
    ("<answer>\\boxed{\\frac{3}{4}</answer>", 0.0, 1.0),             # unclosed box -> None != gold
    ("", 0.0, 0.25),
])
def test_math_xml_branches(text, correct, fmt):
    task = get_task("math")
    total, per_fn, failures = score_batch(task, [text], [EX])
    assert per_fn["correctness"][0] == correct and per_fn["boxed_format"][0] == fmt and failures == 0
    assert total[0] == pytest.approx(correct + fmt)


def test_math_plain_uses_math_verify():
    task = get_task("math", variant="plain")
    texts = ["The answer is $\\boxed{0.75}$.", "So $\\boxed{\\frac{3}{4}}$", "$\\boxed{\\frac{1}{2}}$", "nothing",
             "\\boxed{"]
    total, per_fn, failures = score_batch(task, texts, [EX] * len(texts))
    assert total.tolist() == [2.0, 2.0, 0.0, 0.0, 0.0] and failures == 0
    assert task.prompt_messages({"problem": "P"})[0]["content"] == (
        "P\nPlease reason step by step, and put your final answer within \\boxed{}.")


def test_math_plain_off_main_thread():
    # math-verify's SIGALRM timeouts only work in the main thread; the reward must still work elsewhere
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(M.verify_math, "\\boxed{0.75}", EX["solution"]).result() is True


def test_prompts_and_eval():
    task = get_task("math")
    content = task.prompt_messages({"problem": "P"}, split="train")[0]["content"]
    assert content == ("\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
                       "\n\nYou are a math expert. Solve the problem step by step. Wrap the final answer in a "
                       "\\boxed{}.\n\nP")
    assert task.prompt_messages({"problem": "P"}, split="test") != task.prompt_messages({"problem": "P"})
    assert task.eval_metrics(["<answer>\\boxed{3/4}</answer>", "<answer>\\boxed{1}</answer>"], [EX, EX]) == {
        "accuracy": [1.0, 0.0]}
