"""Pieces shared by both samplers: output type, token sampling, filtering, per-row top-k selection.

Shape letters: B batch, Lp prompt length, Lg generated length, P positions scored in one step, V vocabulary.
All probabilities and confidences are computed in float32 whatever the model's compute dtype: bf16
confidences tie often, and the order of tied candidates is arbitrary in every framework.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gdsd_jax.distributed.mesh import constrain
from gdsd_jax.sampling.config import SamplingConfig

NEG_INF = -jnp.inf
#: What upstream writes into filtered logits (``torch.finfo(dtype).min``); finite, so softmax stays defined.
FILTERED = float(np.finfo(np.float32).min)


class SampleOutput(NamedTuple):
    """Result of :func:`gdsd_jax.sampling.generate` (a pytree).

    Attributes:
      sequences: int32 [B, Lp + Lg], the prompt (unchanged, padding included) followed by the completion.
      completion_mask: int32 [B, Lg], 1 up to and including the first EOS (all ones without an EOS, or
        when ``stop_at_eos`` is off).
      unmask_step: int32 [B, Lg], the 0-based step at which each completion token was revealed (-1 where
        the position still holds the mask token, which only a sampled mask id leaves), or all -1 when
        ``return_unmask_step`` is off.
      nfe: int32 [B], model forwards the row needed (NFE; a guided step counts two). Rows of a batch that
        finish a block early (``threshold`` / ``factor``) stop counting while the others go on.
      tokens_processed: int32 [B], positions the row ran through the layers over those forwards (the
        sequence length for a full forward, the window for a cached one).
    """

    sequences: jax.Array
    completion_mask: jax.Array
    unmask_step: jax.Array
    nfe: jax.Array
    tokens_processed: jax.Array


def completion_mask(completion: jax.Array, eos_id: int) -> jax.Array:
    """int32 [B, Lg]: 1 at positions ``<=`` the first EOS of each row (all ones when a row has no EOS)."""
    lg = completion.shape[1]
    is_eos = completion == eos_id
    first = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), lg)
    return (jnp.arange(lg)[None, :] <= first[:, None]).astype(jnp.int32)


def set_columns(logits: jax.Array, ids, value: float) -> jax.Array:
    """Set vocabulary columns ``ids`` (static ints) of ``logits [..., V]`` to ``value``."""
    vocab = jnp.arange(logits.shape[-1])
    hit = jnp.zeros((logits.shape[-1],), bool)
    for i in ids:
        hit = hit | (vocab == i)
    return jnp.where(hit, jnp.asarray(value, logits.dtype), logits)


def initial_canvas(prompt_ids: jax.Array, prompt_mask: jax.Array | None, gen_length: int, mask_id: int,
                   mesh: Mesh | None) -> tuple[jax.Array, jax.Array | None]:
    """The sampler's starting rows: ``x`` int32 [B, Lp + Lg], the prompt then ``gen_length`` mask tokens, and
    the attention mask int32 [B, Lp + Lg] (the prompt's, the completion attended) or None without one."""
    bsz = prompt_ids.shape[0]
    x = jnp.concatenate([prompt_ids.astype(jnp.int32), jnp.full((bsz, gen_length), mask_id, jnp.int32)], axis=1)
    x = constrain(x, mesh, ("batch", "length"))
    am = None
    if prompt_mask is not None:
        am = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones((bsz, gen_length), jnp.int32)], axis=1)
        am = constrain(am, mesh, ("batch", "length"))
    return x, am


def ban_mask_token(logits: jax.Array, mask_id: int, cfg: SamplingConfig) -> jax.Array:
    """``logits [..., V]`` with the mask token's column at -inf when ``cfg.ban_mask_token``, else unchanged
    (upstream: the mask id is an ordinary outcome of both samplers)."""
    return set_columns(logits, [mask_id], NEG_INF) if cfg.ban_mask_token else logits


