"""Temperature > 0 and random choices: sampled frequencies against closed-form distributions.

A 12-token vocabulary model, thousands of identical prompts in one batch (every row draws its own noise),
one denoising step, and Pearson chi-square tests at significance 1e-4 (critical values by the
Wilson-Hilferty approximation). Each test also checks that a wrong distribution (wrong temperature,
unfiltered logits, wrong ``alg_temp``) is rejected by the same test on the same samples, so it cannot pass
by accident. Seeds are fixed: the outcome is deterministic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampling_reference import jax_logits_fn, random_params

from gdsd_jax.models.config import tiny_dream, tiny_llada
from gdsd_jax.sampling import SamplingConfig, generate_jit

N = 4096
STD = 0.15      # moderately peaked: several tokens carry visible mass
Z_1E4 = 3.719   # standard normal quantile of 1 - 1e-4


def chi2_critical(df: int, z: float = Z_1E4) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * np.sqrt(c)) ** 3


def chi2_rejects(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> tuple[bool, float, float]:
    """Pearson test of ``counts`` against ``probs`` (bins with small expectation merged into one).

    Returns (rejected, statistic, critical value). A count where the probability is 0 rejects at once.
    """
    counts = np.asarray(counts, np.float64)
    probs = np.asarray(probs, np.float64)
    n = counts.sum()
    if np.any((probs == 0) & (counts > 0)):
        return True, np.inf, 0.0
    exp = n * probs
    big = exp >= min_expected
    obs_b, exp_b = list(counts[big]), list(exp[big])
    if (~big).any():
        obs_b.append(counts[~big].sum())
        exp_b.append(exp[~big].sum())
    obs_b, exp_b = np.array(obs_b), np.array(exp_b)
    keep = exp_b > 0
    stat = float(np.sum((obs_b[keep] - exp_b[keep]) ** 2 / exp_b[keep]))
    crit = chi2_critical(int(keep.sum()) - 1)
    return stat > crit, stat, crit


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _small(mk):
    return mk(vocab_size=12, mask_token_id=10, eos_token_id=11, pad_token_id=11)


PROMPT = np.array([[3, 7, 1, 5]], np.int32)


def _first_step_logits(cfg, params, gen_length):
    """float64 [Lg, V] aligned logits of the completion at step 0 (all masked), the mask column included
    (upstream samples it like any token)."""
    x = np.concatenate([PROMPT, np.full((1, gen_length), cfg.mask_token_id, np.int32)], axis=1)
    return jax_logits_fn(params, cfg)(x, None)[0, PROMPT.shape[1]:].astype(np.float64)


def _sample(cfg, params, scfg, seed=0):
    ids = jnp.asarray(np.repeat(PROMPT, N, axis=0))
    out = generate_jit(params, cfg, ids, None, jax.random.key(seed), scfg)
    return np.asarray(out.sequences)[:, PROMPT.shape[1]:], np.asarray(out.unmask_step)


def test_llada_temperature_sampling():
    cfg = _small(tiny_llada)
    params = random_params(cfg, seed=3, std=STD)
    t = 0.7
    comp, _ = _sample(cfg, params, SamplingConfig(gen_length=2, steps=1, temperature=t))
    lg = _first_step_logits(cfg, params, 2)
    for pos in range(2):
        counts = np.bincount(comp[:, pos], minlength=cfg.vocab_size)
        rejected, stat, crit = chi2_rejects(counts, _softmax(lg[pos] / t))
        assert not rejected, (pos, stat, crit)
        for wrong in (t * 1.3, t / 1.3):
            assert chi2_rejects(counts, _softmax(lg[pos] / wrong))[0], f"T={wrong} not rejected at position {pos}"


@pytest.mark.parametrize("filt", [{"top_p": 0.7}, {"top_k": 3}])
def test_dream_filtered_sampling(filt):
    cfg = _small(tiny_dream)
    params = random_params(cfg, seed=4, std=STD)
    t = 0.8
    comp, _ = _sample(cfg, params, SamplingConfig(gen_length=2, steps=1, temperature=t, alg="maskgit_plus", **filt))
    lg = _first_step_logits(cfg, params, 2) / t
    for pos in range(2):
        p = _softmax(lg[pos])
        order = np.argsort(-p)
        if "top_p" in filt:   # keep the smallest prefix whose mass exceeds top_p (the crossing token included)
            n_keep = int(np.searchsorted(np.cumsum(p[order]), filt["top_p"], side="right")) + 1
        else:
            n_keep = filt["top_k"]
        kept = np.zeros_like(p, bool)
        kept[order[:n_keep]] = True
        assert 1 < kept.sum() < cfg.vocab_size - 1, "degenerate case: the filter must keep some, drop some"
        expected = np.where(kept, p, 0.0) / p[kept].sum()
        counts = np.bincount(comp[:, pos], minlength=cfg.vocab_size)
        rejected, stat, crit = chi2_rejects(counts, expected)
        assert not rejected, (pos, stat, crit)
        assert chi2_rejects(counts, p)[0], "the unfiltered distribution was not rejected"


def test_llada_random_remasking_is_uniform():
    cfg = _small(tiny_llada)
    params = random_params(cfg, seed=5, std=STD)
    lg_len = 6
    _, when = _sample(cfg, params, SamplingConfig(gen_length=lg_len, steps=lg_len, remasking="random",
                                                  return_unmask_step=True))
    first = np.argmax(when == 0, axis=1)
    assert np.all((when == 0).sum(1) == 1)
    counts = np.bincount(first, minlength=lg_len)
    rejected, stat, crit = chi2_rejects(counts, np.full(lg_len, 1.0 / lg_len))
    assert not rejected, (stat, crit)
    # Power: low-confidence remasking at temperature 1 is far from uniform and must be rejected.
    _, when_lc = _sample(cfg, params, SamplingConfig(gen_length=lg_len, steps=lg_len, temperature=1.0,
                                                     return_unmask_step=True))
    counts_lc = np.bincount(np.argmax(when_lc == 0, axis=1), minlength=lg_len)
    assert chi2_rejects(counts_lc, np.full(lg_len, 1.0 / lg_len))[0]


def test_dream_origin_transfer_probabilities():
    cfg = _small(tiny_dream)
    params = random_params(cfg, seed=6, std=STD)
    steps, eps, lg_len = 3, 0.3, 8
    # The mask token banned: every transfer then reveals a token, so unmask_step shows every transfer.
    _, when = _sample(cfg, params, SamplingConfig(gen_length=lg_len, steps=steps, eps=eps, alg="origin",
                                                  temperature=1.0, return_unmask_step=True, ban_mask_token=True))
    ts = np.linspace(1, eps, steps + 1)
    at_risk = when.size
    for i in range(steps - 1):
        p = 1 - ts[i + 1] / ts[i]
        hits = int((when == i).sum())
        z = (hits - at_risk * p) / np.sqrt(at_risk * p * (1 - p))
        assert abs(z) < Z_1E4, (i, hits, at_risk, p)
        # Power: a uniform 1/steps per step (unconditional) is rejected at step 0.
        if i == 0:
            q = 1 / steps
            assert abs((hits - at_risk * q) / np.sqrt(at_risk * q * (1 - q))) > 3 * Z_1E4
        at_risk -= hits
    assert at_risk == int((when == steps - 1).sum())          # the last step reveals everything left


def test_dream_alg_temp_position_distribution():
    """With alg_temp > 0, the k positions are drawn without replacement from softmax(confidence / alg_temp):
    at a step with k = 1 the revealed position follows that softmax exactly."""
    cfg = _small(tiny_dream)
    params = random_params(cfg, seed=7, std=STD)
    lg_len, steps, alg_temp = 4, 3, 0.3
    ts = np.linspace(1, 1e-3, steps + 1, dtype=np.float32)
    assert int(np.float32(lg_len) * (np.float32(1) - ts[1] / ts[0])) == 1     # k = 1 at step 0
    _, when = _sample(cfg, params, SamplingConfig(gen_length=lg_len, steps=steps, alg="entropy", alg_temp=alg_temp,
                                                  return_unmask_step=True))
    assert np.all((when == 0).sum(1) == 1)
    counts = np.bincount(np.argmax(when == 0, axis=1), minlength=lg_len)
    p = _softmax(_first_step_logits(cfg, params, lg_len))
    neg_entropy = np.sum(p * np.log(p + 1e-10), axis=-1)
    expected = _softmax(neg_entropy / alg_temp)
    assert expected.max() < 0.95 and expected.min() > 0.01, f"degenerate case {expected}"
    rejected, stat, crit = chi2_rejects(counts, expected)
    assert not rejected, (stat, crit, counts, expected)
    for wrong in (alg_temp * 2, alg_temp / 2):
        assert chi2_rejects(counts, _softmax(neg_entropy / wrong))[0], f"alg_temp={wrong} not rejected"
