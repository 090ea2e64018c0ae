"""Loss reductions, advantages and KL estimators against float64 NumPy references written from the
official trainers' formulas (GDSD, ESPO, d1, wd1, SPG), finite-difference gradients of the references, micro-batch accumulation,
and the on-policy closed form of the GDSD gradient."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gdsd_jax.objectives import compute_advantages, k1, k2, k3, kl_estimate, losses

EPS = 4e-4


# ---- NumPy float64 references (total loss of a batch, from the spec) -----------------------------

def np_kl(name, a, b):
    d = a - b
    return {"k1": d, "k2": 0.5 * d * d, "k3": np.exp(-d) + d - 1.0}[name]


def np_gdsd(ell, old, ref, adv, n, psi, beta, clip_mode="sequence", mc_reduce="sum", kl="k2", eps=(EPS, EPS)):
    """(1/B) Σ_b R_m [clip(Δ)/n - ψA]² + β Σ_{b,m} k(ℓθ, ℓref) / (B M n)."""
    b, m = ell.shape
    lo, hi = np.log(1 - eps[0]), np.log(1 + eps[1])
    delta = ell - old
    nn = n[:, None]
    c = {"sequence": np.clip(delta, lo, hi) / nn, "token": np.clip(delta / nn, lo, hi), "none": delta / nn}[clip_mode]
    sq = (c - psi * adv[:, None]) ** 2
    total = (sq.sum(1) if mc_reduce == "sum" else sq.mean(1)).sum() / b
    if beta:
        total += beta * (np_kl(kl, ell, ref) / nn).sum() / (b * m)
    return total


def np_espo(ell, old, ref, adv, n, beta, eps=(EPS, EPS)):
    """-(1/B) Σ_b min(ρA, clip(ρ, 1±ε)A) + β Σ_b (ℓ̄θ - ℓ̄ref)²/(2 B n), ℓ̄ = mean over M."""
    lb, lo_, lr = ell.mean(1), old.mean(1), ref.mean(1)
    rho = np.exp((lb - lo_) / n)
    obj = np.minimum(rho * adv, np.clip(rho, 1 - eps[0], 1 + eps[1]) * adv)
    b = ell.shape[0]
    return -obj.sum() / b + beta * (0.5 * (lb - lr) ** 2 / n).sum() / b


def np_d1(logp, old, ref, adv, c, beta, eps=0.2):
    rho = np.exp(logp - old)
    per = -np.minimum(rho * adv[:, None], np.clip(rho, 1 - eps, 1 + eps) * adv[:, None])
    per = per + beta * (np.exp(ref - logp) - (ref - logp) - 1)
    return (per * c).sum() / c.sum()


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_wd1(logp, adv, c, negative=True):
    s = (logp * c).sum(1)
    out = -(np_softmax(adv) * s).sum()
    return out + (np_softmax(-adv) * s).sum() if negative else out


def np_spg(logp, is_mask, c, cm, adv, est="mix", w=0.5, be=1.5):
    """SPG's per-sequence estimates and loss, loop by loop from the official description."""
    b, t, length = logp.shape
    out = np.zeros(b)
    for i in range(b):
        elbos = []
        for j in range(t):
            sel = c[i] * is_mask[i, j]
            elbos.append((logp[i, j] * sel).sum() / max(sel.sum(), 1e-8))
        elbo = np.mean(elbos)
        avg = np.zeros(length)
        for j in range(t):
            sel = c[i] * is_mask[i, j]
            t_hat = sel.sum() / c[i].sum()
            avg += np.exp(be * logp[i, j]) * sel / max(t_hat, 1e-8)
        avg /= t
        pos = avg > 0
        eubo = np.log(avg[pos]).sum() / max(pos.sum(), 1e-8) / be
        neg = {"eubo": eubo, "mix": w * eubo + (1 - w) * elbo, "elbo": elbo, "zero": 0.0}[est]
        out[i] = elbo if adv[i] > 0 else neg
    lens = cm.sum(1)
    return (-adv * out * lens).sum() / lens.sum()


def np_logit_match(d, w, n, mc_reduce="sum"):
    per = 0.5 * (d * w[:, None, :]).sum(-1) / n[:, None]
    return (per.sum(1) if mc_reduce == "sum" else per.mean(1)).sum() / d.shape[0]


# ---- helpers ------------------------------------------------------------------------------------

