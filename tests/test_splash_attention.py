"""The splash attention path (``attention_impl="splash"``, the Pallas TPU kernel) in Pallas interpret mode on
the CPU, fp32, against the einsum path and a float64 NumPy reference.

Covered: forward and gradient of the full-sequence attention with both families' padding masks (left and
right padded rows), grouped-query heads (4 query heads on 2 kv heads), a score divisor that is not a power
of two, a length over one kernel block (padded inside the wrapper to a block multiple), the kernel under
``jax.shard_map`` on a mesh of fake CPU devices, the model's logits and weight gradients, and the cached
block's attention (forward only). What padded rows get is asserted too: LLaDA's pad rows equal the einsum
path (they attend the real keys), Dream's attend the pad keys only (the einsum path gives them uniform
weights over every key); either way no real position sees a pad key.

Interpret mode is slow (it runs the kernel's grid as a loop), so every compiled function is computed once
in a module-scoped fixture and the shapes are tiny.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdsd_jax.models.config import execution_platform, execution_record, tiny_dream, tiny_llada
from gdsd_jax.models.denoiser import (
    attention_reference,
    cached_logits,
    init_params,
    logits,
    logits_and_cache,
    positions_and_mask,
)
from gdsd_jax.models.splash import splash_attention

DIVISOR = 3.0          # not a power of two: the wrapper scales q itself
TOL = dict(rtol=2e-5, atol=2e-6)
# Logits of the two-layer model, O(1): the kernel divides q by the divisor where the einsum path divides the
# scores, which moves the last bits.
MODEL_TOL = dict(rtol=2e-5, atol=1e-5)


def _padding(b: int, length: int) -> np.ndarray:
    """Rows: unpadded, left pad 3, right pad 2 (EOS padding), left pad 1."""
    am = np.ones((b, length), bool)
    am[1, :3] = False
    am[2, -2:] = False
    am[3, :1] = False
    return am


def _qkv(length: int, b: int = 4, heads: int = 4, kv_heads: int = 2, dh: int = 16):
    ks = jax.random.split(jax.random.key(length), 4)
    q = jax.random.normal(ks[0], (b, length, heads, dh))
    k = jax.random.normal(ks[1], (b, length, kv_heads, dh))
    v = jax.random.normal(ks[2], (b, length, kv_heads, dh))
    dout = jax.random.normal(ks[3], q.shape)
    return q, k, v, dout


def _numpy_attention(q, k, v, allowed: np.ndarray) -> np.ndarray:
    """float64 reference: q [B, Lq, H, Dh], k, v [B, Lk, KV, Dh], allowed bool [B, Lq, Lk] (no empty rows)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)             # head h reads kv head h // g
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / DIVISOR
    s = np.where(allowed[:, None], s, -np.inf)
    with np.errstate(invalid="ignore"):         # rows with no allowed key are NaN and never compared
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def _family_mask(family: str, am: np.ndarray):
    cfg = (tiny_llada if family == "llada" else tiny_dream)()
    return positions_and_mask(cfg, jnp.zeros(am.shape, jnp.int32), jnp.asarray(am))[1]


def _value_and_grads(attn, q, k, v, mask, dout):
    """Output and gradients of ``sum(attn(q, k, v) * dout)`` with respect to q, k, v (one jit)."""
    def loss(q, k, v):
        out = attn(q, k, v, mask, DIVISOR)
        return jnp.sum(out * dout), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


# L136 > BLOCK: two query and key blocks after padding to 256.
CASES = {"llada_L12": ("llada", 12), "dream_L12": ("dream", 12), "llada_L136": ("llada", 136)}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """Kernel and einsum outputs and gradients of one (family mask, length) case. The cotangent is zero on
    Dream's pad rows (their outputs differ by design and are never used)."""
    family, length = CASES[request.param]
    q, k, v, dout = _qkv(length)
    am = _padding(4, length)
    mask = _family_mask(family, am)
    if family == "dream":
        dout = dout * am[:, :, None, None]
    interp = functools.partial(splash_attention, interpret=True)
    got = _value_and_grads(interp, q, k, v, mask, dout)
    want = _value_and_grads(attention_reference, q, k, v, mask, dout)
    return dict(family=family, am=am, q=q, k=k, v=v, mask=mask, got=got, want=want)


