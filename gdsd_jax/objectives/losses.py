"""The losses as pure functions of statistics (no model inside), each returning a :class:`LossOutput`.

Every function returns ``(numerator, denominator, metrics)`` such that summing numerators and
denominators over the micro-batches of one optimizer step and dividing gives the full-batch formula:

============  ===========================================================  =====================
objective     numerator                                                    denominator
============  ===========================================================  =====================
gdsd(_tlc)    Σ_b R_m[(clip(Δ)/n_b - ψA_b)²] + β Σ_{b,m} k(ℓθ, ℓref)/(M n_b)  B
espo          Σ_b -min(ρ_b A_b, clip(ρ_b) A_b) + β Σ_b k(ℓ̄θ, ℓ̄ref)/n_b        B
gdsd_logit    Σ_b R_m[(1/n_b) Σ_i c_bi ½ ‖z~θ - z*‖²]                          B
d1            Σ_{b,i} c_bi [-min(ρA, clip(ρ)A) + β k3]                         Σ_{b,i} c_bi
spg           Σ_b -A_b ℓ_b len_b                                           Σ_b len_b
wd1           -Σ_b softmax(A)_b S_b + Σ_b softmax(-A)_b S_b (per micro-batch)   1
============  ===========================================================  =====================

R_m is the Monte-Carlo reduction (sum, official, or mean), n_b the scored length (L when every position
is scored, as the official GDSD/ESPO code does), c the scored-position weights. With n_b = L these are
exactly the official formulas (``batchll.py``/``gdsd_trainer_tlc.py`` ``compute_loss``: squared error
summed over B and M divided by B, KL divided by B·M·L; ESPO: ``/B`` and ``/(B·L)``). The official trl
loop averages per-micro-batch losses over gradient-accumulation steps; for GDSD/ESPO (denominator B) that
is the same thing, for d1/SPG the pair above gives the full-batch token-weighted mean (equal to the
official value whenever micro-batches carry equal token counts). wd1's softmax runs over the rows of a
micro-batch, as in its code, so its pair is (micro-batch loss, 1): the step loss is the mean over
micro-batches, like trl's gradient accumulation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from gdsd_jax.objectives.kl import kl_estimate
from gdsd_jax.objectives.types import LossOutput


def clamp_passthrough(x: jax.Array, lo, hi) -> jax.Array:
    """``torch.clamp`` semantics: value clipped, gradient 1 inside ``[lo, hi]`` (inclusive), 0 outside."""
    inside = (x >= lo) & (x <= hi)
    return jnp.where(inside, x, lax.stop_gradient(jnp.clip(x, lo, hi)))


def _mean(x):
    return jnp.mean(lax.stop_gradient(x).astype(jnp.float32))


def _wmean(x, w):
    x, w = lax.stop_gradient(x).astype(jnp.float32), lax.stop_gradient(w).astype(jnp.float32)
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1e-8)


def check_ref(beta: float, ref) -> None:
    """A KL term (``beta != 0``) needs the reference statistics: a clear error instead of a failure inside jit."""
    if beta != 0.0 and ref is None:
        raise ValueError(f"beta={beta} != 0 but no reference statistics were given (ref_stats=None)")


def gdsd_loss(ell: jax.Array, ell_old: jax.Array | None, ell_ref: jax.Array | None, advantages: jax.Array,
              length: jax.Array, *, psi: float, beta: float, epsilon_low: float, epsilon_high: float,
              clip_mode: str = "sequence", mc_reduce: str = "sum", kl_estimator: str = "k2") -> LossOutput:
    """GDSD / GDSD-TLC (official ``compute_loss``): ``(1/B) Σ_b R_m [clip(Δ)/n - ψA]² + β Σ k(ℓθ, ℓref)/(B M n)``.

    ell [B, M] current statistic (differentiable), ell_old [B, M] or None (on-policy: stop_gradient(ell),
    as the official code for num_iterations == 1), ell_ref [B, M] or None (allowed when β = 0),
    advantages [B], length [B] the scored length n_b.
    """
    check_ref(beta, ell_ref)
    b, m = ell.shape
    old = lax.stop_gradient(ell) if ell_old is None else lax.stop_gradient(ell_old)
    adv = lax.stop_gradient(advantages).astype(ell.dtype)[:, None]
    n = length.astype(ell.dtype)[:, None]
    delta = ell - old
    lo, hi = jnp.log1p(-epsilon_low), jnp.log1p(epsilon_high)
    if clip_mode == "sequence":
        c = clamp_passthrough(delta, lo, hi) / n
        band = delta
    elif clip_mode == "token":
        c = clamp_passthrough(delta / n, lo, hi)
        band = delta / n
    elif clip_mode == "none":
        c = delta / n
        band = delta
    else:
        raise ValueError(f"unknown clip_mode {clip_mode!r}")
    sq = (c - psi * adv) ** 2
    per_b = jnp.sum(sq, axis=1) if mc_reduce == "sum" else jnp.mean(sq, axis=1)
    num = jnp.sum(per_b)
    metrics = {
        "inside_clip_frac": _mean((band >= lo) & (band <= hi)),
        "mean_abs_delta": _mean(jnp.abs(delta)),
        "loglik_per_token": _mean(ell / n),
        "sq_error": _mean(sq),
    }
    if beta != 0.0:
        kl = kl_estimate(kl_estimator, ell, lax.stop_gradient(ell_ref)) / n          # per token, [B, M]
        num = num + beta * jnp.sum(kl) / m
        metrics["kl"] = _mean(kl)
    den = jnp.asarray(b, num.dtype)
    metrics["loss"] = lax.stop_gradient(num / den)
    return LossOutput(num, den, metrics)


def espo_loss(ell: jax.Array, ell_old: jax.Array | None, ell_ref: jax.Array | None, advantages: jax.Array,
              length: jax.Array, *, beta: float, epsilon_low: float, epsilon_high: float,
              kl_estimator: str = "k2") -> LossOutput:
    """ESPO (``espo_trainer.py``): PPO on the sequence ratio ``ρ = exp((ℓ̄θ - ℓ̄old)/n)`` of the coupled
    ELBO averaged over the M draws, plus ``β Σ k2(ℓ̄θ, ℓ̄ref)/(B n)``. Shapes as :func:`gdsd_loss`."""
    check_ref(beta, ell_ref)
    b = ell.shape[0]
    lbar = jnp.mean(ell, axis=1)
    old = lax.stop_gradient(lbar) if ell_old is None else lax.stop_gradient(jnp.mean(ell_old, axis=1))
    adv = lax.stop_gradient(advantages).astype(ell.dtype)
    n = length.astype(ell.dtype)
    ratio = jnp.exp((lbar - old) / n)
    clipped = clamp_passthrough(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_b = -jnp.minimum(ratio * adv, clipped * adv)
    num = jnp.sum(per_b)
    low = (ratio < 1.0 - epsilon_low) & (adv < 0)
    high = (ratio > 1.0 + epsilon_high) & (adv > 0)
    metrics = {
        "inside_clip_frac": _mean((ratio >= 1.0 - epsilon_low) & (ratio <= 1.0 + epsilon_high)),
        "clip_frac": _mean(low | high),
        "mean_abs_delta": _mean(jnp.abs(lbar - old)),
        "loglik_per_token": _mean(lbar / n),
    }
    if beta != 0.0:
        kl = kl_estimate(kl_estimator, lbar, lax.stop_gradient(jnp.mean(ell_ref, axis=1))) / n
        num = num + beta * jnp.sum(kl)
        metrics["kl"] = _mean(kl)
    den = jnp.asarray(b, num.dtype)
    metrics["loss"] = lax.stop_gradient(num / den)
    return LossOutput(num, den, metrics)


def logit_match_loss(sqdist: jax.Array, weights: jax.Array, length: jax.Array, *,
                     mc_reduce: str = "sum") -> LossOutput:
    """GDSD-logit reduction: sqdist [B, M, L] = ‖z~θ - z*‖² per position, weights [B, L], length [B].

    ``(1/B) Σ_b R_m [(1/n_b) Σ_i w_bi ½ sqdist_bmi]``.
    """
    b = sqdist.shape[0]
    w = weights.astype(sqdist.dtype)[:, None, :]
    per_bm = 0.5 * jnp.sum(sqdist * w, axis=-1) / length.astype(sqdist.dtype)[:, None]
    per_b = jnp.sum(per_bm, axis=1) if mc_reduce == "sum" else jnp.mean(per_bm, axis=1)
    num = jnp.sum(per_b)
    den = jnp.asarray(b, num.dtype)
    metrics = {
        "logit_sq_dist_per_token": _wmean(sqdist, jnp.broadcast_to(w, sqdist.shape)),
        "loss": lax.stop_gradient(num / den),
    }
    return LossOutput(num, den, metrics)


def d1_loss(logp: jax.Array, logp_old: jax.Array | None, logp_ref: jax.Array | None, advantages: jax.Array,
            weights: jax.Array, *, beta: float, epsilon_low: float, epsilon_high: float,
            kl_estimator: str = "k3") -> LossOutput:
    """diffu-GRPO (d1): per-token PPO on one-step log-probs plus β·k3, averaged over scored tokens.

    logp / logp_old / logp_ref [B, L], advantages [B], weights [B, L] (completion mask).
    """
    check_ref(beta, logp_ref)
    old = lax.stop_gradient(logp) if logp_old is None else lax.stop_gradient(logp_old)
    adv = lax.stop_gradient(advantages).astype(logp.dtype)[:, None]
    w = weights.astype(logp.dtype)
    ratio = jnp.exp(logp - old)
    l1 = ratio * adv
    l2 = clamp_passthrough(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv
    per_tok = -jnp.minimum(l1, l2)
    metrics = {
        "inside_clip_frac": _wmean((ratio >= 1.0 - epsilon_low) & (ratio <= 1.0 + epsilon_high), w),
        "clip_frac": _wmean(l1 < l2, w),
        "mean_abs_delta": _wmean(jnp.abs(logp - old), w),
        "loglik_per_token": _wmean(logp, w),
    }
    if beta != 0.0:
        kl = kl_estimate(kl_estimator, logp, lax.stop_gradient(logp_ref))
        per_tok = per_tok + beta * kl
        metrics["kl"] = _wmean(kl, w)
    num = jnp.sum(per_tok * w)
    den = lax.stop_gradient(jnp.sum(w))
    metrics["loss"] = lax.stop_gradient(num / jnp.maximum(den, 1e-8))
    return LossOutput(num, den, metrics)


def wd1_loss(logp: jax.Array, advantages: jax.Array, weights: jax.Array, *, negative: bool = True) -> LossOutput:
    """wd1 (``rev_grpo_trainer.py``): ``-Σ_b softmax(A)_b S_b + Σ_b softmax(-A)_b S_b`` with
    ``S_b = Σ_i w_bi log p_bi``; the softmax runs over the B rows of the micro-batch.

    logp [B, L], advantages [B], weights [B, L]; ``negative=False`` drops the second term.
    """
    adv = lax.stop_gradient(advantages).astype(logp.dtype)
    s = jnp.sum(logp * weights.astype(logp.dtype), axis=1)
    num = -jnp.sum(jax.nn.softmax(adv) * s)
    if negative:
        num = num + jnp.sum(jax.nn.softmax(-adv) * s)
    den = jnp.asarray(1.0, num.dtype)
    metrics = {"loglik_per_token": _wmean(logp, weights), "loss": lax.stop_gradient(num)}
    return LossOutput(num, den, metrics)


def spg_sequence_loglik(logp: jax.Array, is_mask: jax.Array, weights: jax.Array, advantages: jax.Array, *,
                        logp_estimation: str = "mix", mix_weight: float = 0.5,
                        eubo_beta: float = 1.5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SPG's sandwiched per-sequence estimate (``_get_per_seq_logps``).

    logp [B, T, L] per-token log-probs under T masks, is_mask [B, T, L] (completion part of the masks),
    weights [B, L] (completion mask), advantages [B]. Returns ``(ℓ [B], elbo [B], negative [B])``:

    * ELBO_bj = Σ_i w m logp / Σ_i w m; ``elbo_b`` = mean_j ELBO_bj (used when A_b > 0);
    * EUBO_b = (1/β_E) mean over positions with a > 0 of log a_i, with
      a_i = mean_j [p_ij^β_E m_ij w_i / t̂_j] and t̂_j = Σ w m / Σ w;
    * negative = EUBO, ``mix_weight``·EUBO + (1 - mix_weight)·ELBO, ELBO, or 0; ℓ_b picks by sign of A_b.
    """
    w = weights.astype(logp.dtype)[:, None, :]
    m = is_mask.astype(logp.dtype)
    wm = w * m
    den = jnp.maximum(jnp.sum(wm, axis=-1), 1e-8)                                   # [B, T]
    elbo = jnp.mean(jnp.sum(logp * wm, axis=-1) / den, axis=1)                       # [B]
    if logp_estimation in ("eubo", "mix"):
        t_hat = jnp.sum(wm, axis=-1) / jnp.sum(jnp.broadcast_to(w, wm.shape), axis=-1)   # [B, T]
        p_beta = jnp.exp(eubo_beta * logp)
        avg = jnp.mean(p_beta * wm / jnp.maximum(t_hat, 1e-8)[..., None], axis=1)    # [B, L]
        valid = avg > 0
        logs = jnp.where(valid, jnp.log(jnp.where(valid, avg, 1.0)), 0.0)
        eubo = jnp.sum(logs, axis=-1) / jnp.maximum(jnp.sum(valid, axis=-1), 1e-8) / eubo_beta
        negative = eubo if logp_estimation == "eubo" else mix_weight * eubo + (1.0 - mix_weight) * elbo
    elif logp_estimation == "elbo":
        negative = elbo
    elif logp_estimation == "zero":
        negative = jnp.zeros_like(elbo)
    else:
        raise ValueError(f"unknown logp_estimation {logp_estimation!r}")
    ell = jnp.where(advantages > 0, elbo, negative)
    return ell, elbo, negative