def _stats(b, m, seed, spread=1e-3):
    """ℓ [B, M] around -30 with Δ spread across the clip band, and no Δ within 1e-6 of a boundary."""
    rng = np.random.default_rng(seed)
    ell = -30.0 + rng.standard_normal((b, m))
    lo, hi = np.log(1 - EPS), np.log(1 + EPS)
    delta = rng.uniform(-spread, spread, (b, m))
    delta = np.where(np.minimum(np.abs(delta - lo), np.abs(delta - hi)) < 1e-6, 0.0, delta)
    return ell, ell - delta, ell + rng.standard_normal((b, m)) * 0.3


def _fd_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        g[idx] = (f(xp) - f(xm)) / (2 * eps)
    return g


def _total(out):
    return np.asarray(out.numerator) / np.asarray(out.denominator)


# ---- GDSD ---------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("psi", "beta", "clip_mode", "mc_reduce", "kl_estimator", "on_policy"))
def _gdsd(ell, old, ref, adv, n, *, psi, beta, clip_mode, mc_reduce, kl_estimator, on_policy=False):
    def f(e):
        out = losses.gdsd_loss(e, None if on_policy else old, ref, adv, n, psi=psi, beta=beta, epsilon_low=EPS,
                               epsilon_high=EPS, clip_mode=clip_mode, mc_reduce=mc_reduce,
                               kl_estimator=kl_estimator)
        return out.numerator / out.denominator, out
    (_, out), g = jax.value_and_grad(f, has_aux=True)(ell)
    return out, g


@pytest.mark.parametrize("b,m", [(1, 1), (3, 2), (6, 3)])
@pytest.mark.parametrize("clip_mode,mc_reduce,kl", [("sequence", "sum", "k2"), ("token", "mean", "k3"),
                                                    ("none", "sum", "k1")])
def test_gdsd_loss_against_numpy_and_finite_differences(b, m, clip_mode, mc_reduce, kl):
    with jax.enable_x64(True):
        ell, old, ref = _stats(b, m, seed=b * 7 + m)
        if clip_mode == "token":      # make the per-token band matter: Δ/n spread over ±1e-3
            old = ell - np.random.default_rng(1).uniform(-0.02, 0.02, (b, m))
        adv = np.random.default_rng(b).standard_normal(b)
        n = np.full(b, 20.0)
        n[0] = 13.0                                   # per-row scored lengths (completion_mask mode)
        psi, beta = 0.7, 0.05
        out, g = _gdsd(ell, old, ref, adv, n, psi=psi, beta=beta, clip_mode=clip_mode, mc_reduce=mc_reduce,
                       kl_estimator=kl)
        ref_f = lambda e: np_gdsd(e, old, ref, adv, n, psi, beta, clip_mode, mc_reduce, kl)
        np.testing.assert_allclose(_total(out), ref_f(ell), rtol=1e-12, atol=1e-14)
        assert float(out.denominator) == b
        np.testing.assert_allclose(np.asarray(g), _fd_grad(ref_f, ell), rtol=1e-6, atol=1e-9)
        inside = (ell - old >= np.log(1 - EPS)) & (ell - old <= np.log(1 + EPS))
        if clip_mode != "token":
            np.testing.assert_allclose(float(out.metrics["inside_clip_frac"]), inside.mean(), rtol=1e-6)
        np.testing.assert_allclose(float(out.metrics["mean_abs_delta"]), np.abs(ell - old).mean(), rtol=1e-6)
        np.testing.assert_allclose(float(out.metrics["kl"]), (np_kl(kl, ell, ref) / n[:, None]).mean(), rtol=1e-6)


def test_gdsd_on_policy_gradient_closed_form():
    """At ℓθ = ℓold: ∇ = -(2ψ/(B L)) A_b per draw (+ the k2 KL term β(ℓθ - ℓref)/(B M L))."""
    with jax.enable_x64(True):
        b, m, length, psi, beta = 5, 2, 16, 3.0, 0.01
        ell, _, ref = _stats(b, m, seed=3)
        adv = np.random.default_rng(4).standard_normal(b)
        n = np.full(b, float(length))
        for bt in (0.0, beta):
            _, g = _gdsd(ell, ell, ref, adv, n, psi=psi, beta=bt, clip_mode="sequence", mc_reduce="sum",
                         kl_estimator="k2", on_policy=True)
            want = -(2 * psi / (b * length)) * np.repeat(adv[:, None], m, 1) + bt * (ell - ref) / (b * m * length)
            np.testing.assert_allclose(np.asarray(g), want, rtol=1e-12, atol=1e-15)


