"""A trained policy leaves the run: ``policy/`` at the end of training, any saved step through
``load_denoiser`` / ``eval`` / ``sample`` / ``export --run``, and a clear refusal of the HF layout for
models it cannot hold.

Two 2-step runs of the tiny Sudoku model (learned absolute positions, as the embedded default), one with
LoRA and one with full fine-tuning, are shared by the tests. References are independent of the code under
test: the adapters are merged into the base with float64 NumPy from the raw train state.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import jax
import numpy as np
import pytest
from checkpoint_damage import overwrite_data
from test_rl_trainer import tiny_cfg

# The module trains tiny runs once (module fixture) and reads them in every test: whole runs.
pytestmark = pytest.mark.slow

from gdsd_jax.cli import main as cli
from gdsd_jax.loading import load_denoiser

STEPS = 2
MODEL = ("model.overrides={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 2, mlp_dim: 64, "
         "learned_positions: true}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two runs by kind, and under ``"console"`` what each printed (the full run evaluates every step)."""
    from gdsd_jax.rl.run import run_train

    out = {"console": {}}
    for name, extra in [("lora", ["lora.enabled=true", "lora.rank=8", "lora.alpha=4"]), ("full", ["eval.every=1"])]:
        run = tmp_path_factory.mktemp(name) / "run"
        with contextlib.redirect_stdout(io.StringIO()) as console:
            run_train(tiny_cfg(run, f"rl.total_steps={STEPS}", "optim.lr=0.003", MODEL, *extra), progress=False)
        out[name] = run
        out["console"][name] = console.getvalue()
    return out


def _state(run, step):
    from gdsd_jax.checkpoint.train_state import RunCheckpointer

    ck = RunCheckpointer(run / "checkpoints", async_save=False)
    state, meta = ck.restore_on_one_device(step), ck.read_meta(step)
    ck.close()
    return jax.tree.map(np.asarray, state["trainable"]), meta


def _reference_policy(run, step) -> dict:
    """Full parameters of ``step`` in float64 NumPy: trained weights, or base + (alpha / r) A B per layer."""
    from gdsd_jax.checkpoint.params_io import restore_params

    trainable, meta = _state(run, step)
    lora = meta["config"]["lora"]
    if not lora["enabled"]:
        return jax.tree.map(lambda x: x.astype(np.float64), trainable)
    base, _ = restore_params(run / "base")
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), base)
    for t, ab in trainable.items():
        a, b = ab["a"].astype(np.float64), ab["b"].astype(np.float64)
        w = params["layers"][t]
        for n in range(w.shape[0]):
            delta = a[n].reshape(-1, a.shape[-1]) @ b[n].reshape(b.shape[1], -1)
            w[n] += lora["alpha"] / lora["rank"] * delta.reshape(w.shape[1:])
    return params


def _assert_params_close(got, want, atol=1e-6):
    flat_got, flat_want = jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_flatten_with_path(want)[0]
    assert [p for p, _ in flat_got] == [p for p, _ in flat_want]
    for (path, g), (_, w) in zip(flat_got, flat_want):
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=0, atol=atol, err_msg=str(path))