def spg_loss(logp: jax.Array, is_mask: jax.Array, weights: jax.Array, completion_mask: jax.Array,
             advantages: jax.Array, *, logp_estimation: str = "mix", mix_weight: float = 0.5,
             eubo_beta: float = 1.5) -> LossOutput:
    """SPG (``spg_trainer.py compute_loss``): ``Σ_b -A_b ℓ_b len_b / Σ_b len_b``, on-policy, no KL.

    Shapes as :func:`spg_sequence_loglik`; completion_mask [B, L] gives len_b.
    """
    adv = lax.stop_gradient(advantages).astype(logp.dtype)
    ell, elbo, _ = spg_sequence_loglik(logp, is_mask, weights, adv, logp_estimation=logp_estimation,
                                       mix_weight=mix_weight, eubo_beta=eubo_beta)
    lens = completion_mask.astype(logp.dtype).sum(axis=1)
    num = jnp.sum(-adv * ell * lens)
    den = lax.stop_gradient(jnp.sum(lens))
    metrics = {
        "loglik_per_token": _mean(elbo),
        "seq_estimate": _mean(ell),
        "frac_positive": _mean(adv > 0),
        "loss": lax.stop_gradient(num / jnp.maximum(den, 1e-8)),
    }
    return LossOutput(num, den, metrics)
