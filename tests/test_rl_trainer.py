"""The RL trainer: configs, exact gradient accumulation, LoRA, non-finite handling, bitwise resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from checkpoint_damage import overwrite_data

from gdsd_jax.config_io import ConfigError, load_config
from gdsd_jax.objectives.config import CONFIG_CLASSES
from gdsd_jax.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "model.overrides={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 2, mlp_dim: 64}",
    "warm_start.mode=none", "rl.prompts_per_step=4", "rl.num_generations=4", "rl.micro_batch_size=8",
    "rl.total_steps=6", "eval.every=0", "eval.max_examples=16", "eval.batch_size=16", "checkpoint.every=1",
    "checkpoint.keep=10", "checkpoint.async_save=false", "tensorboard=false",
    # The mechanics tested here do not depend on the default's RL recipe; pin the plain on-policy one so the
    # tests do not change when the tiny default is retuned (tests that need mu > 1 say so).
    "rl.num_iterations=1", "optim.lr=1e-4", "optim.schedule=constant", "objective.psi=1.0",
    # Rollouts without the mask token: the random tiny model draws it often, which puts gradient entries near
    # AdamW's eps, where the first update amplifies float rounding beyond the exactness tests' tolerances.
    "sampling.ban_mask_token=true",
    "objective.clip_mode=sequence", "rl.rollout_prompts_per_step=null",
]


def tiny_cfg(tmp_path, *extra) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs/sudoku_tiny.yaml",
                       TINY + [f"output_dir={tmp_path}"] + list(extra)).validate()


# ---- configs ------------------------------------------------------------------------------------

def test_a_negative_warmup_is_named():
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps=-1: expected an integer >= 0"):
        load_config(TrainConfig, REPO / "configs/sudoku_tiny.yaml", ["optim.warmup_steps=-1"]).validate()


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"rl\.num_generation"):
        load_config(TrainConfig, REPO / "configs/sudoku_tiny.yaml", ["rl.num_generation=4"])


@pytest.mark.parametrize("key", ["rl.reference_refresh_every=10", "task.system_prompt=false"])
def test_removed_key_is_named(key):
    """Keys nothing reads any more stop the run naming the key, instead of being accepted silently."""
    name = key.split("=")[0]
    with pytest.raises(ConfigError, match=rf"'{name}' was removed .*delete it"):
        load_config(TrainConfig, REPO / "configs/sudoku_tiny.yaml", [key])


def test_every_config_key_is_read():
    """Every field of the run config's sections is read somewhere in the package (no accepted-but-ignored key)."""
    import ast
    import dataclasses

    read = set()
    for path in (REPO / "gdsd_jax").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):          # the run config's validation alone does not count as a use
            if isinstance(node, ast.FunctionDef) and node.name == "validate":
                node.body = []
        read |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    sections = [(s.name, s.default) for s in dataclasses.fields(TrainConfig) if dataclasses.is_dataclass(s.default)]
    sections += [(f"objective[{name}]", cls) for name, cls in CONFIG_CLASSES.items()]   # every method's settings
    unread = [f"{name}.{f.name}" for name, section in sections for f in dataclasses.fields(section)
              if f.name not in read]
    assert not unread, f"run-config keys never read: {unread}"


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"rl\.total_steps"):
        load_config(TrainConfig, REPO / "configs/sudoku_tiny.yaml", ["rl.total_steps=many"])
    with pytest.raises(ConfigError, match="objective"):
        load_config(TrainConfig, REPO / "configs/sudoku_tiny.yaml", ["objective.name=nope"]).validate()
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(TrainConfig, REPO / "configs/sudoku_tiny.yaml", ["rl.micro_batch_size=7"]).validate()


