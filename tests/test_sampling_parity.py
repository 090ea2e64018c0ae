"""Token-for-token parity of the jitted samplers with the plain NumPy per-step reference (temperature 0).

Tiny fp32 models with peaked random weights (std 0.3, norms and biases randomised too: top-1 probabilities around 0.3, so arg-max and
confidence orders are far from ties). Where the upstream algorithm draws positions at random (LLaDA
``random`` remasking, Dream ``origin``, ``alg_temp > 0``), the reference replays the positions our sampler
chose (``unmask_step``) and checks the count per step and every token chosen at temperature 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampling_reference import dream_reference, jax_logits_fn, llada_reference, random_params

from gdsd_jax.models.config import tiny_dream, tiny_llada
from gdsd_jax.sampling import SamplingConfig, generate, generate_jit

STD = 0.3


@pytest.fixture(scope="module")
def llada():
    cfg = tiny_llada()
    params = random_params(cfg, seed=0, std=STD)
    return cfg, params, jax_logits_fn(params, cfg)


@pytest.fixture(scope="module")
def dream():
    cfg = tiny_dream()
    params = random_params(cfg, seed=1, std=STD)       # includes non-zero q/k/v biases
    return cfg, params, jax_logits_fn(params, cfg)


def _prompts(b: int, lp: int, pad: dict[int, int] | None, pad_id: int, seed: int = 5):
    """Random prompts (ids < 240, so never the mask/EOS ids of the tiny configs), left-padded per ``pad``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 240, size=(b, lp)).astype(np.int32)
    if pad is None:
        return ids, None
    mask = np.ones((b, lp), np.int32)
    for row, n in pad.items():
        ids[row, :n] = pad_id
        mask[row, :n] = 0
    return ids, mask


def _run(params, cfg, ids, mask, scfg, key=0):
    out = generate_jit(params, cfg, jnp.asarray(ids), None if mask is None else jnp.asarray(mask),
                       jax.random.key(key), scfg)
    return np.asarray(out.sequences), np.asarray(out.unmask_step)


# Batch 3, prompt 6 and completion 12 throughout, so the reference's forward compiles once per family.
LLADA_CASES = [
    # (gen_length, steps, block_length, padding, extra settings)
    (12, 6, 4, {0: 3, 1: 2}, {}),
    (12, 5, None, None, {}),              # one block, uneven schedule 3,3,2,2,2
    (12, 4, 6, {1: 4}, {"cfg_scale": 1.5}),
]


@pytest.mark.parametrize("gen_length,steps,block_length,pad,extra", LLADA_CASES)
def test_llada_greedy_matches_reference(llada, gen_length, steps, block_length, pad, extra):
    cfg, params, fn = llada
    ids, mask = _prompts(3, 6, pad, cfg.pad_token_id)
    scfg = SamplingConfig(gen_length=gen_length, steps=steps, block_length=block_length, **extra)
    seqs, _ = _run(params, cfg, ids, mask, scfg)
    ref = llada_reference(fn, ids, mask, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
                          gen_length=gen_length, steps=steps, block_length=block_length or gen_length,
                          cfg_scale=extra.get("cfg_scale", 0.0))
    np.testing.assert_array_equal(seqs, ref)
    if extra.get("cfg_scale"):
        plain = llada_reference(fn, ids, mask, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
                                gen_length=gen_length, steps=steps, block_length=block_length or gen_length)
        assert not np.array_equal(plain, ref), "guidance had no effect: the case cannot catch ignoring it"


def test_llada_eos_options_match_reference(llada):
    """``logits_eos_inf`` and ``confidence_eos_eot_inf`` with an EOS the model really predicts."""
    cfg, params, fn = llada
    ids, mask = _prompts(3, 6, {2: 2}, cfg.pad_token_id)
    plain = SamplingConfig(gen_length=12, steps=6, block_length=4)
    seqs, _ = _run(params, cfg, ids, mask, plain)
    values, counts = np.unique(seqs[:, 6:], return_counts=True)
    order = np.argsort(-counts)
    eos, eot = int(values[order[0]]), int(values[order[1]])     # the two most frequent generated tokens
    cfg_e = cfg.replace(eos_token_id=eos)
    for extra in ({"logits_eos_inf": True}, {"confidence_eos_eot_inf": True, "eot_token_id": eot}):
        scfg = plain.replace(**extra)
        got, _ = _run(params, cfg_e, ids, mask, scfg)
        ref = llada_reference(fn, ids, mask, mask_id=cfg.mask_token_id, eos_id=eos, gen_length=12, steps=6,
                              block_length=4, logits_eos_inf=extra.get("logits_eos_inf", False),
                              confidence_eos_eot_inf=extra.get("confidence_eos_eot_inf", False),
                              eot_id=extra.get("eot_token_id"))
        np.testing.assert_array_equal(got, ref)
        assert not np.array_equal(got, seqs), f"{extra} had no effect: the test would not see it ignored"
        if extra.get("logits_eos_inf"):
            assert not np.any(got[:, 6:] == eos)