def test_forward_matches_the_einsum_path_and_float64(case):
    am, (out, _), (ref, _) = case["am"], case["got"], case["want"]
    real = _numpy_attention(case["q"], case["k"], case["v"], np.broadcast_to(am[:, None, :], am.shape + am.shape[1:]))
    if case["family"] == "llada":
        # Key padding: every row (pad rows too) attends the real keys, in the kernel as in the einsum path.
        np.testing.assert_allclose(out, ref, **TOL)
        np.testing.assert_allclose(out, real, **TOL)
    else:
        np.testing.assert_allclose(np.asarray(out)[am], np.asarray(ref)[am], **TOL)
        np.testing.assert_allclose(np.asarray(out)[am], real[am], **TOL)


def test_dream_pad_rows_attend_the_pad_keys_only():
    """Dream's pad rows (masked against every key) get attention over the pad keys, finite; the einsum path
    gives them uniform weights over all keys. Neither reaches a real row (asserted above)."""
    length = 12
    q, k, v, _ = _qkv(length)
    am = _padding(4, length)
    out = np.asarray(splash_attention(q, k, v, _family_mask("dream", am), DIVISOR, interpret=True))
    pad_only = _numpy_attention(q, k, v, np.broadcast_to(~am[:, None, :], am.shape + am.shape[1:]))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[~am], pad_only[~am], **TOL)
    uniform = np.asarray(attention_reference(q, k, v, _family_mask("dream", am), DIVISOR))
    assert np.abs(out[~am] - uniform[~am]).max() > 1e-2      # the difference is real, and documented


def test_gradients_match_the_einsum_path(case):
    (_, got), (_, want) = case["got"], case["want"]
    for name, g, w in zip("qkv", got, want):
        scale = float(np.abs(w).max())
        assert scale > 0, f"d{name}: a zero gradient compares nothing"
        np.testing.assert_allclose(g, w, rtol=TOL["rtol"], atol=TOL["atol"] * max(scale, 1.0), err_msg=f"d{name}")


@pytest.mark.parametrize("axes", [dict(data=1, fsdp=4, tensor=2), dict(data=2, fsdp=1, tensor=4)],
                         ids=["kv_heads_split", "kv_heads_repeated"])
def test_under_shard_map_on_a_mesh(axes):
    """Batch over (data, fsdp), heads over tensor; with tensor 4 the 2 kv heads cannot split and each query
    head gets its kv head's copy. Same values as without a mesh."""
    from gdsd_jax.distributed.mesh import make_mesh

    mesh = make_mesh(**axes)
    q, k, v, _ = _qkv(12)
    mask = _family_mask("llada", _padding(4, 12))
    f = jax.jit(lambda q, k, v, mask: splash_attention(q, k, v, mask, DIVISOR, mesh=mesh, interpret=True))
    np.testing.assert_allclose(f(q, k, v, mask), attention_reference(q, k, v, mask, DIVISOR), **TOL)


# ---- the model -------------------------------------------------------------------------------------

def _tiny(make, **kw):
    return make(vocab_size=64, hidden_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=12, mlp_dim=40,
                mask_token_id=60, eos_token_id=61, pad_token_id=61, max_seq_len=32, **kw)


