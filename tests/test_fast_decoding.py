"""Fast block-wise decoding (``cache``, ``cache_refresh_every``, ``threshold``, ``factor``) of both samplers: a
cache refreshed at every step is the exact sampler, threshold and factor decoding follow a NumPy per-step
reference, settings are validated at config time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampling_reference import jax_logits_fn, random_params, threshold_reference

from gdsd_jax.models.config import tiny_dream, tiny_llada
from gdsd_jax.sampling import SamplingConfig, generate_jit
from gdsd_jax.sampling.common import select_by_factor

B, LP, LG = 3, 6, 12
PAD = {0: 3, 2: 1}


@pytest.fixture(scope="module")
def models():
    out = {}
    for name, mk, seed in (("llada", lambda: tiny_llada(num_kv_heads=2), 0), ("dream", tiny_dream, 1)):
        cfg = mk()
        # std 1.0: peaked distributions, so thresholds in (0, 1) reveal several tokens in one step.
        params = random_params(cfg, seed=seed, std=1.0)
        rng = np.random.default_rng(5)
        ids = rng.integers(0, 240, size=(B, LP)).astype(np.int32)
        mask = np.ones((B, LP), np.int32)
        for row, n in PAD.items():
            ids[row, :n], mask[row, :n] = cfg.pad_token_id, 0
        out[name] = (cfg, params, ids, mask)
    return out


def _run(case, scfg, key=3):
    cfg, params, ids, mask = case
    out = generate_jit(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(key), scfg)
    return jax.tree.map(np.asarray, out)


# One block for Dream keeps its exact sampler (upstream's schedule over the whole completion) comparable.
BLOCKS = {"llada": 4, "dream": None}


@pytest.mark.parametrize("name", ["llada", "dream"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cache_refreshed_every_step_is_the_exact_sampler(models, name, temperature):
    base = SamplingConfig(gen_length=LG, steps=6, block_length=BLOCKS[name], temperature=temperature,
                          return_unmask_step=True)
    exact = _run(models[name], base)
    assert exact.nfe.tolist() == [6] * B
    for cache in ("prefix", "dual"):
        fast = _run(models[name], base.replace(cache=cache, cache_refresh_every=1))
        np.testing.assert_array_equal(fast.sequences, exact.sequences, err_msg=cache)
        np.testing.assert_array_equal(fast.unmask_step, exact.unmask_step, err_msg=cache)
        assert fast.nfe.tolist() == [6] * B
        assert fast.tokens_processed.tolist() == [6 * (LP + LG)] * B


def test_cached_steps_process_fewer_positions(models):
    """Without refresh only a block's first step is a full forward: LLaDA, 3 blocks of 4, 2 steps each."""
    base = SamplingConfig(gen_length=LG, steps=6, block_length=4)
    full = LP + LG
    prefix = _run(models["llada"], base.replace(cache="prefix"))
    dual = _run(models["llada"], base.replace(cache="dual"))
    assert prefix.nfe.tolist() == dual.nfe.tolist() == [6] * B
    # second steps: windows of the block + suffix (12, 8, 4) / the block (4)
    assert prefix.tokens_processed.tolist() == [3 * full + 12 + 8 + 4] * B
    assert dual.tokens_processed.tolist() == [3 * full + 3 * 4] * B
    # Dream also runs the position before the block (its logit at i comes from the state at i - 1).
    dream = _run(models["dream"], SamplingConfig(gen_length=LG, steps=6, block_length=4, cache="dual"))
    assert dream.tokens_processed.tolist() == [3 * full + 3 * 5] * B


@pytest.mark.parametrize("name", ["llada", "dream"])
@pytest.mark.parametrize("threshold,ban", [(0.3, False), (0.6, False), (0.9, False), (0.6, True)])
def test_threshold_matches_reference(models, name, threshold, ban):
    cfg, params, ids, mask = models[name]
    ref, ref_nfe = threshold_reference(jax_logits_fn(params, cfg), ids, mask, mask_id=cfg.mask_token_id,
                                       gen_length=LG, block_length=4, threshold=threshold, ban_mask_token=ban)
    scfg = SamplingConfig(gen_length=LG, steps=3, block_length=4, threshold=threshold, return_unmask_step=True,
                          ban_mask_token=ban)
    out = _run(models[name], scfg)
    np.testing.assert_array_equal(out.sequences, ref)
    np.testing.assert_array_equal(out.nfe, ref_nfe)
    assert out.nfe.max() <= LG
    if threshold == 0.3:
        assert out.nfe.min() < LG, "the threshold should reveal several tokens in some step"
    assert out.unmask_step.max() < 3 * 4              # steps are numbered up to block_length per block
    if threshold == 0.6:        # a cache refreshed at every step changes nothing
        cached = _run(models[name], scfg.replace(cache="dual", cache_refresh_every=1))
        np.testing.assert_array_equal(cached.sequences, ref)


