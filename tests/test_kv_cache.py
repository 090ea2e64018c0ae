"""The cached forward of the denoiser: logits of a window run on fresh keys/values of its own positions
plus cached keys/values of every other position equal the full forward's logits when the cache was computed
from the same tokens (both families, grouped-query attention, left-padded rows, fp32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdsd_jax.models.config import tiny_dream, tiny_llada
from gdsd_jax.models.denoiser import cached_logits, context_lead, init_params, logits, logits_and_cache


def _inputs(cfg, b=3, length=20, pad=(0, 4, 7)):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 240, size=(b, length)).astype(np.int32)
    tokens[:, 12:] = cfg.mask_token_id                       # a masked suffix, as during sampling
    tokens[1, 14] = 5
    am = np.ones((b, length), np.int32)
    for r, p in enumerate(pad):
        am[r, :p] = 0
    return jnp.asarray(tokens), jnp.asarray(am)


@pytest.mark.parametrize("make", [lambda: tiny_llada(num_kv_heads=2), tiny_dream], ids=["llada_gqa", "dream_gqa"])
@pytest.mark.parametrize("scan", [True, False])
def test_cached_window_equals_full_forward(make, scan):
    cfg = make().replace(scan_layers=scan)
    assert cfg.num_kv_heads < cfg.num_heads
    params = init_params(cfg, jax.random.key(1), std=0.2)
    tokens, am = _inputs(cfg)
    windows = [(8, 12, 4), (8, 4, 4), (16, 4, 4), (12, 8, 8)]
    # (start, width, num_logits): a block with the suffix after it (prefix cache), a block alone (dual cache),
    # the block at the end of the row, a wider block; the start is traced, as in the samplers.

    @jax.jit
    def run(tokens, am, starts):
        full = logits(params, cfg, tokens, am)                               # [B, L, V]
        _, cache = logits_and_cache(params, cfg, tokens, am, positions=jnp.zeros((3, 1), jnp.int32))
        got = [cached_logits(params, cfg, cache, tokens, am, starts[i], w, n)
               for i, (_, w, n) in enumerate(windows)]
        return full, cache.k.shape, got

    full, kshape, got = run(tokens, am, jnp.asarray([s for s, _, _ in windows], jnp.int32))
    assert kshape == (cfg.num_layers, 3, 20, cfg.num_kv_heads, cfg.head_dim)
    for (start, _, n), g in zip(windows, got):
        np.testing.assert_allclose(np.asarray(g), np.asarray(full)[:, start:start + n], atol=1e-5, rtol=1e-5)


def test_stale_cache_is_used():
    """Guards the test above against a cached forward that silently recomputes everything: with a cache of
    other tokens outside the window, the window's logits change."""
    cfg = tiny_dream()
    params = init_params(cfg, jax.random.key(1), std=0.2)
    tokens, am = _inputs(cfg)
    other = tokens.at[:, 8:10].set(7)

    @jax.jit
    def run(tokens, other):
        _, cache = logits_and_cache(params, cfg, tokens, am)
        return logits(params, cfg, other, am)[:, 12:16], cached_logits(params, cfg, cache, other, am, 12, 4, 4)

    fresh, stale = map(np.asarray, run(tokens, other))
    assert np.abs(stale - fresh).max() > 1e-3
    assert context_lead(cfg) == 1 and context_lead(tiny_llada()) == 0