def test_fast_decoding_options_reach_the_samplers():
    cfg = load_config(TrainConfig, REPO / "configs/sudoku_tiny.yaml",
                      ["sampling.cache=dual", "sampling.block_length=8", "sampling.cache_refresh_every=2",
                       "eval.sampling={threshold: 0.9}"]).validate()
    rollout, evaluation = cfg.sampling, cfg.eval_sampling_config()
    assert (rollout.cache, rollout.cache_refresh_every, rollout.threshold) == ("dual", 2, None)
    assert (evaluation.cache, evaluation.threshold) == ("dual", 0.9)
    with pytest.raises(ConfigError, match=r"sampling: SamplingConfig\.threshold=1\.5"):
        load_config(TrainConfig, REPO / "configs/sudoku_tiny.yaml", ["sampling.threshold=1.5"]).validate()
    cfg = load_config(TrainConfig, REPO / "configs/sudoku_tiny.yaml", ["sampling.factor=0.5"]).validate()
    assert (cfg.sampling.factor, cfg.sampling.blockwise, cfg.eval_sampling_config().factor) == (0.5, True, 0.5)
    with pytest.raises(ConfigError, match=r"sampling: SamplingConfig\.factor=0\.5: expected None when threshold"):
        load_config(TrainConfig, REPO / "configs/sudoku_tiny.yaml",
                    ["sampling.factor=0.5", "sampling.threshold=0.9"]).validate()


def test_overrides_parse_yaml_values():
    cfg = load_config(TrainConfig, REPO / "configs/sudoku_tiny.yaml",
                      ["optim.lr=3e-6", "lora.targets=[q,v]", "lora.enabled=true"])
    assert cfg.optim.lr == pytest.approx(3e-6)
    assert cfg.lora.targets == ("q", "v") and cfg.lora.enabled is True


RECIPES = sorted(p.name for p in (REPO / "configs").glob("*_[0-9]*b_*.yaml"))


def test_all_recipes_present():
    expected = {f"llada_8b_{t}.yaml" for t in ("gsm8k", "math", "sudoku", "countdown", "code")}
    expected |= {f"dream_7b_{t}.yaml" for t in ("sudoku", "countdown")}
    assert expected <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_dream_recipes_sample_top_50_as_the_official_runs(name):
    """Official Dream rollouts and evaluations run top-50 filtered (transformers 4.x's default top_k reaches
    diffusion_generate, official_eval.md §5); LLaDA's sampler has no top-k."""
    cfg = load_config(TrainConfig, REPO / "configs" / name).validate()
    want = 50 if name.startswith("dream") else None
    assert cfg.sampling.top_k == want and cfg.eval_sampling_config().top_k == want


def test_eval_command_gives_dream_models_the_official_top_k():
    from gdsd_jax.commands.eval import eval_top_k

    assert eval_top_k(None, "dream") == 50 and eval_top_k(None, "llada") is None
    assert eval_top_k(0, "dream") is None and eval_top_k(20, "dream") == 20 and eval_top_k(20, "llada") == 20


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_train_step_shapes(name):
    """Every recipe validates and its real update step traces on an abstract 8-device mesh (no weights)."""
    from gdsd_jax.distributed.mesh import make_mesh, parse_mesh_spec
    from gdsd_jax.models.config import dream_7b, llada_8b
    from gdsd_jax.models.denoiser import abstract_params
    from gdsd_jax.objectives.types import RolloutBatch
    from gdsd_jax.rl.trainer import RLTrainer

    cfg = load_config(TrainConfig, REPO / "configs" / name).validate()
    # The task section must construct its task (data files are user-supplied, so they are not read here).
    from gdsd_jax.tasks.base import get_task
    get_task(cfg.task.name, **cfg.task.kwargs)
    mesh = make_mesh(**parse_mesh_spec(cfg.distributed.mesh))
    base = (llada_8b if name.startswith("llada") else dream_7b)(**cfg.model.overrides)
    params = abstract_params(base, mesh)
    trainer = RLTrainer(cfg, base, params, mesh, adapter=None, task=None)
    state, frozen = jax.eval_shape(trainer.init_state)
    rows, lp, lg = trainer.rows, cfg.task.prompt_length, trainer.sampling_cfg.gen_length
    i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    batch = RolloutBatch(sequences=i32(rows, lp + lg), prompt_mask=i32(rows, lp), completion_mask=i32(rows, lg),
                         prompt_len=lp)
    masks = jax.eval_shape(trainer.fns.draw_masks, jax.random.key(0), batch)
    def old_stats(st, fr):
        return trainer.fns.statistics(*trainer.parts.policy(st["trainable"], fr), batch, masks)

    old = jax.eval_shape(old_stats, state, frozen) if trainer.needs_old else None
    ref = jax.eval_shape(trainer.fns.statistics, frozen, None, batch, masks) if trainer.needs_ref else None
    adv = jax.ShapeDtypeStruct((rows,), jnp.float32)
    new_state, metrics = jax.eval_shape(trainer.fns.update, state, frozen, batch, masks, old, ref, adv)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), new_state["trainable"]) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), state["trainable"])
    assert metrics["loss"].shape == ()
    # LoRA recipes train adapters only: r x (in + out) per target, far below the base size.
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["trainable"]))
    assert cfg.lora.enabled and n_train < base.num_params() / 10