@pytest.mark.parametrize("name", ["llada", "dream"])
@pytest.mark.parametrize("factor", [0.5, 1.0, 2.0])
def test_factor_rule_matches_reference(models, name, factor):
    cfg, params, ids, mask = models[name]
    ref, ref_nfe = threshold_reference(jax_logits_fn(params, cfg), ids, mask, mask_id=cfg.mask_token_id,
                                       gen_length=LG, block_length=4, factor=factor, ban_mask_token=True)
    scfg = SamplingConfig(gen_length=LG, steps=3, block_length=4, factor=factor, ban_mask_token=True)
    out = _run(models[name], scfg)
    np.testing.assert_array_equal(out.sequences, ref)
    np.testing.assert_array_equal(out.nfe, ref_nfe)
    if factor == 2.0:           # the second bar is 1/3: several tokens per step somewhere
        assert out.nfe.min() < LG


def test_factor_rule_by_hand():
    """factor 1: rank 2 needs >= 2/3, rank 3 >= 3/4, rank 4 >= 4/5; the run stops at the first miss."""
    scores = jnp.asarray([[0.9, 0.8, 0.7, 0.99],     # ranks 0.99, 0.9, 0.8 clear 2/3, 3/4; 0.7 < 4/5
                          [0.5, 0.1, 0.2, 0.3],      # only the forced first: 0.3 < 2/3
                          [0.9, 0.8, 0.1, 0.95],     # only the last misses: upstream would reveal it too
                          [0.9, 0.9, 0.9, 0.9]])     # ties: every rank clears its bar
    masked = jnp.asarray([[True, True, True, True], [True, True, True, True],
                          [True, True, True, True], [True, False, False, True]])
    got = np.asarray(select_by_factor(scores, masked, 1.0))
    np.testing.assert_array_equal(got, [[True, True, False, True], [True, False, False, False],
                                        [True, True, False, True], [True, False, False, True]])
    assert not np.asarray(select_by_factor(scores, jnp.zeros_like(masked), 1.0)).any()


@pytest.mark.parametrize("name", ["llada", "dream"])
def test_unreachable_threshold_reveals_one_token_per_step(models, name):
    # The mask token banned: a drawn mask id would reveal nothing at its step.
    scfg = SamplingConfig(gen_length=LG, steps=LG, block_length=4, threshold=1.0, return_unmask_step=True,
                          ban_mask_token=True)
    out = _run(models[name], scfg)
    assert out.nfe.tolist() == [LG] * B
    for row in out.unmask_step:                                    # one position per step
        assert sorted(row.tolist()) == list(range(LG))
    if name == "llada":
        exact = _run(models[name], scfg.replace(threshold=None)).sequences   # top-1 by confidence, 12 steps
    else:   # Dream's own schedule is not one token per step (it is 0, 1, 1, 2 for 4 steps): the reference
        cfg, params, ids, mask = models[name]
        exact, _ = threshold_reference(jax_logits_fn(params, cfg), ids, mask, mask_id=cfg.mask_token_id,
                                       gen_length=LG, block_length=4, threshold=np.inf, ban_mask_token=True)
    np.testing.assert_array_equal(out.sequences, exact)


@pytest.mark.parametrize("changes,field", [
    ({"cache": "full"}, "cache"),
    ({"cache": "dual", "cache_refresh_every": 0}, "cache_refresh_every"),
    ({"cache_refresh_every": 2}, "cache_refresh_every"),
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": 0.9, "remasking": "random"}, "threshold"),
    ({"threshold": 0.9, "alg_temp": 0.5}, "threshold"),
    ({"factor": 0.0}, "factor"),
    ({"factor": 1.0, "threshold": 0.9}, "factor"),
    ({"factor": 1.0, "remasking": "random"}, "factor"),
    ({"factor": 1.0, "alg_temp": 0.5}, "factor"),
    ({"cache": "prefix", "cfg_scale": 1.0}, "cfg_scale"),
    ({"cache": "dual", "block_length": 5}, "gen_length"),
])
def test_bad_settings_fail_at_config_time(changes, field):
    with pytest.raises(ValueError, match=f"SamplingConfig.{field}="):
        SamplingConfig(gen_length=LG, steps=6, **changes)
