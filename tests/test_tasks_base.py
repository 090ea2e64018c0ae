"""Task registry and score_batch (weighted sum, per-function arrays, failure counting)."""

import numpy as np
import pytest

from gdsd_jax.tasks import Task, WeightedReward, get_task, score_batch, task_names
from gdsd_jax.tasks.base import per_completion


def test_registry():
    assert task_names() == ["code", "countdown", "gsm8k", "math", "sudoku"]
    for name in task_names():
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name and task.rewards()
    with pytest.raises(ValueError, match="unknown task 'chess'"):
        get_task("chess")
    assert get_task("sudoku").supports_compact and get_task("countdown").supports_compact
    assert not get_task("gsm8k").supports_compact
    with pytest.raises(NotImplementedError):
        get_task("gsm8k").compact_prompt({})


class _Fake(Task):
    name = "fake"

    def rewards(self):
        def length(c, e):
            return [float(len(x)) for x in c]

        def picky(c, e):
            if any(x == "boom" for x in c):
                raise RuntimeError("boom")
            return [1.0] * len(c)

        def wrong_length(c, e):
            return [1.0] * (len(c) + 1) if len(c) > 1 else [2.0]

        def nan(c, e):
            return [float("nan") if x == "nan" else 0.5 for x in c]

        return [WeightedReward("length", length, 0.5), WeightedReward("picky", picky),
                WeightedReward("wrong_length", wrong_length), WeightedReward("nan", nan, 2.0)]


def test_score_batch_localises_failures():
    completions = ["ab", "boom", "nan", "abcd"]
    total, per_fn, failures = score_batch(_Fake(), completions, [{}] * 4)
    np.testing.assert_array_equal(per_fn["length"], [2, 4, 3, 4])
    np.testing.assert_array_equal(per_fn["picky"], [1, 0, 1, 1])          # only "boom" fails
    np.testing.assert_array_equal(per_fn["wrong_length"], [2, 2, 2, 2])   # batch result rejected, singles fine
    np.testing.assert_array_equal(per_fn["nan"], [0.5, 0.5, 0, 0.5])      # the NaN one fails
    # weighted sum: 0.5 * length + picky + wrong_length + 2 * nan
    np.testing.assert_allclose(total, [1 + 1 + 2 + 1, 2 + 0 + 2 + 1, 1.5 + 1 + 2 + 0, 2 + 1 + 2 + 1])
    assert failures == 2 and total.dtype == np.float32
    with pytest.raises(ValueError, match="2 completions but 1 examples"):
        score_batch(_Fake(), ["a", "b"], [{}])


def test_per_completion_scores_a_raising_pair_zero_and_keeps_the_others():
    def ratio(text, example):
        """characters per unit"""
        return len(text) // example["units"]  # an int: the batch function gives floats

    fn = per_completion(ratio)
    out = fn(["abcd", "ab", None, "abc"], [{"units": 2}, {"units": 0}, {"units": 1}, {}])
    assert out == [2.0, 0.0, 0.0, 0.0] and all(type(v) is float for v in out)
    assert (fn.__name__, fn.__doc__) == ("ratio", "characters per unit")


def test_shipped_file_command_checks_and_regenerates(tmp_path, capsys):
    from gdsd_jax.tasks.files import shipped_file_main

    shipped = tmp_path / "set.csv"
    shipped.write_bytes(b"header\na\nb\n")
    run = lambda argv, data: shipped_file_main(argv, prog="t", description="t",  # noqa: E731
                                               files={"test": (lambda: data, shipped)}, unit="rows",
                                               header_lines=1)
    assert run(["--check"], b"header\na\nb\n") == 0
    assert "identical" in capsys.readouterr().out
    assert run(["--check"], b"header\na\nc\n") == 1                   # a generator change is caught
    assert "DIFFERS" in capsys.readouterr().out
    assert shipped.read_bytes() == b"header\na\nb\n"                  # --check never writes
    out = tmp_path / "new.csv"
    assert run(["--regenerate", "--out", str(out)], b"header\nx\ny\nz\n") == 0
    assert out.read_bytes() == b"header\nx\ny\nz\n" and "(3 rows)" in capsys.readouterr().out
    with pytest.raises(SystemExit):                                     # exactly one of the two modes
        run([], b"")
    other = tmp_path / "valid.csv"
    other.write_bytes(b"header\nv\n")
    two = {"test": (lambda: b"header\na\nb\n", shipped), "validation": (lambda: b"header\nw\n", other)}
    assert shipped_file_main(["--check", "--split", "validation"], prog="t", description="t", files=two,
                             unit="rows") == 1                          # checks the named split's file
    assert shipped_file_main(["--regenerate", "--split", "validation"], prog="t", description="t", files=two,
                             unit="rows") == 0
    assert other.read_bytes() == b"header\nw\n" and shipped.read_bytes() == b"header\na\nb\n"