@pytest.mark.slow    # ~20 s: the interpret-mode kernel's forward and backward in a two-layer model
def test_model_logits_and_weight_gradients_match_the_portable_path():
    """Dream layout (GQA, biases), left-padded rows. Compared where a loss can look: positions whose aligned
    logit comes from a real state (Dream's logit at i is the state at i - 1, so the first real token of a
    left-padded row reads a pad state: a prompt token, never scored)."""
    cfg = _tiny(tiny_dream, attention_impl="xla", merge_projections=False, merge_token_dims=False)
    params = init_params(cfg, jax.random.key(0), std=0.2)
    tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, 60)
    am = jnp.ones((3, 9), bool).at[1, :3].set(False).at[2, :1].set(False)
    scored = am & jnp.roll(am, 1, axis=1)
    weights = jax.random.normal(jax.random.key(2), (3, 9, 64)) * scored[:, :, None]

    def run(cfg):
        def loss(p):
            out = logits(p, cfg, tokens, am)
            return jnp.sum(jax.nn.log_softmax(out) * weights), out
        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, want_out), want = run(cfg)
    (_, got_out), got = run(cfg.replace(attention_impl="splash"))
    np.testing.assert_allclose(np.asarray(got_out)[np.asarray(scored)], np.asarray(want_out)[np.asarray(scored)],
                               **MODEL_TOL)
    for (path, w), g in zip(jax.tree.flatten_with_path(want)[0], jax.tree.leaves(got)):
        scale = float(np.abs(w).max())
        assert scale > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(g, w, rtol=MODEL_TOL["rtol"], atol=MODEL_TOL["atol"] * max(scale, 1.0),
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("make", [pytest.param(tiny_llada, marks=pytest.mark.slow), tiny_dream],
                         ids=["llada", "dream"])
def test_cached_block_matches_the_full_forward(make):
    """The dual / prefix cache's window: fresh keys of the window plus cached keys elsewhere, through the
    forward-only kernel, equal the full forward's logits (left-padded rows, GQA; Dream's window also runs
    the position before it). 6-9 s each under interpret mode: LLaDA's case, the same path without Dream's
    extra leading position, is marked slow."""
    cfg = _tiny(make, attention_impl="splash")
    params = init_params(cfg, jax.random.key(1), std=0.2)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 60, size=(2, 20)), jnp.int32).at[:, 12:].set(cfg.mask_token_id)
    am = jnp.ones((2, 20), jnp.int32).at[1, :4].set(0)

    @jax.jit
    def run(tokens, am, start):
        full = logits(params, cfg.replace(attention_impl="xla"), tokens, am)
        _, cache = logits_and_cache(params, cfg.replace(attention_impl="xla"), tokens, am,
                                    positions=jnp.zeros((2, 1), jnp.int32))
        return full, cached_logits(params, cfg, cache, tokens, am, start, 4, 4)

    full, got = run(tokens, am, jnp.int32(12))
    np.testing.assert_allclose(got, np.asarray(full)[:, 12:16], **MODEL_TOL)


# ---- auto on TPU devices ---------------------------------------------------------------------------

def test_auto_picks_the_kernel_for_tpu_devices_and_it_compiles():
    """Under a deviceless TPU compile the default backend is the CPU but the mesh's devices are TPU chips:
    ``auto`` resolves from the mesh, and the TPU compiler (Mosaic) compiles the kernel's forward and
    backward under ``shard_map``."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the libtpu package (pip install "
                                         "'gdsd-jax[tpu]'); without it no TPU device exists here")
    from gdsd_jax.distributed.mesh import make_mesh, named_sharding
    from gdsd_jax.experiments.plan import tpu_devices

    mesh = make_mesh(data=1, fsdp=4, tensor=1, devices=tpu_devices("v5p", 4))
    assert jax.default_backend() == "cpu" and execution_platform(mesh) == "tpu"
    assert execution_record(tiny_dream(), mesh) == dict(platform="tpu", attention_impl="splash",
                                                         merge_projections=False, merge_token_dims=False,
                                                         scan_layers=True)
    shape = (4, 200, 8, 128)
    spec = named_sharding(mesh, ("batch", "length", "heads", "head_dim"), shape)
    args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=spec) for _ in range(3)]
    am = jax.ShapeDtypeStruct((4, 1, 200, 200), jnp.bool_, sharding=named_sharding(mesh, ("batch",) + (None,) * 3,
                                                                                      (4, 1, 200, 200)))

    def loss(q, k, v, mask):
        return jnp.sum(splash_attention(q, k, v, mask, 11.3, mesh=mesh).astype(jnp.float32))

    # The suite's "highest" matmul precision (exact fp32 on the CPU) asks Mosaic for an fp32 pass over bf16
    # operands, which it rejects ("Bad lhs type"); a TPU run uses the default precision.
    with jax.default_matmul_precision("default"):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args, am).compile()
        # The cached block's forward-only call: a 33-query window (Dream's block of 32 plus the position
        # before it; one 48-row query block) against the cached and fresh keys.
        window = jax.ShapeDtypeStruct((4, 33, 8, 128), jnp.bfloat16, sharding=named_sharding(
            mesh, ("batch", "length", "heads", "head_dim"), (4, 33, 8, 128)))
        wmask = jax.ShapeDtypeStruct((4, 1, 33, 200), jnp.bool_, sharding=am.sharding)
        cached = jax.jit(lambda q, k, v, m: splash_attention(q, k, v, m, 11.3, mesh=mesh, backward=False)).lower(
            window, *args[1:], wmask).compile()
    assert "tpu_custom_call" in compiled.as_text() and "tpu_custom_call" in cached.as_text()
