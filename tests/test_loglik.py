"""Denoiser log-likelihoods: chunked LM head + log-softmax against the naive computation and float64
NumPy references written from the spec; TLC centring as a no-op; finite-difference gradients (float64);
the coupled statistics of a tiny model against NumPy computed from the model's own logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdsd_jax.distributed.mesh import make_mesh
from gdsd_jax.models import denoiser
from gdsd_jax.models.config import tiny_dream, tiny_llada
from gdsd_jax.objectives import RolloutBatch, loglik
from gdsd_jax.objectives.masking import coupled_masks, d1_masks

# ---- NumPy float64 references -------------------------------------------------------------------

def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_scores(h, w, targets, kind="logprob", topk=0):
    z = np.einsum("rpd,dv->rpv", np.asarray(h, np.float64), np.asarray(w, np.float64))
    t = np.asarray(targets)[..., None]
    if kind == "logprob":
        return np.take_along_axis(np_log_softmax(z), t, -1)[..., 0]
    zy = np.take_along_axis(z, t, -1)[..., 0]
    if topk:
        return zy - np.sort(z, -1)[..., -topk:].mean(-1)
    lp = np_log_softmax(z)        # Eq. 8 literally: log p(y) - mean_v log p(v)
    return np.take_along_axis(lp, t, -1)[..., 0] - lp.mean(-1)


def np_coupled_ell(lp_masked_y, lp_compl_y, is_mask, x, weights, weighting):
    """ℓ(b,m) from the per-position target log-probs of the two passes (float64, from the spec)."""
    length = is_mask.shape[-1]
    s = np.where(is_mask, lp_masked_y, lp_compl_y) * weights[:, None, :]
    if weighting == "none":
        return 0.5 * s.sum(-1)
    t = x / (length + 1)
    tc = length / (length + 1) - t
    with np.errstate(divide="ignore", invalid="ignore"):
        wm = np.where(is_mask, 1.0 / t[..., None], 1.0 / tc[..., None])
    wm = np.where(np.isfinite(wm), wm, 0.0)
    return 0.5 * (s * wm).sum(-1)


def _rand(shape, seed, scale=1.0, dtype=np.float32):
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


# ---- chunked vs naive ---------------------------------------------------------------------------

R, P, D, V = 3, 11, 16, 200
# (64, 4), (7, 5): a shifted last chunk in both dimensions; (50, None) vocabulary only; (None, 3) positions
# only; (256, 16): one chunk
CHUNKS = [(64, 4), (50, None), (None, 3), (7, 5), (256, 16)]


def _scores_and_grad_fn(h, w, t, g, *, kind, centring, topk, vocab_chunk, seq_chunk):
    def f(h, w):
        s = loglik.token_scores(h, w, t, kind=kind, centring=centring, topk=topk, vocab_chunk=vocab_chunk,
                                seq_chunk=seq_chunk)
        return jnp.sum(s * g), s
    (_, s), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(h, w)
    return s, grads


_scores_and_grad = jax.jit(_scores_and_grad_fn,
                           static_argnames=("kind", "centring", "topk", "vocab_chunk", "seq_chunk"))


@functools.partial(jax.jit, static_argnames=("kind", "centring", "topk"))
def _all_chunkings(h, w, t, g, *, kind, centring, topk):
    kw = dict(kind=kind, centring=centring, topk=topk)
    return [_scores_and_grad_fn(h, w, t, g, vocab_chunk=vc, seq_chunk=sc, **kw) for vc, sc in [(None, None)] + CHUNKS]


@pytest.mark.parametrize("kind,centring,topk", [("logprob", None, 0), ("logprob", "detached_logits", 0),
                                                ("centred_logprob", None, 0), ("centred_logprob", None, 5)])
def test_chunked_matches_naive_and_chunk_size_independent(kind, centring, topk):
    h, w = _rand((R, P, D), 0), _rand((D, V), 1, 0.5)
    t = np.random.default_rng(2).integers(0, V, (R, P)).astype(np.int32)
    g = _rand((R, P), 3)
    (s0, (gh0, gw0)), *rest = _all_chunkings(h, w, t, g, kind=kind, centring=centring, topk=topk)
    for (vc, sc), (s, (gh, gw)) in zip(CHUNKS, rest):
        np.testing.assert_allclose(np.asarray(s), np.asarray(s0), rtol=1e-6, atol=1e-6, err_msg=f"chunks {vc},{sc}")
        np.testing.assert_allclose(np.asarray(gh), np.asarray(gh0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(gw), np.asarray(gw0), rtol=1e-5, atol=1e-6)
    # and the fp32 values are the float64 reference to fp32 accuracy
    np.testing.assert_allclose(np.asarray(s0), np_scores(h, w, t, kind, topk), rtol=2e-6, atol=2e-6)


def test_float64_reference_and_finite_differences():
    """In float64, every score kind equals the NumPy reference to ~1e-12 and its gradient (wrt hidden
    states and LM head) matches central finite differences."""
    with jax.enable_x64(True):
        h, w = _rand((2, 6, 6), 4, dtype=np.float64), _rand((6, 40), 5, 0.7, dtype=np.float64)
        t = np.random.default_rng(6).integers(0, 40, (2, 6)).astype(np.int32)
        g = _rand((2, 6), 7, dtype=np.float64)
        for kind, centring, topk in [("logprob", None, 0), ("centred_logprob", None, 0), ("centred_logprob", None, 4)]:
            kw = dict(kind=kind, centring=centring, topk=topk, vocab_chunk=10, seq_chunk=3)
            s, (gh, gw) = _scores_and_grad(h, w, t, g, **kw)
            assert s.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(s), np_scores(h, w, t, kind, topk), rtol=1e-12, atol=1e-12)

            def f(hh, ww):
                return float(np.sum(np.asarray(_scores_and_grad(hh, ww, t, g, **kw)[0]) * g))

            rng = np.random.default_rng(8)
            for _ in range(3):
                dh, dw = rng.standard_normal(h.shape), rng.standard_normal(w.shape)
                eps = 1e-6
                fd = (f(h + eps * dh, w + eps * dw) - f(h - eps * dh, w - eps * dw)) / (2 * eps)
                an = float(np.sum(np.asarray(gh) * dh) + np.sum(np.asarray(gw) * dw))
                assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), (kind, topk, fd, an)


def test_tlc_centring_is_a_noop_values_and_gradients():
    """z - stop_grad(mean z) before the log-softmax leaves log-probs and their gradients unchanged."""
    h, w = _rand((R, P, D), 10, 2.0), _rand((D, V), 11, 2.0)       # large logits: centring is not trivial
    t = np.random.default_rng(12).integers(0, V, (R, P)).astype(np.int32)
    g = _rand((R, P), 13)
    mean_logit = np.abs(np.einsum("rpd,dv->rpv", h, w).mean(-1)).max()
    assert mean_logit > 0.5           # the constant removed is far from zero
    for vc, sc in [(None, None), (50, None)]:
        a, (gha, gwa) = _scores_and_grad(h, w, t, g, kind="logprob", centring=None, topk=0, vocab_chunk=vc,
                                         seq_chunk=sc)
        b, (ghb, gwb) = _scores_and_grad(h, w, t, g, kind="logprob", centring="detached_logits", topk=0,
                                         vocab_chunk=vc, seq_chunk=sc)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=2e-6)
        np.testing.assert_allclose(np.asarray(ghb), np.asarray(gha), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(gwb), np.asarray(gwa), rtol=1e-5, atol=1e-6)
    with jax.enable_x64(True):
        h64, w64, g64 = h.astype(np.float64), w.astype(np.float64), g.astype(np.float64)
        a, (gha, gwa) = _scores_and_grad(h64, w64, t, g64, kind="logprob", centring=None, topk=0, vocab_chunk=50,
                                         seq_chunk=None)
        b, (ghb, gwb) = _scores_and_grad(h64, w64, t, g64, kind="logprob", centring="detached_logits", topk=0,
                                         vocab_chunk=50, seq_chunk=None)
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(np.asarray(ghb), np.asarray(gha), rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(np.asarray(gwb), np.asarray(gwa), rtol=1e-12, atol=1e-13)


# ---- coupled reduction --------------------------------------------------------------------------

@pytest.mark.parametrize("b,m,length", [(2, 1, 5), (3, 2, 8), (4, 3, 1)])
@pytest.mark.parametrize("weighting", ["none", "elbo"])
def test_coupled_loglik_reduction(b, m, length, weighting):
    rng = np.random.default_rng(b * 10 + m)
    masks = coupled_masks(jax.random.key(b + m), b, length, m)
    is_mask, x = np.asarray(masks["is_mask"]), np.asarray(masks["num_masked"])
    lp_m, lp_c = -rng.random((b, m, length)) * 5, -rng.random((b, m, length)) * 5
    weights = (rng.random((b, length)) < 0.7).astype(np.float64)
    scores = np.where(is_mask, lp_m, lp_c)
    got = loglik.coupled_loglik(jnp.asarray(scores, jnp.float32), masks["is_mask"], masks["num_masked"],
                                jnp.asarray(weights, jnp.float32), weighting)
    want = np_coupled_ell(lp_m, lp_c, is_mask, x, weights, weighting)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ---- end to end on tiny models ------------------------------------------------------------------

def _batch(model_cfg, b, lp, length, seed):
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, model_cfg.mask_token_id, (b, lp + length)).astype(np.int32)
    pm = np.ones((b, lp), np.int32)
    pm[0, :2] = 0                                               # left padding on one row
    cm = (np.arange(length)[None] < rng.integers(1, length + 1, b)[:, None]).astype(np.int32)
    return RolloutBatch.create(seq, pm, cm)


_model_logits = jax.jit(denoiser.logits, static_argnums=(1,))


def _np_pass_logprobs(params, model_cfg, tokens, lp, targets, attention_mask=None):
    logits = np.asarray(_model_logits(params, model_cfg, jnp.asarray(tokens),
                                      None if attention_mask is None else jnp.asarray(attention_mask)))
    lps = np_log_softmax(logits[:, lp:])
    return np.take_along_axis(lps, targets[..., None], -1)[..., 0], logits[:, lp:]


@functools.lru_cache(maxsize=None)
def _model(family):
    cfg = tiny_llada(vocab_size=96, mask_token_id=90, eos_token_id=91, pad_token_id=91) if family == "llada" else \
        tiny_dream(vocab_size=96, mask_token_id=90, eos_token_id=91, pad_token_id=91)
    return cfg, denoiser.init_params(cfg, jax.random.key(0), std=0.3)


@pytest.mark.parametrize("family,b,lp,length,m", [("llada", 3, 4, 7, 2), ("dream", 2, 3, 9, 3)])
def test_coupled_statistic_against_numpy(family, b, lp, length, m):
    model_cfg, params = _model(family)
    batch = _batch(model_cfg, b, lp, length, seed=b + length)
    masks = jax.jit(coupled_masks, static_argnums=(1, 2, 3))(jax.random.key(length), b, length, m)
    is_mask, x = np.asarray(masks["is_mask"]), np.asarray(masks["num_masked"])
    seq = np.asarray(batch.sequences)
    comp = seq[:, lp:]
    mask_id = model_cfg.mask_token_id
    masked = np.concatenate([np.repeat(seq[:, None, :lp], m, 1), np.where(is_mask, mask_id, comp[:, None])], -1)
    compl = np.concatenate([np.repeat(seq[:, None, :lp], m, 1), np.where(is_mask, comp[:, None], mask_id)], -1)
    tg = np.repeat(comp[:, None], m, 1).reshape(b * m, length)
    lpm, zm = _np_pass_logprobs(params, model_cfg, masked.reshape(b * m, -1), lp, tg)
    lpc, zc = _np_pass_logprobs(params, model_cfg, compl.reshape(b * m, -1), lp, tg)
    lpm, lpc = lpm.reshape(b, m, length), lpc.reshape(b, m, length)
    cm = np.asarray(batch.completion_mask, np.float64)
    ones = np.ones_like(cm)
    # Eq. 8 reference: log p(y) - mean_v log p(v) of the pass that scores each position
    eq8 = lambda z: (np.take_along_axis(np_log_softmax(z), tg[..., None], -1)[..., 0]
                     - np_log_softmax(z).mean(-1)).reshape(b, m, length)
    cases = [
        (dict(weighting="none"), np_coupled_ell(lpm, lpc, is_mask, x, ones, "none")),
        (dict(weighting="none", score_positions="completion_mask"), np_coupled_ell(lpm, lpc, is_mask, x, cm, "none")),
        (dict(weighting="elbo", centring="detached_logits"), np_coupled_ell(lpm, lpc, is_mask, x, ones, "elbo")),
        (dict(weighting="elbo"), np_coupled_ell(lpm, lpc, is_mask, x, ones, "elbo")),
        (dict(weighting="elbo", kind="centred_logprob"), np_coupled_ell(eq8(zm), eq8(zc), is_mask, x, ones, "elbo")),
    ]
    f = jax.jit(lambda p, bt, mk: [loglik.coupled_statistic(p, model_cfg, bt, mk, vocab_chunk=48, seq_chunk=None, **kw)
                                   for kw, _ in cases])
    for (kw, want), got in zip(cases, f(params, batch, masks)):
        assert got.shape == (b, m)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4, err_msg=str(kw))


def test_attention_mask_option_and_one_step_logprobs():
    model_cfg, params = _model("llada")
    b, lp, length = 3, 4, 8
    batch = _batch(model_cfg, b, lp, length, seed=1)
    seq = np.asarray(batch.sequences)
    comp = seq[:, lp:]
    am = np.asarray(batch.attention_mask())
    # d1 one-step, with and without the attention mask
    masks = d1_masks(jax.random.key(3), b, lp, 0.3)
    toks = np.concatenate([np.where(np.asarray(masks["prompt_is_mask"]), 90, seq[:, :lp]),
                           np.full_like(comp, 90)], 1)
    both = jax.jit(lambda p: [loglik.one_step_logprobs(p, model_cfg, batch, masks, use_attention_mask=use,
                                                       vocab_chunk=32, seq_chunk=None)
                              for use in (False, True)])(params)
    for use, got in zip((False, True), both):
        want, _ = _np_pass_logprobs(params, model_cfg, toks, lp, comp, am if use else None)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # the option makes a difference here (row 0 is left-padded)
    assert not np.allclose(_np_pass_logprobs(params, model_cfg, toks, lp, comp, am)[0],
                           _np_pass_logprobs(params, model_cfg, toks, lp, comp, None)[0])
    # (SPG's multi-mask log-probs with the attention mask are checked end to end in test_objectives_registry)


def test_statistics_on_a_device_mesh_match_single_device():
    model_cfg, params = _model("llada")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = jax.device_put(params, denoiser.param_shardings(model_cfg, mesh))
    b, lp, length = 4, 3, 8
    batch = _batch(model_cfg, b, lp, length, seed=5)
    masks = coupled_masks(jax.random.key(1), b, length, 2)
    kw = dict(weighting="elbo", vocab_chunk=32, seq_chunk=4)   # 3 vocabulary x 2 position chunks
    ref = jax.jit(lambda p: loglik.coupled_statistic(p, model_cfg, batch, masks, **kw))(params)
    got = jax.jit(lambda p: loglik.coupled_statistic(p, model_cfg, batch, masks, mesh=mesh, **kw))(sharded)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


# ---- GDSD-logit: the chunked squared logit distance ------------------------------------------------

def np_sqdist(h, w, teachers, targets, energy):
    """Σ_v (z~θ - z*)² with z* = Σ c (z_t - mean z_t) + e (1[v = y] - 1/V), float64."""
    f = lambda a, b: np.einsum("rpd,dv->rpv", np.asarray(a, np.float64), np.asarray(b, np.float64))
    cen = lambda z: z - z.mean(-1, keepdims=True)
    v = w.shape[1]
    zstar = sum(c * cen(f(ht, wt)) for c, ht, wt in teachers)
    zstar = zstar + energy[..., None] * (np.eye(v)[targets] - 1.0 / v)
    return ((cen(f(h, w)) - zstar) ** 2).sum(-1)


def test_logit_match_sqdist_chunked_naive_numpy_and_finite_differences():
    from gdsd_jax.objectives.teacher import logit_match_sqdist
    r, p, d, v = 2, 7, 8, 50
    h, w = _rand((r, p, d), 20), _rand((d, v), 21, 0.5)
    ho, hr, wr = _rand((r, p, d), 22), _rand((r, p, d), 23), _rand((d, v), 24, 0.5)
    t = np.random.default_rng(25).integers(0, v, (r, p)).astype(np.int32)
    e = _rand((r, p), 26)
    g = _rand((r, p), 27)

    def run(h, w, ho, hr, wr, e, g, vc, sc):
        f = lambda h, w: jnp.sum(g * logit_match_sqdist(h, w, [(0.7, ho, w), (0.3, hr, wr)], t, e,
                                                         vocab_chunk=vc, seq_chunk=sc))
        return jax.value_and_grad(f, argnums=(0, 1))(h, w)

    fn = jax.jit(lambda *a: [run(*a, vc, sc) for vc, sc in [(None, None), (16, 3), (50, None), (7, 7)]])
    (v0, (gh0, gw0)), *rest = fn(h, w, ho, hr, wr, e, g)
    want = np.sum(g * np_sqdist(h, w, [(0.7, ho, w), (0.3, hr, wr)], t, e))
    np.testing.assert_allclose(float(v0), want, rtol=1e-5)
    for val, (gh, gw) in rest:
        np.testing.assert_allclose(float(val), float(v0), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(gh), np.asarray(gh0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(np.asarray(gw), np.asarray(gw0), rtol=1e-4, atol=1e-5)
    with jax.enable_x64(True):
        a64 = [x.astype(np.float64) for x in (h, w, ho, hr, wr, e, g)]
        val, (gh, gw) = jax.jit(lambda *a: run(*a, 16, 3))(*a64)
        hh0, ww0, ho64, hr64, wr64, e64, g64 = a64
        # the teachers are constants: the first teacher keeps the unperturbed head even though it is the
        # student's head array
        ref = lambda hh, ww: float(np.sum(g64 * np_sqdist(hh, ww, [(0.7, ho64, ww0), (0.3, hr64, wr64)], t, e64)))
        np.testing.assert_allclose(float(val), ref(hh0, ww0), rtol=1e-12)
        rng = np.random.default_rng(28)
        for _ in range(3):
            dh, dw = rng.standard_normal(h.shape), rng.standard_normal(w.shape)
            eps = 1e-6
            fd = (ref(hh0 + eps * dh, ww0 + eps * dw) - ref(hh0 - eps * dh, ww0 - eps * dw)) / (2 * eps)
            an = float(np.sum(np.asarray(gh) * dh) + np.sum(np.asarray(gw) * dw))
            assert abs(fd - an) <= 1e-6 * max(1.0, abs(an)), (fd, an)