# ---- SFT warm start cache -----------------------------------------------------------------------

@pytest.mark.slow
def test_warm_start_is_cached_by_its_settings(tmp_path, capsys):
    """The first call trains and writes the cache; the same settings reuse it (identical weights, no SFT);
    a different SFT setting gets its own entry; progress=False prints no SFT progress bar."""
    from gdsd_jax.sft.run import warm_start
    from gdsd_jax.training.setup import build_mesh, build_model

    cfg = tiny_cfg(tmp_path, "warm_start.mode=sft", f"warm_start.cache_dir={tmp_path / 'cache'}",
                   "sft.steps=2", "sft.batch_size=8", "sft.eval_every=0")
    mesh = build_mesh(cfg)
    model_cfg, init = build_model(cfg, mesh)
    init = jax.tree.map(np.array, init)        # host copies: the SFT step donates the parameters it gets
    _, first = warm_start(cfg, mesh, model_cfg, jax.tree.map(jnp.asarray, init), progress=False)
    out = capsys.readouterr()
    assert "running SFT" in out.out + out.err and "sft:" not in out.err
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == 1 and entries[0].startswith("sudoku-")
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), first, init)
    assert any(jax.tree.leaves(changed)), "SFT did not change the weights"

    _, again = warm_start(cfg, mesh, model_cfg, jax.tree.map(jnp.asarray, init), progress=False)
    out = capsys.readouterr()
    assert "reusing cached SFT checkpoint" in out.out + out.err
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again, first)

    # A damaged cache is named and rebuilt (it used to end the run with a 179-line traceback naming neither).
    cache = tmp_path / "cache" / entries[0]
    overwrite_data(cache / "params" / "params")
    _, rebuilt = warm_start(cfg, mesh, model_cfg, jax.tree.map(jnp.asarray, init), progress=False)
    out = capsys.readouterr()
    assert f"the cached SFT checkpoint {cache} is damaged" in out.out + out.err and "running SFT" in out.out + out.err
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), rebuilt, first)
    warm_start(cfg, mesh, model_cfg, jax.tree.map(jnp.asarray, init), progress=False)
    assert "reusing cached SFT checkpoint" in capsys.readouterr().out   # the rebuilt cache is intact

    other = tiny_cfg(tmp_path, "warm_start.mode=sft", f"warm_start.cache_dir={tmp_path / 'cache'}",
                     "sft.steps=3", "sft.batch_size=8", "sft.eval_every=0")
    warm_start(other, mesh, model_cfg, jax.tree.map(jnp.asarray, init), progress=False)
    assert len(list((tmp_path / "cache").iterdir())) == 2


# ---- LoRA ---------------------------------------------------------------------------------------

def test_lora_forward_equals_merged_weights_and_reference_is_base():
    from gdsd_jax.models.config import tiny_dream
    from gdsd_jax.models.denoiser import init_params, logits
    from gdsd_jax.models.lora import init_lora, merge_lora

    cfg = tiny_dream()
    params = init_params(cfg, jax.random.key(0))
    lora = init_lora(cfg, jax.random.key(1), 4, ("q", "k", "v", "o", "gate", "up", "down"))
    toks = jax.random.randint(jax.random.key(2), (2, 10), 0, 200)
    base = logits(params, cfg, toks)
    # B = 0 at init: the adapted model is the base model.
    np.testing.assert_array_equal(np.asarray(logits(params, cfg, toks, lora=lora)), np.asarray(base))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), lora)
    adapted = logits(params, cfg, toks, lora=lora, lora_scale=2.0)
    # Independent reference: fold 2 * A @ B into the kernels with NumPy float64.
    merged = jax.tree.map(np.asarray, params)
    for t, ab in lora.items():
        a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
        w = merged["layers"][t]
        delta = np.einsum("nir,nro->nio", a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(b.shape[0], b.shape[1], -1))
        merged["layers"][t] = (w.astype(np.float64) + 2.0 * delta.reshape(w.shape)).astype(np.float32)
    ref = logits(jax.tree.map(jnp.asarray, merged), cfg, toks)
    np.testing.assert_allclose(np.asarray(adapted), np.asarray(ref), atol=2e-5)
    np.testing.assert_allclose(np.asarray(logits(merge_lora(params, lora, 2.0), cfg, toks)), np.asarray(ref),
                               atol=2e-5)
    assert np.abs(np.asarray(adapted) - np.asarray(base)).max() > 1e-3