def _moved(a, b) -> float:
    return max(float(np.abs(np.asarray(x, np.float64) - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_train_writes_the_merged_policy_at_the_end(runs, kind):
    from gdsd_jax.checkpoint.params_io import read_meta, restore_params

    run = runs[kind]
    meta = read_meta(run / "policy")
    assert meta["source"]["step"] == STEPS
    assert {leaf["dtype"] for leaf in meta["leaves"].values()} == {"float32"}      # the base's dtype
    params, cfg = restore_params(run / "policy")
    assert cfg.learned_positions and "pos_embed" in params
    _assert_params_close(params, _reference_policy(run, STEPS))
    assert not any(p.name.startswith(".") for p in run.iterdir())      # no leftover of the atomic write


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_load_denoiser_takes_a_run_directory_and_any_saved_step(runs, kind, tmp_path):
    run = runs[kind]
    latest = load_denoiser(run)
    _assert_params_close(latest.params(), _reference_policy(run, STEPS))
    first = load_denoiser(run, step=1)
    want1 = _reference_policy(run, 1)
    _assert_params_close(first.params(), want1)
    assert _moved(latest.params(), want1) > 1e-5               # steps 1 and 2 are different policies
    # Without policy/, the latest step comes from the train state alone.
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("policy"))
    _assert_params_close(load_denoiser(bare).params(), _reference_policy(run, STEPS))
    with pytest.raises(FileNotFoundError, match="no saved step 7"):
        load_denoiser(run, step=7)
    with pytest.raises(ValueError, match="not a run directory"):
        load_denoiser(run / "policy", step=1)


def test_export_a_saved_step_as_params_and_refuse_hf_for_learned_positions(runs, tmp_path, capsys):
    from gdsd_jax.checkpoint.params_io import read_meta, restore_params

    run = runs["lora"]
    out = tmp_path / "step1"
    assert cli(["export", "--run", str(run), "--step", "1", "--format", "params", "--out", str(out)]) == 0
    params, _ = restore_params(out)
    _assert_params_close(params, _reference_policy(run, 1))
    assert read_meta(out)["source"]["step"] == 1

    capsys.readouterr()
    hf = tmp_path / "hf"
    assert cli(["export", "--run", str(run), "--out", str(hf), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "learned absolute position" in err and "--format params" in err
    assert not hf.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["step1"]
    # the same refusal for a params checkpoint of such a model
    assert cli(["export", "--checkpoint", str(run / "policy"), "--out", str(hf), "--no-progress"]) == 1
    assert "learned absolute position" in capsys.readouterr().err and not hf.exists()


def test_eval_and_sample_take_a_run_directory(runs, tmp_path, capsys):
    run = runs["full"]
    out = tmp_path / "eval"
    assert cli(["eval", "--checkpoint", str(run), "--step", "1", "--task", "sudoku", "--max-examples", "8",
                "--batch-size", "8", "--output", str(out)]) == 0
    summary = json.loads((out / "eval_summary.json").read_text())
    assert summary["num_examples"] == 8
    capsys.readouterr()
    assert cli(["sample", "--checkpoint", str(run), "--prompt-ids", "1,2,3,4", "--gen-length", "4",
                "--steps", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_a_damaged_step_or_policy_is_refused_by_every_reader(runs, tmp_path, capsys):
    """export --run --step, eval --step, sample --step and load_denoiser check the save-time digests: a damaged
    step is refused with one line naming it and nothing is written (they used to export NaNs and exit 0)."""
    from gdsd_jax.checkpoint.integrity import CheckpointIntegrityError

    run = tmp_path / "run"
    shutil.copytree(runs["full"], run)
    overwrite_data(run / "checkpoints" / "1" / "state")
    capsys.readouterr()
    out = tmp_path / "out"
    commands = [
        ["export", "--run", str(run), "--step", "1", "--format", "params", "--out", str(out)],
        ["eval", "--checkpoint", str(run), "--step", "1", "--task", "sudoku", "--max-examples", "8",
         "--batch-size", "8", "--output", str(out)],
        ["sample", "--checkpoint", str(run), "--step", "1", "--prompt-ids", "1,2,3,4", "--gen-length", "4",
         "--steps", "4", "--output", str(out / "samples.jsonl")],
    ]
    for argv in commands:
        assert cli(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "checkpoint step 1: " in err, (argv, err)
        assert not out.exists(), argv
    with pytest.raises(CheckpointIntegrityError, match="checkpoint step 1: "):
        load_denoiser(run, step=1)
    load_denoiser(run, step=2)                              # the intact step still loads
    overwrite_data(run / "policy" / "params")
    with pytest.raises(CheckpointIntegrityError, match=f"checkpoint {run / 'policy'}: "):
        load_denoiser(run)


def test_eval_of_a_run_reproduces_its_final_metric_and_flags_override(runs, tmp_path):
    """``gdsd-jax eval --checkpoint RUN`` takes the run's task, split, examples and evaluation sampling (greedy,
    mask token banned, from its config) and gives exactly the final test reward and accuracy the run logged;
    a flag replaces one setting (here the mask-token ban, which this barely trained policy depends on)."""
    from gdsd_jax.training.metrics import read_metrics

    run = runs["full"]
    final = [r for r in read_metrics(run) if "test_reward" in r][-1]
    assert final["step"] == STEPS
    assert cli(["eval", "--checkpoint", str(run), "--output", str(tmp_path / "same")]) == 0
    summary = json.loads((tmp_path / "same" / "eval_summary.json").read_text())
    assert summary["num_examples"] == 16                                  # the run's eval.max_examples
    assert (summary["mean_reward"], summary["accuracy"]) == (final["test_reward"], final["test_accuracy"])
    assert summary == json.loads((run / "eval_final_summary.json").read_text())

    assert cli(["eval", "--checkpoint", str(run), "--no-ban-mask-token", "--output", str(tmp_path / "unbanned")]) == 0
    unbanned = [json.loads(x) for x in (tmp_path / "unbanned" / "eval.jsonl").read_text().splitlines()]
    assert len(unbanned) == 16
    assert any(6 in r["completion_ids"] for r in unbanned)                # the mask token (6) is drawn now


def test_every_evaluation_leaves_a_line_on_the_console_and_the_run_ends_with_a_summary(runs):
    """One line per evaluation (step 0, each eval.every, the final one) with the logged numbers, then the
    before/after table of test reward and accuracy."""
    from gdsd_jax.training.metrics import read_metrics

    console = runs["console"]["full"]
    evals = [r for r in read_metrics(runs["full"]) if "test_reward" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    for r, final in zip(evals, (False, False, True)):
        line = (f"step {r['step']}{' (final)' if final else ''}: test reward {r['test_reward']:.3f}, "
                f"accuracy {r['test_accuracy']:.3f} (16 examples)")
        assert line in console.splitlines(), console
    first, last = evals[0], evals[-1]
    assert (f"| after gdsd | {last['test_reward']:.3f} | {last['test_accuracy']:.3f} |") in console
    assert f"| before (warm start) | {first['test_reward']:.3f} | {first['test_accuracy']:.3f} |" in console
    assert console.rstrip().endswith(f"test_reward: {first['test_reward']:.3f} -> {last['test_reward']:.3f}")