def gumbel_argmax(logits: jax.Array, temperature: float, key: jax.Array | None) -> jax.Array:
    """Sample ``argmax(logits / T + Gumbel)`` ~ ``softmax(logits / T)``; argmax when ``T == 0``.

    logits [..., V] float32 -> int32 [...]. Noise and arithmetic are float32 (float64 is unavailable on
    TPU): ``exp(l) / (-log u)^T`` of upstream LLaDA is monotone in ``l / T - log(-log u)``, so the two pick
    the same distribution; the draws themselves cannot match torch's generator anyway.
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    g = jax.random.gumbel(key, logits.shape, jnp.float32)
    return jnp.argmax(logits / jnp.float32(temperature) + g, axis=-1).astype(jnp.int32)


def log_prob_of(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """``log softmax(logits)[tokens]``: logits [..., V] float32, tokens [...] -> float32 [...]."""
    picked = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _ordered_bits(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (a < b iff key(a) < key(b)); -inf maps above 0."""
    b = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (b >> 31) == 1
    return jnp.where(negative, ~b, b | jnp.uint32(0x80000000))


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filtering as Dream's ``top_p_logits``: in descending order, keep tokens up to and including
    the first one whose cumulative probability exceeds ``top_p``; the rest get :data:`FILTERED`.

    Token ``j`` is kept iff the probability mass of the tokens with a strictly larger logit is ``<= top_p``
    (exactly upstream's rule for distinct logits; tokens tied with the last kept one are kept too, where
    torch's order among exact ties is unspecified). That mass is non-increasing in the logit, so the kept set
    is ``logit >= K`` and ``K`` is found by a 32-step bisection on the float32 bit pattern: 32 masked sums
    over the vocabulary instead of a full sort (much cheaper on TPU for a 150k vocabulary).
    """
    probs = jax.nn.softmax(logits, axis=-1)
    keys = _ordered_bits(logits)
    p = jnp.float32(top_p)

    def mass_above(t):                      # [...] mass of tokens whose key is > t
        return jnp.sum(jnp.where(keys > t[..., None], probs, 0.0), axis=-1)

    def step(i, ans):                       # largest t with mass_above(t) > top_p, built bit by bit
        cand = ans | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(mass_above(cand) > p, cand, ans)

    ans = jax.lax.fori_loop(0, 32, step, jnp.zeros(logits.shape[:-1], jnp.uint32))
    # mass_above(0) = 1 > top_p (top_p < 1), so ans is well defined; kept: key > ans.
    return jnp.where(keys > ans[..., None], logits, FILTERED)


def top_k_filter(logits: jax.Array, top_k: int) -> jax.Array:
    """Dream's ``top_k_logits``: logits below the k-th largest get :data:`FILTERED`."""
    k = min(int(top_k), logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, FILTERED, logits)


def select_above(scores: jax.Array, masked: jax.Array, threshold: float) -> jax.Array:
    """Boolean [B, P]: Fast-dLLM's confidence-aware parallel decoding rule. Every ``masked`` position whose
    score is ``>= threshold``, and at least the highest-scoring masked one (ties: lower position); nothing in
    a row without a masked position."""
    scores = jnp.where(masked, scores, NEG_INF)
    return masked & ((scores >= jnp.float32(threshold)) | select_top(scores, 1))


def select_by_factor(scores: jax.Array, masked: jax.Array, factor: float) -> jax.Array:
    """Boolean [B, P]: Fast-dLLM's factor rule. The ``n`` highest-scoring ``masked`` positions, ``n`` the
    largest count for which the ``i``-th highest score is ``>= 1 - factor / (i + 1)`` for every ``i <= n``;
    at least one (ties: lower position); nothing in a row without a masked position.

    Scores fall and the bar rises with ``i``, so the rule is the leading run of ranks that clear their bar.
    (Upstream's loop also reveals the last masked position when it is the only one to miss its bar; that
    edge is not reproduced, see docs/sampling.md.)
    """
    scores = jnp.where(masked, scores, NEG_INF)
    ranked = -jnp.sort(-scores, axis=-1)                                     # [B, P], descending
    rank = jnp.arange(1, scores.shape[-1] + 1, dtype=jnp.float32)
    clears = (ranked >= 1.0 - jnp.float32(factor) / (rank + 1.0)) | (rank == 1)
    n = jnp.sum(jnp.cumprod(clears.astype(jnp.int32), axis=-1), axis=-1, keepdims=True)   # [B, 1]
    return masked & select_top(scores, n)


def select_parallel(scores: jax.Array, masked: jax.Array, threshold: float | None,
                    factor: float | None) -> jax.Array:
    """Boolean [B, P]: the positions one parallel-decoding step reveals, by ``threshold`` or by ``factor``
    (exactly one of them is set)."""
    if threshold is not None:
        return select_above(scores, masked, threshold)
    return select_by_factor(scores, masked, factor)


def select_top(scores: jax.Array, k: jax.Array) -> jax.Array:
    """Boolean [B, P]: the ``k`` highest ``scores`` of every row (``k`` a traced int scalar, or [B, 1] per row).

    Ties are broken toward the lower position (stable sort), deterministically on every backend.
    """
    order = jnp.argsort(-scores, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1, stable=True)
    return rank < k