def test_gdsd_requires_ref_when_beta_nonzero():
    with pytest.raises(ValueError, match="reference"):
        losses.gdsd_loss(jnp.zeros((2, 1)), None, None, jnp.zeros(2), jnp.ones(2), psi=1.0, beta=0.1,
                         epsilon_low=EPS, epsilon_high=EPS)


# ---- ESPO, d1, wd1, SPG, logit matching ----------------------------------------------------------

@pytest.mark.parametrize("b,m", [(2, 1), (5, 3)])
def test_espo_loss_against_numpy_and_finite_differences(b, m):
    with jax.enable_x64(True):
        rng = np.random.default_rng(b + m)
        ell = -60.0 + rng.standard_normal((b, m))
        old = ell - rng.uniform(-0.05, 0.05, (b, m))      # ratios exp(Δ/n) straddle 1 ± ε
        ref = ell + rng.standard_normal((b, m))
        adv = rng.standard_normal(b)
        n = np.full(b, 32.0)
        eps = (0.001, 0.0015)

        def f(e):
            out = losses.espo_loss(e, old, ref, adv, n, beta=0.02, epsilon_low=eps[0], epsilon_high=eps[1])
            return out.numerator / out.denominator, out
        (_, out), g = jax.jit(jax.value_and_grad(f, has_aux=True))(ell)
        ref_f = lambda e: np_espo(e, old, ref, adv, n, 0.02, eps)
        np.testing.assert_allclose(_total(out), ref_f(ell), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np.asarray(g), _fd_grad(ref_f, ell), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("b,length", [(2, 5), (4, 9)])
def test_d1_and_wd1_losses_against_numpy_and_finite_differences(b, length):
    with jax.enable_x64(True):
        rng = np.random.default_rng(b * length)
        logp = -rng.random((b, length)) * 4
        old = logp + rng.uniform(-0.4, 0.4, (b, length))
        ref = logp + rng.uniform(-0.5, 0.5, (b, length))
        adv = rng.standard_normal(b)
        c = (np.arange(length)[None] < rng.integers(1, length + 1, b)[:, None]).astype(np.float64)

        def fd1(lp):
            out = losses.d1_loss(lp, old, ref, adv, c, beta=0.04, epsilon_low=0.2, epsilon_high=0.2)
            return out.numerator / out.denominator, out
        (_, out), g = jax.jit(jax.value_and_grad(fd1, has_aux=True))(logp)
        ref_f = lambda lp: np_d1(lp, old, ref, adv, c, 0.04)
        np.testing.assert_allclose(_total(out), ref_f(logp), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(float(out.denominator), c.sum())
        np.testing.assert_allclose(np.asarray(g), _fd_grad(ref_f, logp), rtol=1e-6, atol=1e-9)

        for negative in (True, False):
            def fw(lp):
                out = losses.wd1_loss(lp, adv, c, negative=negative)
                return out.numerator / out.denominator, out
            (_, out), g = jax.jit(jax.value_and_grad(fw, has_aux=True))(logp)
            ref_w = lambda lp: np_wd1(lp, adv, c, negative)
            np.testing.assert_allclose(_total(out), ref_w(logp), rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(np.asarray(g), _fd_grad(ref_w, logp), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("est", ["mix", "eubo", "elbo", "zero"])
def test_spg_loss_against_numpy_and_finite_differences(est):
    with jax.enable_x64(True):
        b, t, length = 4, 2, 8
        rng = np.random.default_rng(["mix", "eubo", "elbo", "zero"].index(est))
        logp = -rng.random((b, t, length)) * 3
        is_mask = rng.random((b, t, length)) < 0.5
        is_mask[:, :, 0] = True
        cm = (np.arange(length)[None] < np.array([8, 3, 5, 1])[:, None]).astype(np.float64)
        adv = np.array([0.5, -0.3, 0.0, 1.2])

        def f(lp):
            out = losses.spg_loss(lp, is_mask, cm, cm, adv, logp_estimation=est, mix_weight=0.3, eubo_beta=1.5)
            return out.numerator / out.denominator, out
        (_, out), g = jax.jit(jax.value_and_grad(f, has_aux=True))(logp)
        ref_f = lambda lp: np_spg(lp, is_mask, cm, cm, adv, est, 0.3, 1.5)
        np.testing.assert_allclose(_total(out), ref_f(logp), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(float(out.denominator), cm.sum())
        np.testing.assert_allclose(np.asarray(g), _fd_grad(ref_f, logp), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mc_reduce", ["sum", "mean"])
def test_logit_match_reduction(mc_reduce):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        d = rng.random((3, 2, 6)) * 5
        w = (rng.random((3, 6)) < 0.8).astype(np.float64)
        n = np.array([6.0, 4.0, 5.0])
        out = losses.logit_match_loss(jnp.asarray(d), jnp.asarray(w), jnp.asarray(n), mc_reduce=mc_reduce)
        np.testing.assert_allclose(_total(out), np_logit_match(d, w, n, mc_reduce), rtol=1e-12)


# ---- accumulation over micro-batches -----------------------------------------------------------

def test_micro_batch_accumulation_equals_full_batch():
    """Σ numerators / Σ denominators over micro-batches equals the full-batch formula."""
    with jax.enable_x64(True):
        b, m, length = 6, 2, 7
        ell, old, ref = _stats(b, m, seed=11)
        rng = np.random.default_rng(12)
        adv = rng.standard_normal(b)
        n = rng.integers(3, 8, b).astype(np.float64)
        logp = -rng.random((b, length))
        c = (np.arange(length)[None] < n[:, None]).astype(np.float64)
        lp3 = -rng.random((b, 2, length))
        im = rng.random((b, 2, length)) < 0.6
        im[..., 0] = True
        calls = {
            "gdsd": (lambda s: losses.gdsd_loss(ell[s], old[s], ref[s], adv[s], n[s], psi=2.0, beta=0.1,
                                                 epsilon_low=EPS, epsilon_high=EPS),
                     np_gdsd(ell, old, ref, adv, n, 2.0, 0.1)),
            "espo": (lambda s: losses.espo_loss(ell[s], old[s], ref[s], adv[s], n[s], beta=0.1, epsilon_low=EPS,
                                                 epsilon_high=EPS), np_espo(ell, old, ref, adv, n, 0.1)),
            "d1": (lambda s: losses.d1_loss(logp[s], logp[s] * 0.9, logp[s] * 1.1, adv[s], c[s], beta=0.04,
                                             epsilon_low=0.2, epsilon_high=0.2),
                   np_d1(logp, logp * 0.9, logp * 1.1, adv, c, 0.04)),
            "spg": (lambda s: losses.spg_loss(lp3[s], im[s], c[s], c[s], adv[s]), np_spg(lp3, im, c, c, adv)),
        }
        splits = [slice(0, 2), slice(2, 6)]
        for name, (fn, want) in calls.items():
            outs = [jax.jit(functools.partial(fn, s))() for s in splits]
            total = sum(float(o.numerator) for o in outs) / sum(float(o.denominator) for o in outs)
            np.testing.assert_allclose(total, want, rtol=1e-12, err_msg=name)


# ---- advantages and KL ---------------------------------------------------------------------------

@pytest.mark.parametrize("g", [2, 3, 6])
def test_advantages_against_numpy(g):
    rng = np.random.default_rng(g)
    r = rng.random(4 * g).astype(np.float32)
    rg = r.reshape(4, g).astype(np.float64)
    loo = (rg - (rg.sum(1, keepdims=True) - rg) / (g - 1)).reshape(-1)
    mean = (rg - rg.mean(1, keepdims=True)).reshape(-1)
    std = np.repeat(rg.std(1, ddof=1), g) + 1e-4
    got = compute_advantages(jnp.asarray(r), g, "loo")
    np.testing.assert_allclose(np.asarray(got), loo, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got).reshape(4, g).sum(1), 0.0, atol=1e-5)   # LOO: zero per group
    np.testing.assert_allclose(np.asarray(compute_advantages(r, g, "group_mean")), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(compute_advantages(r, g, "loo", scale_std=True)), loo / std, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(compute_advantages(r, g, "group_mean", True)), mean / std, rtol=1e-4)


def test_advantages_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        compute_advantages(jnp.zeros(5), 2)
    with pytest.raises(ValueError, match="unknown advantage method"):
        compute_advantages(jnp.zeros(4), 2, "grpo")
    with pytest.raises(ValueError, match="group_size >= 2"):
        compute_advantages(jnp.zeros(4), 1, "loo")


def test_kl_estimators_against_numpy():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal(50), rng.standard_normal(50)
        for name, fn in (("k1", k1), ("k2", k2), ("k3", k3)):
            np.testing.assert_allclose(np.asarray(fn(a, b)), np_kl(name, a, b), rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(np.asarray(kl_estimate(name, a, b)), np_kl(name, a, b), rtol=1e-12,
                                       atol=1e-14)
        assert (np.asarray(k3(a, b)) >= 0).all()
        with pytest.raises(ValueError, match="unknown KL estimator"):
            kl_estimate("k4", a, b)