# ---- the update step ----------------------------------------------------------------------------

def _trainer(tmp_path, *extra):
    from gdsd_jax.rl.trainer import RLTrainer
    from gdsd_jax.training.setup import build_mesh, build_model, build_task_and_adapter

    cfg = tiny_cfg(tmp_path, *extra)
    mesh = build_mesh(cfg)
    model_cfg, params = build_model(cfg, mesh)
    task, adapter, _ = build_task_and_adapter(cfg, model_cfg)
    return cfg, RLTrainer(cfg, model_cfg, params, mesh, adapter, task), task


@pytest.mark.slow
def test_gradient_accumulation_is_exact(tmp_path):
    """One update over 16 rows equals the same update accumulated over 2 or 4 micro-batches (same masks)."""
    from gdsd_jax.objectives.advantages import compute_advantages
    from gdsd_jax.objectives.types import RolloutBatch

    _, full, task = _trainer(tmp_path / "16", "rl.micro_batch_size=16", "objective.beta=0.01")
    state, frozen = full.init_state()
    examples = list(task.examples("train"))[:4]
    pids, pmask = full.adapter.encode([ex for ex in examples for _ in range(4)])
    out = full.fns.rollout(state["trainable"], frozen, pids, pmask, jax.random.key(3), full.sampling_cfg)
    seqs = np.asarray(out.sequences)
    rewards = full.adapter.score(seqs[:, pids.shape[1]:], np.asarray(out.completion_mask),
                                 [ex for ex in examples for _ in range(4)]).rewards
    adv = compute_advantages(jnp.asarray(rewards), 4)
    batch = RolloutBatch(sequences=jnp.asarray(seqs), prompt_mask=jnp.asarray(pmask),
                         completion_mask=out.completion_mask, prompt_len=pids.shape[1])
    masks = full.fns.draw_masks(jax.random.key(4), batch)
    ref = full.fns.statistics(*full.parts.reference(state["trainable"], frozen), batch, masks)
    results = []
    for micro in (16, 8, 4):
        _, trainer, _ = _trainer(tmp_path / str(micro), f"rl.micro_batch_size={micro}", "objective.beta=0.01")
        n = 16 // micro
        regroup = lambda t: jax.tree.map(lambda x: x.reshape(n, micro, *x.shape[2:]), t)  # noqa: E731
        new_state, m = trainer.fns.update(jax.tree.map(jnp.copy, state), frozen, batch, regroup(masks), None,
                                       regroup(ref), adv)
        results.append((jax.tree.map(np.asarray, new_state["trainable"]), float(m["loss"])))
    for params, loss in results[1:]:
        assert loss == pytest.approx(results[0][1], rel=1e-5)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(results[0][0])):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    moved = max(np.abs(a - np.asarray(b)).max() for a, b in zip(jax.tree.leaves(results[0][0]),
                                                                 jax.tree.leaves(state["trainable"])))
    assert moved > 1e-6


# Each method's advantages as its released code computes them (gdsd_paper.md §2.6 and §3): leave-one-out
# for GDSD and ESPO (hard-coded), r - mean for SPG and wd1, (r - mean) / (std_ddof1 + 1e-4) for d1 (trl's
# GRPO default scale_rewards=True).
OFFICIAL_ADVANTAGES = {"gdsd": ("loo", False), "gdsd_tlc": ("loo", False), "gdsd_logit": ("loo", False),
                       "espo": ("loo", False), "spg": ("group_mean", False), "d1": ("group_mean", True),
                       "wd1": ("group_mean", False)}