def test_llada_random_remasking_replay(llada):
    cfg, params, fn = llada
    ids, mask = _prompts(3, 6, {0: 2}, cfg.pad_token_id)
    scfg = SamplingConfig(gen_length=12, steps=6, block_length=4, remasking="random", return_unmask_step=True)
    seqs, steps = _run(params, cfg, ids, mask, scfg, key=7)
    ref = llada_reference(fn, ids, mask, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id, gen_length=12,
                          steps=6, block_length=4, remasking="random", transfer_steps=steps)
    np.testing.assert_array_equal(seqs, ref)


def test_llada_with_lora_matches_reference(llada):
    cfg, params, base_fn = llada
    n, d, h, dh, r = cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.head_dim, 4
    k1, k2 = jax.random.split(jax.random.key(3))
    lora = {"q": {"a": 0.3 * jax.random.normal(k1, (n, d, r)), "b": 0.3 * jax.random.normal(k2, (n, r, h, dh))}}
    ids, mask = _prompts(3, 6, {1: 3}, cfg.pad_token_id)
    scfg = SamplingConfig(gen_length=12, steps=6, block_length=4)
    out = generate_jit(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), scfg, lora=lora,
                       lora_scale=0.5)
    ref_kw = dict(mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id, gen_length=12, steps=6, block_length=4)
    ref = llada_reference(jax_logits_fn(params, cfg, lora=lora, lora_scale=0.5), ids, mask, **ref_kw)
    np.testing.assert_array_equal(np.asarray(out.sequences), ref)
    base = llada_reference(base_fn, ids, mask, **ref_kw)
    assert not np.array_equal(base, ref), "the adapter did not change the output: the test is blind to it"


DREAM_CASES = [
    # (gen_length, steps, padding, extra settings)
    (12, 6, {1: 2}, {"alg": "entropy"}),
    (12, 16, None, {"alg": "maskgit_plus"}),                     # more steps than tokens: some steps reveal 0
    (12, 5, {0: 3}, {"alg": "topk_margin"}),
    (12, 6, {2: 1}, {"alg": "entropy", "top_p": 0.6, "top_k": 20}),
]


@pytest.mark.parametrize("gen_length,steps,pad,extra", DREAM_CASES)
def test_dream_greedy_matches_reference(dream, gen_length, steps, pad, extra):
    cfg, params, fn = dream
    ids, mask = _prompts(3, 6, pad, cfg.pad_token_id)
    scfg = SamplingConfig(gen_length=gen_length, steps=steps, **extra)
    seqs, _ = _run(params, cfg, ids, mask, scfg)
    ref = dream_reference(fn, ids, mask, mask_id=cfg.mask_token_id, gen_length=gen_length, steps=steps,
                          **extra)
    np.testing.assert_array_equal(seqs, ref)
    if "top_p" in extra:   # the filters change the entropy confidences at temperature 0, as upstream
        plain = dream_reference(fn, ids, mask, mask_id=cfg.mask_token_id, gen_length=gen_length, steps=steps,
                                alg=extra["alg"])
        assert not np.array_equal(plain, ref), "top-p/top-k had no effect: the case cannot catch ignoring them"


@pytest.mark.parametrize("extra", [{"alg": "origin"}, {"alg": "entropy", "alg_temp": 0.5}])
def test_dream_random_positions_replay(dream, extra):
    cfg, params, fn = dream
    ids, mask = _prompts(3, 6, {1: 2}, cfg.pad_token_id)
    scfg = SamplingConfig(gen_length=12, steps=6, return_unmask_step=True, **extra)
    seqs, steps = _run(params, cfg, ids, mask, scfg, key=11)
    ref = dream_reference(fn, ids, mask, mask_id=cfg.mask_token_id, gen_length=12, steps=6,
                          transfer_steps=steps, **extra)
    np.testing.assert_array_equal(seqs, ref)


