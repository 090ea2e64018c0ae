"""Schedules, invariants and settings of the samplers.

Expected counts come from closed forms (LLaDA: base + remainder; Dream: the upstream formula re-evaluated
step by step from the live mask count with NumPy's float32 ``linspace``, or with PyTorch itself when it is
installed), never from the code under test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampling_reference import random_params

from gdsd_jax.models.config import tiny_dream, tiny_llada
from gdsd_jax.sampling import (
    SamplingConfig,
    completion_mask,
    dream_origin_probs,
    dream_transfer_schedule,
    generate,
    generate_jit,
    llada_transfer_schedule,
)


def _upstream_k(timesteps, gen_length: int, steps: int) -> list[int]:
    """Dream's ``number_transfer_tokens`` loop with float32 scalars, the live count updated each step."""
    n, out = gen_length, []
    for i in range(steps):
        t, s = np.float32(timesteps[i]), np.float32(timesteps[i + 1])
        k = int(np.float32(n) * (np.float32(1) - np.float32(s / t))) if i < steps - 1 else n
        out.append(k)
        n -= k
    return out


# ---- pure schedules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("block,spb,expected", [
    (32, 8, [4] * 8), (10, 4, [3, 3, 2, 2]), (7, 7, [1] * 7), (5, 8, [1, 1, 1, 1, 1, 0, 0, 0]), (12, 5, [3, 3, 2, 2, 2]),
])
def test_llada_transfer_schedule_closed_form(block, spb, expected):
    np.testing.assert_array_equal(llada_transfer_schedule(block, spb), expected)


def test_dream_schedule_equal_steps_and_length():
    """steps == gen_length gives [0, 1, ..., 1, 2] (the float32 truncation observed upstream at 256/512)."""
    for n in (256, 512):
        k = dream_transfer_schedule(n, n, 1e-3)
        assert k[0] == 0 and k[-1] == 2 and np.all(k[1:-1] == 1) and k.sum() == n