def _numpy_advantages(r: np.ndarray, g: int, method: str, scale_std: bool) -> np.ndarray:
    r = r.astype(np.float64).reshape(-1, g)
    base = (r.sum(1, keepdims=True) - r) / (g - 1) if method == "loo" else r.mean(1, keepdims=True)
    adv = r - base
    if scale_std:
        adv = adv / (r.std(1, ddof=1, keepdims=True) + 1e-4)
    return adv.reshape(-1)


@pytest.mark.parametrize("name", sorted(OFFICIAL_ADVANTAGES))
def test_advantages_default_to_the_objectives_own(tmp_path, name):
    # The whole section is replaced: the base config's GDSD settings (psi, clip_mode) are not the method's.
    objective = "objective={name: spg, block_length: 4}" if name == "spg" else f"objective={{name: {name}}}"
    cfg = tiny_cfg(tmp_path, objective)
    assert cfg.advantage_settings() == OFFICIAL_ADVANTAGES[name]
    assert "own" in run_describe(cfg) and "set by" not in run_describe(cfg)
    cfg = tiny_cfg(tmp_path, objective, "rl.advantage=loo", "rl.scale_std=true")
    assert cfg.advantage_settings() == ("loo", True)
    assert "set by rl.advantage=loo, rl.scale_std=True" in run_describe(cfg)


def run_describe(cfg) -> str:
    from gdsd_jax.rl.run import describe_advantages
    return describe_advantages(cfg)


@pytest.mark.parametrize("extra,expected", [
    ((), ("group_mean", True)),                                          # d1's own
    (("rl.advantage=loo", "rl.scale_std=false"), ("loo", False)),       # an explicit setting wins
])
def test_d1_run_trains_with_d1_advantages(tmp_path, monkeypatch, extra, expected):
    """objective d1 without rl.* settings: the update receives d1's std-scaled group-mean advantages."""
    from gdsd_jax.training.task_adapter import CompactAdapter

    _, trainer, task = _trainer(tmp_path, "objective={name: d1, beta: 0.0}", *extra)
    g = trainer.cfg.rl.num_generations
    rewards = np.random.default_rng(0).uniform(0, 1, trainer.rows).astype(np.float32)
    original = CompactAdapter.score

    def fixed(self, ids, mask, examples):              # known rewards with spread in every group
        s = original(self, ids, mask, examples)
        s.rewards = rewards.copy()
        return s

    monkeypatch.setattr(CompactAdapter, "score", fixed)
    seen = []
    update = trainer.fns.update

    def spy(state, frozen, batch, masks, old, ref, adv):
        seen.append(np.asarray(adv))
        return update(state, frozen, batch, masks, old, ref, adv)

    trainer.fns.update = spy
    state, frozen = trainer.init_state()
    trainer.rl_step(state, frozen, list(task.examples("train"))[:trainer.cfg.rl.prompts_per_step])
    np.testing.assert_allclose(seen[0], _numpy_advantages(rewards, g, *expected), rtol=1e-5, atol=1e-6)


def test_optimizer_state_is_sharded_like_the_parameters(tmp_path):
    _, trainer, _ = _trainer(tmp_path)
    state, _ = trainer.init_state()
    mu = state["opt_state"][1][0].mu
    for p, m in zip(jax.tree.leaves(state["trainable"]), jax.tree.leaves(mu)):
        assert m.sharding.is_equivalent_to(p.sharding, p.ndim)
    q = state["trainable"]["layers"]["q"]
    assert jax.tree.leaves(mu)[0].addressable_shards[0].data.size < jax.tree.leaves(mu)[0].size or q.size < 8


