"""The objective registry end to end on a tiny random denoiser: every objective's loss (and GDSD-logit's
teacher logits) against float64 NumPy computed from the model's own logits under the same masks, the
on-policy closed-form gradient through the model, LoRA gradients, config validation and defaults."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdsd_jax.models import denoiser
from gdsd_jax.models.config import tiny_llada
from gdsd_jax.objectives import (
    ObjectiveConfig,
    RolloutBatch,
    compute_advantages,
    config_class,
    get_objective,
    objective_config,
    objective_names,
)
from gdsd_jax.objectives.teacher import teacher_logits, teacher_sequence_target

MASK = 90
MODEL = tiny_llada(vocab_size=96, mask_token_id=MASK, eos_token_id=91, pad_token_id=91, num_layers=1)
_logits = jax.jit(denoiser.logits, static_argnums=(1,))


@functools.lru_cache(maxsize=None)
def _params():
    p = denoiser.init_params(MODEL, jax.random.key(0), std=0.3)
    old = jax.tree.map(lambda x, k: x + 0.01 * jax.random.normal(k, x.shape), p,
                       jax.tree.unflatten(jax.tree.structure(p), list(jax.random.split(jax.random.key(1),
                                                                                      len(jax.tree.leaves(p))))))
    ref = jax.tree.map(lambda x: x * 0.98, p)
    return p, old, ref


def _batch(b, lp, length, seed):
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, MASK, (b, lp + length)).astype(np.int32)
    pm = np.ones((b, lp), np.int32)
    pm[0, :1] = 0
    cm = (np.arange(length)[None] < rng.integers(1, length + 1, b)[:, None]).astype(np.int32)
    return RolloutBatch.create(seq, pm, cm)


# ---- NumPy float64 references from the model's logits -------------------------------------------

def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_pass(params, tokens, lp, attention=None):
    """Completion logits [N, L, V] (float64) of the model on ``tokens``."""
    z = _logits(params, MODEL, jnp.asarray(tokens), None if attention is None else jnp.asarray(attention))
    return np.asarray(z, np.float64)[:, lp:]


def np_coupled(params, batch, masks):
    """Per-position logits of the pass that scores each position: [B, M, L, V]."""
    seq, lp = np.asarray(batch.sequences), batch.prompt_len
    im = np.asarray(masks["is_mask"])
    b, m, length = im.shape
    comp = seq[:, lp:]
    pre = np.repeat(seq[:, None, :lp], m, 1)
    masked = np.concatenate([pre, np.where(im, MASK, comp[:, None])], -1).reshape(b * m, -1)
    compl = np.concatenate([pre, np.where(im, comp[:, None], MASK)], -1).reshape(b * m, -1)
    zm = np_pass(params, masked, lp).reshape(b, m, length, -1)
    zc = np_pass(params, compl, lp).reshape(b, m, length, -1)
    return np.where(im[..., None], zm, zc)


def np_ell(z, batch, masks, weighting, weights):
    comp = np.asarray(batch.completion)
    im, x = np.asarray(masks["is_mask"]), np.asarray(masks["num_masked"])
    length = im.shape[-1]
    lp = np.take_along_axis(np_log_softmax(z), np.broadcast_to(comp[:, None, :, None], z.shape[:-1] + (1,)),
                            -1)[..., 0]
    s = lp * weights[:, None]
    if weighting == "none":
        return 0.5 * s.sum(-1)
    t = x / (length + 1)
    tc = (length - x) / (length + 1)
    with np.errstate(divide="ignore"):
        w = np.where(im, 1 / t[..., None], 1 / tc[..., None])
    return 0.5 * (s * np.where(np.isfinite(w), w, 0)).sum(-1)


def np_gdsd(ell, old, ref, adv, n, psi, beta, eps):
    lo, hi = np.log(1 - eps), np.log(1 + eps)
    b, m = ell.shape
    sq = (np.clip(ell - old, lo, hi) / n[:, None] - psi * adv[:, None]) ** 2
    return sq.sum() / b + beta * (0.5 * (ell - ref) ** 2 / n[:, None]).sum() / (b * m)


def np_espo(ell, old, ref, adv, n, beta, eps):
    lb, lo_, lr = ell.mean(1), old.mean(1), ref.mean(1)
    rho = np.exp((lb - lo_) / n)
    b = ell.shape[0]
    return -np.minimum(rho * adv, np.clip(rho, 1 - eps, 1 + eps) * adv).sum() / b + \
        beta * (0.5 * (lb - lr) ** 2 / n).sum() / b


def np_centred(z):
    return z - z.mean(-1, keepdims=True)


# ---- end to end ---------------------------------------------------------------------------------

CASES = [(3, 4, 8, 2, 3), (4, 3, 6, 1, 2)]       # B, Lp, L, M, G


def _run(name, cfg, batch, adv, key, mu=2):
    obj = get_objective(name)
    p, p_old, p_ref = _params()

    @jax.jit
    def step(p, p_old, p_ref, batch, adv, key):
        masks = obj.draw_masks(key, batch, cfg)
        old = obj.statistics(p_old, MODEL, batch, masks, cfg) if obj.needs_old(cfg, mu) else None
        ref = obj.statistics(p_ref, MODEL, batch, masks, cfg) if obj.needs_ref(cfg) else None
        out = obj.loss(p, MODEL, batch, masks, old, ref, adv, cfg)
        return masks, out

    return step(p, p_old, p_ref, batch, adv, key)


@pytest.mark.parametrize("name,case", [("gdsd", 0), ("gdsd_tlc", 1), ("espo", 0)])
def test_coupled_objectives_against_numpy(name, case):
    b, lp, length, m, g = CASES[case]
    batch = _batch(b, lp, length, seed=b)
    adv = compute_advantages(jnp.asarray(np.random.default_rng(b).random(b), jnp.float32), g)
    p, p_old, p_ref = _params()
    n = np.full(b, float(length))
    weighting = "none" if name == "gdsd" else "elbo"
    eps = 0.5 if name == "gdsd" else 0.05     # wide bands: both clipped and unclipped rows occur
    psi = {} if name == "espo" else {"psi": 2.0}            # ESPO's loss has no target scale
    cfg = objective_config(name=name, num_mc=m, beta=0.01, epsilon_low=eps, vocab_chunk=40, seq_chunk=5, **psi)
    masks, out = _run(name, cfg, batch, adv, jax.random.key(b + m))
    ell, old, ref = (np_ell(np_coupled(q, batch, masks), batch, masks, weighting, np.ones((b, length)))
                     for q in (p, p_old, p_ref))
    a = np.asarray(adv, np.float64)
    want = (np_gdsd(ell, old, ref, a, n, 2.0, 0.01, eps) if name != "espo"
            else np_espo(ell, old, ref, a, n, 0.01, eps))
    np.testing.assert_allclose(float(out.numerator) / float(out.denominator), want, rtol=2e-4, atol=1e-6)
    assert float(out.denominator) == b
    lo, hi = np.log(1 - eps), np.log(1 + eps)
    delta = ell - old if name != "espo" else np.exp((ell.mean(1) - old.mean(1)) / n)
    inside = (delta >= lo) & (delta <= hi) if name != "espo" else (delta >= 1 - eps) & (delta <= 1 + eps)
    np.testing.assert_allclose(float(out.metrics["inside_clip_frac"]), inside.mean(), atol=1e-6)


def test_one_step_and_spg_objectives_against_numpy():
    b, lp, length = 4, 3, 8
    batch = _batch(b, lp, length, seed=7)
    p, p_old, p_ref = _params()
    adv = np.asarray(compute_advantages(jnp.asarray([0.1, 0.7, 0.2, 0.9]), 2, "group_mean"), np.float64)
    seq, comp = np.asarray(batch.sequences), np.asarray(batch.completion)
    cm = np.asarray(batch.completion_mask, np.float64)
    gather = lambda z, y: np.take_along_axis(np_log_softmax(z), y[..., None], -1)[..., 0]

    cfg = objective_config(name="d1", vocab_chunk=32, seq_chunk=3)
    masks, out = _run("d1", cfg, batch, jnp.asarray(adv, jnp.float32), jax.random.key(2))
    toks = np.concatenate([np.where(np.asarray(masks["prompt_is_mask"]), MASK, seq[:, :lp]),
                           np.full_like(comp, MASK)], 1)
    lp_cur, lp_old, lp_ref = (gather(np_pass(q, toks, lp), comp) for q in (p, p_old, p_ref))
    rho = np.exp(lp_cur - lp_old)
    per = -np.minimum(rho * adv[:, None], np.clip(rho, 0.8, 1.2) * adv[:, None])
    per += 0.04 * (np.exp(lp_ref - lp_cur) - (lp_ref - lp_cur) - 1)
    np.testing.assert_allclose(float(out.numerator) / float(out.denominator), (per * cm).sum() / cm.sum(),
                               rtol=2e-4, atol=1e-6)

    cfg = objective_config(name="wd1", vocab_chunk=32, seq_chunk=3)
    masks, out = _run("wd1", cfg, batch, jnp.asarray(adv, jnp.float32), jax.random.key(3))
    toks = np.concatenate([np.where(np.asarray(masks["prompt_is_mask"]), MASK, seq[:, :lp]),
                           np.full_like(comp, MASK)], 1)
    s = (gather(np_pass(p, toks, lp), comp) * cm).sum(1)
    sm = lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    np.testing.assert_allclose(float(out.numerator), -(sm(adv) * s).sum() + (sm(-adv) * s).sum(), rtol=2e-4)

    cfg = objective_config(name="spg", vocab_chunk=32, seq_chunk=3, block_length=4, logp_estimation="mix")
    masks, out = _run("spg", cfg, batch, jnp.asarray(adv, jnp.float32), jax.random.key(4))
    im = np.asarray(masks["is_mask"])
    toks = np.where(im, MASK, seq[:, None]).reshape(b * 2, -1)
    am = np.repeat(np.asarray(batch.attention_mask()), 2, 0)               # SPG passes the prompt mask
    lpt = gather(np_pass(p, toks, lp, am), np.repeat(comp, 2, 0)).reshape(b, 2, length)
    cim = im[..., lp:]
    ell = np.zeros(b)
    for i in range(b):
        sel = cm[i] * cim[i]
        elbo = np.mean((lpt[i] * sel).sum(-1) / sel.sum(-1))
        that = sel.sum(-1) / cm[i].sum()
        avg = (np.exp(1.5 * lpt[i]) * sel / that[:, None]).mean(0)
        eubo = np.log(avg[avg > 0]).sum() / (avg > 0).sum() / 1.5
        ell[i] = elbo if adv[i] > 0 else 0.5 * eubo + 0.5 * elbo
    want = (-adv * ell * cm.sum(1)).sum() / cm.sum()
    np.testing.assert_allclose(float(out.numerator) / float(out.denominator), want, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("head", ["current", "own"])
def test_gdsd_logit_and_teacher_logits_against_numpy(head):
    b, lp, length, m = 3, 3, 6, 2
    batch = _batch(b, lp, length, seed=11)
    p, p_old, p_ref = _params()
    if head == "current":      # the teacher uses the current head: old/ref differ only below the head (LoRA case)
        p_old = dict(p_old, lm_head=p["lm_head"])
        p_ref = dict(p_ref, lm_head=p["lm_head"])
    adv = jnp.asarray([0.4, -0.2, -0.2])
    psi, beta = 3.0, 0.2
    cfg = objective_config(name="gdsd_logit", num_mc=m, psi=psi, beta=beta, logit_teacher_head=head,
                           score_positions="completion_mask", vocab_chunk=40, seq_chunk=4)
    obj = get_objective("gdsd_logit")
    masks = obj.draw_masks(jax.random.key(5), batch, cfg)

    @jax.jit
    def f(p, po, pr):
        st_old = obj.statistics(po, MODEL, batch, masks, cfg)
        st_ref = obj.statistics(pr, MODEL, batch, masks, cfg)
        return obj.loss(p, MODEL, batch, masks, st_old, st_ref, adv, cfg), st_old, st_ref

    out, st_old, st_ref = f(p, p_old, p_ref)
    cm = np.asarray(batch.completion_mask, np.float64)
    n = cm.sum(1)
    comp = np.asarray(batch.completion)
    z, zo, zr = (np_coupled(q, batch, masks) for q in (p, p_old, p_ref))
    energy = psi * np.asarray(adv, np.float64) / n                         # ψ A / L per row
    onehot = np.eye(MODEL.vocab_size)[comp][:, None]                       # [B, 1, L, V]
    zstar = (1 - beta) * np_centred(zo) + beta * np_centred(zr) + \
        energy[:, None, None, None] * (onehot - 1.0 / MODEL.vocab_size)
    d = ((np_centred(z) - zstar) ** 2).sum(-1)                             # [B, M, L]
    want = (0.5 * (d * cm[:, None]).sum(-1) / n[:, None]).sum() / b
    np.testing.assert_allclose(float(out.numerator) / float(out.denominator), want, rtol=2e-4, atol=1e-7)

    # the explicit teacher logits from the cached hidden states equal the NumPy teacher
    e = jnp.broadcast_to(jnp.asarray(energy, jnp.float32)[:, None, None], (b, m, length))
    tl = teacher_logits(st_old["hidden"], p_old["lm_head"], st_ref["hidden"], p_ref["lm_head"],
                        jnp.broadcast_to(batch.completion[:, None], (b, m, length)), e, beta)
    np.testing.assert_allclose(np.asarray(tl), zstar, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(tl).sum(-1), 0.0, atol=1e-3)     # centred


def test_teacher_sequence_target():
    ell_old, ell_ref = jnp.asarray([[-10.0, -11.0]]), jnp.asarray([[-12.0, -9.0]])
    adv = jnp.asarray([0.5])
    got = teacher_sequence_target(ell_old, adv, 8.0, psi=2.0)
    np.testing.assert_allclose(np.asarray(got), [[-10 + 8.0, -11 + 8.0]])
    got = teacher_sequence_target(ell_old, adv, 8.0, psi=2.0, beta=0.25, ell_ref=ell_ref, form="geometric")
    np.testing.assert_allclose(np.asarray(got), [[0.75 * -10 + 0.25 * -12 + 8, 0.75 * -11 + 0.25 * -9 + 8]])
    with pytest.raises(ValueError, match="ell_ref"):
        teacher_sequence_target(ell_old, adv, 8.0, psi=2.0, form="geometric")


# ---- gradients through the model ----------------------------------------------------------------

def test_on_policy_gradient_closed_form_through_the_model():
    """old=None (ℓθ = ℓold): ∇θ loss = -(2ψ/(B L)) Σ_{b,m} A_b ∇θ ℓθ(b,m) + β ∇θ Σ k2/(B M L)."""
    b, lp, length, m, psi, beta = 3, 3, 6, 2, 5.0, 0.1
    batch = _batch(b, lp, length, seed=21)
    p, _, p_ref = _params()
    adv = jnp.asarray([0.5, -1.0, 0.25])
    cfg = objective_config(name="gdsd_tlc", num_mc=m, psi=psi, beta=beta, vocab_chunk=48, seq_chunk=3)
    obj = get_objective("gdsd_tlc")
    masks = obj.draw_masks(jax.random.key(9), batch, cfg)
    ref = obj.statistics(p_ref, MODEL, batch, masks, cfg)

    @jax.jit
    def both(p):
        g = jax.grad(lambda q: (lambda o: o.numerator / o.denominator)(
            obj.loss(q, MODEL, batch, masks, None, ref, adv, cfg)))(p)
        ell_fn = lambda q: obj.statistics(q, MODEL, batch, masks, cfg)["ell"]
        ell = ell_fn(p)
        coef = -(2 * psi / (b * length)) * adv[:, None] + beta * (ell - ref["ell"]) / (b * m * length)
        _, vjp = jax.vjp(ell_fn, p)
        return g, vjp(jnp.broadcast_to(coef, ell.shape))[0]

    g, want = both(p)
    for a, w in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-4, atol=1e-6 * float(jnp.abs(w).max()))
    assert float(jnp.abs(g["lm_head"]).max()) > 0


def _lora(rank=2):
    n, d, h, dh, f = MODEL.num_layers, MODEL.hidden_size, MODEL.num_heads, MODEL.head_dim, MODEL.mlp_dim
    k = jax.random.split(jax.random.key(3), 4)
    normal = lambda key, shape: 0.1 * jax.random.normal(key, shape)
    return {"q": {"a": normal(k[0], (n, d, rank)), "b": normal(k[1], (n, rank, h, dh))},
            "down": {"a": normal(k[2], (n, f, rank)), "b": normal(k[3], (n, rank, d))}}


@pytest.mark.parametrize("name", ["gdsd", "gdsd_logit", "spg"])   # coupled (with old LoRA), hidden-state teacher,
#                                                               multi-mask with attention mask
def test_objective_differentiates_wrt_lora_under_jit(name):
    b, lp, length = 4, 3, 8
    batch = _batch(b, lp, length, seed=31)
    p = _params()[0]
    lora = _lora()
    lora_old = jax.tree.map(lambda x: x * 0.9, lora)
    adv = jnp.asarray([0.3, -0.3, 1.0, -1.0])
    own = {"gdsd": dict(num_mc=2, epsilon_low=0.5), "gdsd_logit": dict(num_mc=2), "spg": dict(block_length=4)}
    cfg = objective_config(name=name, vocab_chunk=None, seq_chunk=None, **own[name])
    obj = get_objective(name)

    @jax.jit
    def grad_fn(lora, batch, key):
        masks = obj.draw_masks(key, batch, cfg)
        old = obj.statistics(p, MODEL, batch, masks, cfg, lora=lora_old) if obj.needs_old(cfg, 2) else None
        ref = obj.statistics(p, MODEL, batch, masks, cfg) if obj.needs_ref(cfg) else None
        f = lambda lo: (lambda o: (o.numerator / o.denominator, o.metrics))(
            obj.loss(p, MODEL, batch, masks, old, ref, adv, cfg, lora=lo))
        return jax.grad(f, has_aux=True)(lora)

    g, metrics = grad_fn(lora, batch, jax.random.key(0))
    norms = [float(jnp.abs(x).max()) for x in jax.tree.leaves(g)]
    assert all(np.isfinite(norms)) and min(norms) > 0, (name, norms)
    assert all(np.isfinite(float(v)) for v in metrics.values()), (name, metrics)
    assert "loss" in metrics


# ---- config and registry ------------------------------------------------------------------------

def test_registry_names_and_contract():
    assert set(objective_names()) == {"gdsd", "gdsd_tlc", "gdsd_logit", "espo", "spg", "d1", "wd1"}
    with pytest.raises(ValueError, match="unknown objective"):
        get_objective("grpo")
    with pytest.raises(ValueError, match="ObjectiveConfig\\(name='d1'\\)"):
        get_objective("gdsd").needs_ref(objective_config(name="d1"))
    expect_old = {"gdsd": True, "gdsd_tlc": True, "gdsd_logit": True, "espo": True, "d1": True, "spg": False,
                  "wd1": False}
    for name in objective_names():
        obj, cfg = get_objective(name), objective_config(name=name)
        assert obj.needs_old(cfg, 2) == expect_old[name]
        assert not obj.needs_old(cfg, 1)
        assert obj.needs_ref(cfg) == (name not in ("wd1", "spg"))     # every official beta is > 0 where it exists
        if name not in ("spg", "wd1"):
            assert not obj.needs_ref(cfg.replace(beta=0.0))


def test_config_defaults_and_replace():
    c = objective_config()
    assert (c.name, c.beta, c.epsilon_low, c.epsilon_high, c.kl_estimator, c.score_positions) == \
        ("gdsd", 1e-3, 4e-4, 4e-4, "k2", "all")
    assert c.clip_mode == "sequence" and c.mc_reduce == "sum" and c.use_attention_mask is False
    d1 = objective_config(name="d1")
    assert (d1.beta, d1.epsilon_low, d1.kl_estimator, d1.score_positions) == (0.04, 0.2, "k3", "completion_mask")
    explicit = objective_config(name="d1", beta=0.5, epsilon_low=0.1)
    assert explicit.beta == 0.5 and explicit.epsilon_low == 0.1 and explicit.epsilon_high == 0.1
    assert objective_config(name="spg").use_attention_mask is True
    assert ObjectiveConfig.from_dict({"name": "espo", "num_mc": 2}).num_mc == 2
    assert c.replace(psi=3.0).psi == 3.0 and type(c.replace(psi=3.0)) is config_class("gdsd")
    np.testing.assert_allclose(c.clip_bounds, (np.log(1 - 4e-4), np.log(1 + 4e-4)))


@pytest.mark.parametrize("bad,field", [
    (dict(name="grpo"), "name"), (dict(psi=float("inf")), "psi"), (dict(beta=-1.0), "beta"),
    (dict(epsilon_low=1.0), "epsilon_low"), (dict(epsilon_high=0.0), "epsilon_high"),
    (dict(clip_mode="ratio"), "clip_mode"), (dict(num_mc=0), "num_mc"), (dict(mc_reduce="max"), "mc_reduce"),
    (dict(score_positions="eos"), "score_positions"), (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(tlc_centring="mean"), "tlc_centring"), (dict(vocab_chunk=0), "vocab_chunk"),
    (dict(name="gdsd_tlc", tlc_centring="mean"), "tlc_centring"), (dict(vocab_chunk=0), "vocab_chunk"),
    (dict(seq_chunk=-3), "seq_chunk"), (dict(name="spg", min_t=0.6, max_t=0.5), "max_t"),
    (dict(name="spg", logp_estimation="upper"), "logp_estimation"), (dict(name="spg", beta=0.1), "beta"),
    (dict(name="d1", p_mask_prompt=1.5), "p_mask_prompt"),
    (dict(name="gdsd_logit", logit_teacher_head="old"), "logit_teacher_head"),
    (dict(name="spg", num_t=0), "num_t"), (dict(use_attention_mask="yes"), "use_attention_mask"),
])
def test_config_validation_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        objective_config(**bad)


@pytest.mark.parametrize("name,field,owners", [("gdsd", "num_t", "a setting of spg only"),
                                               ("spg", "beta", "a setting of gdsd, gdsd_tlc"),
                                               ("gdsd", "wd1_negative", "a setting of wd1 only"),
                                               ("espo", "psi", "a setting of gdsd, gdsd_tlc, gdsd_logit only"),
                                               ("gdsd", "temperature", "not a setting of any objective")])
def test_a_setting_of_another_method_is_named(name, field, owners):
    """A field the chosen method does not read fails, naming the field, the method and where it belongs."""
    with pytest.raises(ValueError, match=rf"objective '{name}' has no setting '{field}' \({owners}"):
        ObjectiveConfig.from_dict({"name": name, field: 1})
    with pytest.raises(ValueError, match=rf"objective '{name}' has no setting '{field}'"):
        objective_config(name=name).replace(**{field: 1})


def test_only_the_method_classes_are_built():
    with pytest.raises(TypeError, match="objective_config"):
        ObjectiveConfig(name="gdsd")
    with pytest.raises(ValueError, match="holds the settings of 'gdsd'"):
        config_class("gdsd")(name="spg")


def test_bad_batch_and_advantages():
    with pytest.raises(ValueError, match="prompt_mask"):
        RolloutBatch.create(np.zeros((2, 7), np.int32), np.ones((2, 3)), np.ones((2, 5)), prompt_len=2)
    with pytest.raises(ValueError, match="completion_mask"):
        RolloutBatch.create(np.zeros((2, 7), np.int32), np.ones((2, 3)), np.ones((2, 5)))
    batch = _batch(2, 3, 4, seed=0)
    obj, cfg = get_objective("gdsd"), objective_config(beta=0.0)
    masks = obj.draw_masks(jax.random.key(0), batch, cfg)
    with pytest.raises(ValueError, match="advantages"):
        obj.loss(_params()[0], MODEL, batch, masks, None, None, jnp.zeros(3), cfg)


@pytest.mark.parametrize("name", ["gdsd", "gdsd_tlc", "espo", "d1", "wd1", "spg", "gdsd_logit"])
def test_each_objective_names_per_iteration_metrics_its_loss_reports(name):
    """The per-iteration metrics an objective names are among those its loss returns (the trainer once
    hard-coded ``clip_fraction`` / ``in_band_fraction``, names no loss reports, so those were never logged)."""
    obj = get_objective(name)
    cfg = objective_config(name, **(dict(block_length=4) if name == "spg" else {}))
    batch = _batch(4, 3, 8, seed=7)
    _, out = _run(name, cfg, batch, jnp.asarray([1.0, -0.5, 0.25, -0.75]), jax.random.key(2))
    assert set(obj.iteration_metrics) <= set(out.metrics)
    if name in ("gdsd", "gdsd_tlc", "espo", "d1"):       # the ratio/clip objectives report how far the policy moved
        assert {"inside_clip_frac", "mean_abs_delta"} <= set(obj.iteration_metrics)


def test_step_metrics_average_the_updates_and_list_the_named_ones_per_iteration():
    obj = get_objective("espo")
    updates = {"clip_frac": [0.25, 0.5], "loss": [1.0, 2.0], "kl": [0.5, 0.5]}
    assert obj.step_metrics(updates) == {"clip_frac": 0.375, "loss": 1.5, "kl": 0.5,
                                         "clip_frac/iter0": 0.25, "clip_frac/iter1": 0.5}
    assert obj.step_metrics({k: v[:1] for k, v in updates.items()}) == {"clip_frac": 0.25, "loss": 1.0, "kl": 0.5}