@pytest.mark.parametrize("gen_length", [64, 128, 256, 512])
def test_dream_schedule_matches_stepwise_numpy(gen_length):
    for steps in sorted({1, 2, 3, 7, gen_length // 4, gen_length // 2, gen_length - 1, gen_length, 100, 2 * gen_length}):
        ts = np.linspace(1, 1e-3, steps + 1, dtype=np.float32)
        np.testing.assert_array_equal(dream_transfer_schedule(gen_length, steps, 1e-3),
                                      _upstream_k(ts, gen_length, steps), err_msg=f"steps={steps}")


@pytest.mark.torch
def test_dream_schedule_matches_torch_linspace():
    """Upstream computes the timesteps with ``torch.linspace`` (float32): the integer schedules agree."""
    torch = pytest.importorskip("torch", reason="compares with PyTorch's float32 linspace")
    rng = np.random.default_rng(0)
    for gen_length in (64, 128, 256, 512):
        steps_list = {8, 16, 32, 64, 128, 256, gen_length // 2, gen_length} | set(rng.integers(1, gen_length + 1, 25))
        for steps in sorted(s for s in steps_list if s <= gen_length):
            ts = torch.linspace(1, 1e-3, steps + 1)
            n, ks = gen_length, []
            for i in range(steps):      # verbatim upstream arithmetic on torch float32 tensors
                num = torch.tensor(n * 4) / 4
                t, s = ts[i], ts[i + 1]
                k = int(num * (1 - s / t)) if i < steps - 1 else int(num)
                ks.append(k)
                n -= k
            np.testing.assert_array_equal(dream_transfer_schedule(gen_length, steps, 1e-3), ks,
                                          err_msg=f"gen_length={gen_length} steps={steps}")


def test_dream_origin_probs():
    p = dream_origin_probs(4, 1e-3)
    ts = np.linspace(1, 1e-3, 5, dtype=np.float32)
    np.testing.assert_allclose(p[:3], 1 - ts[1:4] / ts[:3], rtol=1e-6)
    assert p[-1] == 1.0


def test_completion_mask():
    comp = jnp.asarray([[5, 9, 3, 9, 1], [1, 2, 3, 4, 5], [9, 9, 9, 9, 9]])
    np.testing.assert_array_equal(np.asarray(completion_mask(comp, 9)),
                                  [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


# ---- invariants of full runs -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    out = {}
    for name, mk in (("llada", tiny_llada), ("dream", tiny_dream)):
        cfg = mk()
        out[name] = (cfg, random_params(cfg, seed=2))
    return out


def _padded_prompts(cfg, b=4, lp=5):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 240, size=(b, lp)).astype(np.int32)
    mask = np.ones((b, lp), np.int32)
    ids[1, :2], mask[1, :2] = cfg.pad_token_id, 0
    ids[3, :4], mask[3, :4] = cfg.pad_token_id, 0
    return ids, mask


@pytest.mark.parametrize("gen_length,steps,block_length,remasking,temperature", [
    (12, 6, 6, "random", 0.0),
    (15, 6, 5, "low_confidence", 0.5),
])
def test_llada_schedule_and_block_order(models, gen_length, steps, block_length, remasking, temperature):
    cfg, params = models["llada"]
    ids, mask = _padded_prompts(cfg)
    scfg = SamplingConfig(gen_length=gen_length, steps=steps, block_length=block_length, remasking=remasking,
                          temperature=temperature, return_unmask_step=True)
    out = generate_jit(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(3), scfg)
    seqs, when = np.asarray(out.sequences), np.asarray(out.unmask_step)
    lp = ids.shape[1]
    np.testing.assert_array_equal(seqs[:, :lp], ids)                       # prompt (and pads) unchanged
    assert not np.any(seqs[:, lp:] == cfg.mask_token_id)                   # every position filled
    assert when.min() >= 0 and when.max() < steps
    nb, spb = gen_length // block_length, steps // (gen_length // block_length)
    base, rem = divmod(block_length, spb)
    per_step = [base + (i < rem) for i in range(spb)] * nb
    for row in when:
        np.testing.assert_array_equal(np.bincount(row, minlength=steps), per_step)
        for b in range(nb):
            blk = row[b * block_length:(b + 1) * block_length]
            # block b is revealed exactly during its own steps: nothing of block b+1 before b is complete
            assert blk.min() >= b * spb and blk.max() < (b + 1) * spb


@pytest.mark.parametrize("alg,steps", [("entropy", 5), ("origin", 4)])
def test_dream_schedule_in_run(models, alg, steps):
    cfg, params = models["dream"]
    ids, mask = _padded_prompts(cfg)
    gen_length = 16
    scfg = SamplingConfig(gen_length=gen_length, steps=steps, alg=alg, temperature=1.0, top_p=0.95,
                          return_unmask_step=True)
    out = generate_jit(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(4), scfg)
    seqs, when = np.asarray(out.sequences), np.asarray(out.unmask_step)
    lp = ids.shape[1]
    np.testing.assert_array_equal(seqs[:, :lp], ids)
    assert not np.any(seqs[:, lp:] == cfg.mask_token_id)
    assert when.min() >= 0 and when.max() < steps
    if alg != "origin":
        expected = _upstream_k(np.linspace(1, 1e-3, steps + 1, dtype=np.float32), gen_length, steps)
        for row in when:
            np.testing.assert_array_equal(np.bincount(row, minlength=steps), expected)


def test_unmask_step_off_and_completion_mask(models):
    cfg, params = models["llada"]
    ids, mask = _padded_prompts(cfg)
    scfg = SamplingConfig(gen_length=8, steps=4, block_length=4)
    out = generate_jit(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), scfg)
    assert np.all(np.asarray(out.unmask_step) == -1)
    comp = np.asarray(out.sequences)[:, ids.shape[1]:]
    # Make the most frequent completion token the EOS: the mask must stop right after its first occurrence.
    values, counts = np.unique(comp, return_counts=True)
    eos = int(values[np.argmax(counts)])
    out2 = generate_jit(params, cfg.replace(eos_token_id=eos), jnp.asarray(ids), jnp.asarray(mask),
                        jax.random.key(0), scfg)
    np.testing.assert_array_equal(np.asarray(out2.sequences), np.asarray(out.sequences))
    cm = np.asarray(out2.completion_mask)
    for row, m in zip(comp, cm):
        hits = np.nonzero(row == eos)[0]
        end = hits[0] + 1 if len(hits) else len(row)
        np.testing.assert_array_equal(m, (np.arange(len(row)) < end).astype(int))
    assert (cm == 0).any()


# ---- settings --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,needle", [
    (dict(gen_length=10, block_length=4, sampler="llada"), "gen_length=10 is not divisible by block_length=4"),
    (dict(gen_length=32, block_length=4, steps=4, sampler="llada"), "steps=4 is less than the number of blocks 8"),
    (dict(gen_length=32, block_length=8, steps=6, sampler="llada"), "steps=6 is not divisible by the number of blocks 4"),
    (dict(alg="greedy"), "SamplingConfig.alg='greedy'"),
    (dict(remasking="lowest"), "SamplingConfig.remasking='lowest'"),
    (dict(sampler="mdlm"), "SamplingConfig.sampler='mdlm'"),
    (dict(gen_length=0), "SamplingConfig.gen_length=0"),
    (dict(steps=-1), "SamplingConfig.steps=-1"),
    (dict(temperature=-0.5), "SamplingConfig.temperature=-0.5"),
    (dict(top_p=1.5), "SamplingConfig.top_p=1.5"),
    (dict(top_k=0), "SamplingConfig.top_k=0"),
    (dict(eps=0.0), "SamplingConfig.eps=0.0"),
    (dict(cfg_scale=-1.0), "SamplingConfig.cfg_scale=-1.0"),
    (dict(alg_temp=-1.0), "SamplingConfig.alg_temp=-1.0"),
])
def test_bad_settings_fail_at_construction(kwargs, needle):
    with pytest.raises(ValueError) as e:
        SamplingConfig(**kwargs)
    assert needle in str(e.value)


def test_bad_settings_fail_at_generate(models):
    cfg, params = models["llada"]
    ids = jnp.zeros((2, 5), jnp.int32)
    key = jax.random.key(0)
    # Block layout is checked once the family is known (sampler="auto").
    with pytest.raises(ValueError, match="gen_length=10 is not divisible by block_length=4"):
        generate(params, cfg, ids, None, key, SamplingConfig(gen_length=10, block_length=4))
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 16"):
        generate(params, cfg.replace(max_seq_len=16), ids, None, key, SamplingConfig(gen_length=12, steps=4))
    with pytest.raises(ValueError, match="prompt_mask shape"):
        generate(params, cfg, ids, jnp.ones((2, 4), jnp.int32), key, SamplingConfig(gen_length=8, steps=4))
    with pytest.raises(ValueError, match="integer token ids"):
        generate(params, cfg, ids.astype(jnp.float32), None, key, SamplingConfig(gen_length=8, steps=4))
    dcfg, dparams = models["dream"]
    with pytest.raises(ValueError, match="non-empty prompt"):
        generate(dparams, dcfg, jnp.zeros((2, 0), jnp.int32), None, key, SamplingConfig(gen_length=8, steps=4))
    # The Dream sampler ignores LLaDA's block layout.
    SamplingConfig(gen_length=10, block_length=4, steps=3, sampler="dream")