@pytest.mark.parametrize("weights", ["bfloat16", "float32"])
def test_param_dtype_sets_the_trained_weights_and_moments_stay_fp32(tmp_path, weights):
    """optim.param_dtype: bf16 weights with fp32 AdamW moments, or fp32 master weights; one update moves
    the weights by what an fp32 AdamW step from the same gradient gives (to the weights' precision)."""
    _, trainer, _ = _trainer(tmp_path, f"optim.param_dtype={weights}")
    state, frozen = trainer.init_state()
    adam = state["opt_state"][1][0]
    assert {x.dtype for x in jax.tree.leaves(state["trainable"])} == {jnp.dtype(weights)}
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.float32)}
    before = jax.tree.map(lambda x: np.asarray(x, np.float32), state["trainable"])
    examples = list(trainer.task.examples("train"))[:4]
    new_state, _ = trainer.rl_step(state, frozen, examples)
    adam = new_state["opt_state"][1][0]
    assert {x.dtype for x in jax.tree.leaves(new_state["trainable"])} == {jnp.dtype(weights)}
    assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {jnp.dtype(jnp.float32)}
    # First AdamW step, from its fp32 moments: w1 = w0 - lr * (m/(1-b1) / (sqrt(v/(1-b2)) + eps) + wd * w0),
    # computed in float64 here and rounded once to the weights' dtype by the trainer.
    o = trainer.cfg.optim
    for w0, w1, m, v in zip(jax.tree.leaves(before), jax.tree.leaves(new_state["trainable"]),
                            jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)):
        w0 = w0.astype(np.float64)
        m_hat = np.asarray(m, np.float64) / (1 - o.b1)
        v_hat = np.asarray(v, np.float64) / (1 - o.b2)
        expected = w0 - o.lr * (m_hat / (np.sqrt(v_hat) + 1e-8) + o.weight_decay * w0)
        ulp = np.abs(expected) * (2.0 ** -8 if weights == "bfloat16" else 2.0 ** -23)
        np.testing.assert_array_less(np.abs(np.asarray(w1, np.float64) - expected), ulp + 1e-9)
    assert any(np.any(np.asarray(a, np.float32) != b) for a, b in zip(jax.tree.leaves(new_state["trainable"]),
                                                                      jax.tree.leaves(before)))


@pytest.mark.slow
def test_nonfinite_update_is_skipped_and_stops_the_run(tmp_path, monkeypatch):
    from gdsd_jax.checkpoint.train_state import RunCheckpointer
    from gdsd_jax.rl import run as run_mod
    from gdsd_jax.rl.trainer import NonFiniteError, RLTrainer
    from gdsd_jax.training.task_adapter import CompactAdapter

    # Two clean training steps, then every rollout scores NaN (evaluation's scoring stays clean).
    calls = {"n": 0}
    rollout_score, adapter_score = RLTrainer.score, CompactAdapter.score

    def nan_scores(adapter, ids, mask, examples):
        s = adapter_score(adapter, ids, mask, examples)
        s.rewards = np.full_like(s.rewards, np.nan)
        return s

    def poisoned(self, gen, examples):
        calls["n"] += 1
        if calls["n"] <= 2:
            return rollout_score(self, gen, examples)
        with monkeypatch.context() as m:
            m.setattr(CompactAdapter, "score", nan_scores)
            return rollout_score(self, gen, examples)

    monkeypatch.setattr(RLTrainer, "score", poisoned)
    cfg = tiny_cfg(tmp_path, "rl.max_nonfinite_in_a_row=2")
    with pytest.raises(NonFiniteError, match="non-finite"):
        run_mod.run_train(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "nonfinite_updates" in r]
    assert [r["nonfinite_updates"] for r in steps] == [0, 0, 1, 1]
    # Rollout cost metrics: the exact sampler makes `steps` forwards per completion.
    assert all(r["rollout_nfe"] == cfg.sampling.steps for r in steps)
    assert all(0 < r["time_share_rollout"] < 1 and r["tokens_per_second_rollout"] > 0 for r in steps)
    # Checkpoints written before the failure are intact; the skipped updates left the parameters alone.
    ck = RunCheckpointer(tmp_path / "checkpoints")
    assert ck.latest_step() == 3
    ck.close()


# ---- bitwise resume ---------------------------------------------------------------------------

_VOLATILE = ("time_", "tokens_per_second")


