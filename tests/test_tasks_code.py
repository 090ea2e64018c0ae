"""Code task: loader, official format reward branches, pass rate through the sandbox, prompts."""

import json

import pytest

from gdsd_jax.tasks import code as K
from gdsd_jax.tasks import get_task, score_batch
from gdsd_jax.tasks.files import DataError
from gdsd_jax.tasks.sandbox import SandboxConfig

pytestmark = pytest.mark.timeout(120)

EX = {"question": "Write add(a, b).", "test_cases": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}


def _block(code, before="Here is the code:\n", after=""):
    return f"{before}```python\n{code}\n```{after}"


@pytest.mark.parametrize("text, expected", [
    (_block("def add(a, b):\n    return a + b"), 1.0),
    (_block("def add(a, b):\n    return a + b", after="\n"), 1.0),            # one trailing newline allowed
    (_block("def add(a, b):\n    return a + b", before=""), 1.0),             # no text before
    (_block("def add(a, b)\n    return a + b"), 0.5),                         # SyntaxError
    (_block("x = 1", after="\nmore text"), 0.0),                              # block not last
    (_block("x = 1") + "\n" + _block("y = 2", before=""), 0.0),               # two blocks
    ("```\nx = 1\n```", 0.0),                                                 # no language
    ("def add(a, b): return a + b", 0.0),                                     # no block
    ("```python\nx = 1", 0.0),                                                # unclosed
    ("", 0.0),
])
def test_format_reward(text, expected):
    assert K.code_format_reward([text], [EX]) == [expected]


def test_pass_rate_and_score_batch():
    task = get_task("code", sandbox_config=SandboxConfig(timeout_s=1.0, num_workers=2))
    texts = [
        _block("def add(a, b):\n    return a + b"),                          # both tests pass
        _block("def add(a, b):\n    return abs(a) + b"),                     # only the first passes
        _block("import os\ndef add(a, b):\n    return a + b"),               # banned import: not run
        _block("def add(a, b)\n    return a + b"),                           # format 0.5: not run
        "def add(a, b): return a + b",                                        # no block
        _block("def add(a, b):\n    while True: pass"),                      # times out
    ]
    total, per_fn, failures = score_batch(task, texts, [EX] * len(texts))
    assert per_fn["code_format"].tolist() == [1.0, 1.0, 1.0, 0.5, 0.0, 1.0]
    assert per_fn["code_pass_rate"].tolist() == [1.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert total.tolist() == [2.0, 1.5, 1.0, 0.5, 0.0, 1.0]
    assert failures == 0
    assert task.eval_metrics(texts[:2], [EX, EX]) == {"accuracy": [1.0, 0.0], "pass_rate": [1.0, 0.5]}


def test_prompt():
    task = get_task("code")
    msgs = task.prompt_messages(EX)
    assert msgs[0] == {"role": "system", "content": K.SYSTEM_PROMPT}
    assert msgs[1] == {"role": "user", "content": "Write add(a, b).\nTest cases: assert add(1, 2) == 3"}
    fenced = {"question": "Fix:\n```\nx\n```\nplease", "test_cases": ["assert 1"]}
    assert task.prompt_messages(fenced)[1]["content"] == fenced["question"]


@pytest.mark.parametrize("row, column, message", [
    ({"question": "q"}, "test_cases", "missing"),
    ({"question": "q", "test_cases": []}, "test_cases", "empty list"),
    ({"question": "q", "test_cases": "assert 1"}, "test_cases", "list of strings"),
    ({"question": "q", "test_cases": ["assert 1", 2]}, "test_cases", "item 1"),
    ({"question": 5, "test_cases": ["assert 1"]}, "question", "string"),
])
def test_bad_rows(tmp_path, row, column, message):
    p = tmp_path / "code.jsonl"
    p.write_text(json.dumps(EX) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message) as err:
        K.load_code(p)
    assert (err.value.path, err.value.row, err.value.column) == (str(p), 2, column)


def test_loader(tmp_path):
    p = tmp_path / "code.jsonl"
    p.write_text(json.dumps(EX) + "\n")
    assert get_task("code", train_file=p).examples("train") == [EX]
    with pytest.raises(ValueError, match="not bundled"):
        get_task("code").examples("train")