def test_generate_inside_outer_jit(dream):
    """The trainer jits its rollout: generate traced inside another jit (keys derived inside) still matches
    the reference."""
    cfg, params, fn = dream
    ids, mask = _prompts(3, 6, {0: 1}, cfg.pad_token_id)
    scfg = SamplingConfig(gen_length=12, steps=6, alg="entropy", top_p=0.6, top_k=20)

    @jax.jit
    def rollout(p, seed, ids, mask):
        out = generate(p, cfg, ids, mask, jax.random.fold_in(jax.random.key(0), seed), scfg)
        return out.sequences, out.completion_mask

    seqs, cmask = rollout(params, 3, jnp.asarray(ids), jnp.asarray(mask))
    ref = dream_reference(fn, ids, mask, mask_id=cfg.mask_token_id, gen_length=12, steps=6, alg="entropy",
                          top_p=0.6, top_k=20)
    np.testing.assert_array_equal(np.asarray(seqs), ref)
    assert cmask.shape == (3, 12)


# ---- the mask token as a sampling outcome ------------------------------------------------------------

def _mask_heavy(cfg, params, fn, ids):
    """``params`` with the mask token's LM-head column set near that of the token most often predicted first,
    so the mask id wins the arg-max at some positions and takes probability mass everywhere."""
    x = np.concatenate([ids, np.full((ids.shape[0], 12), cfg.mask_token_id, np.int32)], axis=1)
    top = np.bincount(fn(x, None)[:, ids.shape[1]:].argmax(-1).ravel(), minlength=cfg.vocab_size).argmax()
    head = np.array(params["lm_head"])
    noise = np.random.default_rng(0).standard_normal(head.shape[0]).astype(np.float32)
    head[:, cfg.mask_token_id] = head[:, top] + 0.05 * noise
    out = dict(params, lm_head=head)
    return out, jax_logits_fn(out, cfg)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_mask_token_is_sampled_as_upstream_unless_banned(family, llada, dream):
    """Default: the mask id is an ordinary outcome (upstream); ``ban_mask_token=True``: its logit is -inf.
    On a model that puts mass on the mask id the two reveal different positions, each as its reference.
    LLaDA runs one block (a mask left at a block's end is revealed only within its block here: see
    docs/sampling.md); Dream runs one prompt (upstream averages the live mask count over the batch)."""
    cfg, params, fn = llada if family == "llada" else dream
    ids, _ = _prompts(3 if family == "llada" else 1, 6, None, cfg.pad_token_id, seed=2)
    params, fn = _mask_heavy(cfg, params, fn, ids)
    if family == "llada":
        extra, ref_kw = {}, dict(eos_id=cfg.eos_token_id, block_length=12)
        reference = llada_reference
    else:
        extra = ref_kw = {"alg": "maskgit_plus"}
        reference = dream_reference
    runs = {}
    for ban in (False, True):
        scfg = SamplingConfig(gen_length=12, steps=6, ban_mask_token=ban, return_unmask_step=True, **extra)
        seqs, when = _run(params, cfg, ids, None, scfg)
        ref = reference(fn, ids, None, mask_id=cfg.mask_token_id, gen_length=12, steps=6, ban_mask_token=ban,
                        **ref_kw)
        np.testing.assert_array_equal(seqs, ref, err_msg=f"ban_mask_token={ban}")
        runs[ban] = seqs, when
    assert not np.any(runs[True][0] == cfg.mask_token_id)
    assert np.any(runs[False][1] != runs[True][1]), "the same positions were revealed at every step"
    assert not SamplingConfig().ban_mask_token


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_filter_matches_sort_reference(top_p):
    """The bisection nucleus filter keeps exactly the tokens of upstream's sort-and-cumsum rule."""
    from sampling_reference import _top_p_logits

    from gdsd_jax.sampling.common import FILTERED, top_p_filter

    rng = np.random.default_rng(int(top_p * 1000))
    logits = (rng.standard_normal((300, 64)) * rng.uniform(0.2, 4.0, (300, 1))).astype(np.float32)
    logits[:5, 7] = -np.inf                          # banned columns (the mask token) are handled too
    got = np.asarray(top_p_filter(jnp.asarray(logits), top_p))
    want = _top_p_logits(logits.astype(np.float64), top_p)
    np.testing.assert_array_equal(got == FILTERED, want == np.finfo(np.float32).min)
    kept = (got != FILTERED).sum(-1)
    assert kept.min() >= 1 and (top_p < 0.9 or kept.max() > 1)
