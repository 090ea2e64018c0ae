"""The attention core (:func:`gdsd_jax.models.denoiser.attention`) and its custom VJP against a float64 NumPy
implementation of masked softmax attention and of its analytic gradients, written from the definitions:

    S = Q K^T / c,  S' = S where mask else min(float32),  P = softmax_rows(S'),  O = P V
    dV = P^T dO,  dP = dO V^T,  dS' = P * (dP - rowsum(P * dP)),  dS = dS' where mask else 0,
    dQ = dS K / c,  dK = dS^T Q / c

per query head; grouped-query heads read kv head ``h // (H / KV)`` and their dK, dV are summed over the group.
The row sums here are over the keys (``P * dP``), not the head-dim identity the implementation uses.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdsd_jax.models.config import tiny_dream
from gdsd_jax.models.denoiser import attention, init_params, logits, positions_and_mask

_MIN32 = float(np.finfo(np.float32).min)


# ---- float64 reference --------------------------------------------------------------------------

def ref_attention(q, k, v, mask, divisor, dout):
    """float64 forward and gradients. q [B, L, H, Dh], k/v [B, L, KV, Dh], mask [B, 1, L, L] bool or None,
    dout [B, L, H, Dh] the output cotangent -> (O, dQ, dK, dV)."""
    q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
    b, length, heads, _ = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    c = 1.0 if divisor is None else float(divisor)
    out, dq = np.zeros_like(q), np.zeros_like(q)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    for i in range(b):
        for h in range(heads):
            j = h // groups
            s = q[i, :, h] @ k[i, :, j].T / c                                  # [Lq, Lk]
            keep = np.ones_like(s, bool) if mask is None else np.asarray(mask[i, 0], bool)
            s = np.where(keep, s, _MIN32)
            e = np.exp(s - s.max(axis=1, keepdims=True))
            p = e / e.sum(axis=1, keepdims=True)
            out[i, :, h] = p @ v[i, :, j]
            do = dout[i, :, h]
            dv[i, :, j] += p.T @ do
            dp = do @ v[i, :, j].T
            ds = p * (dp - np.sum(p * dp, axis=1, keepdims=True))
            ds = np.where(keep, ds, 0.0)
            dq[i, :, h] = ds @ k[i, :, j] / c
            dk[i, :, j] += ds.T @ q[i, :, h] / c
    return out, dq, dk, dv


def _inputs(seed, b=2, length=7, heads=4, kv_heads=2, dh=8, scale=1.0):
    rng = np.random.default_rng(seed)
    q = (scale * rng.standard_normal((b, length, heads, dh))).astype(np.float32)
    k = rng.standard_normal((b, length, kv_heads, dh)).astype(np.float32)
    v = rng.standard_normal((b, length, kv_heads, dh)).astype(np.float32)
    dout = rng.standard_normal((b, length, heads, dh)).astype(np.float32)
    return q, k, v, dout


def _key_padding(b, length):
    """LLaDA: left padding of 0 and 3 tokens; padded queries still attend to the real keys."""
    am = np.ones((b, length), bool)
    am[1, :3] = False
    return np.broadcast_to(am[:, None, None, :], (b, 1, length, length)).copy()


def _outer_and(b, length):
    """Dream: outer AND of the padding masks; the padded query rows of row 1 attend to nothing."""
    am = np.ones((b, length), bool)
    am[1, :3] = False
    return am[:, None, None, :] & am[:, None, :, None]


def _jax_grads(q, k, v, mask, divisor, dout):
    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, None if mask is None else jnp.asarray(mask), divisor) * dout)

    out = jax.jit(attention, static_argnums=4)(q, k, v, None if mask is None else jnp.asarray(mask), divisor)
    return (out,) + tuple(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))


def _check(got, want, names=("O", "dQ", "dK", "dV")):
    for name, g, w in zip(names, got, want):
        g = np.asarray(g)
        assert np.all(np.isfinite(g)), name
        np.testing.assert_allclose(g.astype(np.float64), w, rtol=2e-5, atol=2e-6, err_msg=name)


# ---- forward and gradients ----------------------------------------------------------------------

@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("masking", [None, "key_padding", "outer_and"])
@pytest.mark.parametrize("divisor", [None, float(np.sqrt(8.0))])
def test_forward_and_gradients_match_float64(heads, kv_heads, masking, divisor):
    b, length = 2, 7
    q, k, v, dout = _inputs(heads * 10 + kv_heads, b, length, heads, kv_heads, scale=0.7)
    mask = {None: None, "key_padding": _key_padding, "outer_and": _outer_and}[masking]
    mask = None if mask is None else mask(b, length)
    _check(_jax_grads(q, k, v, mask, divisor, dout), ref_attention(q, k, v, mask, divisor, dout))


def test_fully_masked_rows_are_uniform_and_pass_no_query_gradient():
    """Dream pads: a query row that attends to nothing averages V uniformly (finite) and its dQ is zero."""
    b, length, heads, kv_heads = 2, 6, 2, 1
    q, k, v, dout = _inputs(3, b, length, heads, kv_heads)
    mask = _outer_and(b, length)
    out, dq, _, _ = _jax_grads(q, k, v, mask, None, dout)
    np.testing.assert_allclose(np.asarray(out)[1, :3], np.broadcast_to(v[1].mean(0).repeat(2, 0)[None], (3, 2, 8)),
                               rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(dq)[1, :3] == 0.0)


def test_large_scores_stay_stable():
    """Scores of magnitude ~50 (softmax close to one-hot) against the float64 reference.

    Near one-hot rows make dS = P (dP - rowsum) a cancellation, so small gradient entries carry absolute
    float32 errors of the size of the largest entries' rounding: the bound is on max |error| relative to
    max |reference| per array (1e-6, i.e. a few float32 ulps of the largest entry; the plain autodiff
    composition shows the same 2-4e-7 here), not elementwise."""
    q, k, v, dout = _inputs(5, heads=2, kv_heads=2, scale=6.0)
    got = _jax_grads(q, k, v, None, None, dout)
    want = ref_attention(q, k, v, None, None, dout)
    for name, g, w in zip(("O", "dQ", "dK", "dV"), got, want):
        g = np.asarray(g, np.float64)
        assert np.all(np.isfinite(g)), name
        assert np.max(np.abs(g - w)) <= 1e-6 * np.max(np.abs(w)), (name, np.max(np.abs(g - w)), np.max(np.abs(w)))


def test_composes_with_checkpoint_and_scan():
    """Two "layers" under lax.scan with a remat'd body: the gradients w.r.t. the stacked q, k, v are the
    per-layer float64 reference gradients (both remat policies the model offers)."""
    b, length, heads, kv_heads = 2, 5, 4, 2
    layers = [_inputs(20 + i, b, length, heads, kv_heads) for i in range(2)]
    q, k, v, dout = (np.stack(x) for x in zip(*layers))
    mask = _outer_and(b, length)
    want = [ref_attention(*layer[:3], mask, 2.0, layer[3]) for layer in layers]
    for policy in (jax.checkpoint_policies.nothing_saveable,
                   jax.checkpoint_policies.dots_with_no_batch_dims_saveable):
        def body(total, xs, policy=policy):
            qi, ki, vi, di = xs
            f = jax.checkpoint(lambda a, b_, c: attention(a, b_, c, jnp.asarray(mask), 2.0), policy=policy)
            return total + jnp.sum(f(qi, ki, vi) * di), None

        def loss(q, k, v):
            return jax.lax.scan(body, jnp.float32(0), (q, k, v, dout))[0]

        grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
        for i in range(2):
            _check([g[i] for g in grads], want[i][1:], names=("dQ", "dK", "dV"))


def test_bf16_compute_dtype():
    """bf16 inputs give bf16 outputs and gradients close to the float64 reference (bf16 has 8 mantissa bits)."""
    q, k, v, dout = _inputs(7, heads=4, kv_heads=2)
    mask = _key_padding(2, 7)
    bf = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, dout)]
    got = _jax_grads(*bf[:3], mask, None, bf[3])
    want = ref_attention(*(np.asarray(x.astype(jnp.float32)) for x in bf[:3]), mask, None,
                         np.asarray(bf[3].astype(jnp.float32)))
    for name, g, w in zip(("O", "dQ", "dK", "dV"), got, want):
        assert g.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(np.asarray(g.astype(jnp.float32)), w, rtol=0.05, atol=0.05, err_msg=name)


def test_bad_shapes_are_rejected():
    q, k, v, _ = _inputs(0, heads=3, kv_heads=2)
    with pytest.raises(ValueError, match="num_heads"):
        attention(q, k, v, None)
    q, k, v, _ = _inputs(0, heads=4, kv_heads=2)
    with pytest.raises(ValueError, match="head dim"):
        attention(q, k[..., :4], v[..., :4], None)
    with pytest.raises(ValueError, match="mask"):
        attention(q, k, v, jnp.ones((2, 7, 7), bool))


# ---- inside the model ---------------------------------------------------------------------------

def test_model_gradient_directional_derivative():
    """jax.grad of a whole tiny Dream model (GQA, left padding, remat + scan) against a central difference
    of the loss along a random direction (fourth-order stencil), in float64 NumPy arithmetic on float32 evaluations."""
    cfg = tiny_dream().replace(remat="full")
    assert cfg.num_kv_heads < cfg.num_heads
    params = init_params(cfg, jax.random.key(0))
    tok = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 8))
    am = np.ones_like(tok)
    am[1, :3] = 0
    _, mask = positions_and_mask(cfg, jnp.asarray(tok), jnp.asarray(am))
    assert not np.asarray(mask)[1, 0, 0].any()           # a fully masked query row is exercised
    w = jax.random.normal(jax.random.key(2), (2, 8, cfg.vocab_size))

    loss = jax.jit(functools.partial(lambda p: jnp.sum(logits(p, cfg, tok, am) * w)))
    grad = jax.jit(jax.grad(lambda p: jnp.sum(logits(p, cfg, tok, am) * w)))(params)
    # Direction: only the attention weights of the layers, scaled to the parameter size.
    rng = np.random.default_rng(3)
    direction = jax.tree.map(np.zeros_like, params)
    for name in ("q", "k", "v"):
        direction["layers"][name] = 0.02 * rng.standard_normal(params["layers"][name].shape).astype(np.float32)
    # Fourth-order central difference: its truncation error is O(eps^4), so eps can be large enough that the
    # float32 rounding of the loss (~1e-6 on a loss of ~14, amplified by 1.5/eps) stays near 1e-5 relative.
    # A second-order stencil at eps=3e-3 sat at ~3e-4 from rounding alone.
    eps = 3e-2

    def at(step):
        return float(loss(jax.tree.map(lambda p, d: p + step * d, params, direction)))

    fd = (-at(2 * eps) + 8 * at(eps) - 8 * at(-eps) + at(-2 * eps)) / (12 * eps)
    analytic = sum(float(np.sum(np.asarray(g, np.float64) * d))
                   for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    assert abs(analytic) > 1e-1                            # the check is not trivially 0 == 0
    np.testing.assert_allclose(analytic, fd, rtol=1e-4)