def _metrics(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.append({k: v for k, v in rec.items() if not k.startswith(_VOLATILE)})
    return out


def _final_trainable(run_dir: Path):
    from gdsd_jax.checkpoint.train_state import RunCheckpointer

    ck = RunCheckpointer(run_dir / "checkpoints")
    step = ck.latest_step()
    state = ck.restore_on_one_device(step)
    ck.close()
    return step, jax.tree.map(np.asarray, state)


@pytest.mark.slow
def test_preempted_run_resumes_bitwise_identically(tmp_path):
    """12 steps in one go == k steps, SIGTERM (pre-emption: the trainer checkpoints and exits), resume.

    The killed run checkpoints only every 100 steps, so its resume point is the checkpoint the SIGTERM
    handler wrote."""
    from gdsd_jax.rl.run import run_train

    straight = tmp_path / "straight"
    run_train(tiny_cfg(straight, "rl.total_steps=12", "checkpoint.every=100"), progress=False)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "gdsd_jax.cli", "train", "--config", str(REPO / "configs/sudoku_tiny.yaml"),
           "--no-progress", "--output-dir", str(killed), *TINY, "checkpoint.every=100", "rl.total_steps=12"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    deadline = time.monotonic() + 600
    metrics = killed / "metrics.jsonl"
    try:
        while time.monotonic() < deadline:
            if metrics.exists() and sum(1 for _ in metrics.open()) >= 3:  # step 0 eval + 2 RL steps
                break
            if proc.poll() is not None:
                pytest.fail(f"training subprocess ended early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.01)
        else:
            pytest.fail("training subprocess did not reach step 2 in time")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 143, proc.stderr.read().decode()[-2000:]
    stopped_at = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert 2 <= stopped_at < 12
    assert _final_trainable(killed)[0] == stopped_at      # the SIGTERM checkpoint
    run_train(tiny_cfg(killed, "checkpoint.every=100", "rl.total_steps=12"), resume=True, progress=False)

    s1, a = _final_trainable(straight)
    s2, b = _final_trainable(killed)
    assert s1 == s2 == 12
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert _metrics(straight / "metrics.jsonl") == _metrics(killed / "metrics.jsonl")


@pytest.mark.slow
def test_without_the_initial_evaluation_no_step_0_record_even_after_a_resume(tmp_path, capsys):
    """``eval.initial=false`` (experiments measure their shared warm start once): the run evaluates only at
    the end, on the split it names, and a resumed run does not add the step-0 evaluation either."""
    from gdsd_jax.rl.run import run_train

    cfg = tiny_cfg(tmp_path, "eval.initial=false", "rl.total_steps=2", "task.kwargs.hold_out_validation=true",
                   "eval.split=validation")
    res = run_train(cfg, progress=False, stop_after=1)
    assert res.before is None and res.after is None
    res = run_train(cfg, resume=True, progress=False)
    assert res.before is None and res.after is not None
    evals = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "test_reward" in r]
    assert [r["step"] for r in evals] == [2]
    assert "no step-0 evaluation" in capsys.readouterr().out

@pytest.mark.slow
def test_resume_with_a_different_model_names_the_field(tmp_path):
    from gdsd_jax.rl.run import run_train

    run_train(tiny_cfg(tmp_path, "rl.total_steps=1"), progress=False)
    with pytest.raises(ConfigError, match=r"model.*overrides"):
        run_train(tiny_cfg(tmp_path, "rl.total_steps=2",
                           "model.overrides={hidden_size: 64, num_layers: 1, num_heads: 2, num_kv_heads: 2, "
                           "mlp_dim: 64}"), resume=True, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        run_train(tiny_cfg(tmp_path), progress=False)


@pytest.mark.parametrize("schedule,warmup", [("constant_with_warmup", 10), ("constant_with_warmup", 0),
                                             ("cosine", 10), ("cosine", 0)])
def test_schedule_counts_rl_steps_whatever_num_iterations(schedule, warmup):
    """With mu optimizer updates per RL step, update c runs at the learning rate of RL step c // mu, and the
    schedule follows its closed form over RL steps (linear warm-up, then constant or half-cosine to 0)."""
    from gdsd_jax.rl.trainer import update_schedule
    from gdsd_jax.training.config import OptimSection

    optim = OptimSection(lr=3e-4, schedule=schedule, warmup_steps=warmup)
    total, mu = 100, 4

    def closed_form(step):
        if step < warmup:
            return 3e-4 * step / warmup
        if schedule == "constant_with_warmup":
            return 3e-4
        return 3e-4 * 0.5 * (1 + np.cos(np.pi * min(step - warmup, total - warmup) / (total - warmup)))

    fn = jax.jit(update_schedule(optim, total, mu))      # optax calls it with a traced update count
    for count in (0, 3, 4, 39, 40, 41, 200, 397, 399, 400, 500):
        # fp32 schedule arithmetic: errors of a few ulps of lr (cos near -1 cancels), hence abs = lr * 2^-18
        assert float(fn(jnp.int32(count))) == pytest.approx(closed_form(count // mu), rel=1e-5, abs=3e-4 * 2 ** -18)
