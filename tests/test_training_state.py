"""Training state: non-finite updates are never applied or saved, restored checkpoints are verified against
save-time digests (a damaged step falls back to the newest intact one), metrics files cut short by a crash
still resume and plot, and the checkpoint settings that would lose every checkpoint are refused."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdsd_jax.checkpoint.integrity import state_digests
from gdsd_jax.checkpoint.train_state import CheckpointIntegrityError, RunCheckpointer, abstract_like, written_bytes
from gdsd_jax.config_io import ConfigError, load_config
from gdsd_jax.training.config import TrainConfig
from tests.checkpoint_damage import overwrite_data
from tests.test_rl_trainer import REPO, TINY, _final_trainable, _metrics, _trainer, tiny_cfg

# ---- the digest ---------------------------------------------------------------------------------

def _np_fmix32(h: np.ndarray) -> np.ndarray:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _np_digest(x: np.ndarray) -> str:
    """The documented digest, element by element in NumPy ``uint32`` arithmetic (an independent reference)."""
    bits = x.view(np.dtype(f"uint{x.dtype.itemsize * 8}")).astype(np.uint32).ravel()
    index = np.arange(bits.size, dtype=np.uint32)
    sums = [int(_np_fmix32(bits ^ _np_fmix32(index * np.uint32(0x9E3779B9) + np.uint32(seed))).sum(dtype=np.uint32))
            for seed in (0x243F6A88, 0x85A308D3)]
    return f"{sums[0]:08x}{sums[1]:08x}"


def test_digest_matches_a_numpy_reference_on_any_layout():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    x = np.asarray(jax.random.normal(jax.random.key(0), (16, 24)))
    tree = {"f32": x, "bf16": x.astype(jnp.bfloat16), "i32": np.arange(-5, 30, dtype=np.int32),
            "scalar": np.float32(2.5), "key": np.asarray(jax.random.key_data(jax.random.key(3)))}
    expected = {k: _np_digest(np.asarray(v).reshape(np.shape(v))) for k, v in tree.items()}
    got, nonfinite = state_digests(jax.tree.map(jnp.asarray, tree))
    assert got == expected and nonfinite == []
    # Sharded over a 2 x 4 mesh: each device sums its block; the wrap-around sum does not depend on the order.
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    sharded = dict(tree, f32=jax.device_put(x, NamedSharding(mesh, P("a", "b"))),
                   bf16=jax.device_put(tree["bf16"], NamedSharding(mesh, P("b", None))))
    assert state_digests(sharded)[0] == expected
    # One ulp in one element, or two rows swapped, changes the digest.
    y = x.copy()
    y[3, 5] = np.nextafter(y[3, 5], np.float32(10))
    assert state_digests({"f32": y})[0]["f32"] != expected["f32"]
    assert state_digests({"f32": x[[1, 0, *range(2, 16)]]})[0]["f32"] != expected["f32"]
    assert state_digests(dict(tree, scalar=np.float32(np.inf)))[1] == ["scalar"]


# ---- non-finite updates (an overflowing learning rate) --------------------------------------------

def test_update_with_finite_loss_but_overflowing_step_is_not_applied(tmp_path):
    """lr = 1e39 (inf in fp32): loss and gradient are finite, the updated parameters are not. The update is
    counted as non-finite and the parameters and optimizer state stay exactly as they were."""
    from gdsd_jax.rl.trainer import RLTrainer

    cfg, trainer, task = _trainer(tmp_path)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=1e39))
    trainer = RLTrainer(cfg, trainer.model_cfg, trainer._base_params, trainer.mesh, trainer.adapter, task)
    state, frozen = trainer.init_state()
    before = jax.tree.map(np.asarray, (state["trainable"], state["opt_state"]))
    new_state, m = trainer.rl_step(state, frozen, list(task.examples("train"))[:4])
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["nonfinite_updates"] == 1
    after = jax.tree.map(np.asarray, (new_state["trainable"], new_state["opt_state"]))
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("every", [1, 2])
def test_nonfinite_stop_saves_only_finite_state_and_says_what_exists(tmp_path, monkeypatch, every):
    """Every update overflows (an optimizer step scaled by 1e39); the run stops after 2 such steps. With
    ``checkpoint.every=1`` step 1 was saved, with the finite initial state, and the message names it; with
    ``every=2`` nothing was saved and the message says so instead of claiming an intact checkpoint."""
    import optax

    from gdsd_jax.rl import trainer as trainer_mod
    from gdsd_jax.rl.run import run_train

    original = trainer_mod.make_optimizer
    monkeypatch.setattr(trainer_mod, "make_optimizer",
                        lambda *a, **k: optax.chain(original(*a, **k), optax.scale(1e39)))
    cfg = tiny_cfg(tmp_path, "rl.max_nonfinite_in_a_row=2", f"checkpoint.every={every}")
    with pytest.raises(trainer_mod.NonFiniteError) as err:
        run_train(cfg, progress=False)
    message = str(err.value)
    assert "2 steps in a row" in message and "at step 2" in message and "intact" not in message
    ck = RunCheckpointer(tmp_path / "checkpoints")
    if every == 2:
        assert ck.all_steps() == [] and "no checkpoint was written" in message
        return
    assert ck.all_steps() == [1] and "newest checkpoint is step 1" in message
    saved = jax.tree.map(np.asarray, ck.restore_on_one_device(1))
    ck.close()
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(saved) if np.issubdtype(x.dtype, np.floating))


def test_checkpointer_refuses_to_save_a_nonfinite_state(tmp_path):
    ck = RunCheckpointer(tmp_path / "ck", async_save=False)
    with pytest.raises(ValueError, match=r"refusing to save checkpoint step 1 .*non-finite values in b/w"):
        ck.save(1, {"a": jnp.ones(3), "b": {"w": jnp.array([1.0, jnp.nan])}}, {})
    assert ck.all_steps() == []
    ck.close()


def test_written_bytes_counts_one_copy_of_each_shard():
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((len(jax.devices()),), ("d",))
    sharded = jax.device_put(jnp.zeros((len(jax.devices()), 4), jnp.float32), NamedSharding(mesh, PartitionSpec("d")))
    replicated = jax.device_put(jnp.zeros(3, jnp.float32), NamedSharding(mesh, PartitionSpec()))
    state = {"w": sharded, "r": replicated, "n": np.zeros(5, np.int32)}
    assert written_bytes(state) == len(jax.devices()) * 4 * 4 + 3 * 4 + 5 * 4


def test_a_save_that_cannot_fit_on_the_disk_writes_nothing(tmp_path, monkeypatch):
    import errno

    from gdsd_jax.checkpoint import train_state

    ck = RunCheckpointer(tmp_path / "ck", async_save=False)
    ck.save(1, _state(1), {"i": 1})
    need = written_bytes(_state(2))
    real = shutil.disk_usage
    monkeypatch.setattr(train_state.shutil, "disk_usage", lambda p: real(p)._replace(free=need - 1))
    with pytest.raises(OSError, match=r"checkpoint step 2 needs .* MiB free") as info:
        ck.save(2, _state(2), {"i": 2})
    assert info.value.errno == errno.ENOSPC and info.value.filename.endswith("2")
    monkeypatch.setattr(train_state.shutil, "disk_usage", lambda p: real(p)._replace(free=need))
    ck.save(3, _state(3), {"i": 3})
    assert ck.all_steps() == [1, 3] and not (tmp_path / "ck" / "2").exists()
    ck.close()


# ---- damaged checkpoints: verification and fallback ------------------------------------------------

def _state(i: int) -> dict:
    return {"w": jnp.arange(50_000, dtype=jnp.float32) * (i + 1), "b": jnp.full((7, 3), i, jnp.bfloat16),
            "n": jnp.int32(i)}


def _largest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _damage(step_dir: Path, kind: str) -> None:
    """What a failing disk, an interrupted copy or a stray edit leaves behind in a committed step."""
    big = _largest_file(step_dir / "state")
    if kind == "overwrite_4k":
        overwrite_data(step_dir / "state")
    elif kind == "truncate":
        with open(big, "r+b") as f:
            f.truncate(big.stat().st_size // 2)
    elif kind == "delete":
        big.unlink()
    elif kind == "delete_meta":
        (step_dir / "meta" / "metadata").unlink()
    elif kind == "truncate_meta":
        p = step_dir / "meta" / "metadata"
        p.write_bytes(p.read_bytes()[:40])
    elif kind == "edit_meta":            # still valid JSON, one value changed
        p = step_dir / "meta" / "metadata"
        p.write_text(p.read_text().replace('"i": 3', '"i": 7'))
    elif kind == "truncate_state_metadata":
        p = step_dir / "state" / "_METADATA"
        p.write_bytes(p.read_bytes()[:100])
    else:
        raise AssertionError(kind)


def _three_steps(directory: Path) -> None:
    ck = RunCheckpointer(directory, keep=5, async_save=False)
    for i in (1, 2, 3):
        ck.save(i, _state(i), {"i": i, "config": {"x": [1, 2]}})
    ck.close()


@pytest.mark.parametrize("kind", ["overwrite_4k", "truncate", "delete", "delete_meta", "truncate_meta", "edit_meta",
                                  "truncate_state_metadata"])
def test_damaged_newest_step_falls_back_to_the_previous_one(tmp_path, kind):
    d = tmp_path / "ck"
    _three_steps(d)
    _damage(d / "3", kind)
    ck = RunCheckpointer(d, keep=5, async_save=False)
    with pytest.raises(CheckpointIntegrityError, match="checkpoint step 3: "):
        ck.restore(3, abstract_like(_state(0)))
    restored = ck.restore_newest_intact(abstract_like(_state(0)))
    assert restored.step == 2 and restored.meta == {"i": 2, "config": {"x": [1, 2]}}
    for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(_state(2))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    [(step, reason, moved)] = restored.rejected
    assert step == 3 and "\n" not in reason and len(reason) < 300
    # The damaged step is kept for inspection, out of the way of the run, which writes step 3 again.
    assert Path(moved) == tmp_path / "ck.rejected" / "3" and Path(moved).is_dir()
    assert ck.all_steps() == [1, 2]
    ck.save(3, _state(3), {"i": 3})
    assert ck.restore(3, abstract_like(_state(0)))[1] == {"i": 3}
    ck.close()


def test_every_step_damaged_is_one_error_naming_each(tmp_path):
    d = tmp_path / "ck"
    _three_steps(d)
    for step, kind in ((3, "delete"), (2, "overwrite_4k"), (1, "truncate_meta")):
        _damage(d / str(step), kind)
    ck = RunCheckpointer(d, async_save=False)
    with pytest.raises(CheckpointIntegrityError, match=r"no intact checkpoint in .*step 3: unreadable .*; "
                                                        r"step 2: .*; step 1: unreadable \(JSONDecodeError"):
        ck.restore_newest_intact(abstract_like(_state(0)))
    assert ck.all_steps() == [1, 2, 3]           # nothing moved when there is nothing to resume from
    ck.close()


def test_every_read_of_a_damaged_step_refuses_it(tmp_path):
    """Export, eval and sampling read a step through ``restore_trainable`` / ``restore_on_one_device``: both
    check the save-time digests like a resume does (they used to return the damaged values)."""
    d = tmp_path / "ck"
    ck = RunCheckpointer(d, keep=5, async_save=False)
    states = {i: {"trainable": {"w": _state(i)["w"]}, "opt": {"m": _state(i)["b"]}} for i in (1, 2)}
    for i, st in states.items():
        ck.save(i, st, {"i": i})
    ck.close()
    overwrite_data(d / "2" / "state")
    ck = RunCheckpointer(d, keep=5, async_save=False)
    for read in (lambda: ck.restore_trainable(2), lambda: ck.restore_on_one_device(2)):
        with pytest.raises(CheckpointIntegrityError, match=r"^checkpoint step 2: (trainable/w .*differs from its "
                                                           r"save-time digest|unreadable)"):
            read()
    np.testing.assert_array_equal(np.asarray(ck.restore_trainable(1)["w"]), np.asarray(states[1]["trainable"]["w"]))
    np.testing.assert_array_equal(np.asarray(ck.restore_on_one_device(1)["opt"]["m"]),
                                  np.asarray(states[1]["opt"]["m"]))
    ck.close()


def test_params_checkpoint_reads_check_the_save_time_digests(tmp_path):
    """``restore_params`` (load_denoiser, the policy, the warm-start cache) and ``load_leaf_numpy`` (export)
    compare what they read with the digests recorded at save time."""
    from gdsd_jax.checkpoint.params_io import load_leaf_numpy, read_meta, restore_params, save_params
    from gdsd_jax.models.config import tiny_llada
    from gdsd_jax.models.denoiser import init_params

    cfg = tiny_llada()
    params = init_params(cfg, jax.random.key(0))
    good, bad = save_params(tmp_path / "good", params, cfg), save_params(tmp_path / "bad", params, cfg)
    assert all(len(v["digest"]) == 16 for v in read_meta(good)["leaves"].values())
    overwrite_data(bad / "params")
    with pytest.raises(CheckpointIntegrityError, match=rf"^checkpoint {bad}: "):
        restore_params(bad)
    damaged = [leaf for leaf in (("embed",), ("layers", "q"), ("layers", "up"))
               if not _reads(lambda leaf=leaf: load_leaf_numpy(bad, leaf))]
    assert damaged, "no leaf read from the damaged checkpoint was refused"
    restored, _ = restore_params(good)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, params)
    as_bf16, bf16_cfg = restore_params(good, dtype="bfloat16")   # checked in the stored dtype, then cast
    assert bf16_cfg.param_dtype == "bfloat16" and as_bf16["layers"]["q"].dtype == jnp.bfloat16


def _reads(read) -> bool:
    try:
        read()
        return True
    except CheckpointIntegrityError:
        return False


def _save_without_digests(directory: Path, step: int, state: dict, meta: dict) -> None:
    """A step as checkpoints were written before digests were recorded (the same Orbax items, no record)."""
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager(directory, item_names=("state", "meta"),
                                 item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                "meta": ocp.JsonCheckpointHandler()})
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()
    mngr.close()


def test_step_saved_without_digests_is_checked_for_finite_values(tmp_path):
    d = tmp_path / "ck"
    _save_without_digests(d, 1, _state(1), {"i": 1})
    _save_without_digests(d, 2, dict(_state(2), w=_state(2)["w"].at[7].set(jnp.nan)), {"i": 2})
    ck = RunCheckpointer(d, async_save=False)
    restored = ck.restore_newest_intact(abstract_like(_state(0)))
    assert restored.step == 1 and restored.meta == {"i": 1}
    assert restored.rejected[0][:2] == (2, "non-finite values in w")
    ck.close()


# ---- damaged checkpoints: a real run resumes from the newest intact step ------------------------------

@pytest.fixture(scope="module")
def three_step_run(tmp_path_factory):
    """A 3-step tiny run with a checkpoint after every step (reference for the resumes below)."""
    from gdsd_jax.rl.run import run_train

    run = tmp_path_factory.mktemp("run") / "run"
    run_train(tiny_cfg(run, "rl.total_steps=3"), progress=False)
    return run


def test_the_run_records_the_execution_paths_it_chose(three_step_run):
    """The model config keeps ``auto`` (a saved policy stays portable across backends); the checkpoint
    metadata records what this CPU run resolved it to."""
    ck = RunCheckpointer(three_step_run / "checkpoints")
    _, meta = ck.newest_meta()
    ck.close()
    assert meta["model_config"]["attention_impl"] == "auto"
    execution = meta["execution"]
    assert execution["platform"] == "cpu"
    assert (execution["attention_impl"], execution["merge_projections"], execution["merge_token_dims"]) == \
        ("custom_vjp", True, True)
    assert execution["scan_layers"] == meta["model_config"]["scan_layers"]


def _copy_run(src: Path, dst: Path) -> Path:
    """A copy of the run as if it had stopped before its final evaluation (a resume of a run whose final
    evaluation is written does nothing)."""
    shutil.copytree(src, dst)
    (dst / "eval_final_summary.json").unlink()
    return dst


@pytest.mark.parametrize("kind", ["overwrite_4k", "delete"])
def test_resume_from_a_damaged_newest_checkpoint_uses_the_previous_one_bitwise(three_step_run, tmp_path, capsys,
                                                                                kind):
    """Step 3 of a run stopped before its final evaluation is damaged: --resume says so in one line naming steps 3 and 2, replays step 3
    from step 2, and ends with exactly the parameters and metrics of the undamaged run."""
    from gdsd_jax.rl.run import run_train

    run = _copy_run(three_step_run, tmp_path / "run")
    _damage(run / "checkpoints" / "3", kind)
    capsys.readouterr()
    run_train(tiny_cfg(run, "rl.total_steps=3"), resume=True, progress=False)
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if "rejected" in x]
    assert len(lines) == 1, out
    line = lines[0]
    assert line.startswith("checkpoint step 3 rejected (") and "resuming from step 2 instead" in line
    assert "resumed from step 2" in out
    assert (run / "checkpoints.rejected" / "3").is_dir()
    s1, a = _final_trainable(three_step_run)
    s2, b = _final_trainable(run)
    assert s1 == s2 == 3
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert _metrics(run / "metrics.jsonl") == _metrics(three_step_run / "metrics.jsonl")


def test_resume_with_every_step_damaged_is_one_line(three_step_run, tmp_path, capsys):
    """Nothing to resume from: one line naming each damaged step (it used to be a 24-line traceback), and
    the damaged steps stay where they are."""
    from gdsd_jax.cli import main as cli

    run = _copy_run(three_step_run, tmp_path / "run")
    for step in (1, 2, 3):
        overwrite_data(run / "checkpoints" / str(step) / "state")
    capsys.readouterr()
    code = cli(["train", "--config", str(REPO / "configs/sudoku_tiny.yaml"), "--resume", "--no-progress",
                "--output-dir", str(run), *TINY, "rl.total_steps=3"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("gdsd-jax train: error: no intact checkpoint in ") and "step 3: " in err[0]
    assert "step 2: " in err[0] and "step 1: " in err[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["1", "2", "3"]


# ---- metrics.jsonl cut short by a crash ------------------------------------------------------------

def _write_cut_short(path: Path) -> None:
    path.write_text(json.dumps({"step": 0, "test_reward": 0.25}) + "\n" + json.dumps({"step": 1, "reward_mean": 0.5})
                    + "\n" + json.dumps({"step": 2, "reward_mean": 0.75})[:17])


def test_metrics_cut_short_resume_and_plot(tmp_path, capsys):
    from gdsd_jax.experiments.plots import plot_run
    from gdsd_jax.training.metrics import MetricsLogger, read_metrics

    path = tmp_path / "metrics.jsonl"
    _write_cut_short(path)
    assert read_metrics(tmp_path) == [{"step": 0, "test_reward": 0.25}, {"step": 1, "reward_mean": 0.5}]
    assert "line 3: incomplete last record" in capsys.readouterr().err
    assert [p.name for p in plot_run(tmp_path)] == ["reward.png", "diagnostics.png"]
    # Resuming from step 1 keeps steps <= 1, drops the partial line, and appends after a complete line.
    logger = MetricsLogger(tmp_path, tensorboard=False, resume_step=1)
    logger.log(2, {"reward_mean": 0.875})
    logger.close()
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"step": 0, "test_reward": 0.25}, {"step": 1, "reward_mean": 0.5}, {"step": 2, "reward_mean": 0.875}]


def test_metrics_damaged_before_the_last_line_is_named(tmp_path):
    from gdsd_jax.training.metrics import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "x\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a JSON record"):
        read_metrics(tmp_path)


# ---- settings that would lose every checkpoint or stop every run --------------------------------------

@pytest.mark.parametrize("override,message", [
    ("checkpoint.keep=0", r"checkpoint\.keep=0: expected an integer >= 1"),
    ("rl.max_nonfinite_in_a_row=0", r"rl\.max_nonfinite_in_a_row=0: expected an integer >= 1"),
])
def test_settings_that_lose_checkpoints_or_stop_every_run_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, REPO / "configs/sudoku_tiny.yaml", [override]).validate()
