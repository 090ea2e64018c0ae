"""Memory-safe denoiser log-likelihoods: the LM head, log-softmax and gather in chunks.

Only completion positions go through the LM head, and the ``[rows, positions, vocab]`` logits in fp32 are
never formed: :func:`token_scores` runs a scan over **position chunks** (``seq_chunk``) and, inside it, a
scan over **vocabulary chunks** (``vocab_chunk``) with an online (streaming) logsumexp. The backward pass
is written by hand (``jax.custom_vjp``, :func:`head_backward`): it recomputes each ``[rows, seq_chunk,
vocab_chunk]`` logits block and accumulates the gradients of the hidden states and of the LM head in
place, so the live temporary is one such block plus the two accumulators. When a chunk
size does not divide V (or L) the last chunk is shifted left to end at the boundary and the overlap is
masked out, so there is one loop body and no padding copy of the LM head. ``vocab_chunk=None`` and
``seq_chunk=None`` select :func:`token_scores_naive`, the plain full-logits computation (reference for tests and benchmarks).

Score kinds (per position i with target token y = x0_i and logits z over the vocabulary):

* ``"logprob"``: ``log softmax(z)_y = z_y - logsumexp(z)``.
* ``"centred_logprob"``: the GDSD-TLC "Eq. 8" form ``log p(y) - mean_v log p(v) = z_y - mean_v z``
  (normalisation-free; ``topk > 0`` replaces the full mean by the mean of the k largest logits).

Logit centring for ``"logprob"`` (``centring="detached_logits"``, the TLC as one released version of the
official GDSD-TLC trainer does it): ``z~ = z - stop_gradient(mean_v z)`` before the log-softmax. It is implemented
once (:func:`tlc_centre`) and is a mathematical no-op: ``log_softmax(z - c) = log_softmax(z)`` for any
per-position constant ``c``, and since ``c`` carries no gradient the gradients are unchanged too (the
tests check values and gradients).

Shape letters: R rows (B·M masked sequences), P positions (L), D width, V vocabulary, B, M, L as usual.
Accumulation is in ``promote(hidden dtype, float32)``: fp32 for bf16/fp32 models, fp64 under x64.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from gdsd_jax.distributed.mesh import constrain
from gdsd_jax.models.config import DenoiserConfig
from gdsd_jax.models.denoiser import hidden_states
from gdsd_jax.objectives.masking import d1_tokens, mask_ratio, masked_completion_tokens
from gdsd_jax.objectives.types import RolloutBatch

SCORE_KINDS = ("logprob", "centred_logprob")


def acc_dtype(dtype) -> jnp.dtype:
    """Accumulation dtype: at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def head_logits(h: jax.Array, w: jax.Array) -> jax.Array:
    """h [..., D], w [D, c] -> logits [..., c] in the accumulation dtype (w cast to h's dtype first,
    like the model's own LM head)."""
    return jnp.einsum("...d,dc->...c", h, w.astype(h.dtype), preferred_element_type=acc_dtype(h.dtype))


def vocab_mean_logit(h: jax.Array, w: jax.Array) -> jax.Array:
    """h [..., D], w [D, V] -> mean over the vocabulary of the logits [...], as ``h · mean_v W[:, v]``
    (no [.., V] array; differentiable)."""
    acc = acc_dtype(h.dtype)
    wbar = jnp.mean(w.astype(h.dtype).astype(acc), axis=1)
    return jnp.einsum("...d,d->...", h.astype(acc), wbar)


def tlc_centre(z: jax.Array, zbar: jax.Array) -> jax.Array:
    """Token logit centring as the TLC release does it: ``z - stop_gradient(zbar)[..., None]``.

    z [..., c] logits (all or a chunk of the vocabulary), zbar [...] the per-position vocabulary mean.
    Under a following log-softmax this changes neither values nor gradients (see module docstring).
    """
    return z - lax.stop_gradient(zbar)[..., None]


def target_logit(h: jax.Array, w: jax.Array, targets: jax.Array) -> jax.Array:
    """z_y without the vocabulary: h [R, P, D], targets [R, P] -> [R, P] (gathers LM-head columns)."""
    wy = jnp.take(w, targets, axis=1).astype(h.dtype)                          # [D, R, P]
    return jnp.einsum("rpd,drp->rp", h, wy, preferred_element_type=acc_dtype(h.dtype))


# ---- chunk iteration helpers ----------------------------------------------------------------------

def _num_chunks(total: int, chunk: int | None) -> tuple[int, int]:
    """(chunk size c <= total, number of chunks ceil(total / c))."""
    c = total if chunk is None else min(int(chunk), total)
    return c, -(-total // c)


def _vocab_chunk(w: jax.Array, c: int, i) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Chunk i of the LM-head columns: (w[:, cols] [D, c], cols [c], fresh [c]).

    The chunk starts at ``min(i c, V - c)``: when c does not divide V the last chunk is shifted left to
    stay inside the matrix (no padding copy of the head, one compiled loop body) and ``fresh`` marks the
    columns not already covered by the previous chunk; callers ignore the others.
    """
    v = w.shape[1]
    nominal = i * c
    start = jnp.minimum(nominal, v - c)
    cols = start + jnp.arange(c, dtype=jnp.int32)
    return dynamic_slice(w, start, c, axis=1), cols, cols >= nominal


def dynamic_slice(a: jax.Array, start, size: int, axis: int) -> jax.Array:
    """``lax.dynamic_slice_in_dim``; on CPU, 16-bit floats are sliced as raw bits because XLA's CPU
    backend otherwise upcasts a bf16 operand to fp32 before slicing and hoists that full-size copy out
    of the loop (a 1.9 GiB fp32 copy of LLaDA's head). Other backends slice bf16 natively."""
    if a.dtype in (jnp.bfloat16, jnp.float16) and jax.default_backend() == "cpu":
        bits = lax.bitcast_convert_type(a, jnp.uint16)
        return lax.bitcast_convert_type(lax.dynamic_slice_in_dim(bits, start, size, axis=axis), a.dtype)
    return lax.dynamic_slice_in_dim(a, start, size, axis=axis)


def over_vocab(w: jax.Array, vocab_chunk: int | None, step: Callable, init, remat: bool = True):
    """Fold ``step(carry, w_chunk [D, c], cols [c], fresh [c]) -> carry`` over the LM-head columns.

    With ``remat`` the step is rematerialised (``jax.checkpoint``) and slices ``w`` inside the
    checkpoint, so under autodiff the only per-chunk residuals are the (small) carries.
    """
    c, n = _num_chunks(w.shape[1], vocab_chunk)

    def body(carry, i):
        inner = lambda carry, i: step(carry, *_vocab_chunk(w, c, i))
        return (jax.checkpoint(inner) if remat else inner)(carry, i), None

    if n == 1:
        return body(init, jnp.asarray(0, jnp.int32))[0]
    carry, _ = lax.scan(body, init, jnp.arange(n, dtype=jnp.int32))
    return carry


def _position_chunk(a: jax.Array, s: int, i):
    """Chunk i (size s) of axis 1, shifted left at the end like :func:`_vocab_chunk`; also returns a
    [s] mask of the positions not covered by the previous chunk."""
    length = a.shape[1]
    nominal = i * s
    start = jnp.minimum(nominal, length - s)
    return dynamic_slice(a, start, s, axis=1), start + jnp.arange(s) >= nominal


def _assemble(ys: jax.Array, length: int) -> jax.Array:
    """[n, R, S, ...] chunk outputs -> [R, P, ...], keeping only the new positions of the last chunk."""
    n, rows, s = ys.shape[:3]
    if n == 1:
        return ys[0]
    head = jnp.moveaxis(ys[: n - 1], 0, 1).reshape((rows, (n - 1) * s) + ys.shape[3:])
    return jnp.concatenate([head, ys[n - 1][:, n * s - length:]], axis=1)


def over_positions(fn: Callable, seq_chunk: int | None, length: int, *arrays, remat: bool = True):
    """Apply ``fn(*chunks) -> pytree of [R, S, ...]`` over chunks of axis 1 of ``arrays`` (``None``
    entries pass through) and assemble each output to [R, P, ...]."""
    s, n = _num_chunks(length, seq_chunk)
    if n == 1:
        return fn(*arrays)

    def body(_, i):
        chunks = [None if a is None else _position_chunk(a, s, i)[0] for a in arrays]
        return None, (jax.checkpoint(fn) if remat else fn)(*chunks)

    _, ys = lax.scan(body, None, jnp.arange(n, dtype=jnp.int32))
    return jax.tree.map(lambda y: _assemble(y, length), ys)


# ---- the chunked log-softmax with a hand-written backward pass ----------------------------------

def _logprob_forward(h, w, targets, shift, vocab_chunk, seq_chunk, mesh):
    """(log p_y [R, P], logsumexp [R, P]) by streaming over vocabulary chunks."""
    acc = acc_dtype(h.dtype)

    def chunk_fn(h_c, t_c, sh_c):
        r, s = t_c.shape

        def step(carry, w_c, cols, fresh):
            m, ssum, zy = carry
            z = head_logits(h_c, w_c)
            if sh_c is not None:
                z = tlc_centre(z, sh_c)
            z = constrain(z, mesh, ("batch", "length", "vocab"))
            z = jnp.where(fresh, z, -jnp.inf)            # columns already counted by the previous chunk
            m_new = jnp.maximum(m, jnp.max(z, axis=-1))
            ssum = ssum * jnp.exp(m - m_new) + jnp.sum(jnp.exp(z - m_new[..., None]), axis=-1)
            return m_new, ssum, zy + _gather_in_chunk(z, t_c, cols, fresh)

        init = (jnp.full((r, s), -jnp.inf, acc), jnp.zeros((r, s), acc), jnp.zeros((r, s), acc))
        m, ssum, zy = over_vocab(w, vocab_chunk, step, init, remat=False)
        lse = m + jnp.log(ssum)
        return zy - lse, lse

    return over_positions(chunk_fn, seq_chunk, targets.shape[1], h, targets, shift, remat=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _logprob_op(h, w, targets, shift, vocab_chunk, seq_chunk, mesh):
    return _logprob_forward(h, w, targets, shift, vocab_chunk, seq_chunk, mesh)[0]


def _logprob_op_fwd(h, w, targets, shift, vocab_chunk, seq_chunk, mesh):
    logp, lse = _logprob_forward(h, w, targets, shift, vocab_chunk, seq_chunk, mesh)
    return logp, (h, w, targets, shift, lse)


def head_backward(h: jax.Array, w: jax.Array, per_position: Sequence, dz_fn: Callable, vocab_chunk: int | None,
                  seq_chunk: int | None) -> tuple[jax.Array, jax.Array]:
    """Gradients (dh [R, P, D], dW [D, V]) of a function of the logits z = h W, given its logits
    cotangent block by block: ``dz_fn(h_c, w_c, cols, *per_position_chunks) -> dz [R, S, c]``.

    Outer loop over position chunks, inner loop over vocabulary chunks; dh and dW are single in-place
    accumulators (dW in the accumulation dtype, aliased with the output for fp32 heads), and the live
    temporary is one [R, S, c] block. Stale columns / positions of shifted last chunks get zero cotangent.
    """
    acc = acc_dtype(h.dtype)
    length = h.shape[1]
    d, v = w.shape
    s, n = _num_chunks(length, seq_chunk)
    c, nv = _num_chunks(v, vocab_chunk)

    def pos_body(carry, i):
        dw, dh = carry
        h_c, new = _position_chunk(h, s, i)
        chunks = [None if a is None else _position_chunk(a, s, i)[0] for a in per_position]

        def voc_body(carry, j):
            dh_c, dw = carry
            w_c, cols, fresh = _vocab_chunk(w, c, j)
            dz = dz_fn(h_c, w_c, cols, *chunks)
            dz = jnp.where(new[None, :, None] & fresh, dz, 0.0).astype(h.dtype)
            dh_c = dh_c + jnp.einsum("rsc,dc->rsd", dz, w_c.astype(h.dtype), preferred_element_type=acc)
            upd = jnp.einsum("rsd,rsc->dc", h_c, dz, preferred_element_type=acc)
            dw = lax.dynamic_update_slice_in_dim(dw, dynamic_slice(dw, cols[0], c, axis=1) + upd, cols[0], axis=1)
            return (dh_c, dw), None

        (dh_c, dw), _ = lax.scan(voc_body, (jnp.zeros(h_c.shape, acc), dw), jnp.arange(nv, dtype=jnp.int32))
        start = jnp.minimum(i * s, length - s)          # the overlap of a shifted last chunk adds zeros
        dh = lax.dynamic_update_slice_in_dim(dh, lax.dynamic_slice_in_dim(dh, start, s, axis=1) + dh_c, start,
                                             axis=1)
        return (dw, dh), None

    (dw, dh), _ = lax.scan(pos_body, (jnp.zeros((d, v), acc), jnp.zeros(h.shape, acc)),
                           jnp.arange(n, dtype=jnp.int32))
    return dh.astype(h.dtype), dw.astype(w.dtype)


def _logprob_op_bwd(vocab_chunk, seq_chunk, mesh, res, g):
    """d log p_y / dz_v = 1[v = y] - softmax(z)_v, recomputed block by block (:func:`head_backward`)."""
    h, w, targets, shift, lse = res
    acc = acc_dtype(h.dtype)

    def dz_fn(h_c, w_c, cols, t_c, lse_c, g_c, sh_c):
        z = head_logits(h_c, w_c)
        if sh_c is not None:
            z = tlc_centre(z, sh_c)
        z = constrain(z, mesh, ("batch", "length", "vocab"))
        p = jnp.exp(z - lse_c[..., None])
        return g_c[..., None] * ((cols == t_c[..., None]).astype(acc) - p)

    dh, dw = head_backward(h, w, [targets, lse, g.astype(acc), shift], dz_fn, vocab_chunk, seq_chunk)
    return dh, dw, None, None


_logprob_op.defvjp(_logprob_op_fwd, _logprob_op_bwd)


# ---- per-position scores ------------------------------------------------------------------------

def _check_kind(kind: str, centring: str | None, topk: int) -> None:
    if kind not in SCORE_KINDS:
        raise ValueError(f"unknown score kind {kind!r}; expected one of {SCORE_KINDS}")
    if centring not in (None, "detached_logits"):
        raise ValueError(f"unknown centring {centring!r}; expected None or 'detached_logits'")
    if topk < 0:
        raise ValueError(f"topk={topk}; expected >= 0")


def token_scores(h: jax.Array, w: jax.Array, targets: jax.Array, *, kind: str = "logprob",
                 centring: str | None = None, topk: int = 0, vocab_chunk: int | None = 8192,
                 seq_chunk: int | None = 128, mesh: Mesh | None = None) -> jax.Array:
    """Per-position scores of the target tokens, chunked.

    Args:
      h: [R, P, D] final-normed, aligned hidden states at the scored positions.
      w: [D, V] the LM head.
      targets: [R, P] int token ids (the clean tokens x0).
      kind / centring / topk: see the module docstring.
      vocab_chunk / seq_chunk: chunk sizes; both ``None`` -> :func:`token_scores_naive`.
    Returns: [R, P] in the accumulation dtype.

    ``"logprob"`` has a hand-written backward pass (recompute each logits block, accumulate dh and dW
    in place); the top-k form uses autodiff through rematerialised chunks.
    """
    _check_kind(kind, centring, topk)
    if vocab_chunk is None and seq_chunk is None:
        return token_scores_naive(h, w, targets, kind=kind, centring=centring, topk=topk)
    h = constrain(h, mesh, ("batch", "length", "act_embed"))
    acc = acc_dtype(h.dtype)
    v = w.shape[1]
    if topk > v:
        raise ValueError(f"topk={topk} exceeds the vocabulary size {v}")

    if kind == "logprob":
        shift = vocab_mean_logit(h, w) if centring == "detached_logits" else None
        return _logprob_op(h, w, targets, None if shift is None else lax.stop_gradient(shift), vocab_chunk,
                           seq_chunk, mesh)

    if topk == 0:
        # z_y - mean_v z needs no pass over the vocabulary at all.
        return target_logit(h, w, targets) - vocab_mean_logit(h, w)

    def chunk_fn(h_c, t_c):                                 # z_y - mean of the top-k logits
        r, s = t_c.shape

        def step(carry, w_c, cols, fresh):
            top, zy = carry
            z = jnp.where(fresh, head_logits(h_c, w_c), -jnp.inf)
            zy = zy + _gather_in_chunk(z, t_c, cols, fresh)
            top = lax.top_k(jnp.concatenate([top, z], axis=-1), topk)[0]
            return top, zy

        init = (jnp.full((r, s, topk), -jnp.inf, acc), jnp.zeros((r, s), acc))
        top, zy = over_vocab(w, vocab_chunk, step, init)
        return zy - jnp.mean(top, axis=-1)

    return over_positions(chunk_fn, seq_chunk, targets.shape[1], h, targets)


def _gather_in_chunk(z: jax.Array, targets: jax.Array, cols: jax.Array, fresh: jax.Array) -> jax.Array:
    """z [R, S, c] logits of the columns ``cols`` [c] (contiguous): the target's logit where the target
    is one of the ``fresh`` columns, else 0."""
    c = z.shape[-1]
    idx = targets - cols[0]
    inside = (idx >= 0) & (idx < c)
    idx = jnp.clip(idx, 0, c - 1)
    inside = inside & fresh[idx]
    val = jnp.take_along_axis(z, idx[..., None], axis=-1)[..., 0]
    return jnp.where(inside, val, jnp.zeros_like(val))


def token_scores_naive(h: jax.Array, w: jax.Array, targets: jax.Array, *, kind: str = "logprob",
                       centring: str | None = None, topk: int = 0) -> jax.Array:
    """The same scores from the full ``[R, P, V]`` logits (memory O(R·P·V)): reference path."""
    _check_kind(kind, centring, topk)
    z = head_logits(h, w)
    zy = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    if kind == "centred_logprob":
        if topk:
            return zy - jnp.mean(lax.top_k(z, topk)[0], axis=-1)
        return zy - jnp.mean(z, axis=-1)
    if centring == "detached_logits":
        z = tlc_centre(z, jnp.mean(z, axis=-1))
        zy = jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
    return zy - jax.nn.logsumexp(z, axis=-1)


# ---- the denoiser passes ------------------------------------------------------------------------

def completion_hidden(params: Mapping, model_cfg: DenoiserConfig, tokens: jax.Array, prompt_len: int,
                      attention_mask: jax.Array | None = None, *, lora: Mapping | None = None,
                      mesh: Mesh | None = None) -> jax.Array:
    """tokens [N, Lp+L] -> aligned final hidden states at the completion positions [N, L, D]."""
    h = hidden_states(params, model_cfg, tokens, attention_mask, mesh=mesh, lora=lora)
    return h[:, prompt_len:]


def _attention(batch: RolloutBatch, use: bool, repeat: int) -> jax.Array | None:
    if not use:
        return None
    am = batch.attention_mask()
    return jnp.repeat(am, repeat, axis=0) if repeat > 1 else am


def coupled_hidden(params: Mapping, model_cfg: DenoiserConfig, batch: RolloutBatch, is_mask: jax.Array, *,
                   use_attention_mask: bool = False, lora: Mapping | None = None,
                   mesh: Mesh | None = None) -> jax.Array:
    """Hidden states of the two coupled passes, merged per position.

    Row (b, m) is run twice: with ``is_mask[b, m]`` masked, and with its complement masked (one forward of
    2·B·M rows). Each completion position keeps the hidden state of the pass where it was masked, so
    every position is scored exactly once and the LM head runs on B·M·L positions, not 2·B·M·L.

    is_mask: [B, M, L] bool. Returns [B·M, L, D] (rows in (b, m) order).
    """
    b, m, length = is_mask.shape
    mask_id = model_cfg.mask_token_id
    masked = masked_completion_tokens(batch.sequences, batch.prompt_len, is_mask, mask_id)
    compl = masked_completion_tokens(batch.sequences, batch.prompt_len, ~is_mask, mask_id)
    total = batch.sequences.shape[1]
    tokens = jnp.concatenate([masked.reshape(b * m, total), compl.reshape(b * m, total)], axis=0)
    am = _attention(batch, use_attention_mask, m)
    if am is not None:
        am = jnp.concatenate([am, am], axis=0)
    h = completion_hidden(params, model_cfg, tokens, batch.prompt_len, am, lora=lora, mesh=mesh)
    sel = is_mask.reshape(b * m, length)[..., None]
    return jnp.where(sel, h[: b * m], h[b * m:])


def position_weights(batch: RolloutBatch, score_positions: str) -> jax.Array:
    """[B, L] float32: which completion positions are scored (1/0)."""
    if score_positions == "all":
        return jnp.ones(batch.completion_mask.shape, jnp.float32)
    if score_positions == "completion_mask":
        return batch.completion_mask.astype(jnp.float32)
    raise ValueError(f"unknown score_positions {score_positions!r}; expected 'all' or 'completion_mask'")


def scored_length(batch: RolloutBatch, score_positions: str) -> jax.Array:
    """[B] float32: the length used to normalise (L, or the number of scored positions, at least 1)."""
    return jnp.maximum(position_weights(batch, score_positions).sum(axis=1), 1.0)


def coupled_loglik(scores: jax.Array, is_mask: jax.Array, num_masked: jax.Array, weights: jax.Array,
                   weighting: str = "none") -> jax.Array:
    """The per-sequence, per-draw statistic ℓ(b, m) from per-position scores of the coupled passes.

    scores [B, M, L] (each position from the pass where it was masked), is_mask [B, M, L],
    num_masked [B, M] (x), weights [B, L] (scored positions).

    * ``"none"`` (GDSD): ``ℓ = ½ Σ_i w_i s_i``.
    * ``"elbo"`` (GDSD-TLC, ESPO's coupled ELBO): masked positions weighted ``1/t``, complement positions
      ``1/((L - x)/(L + 1))``, with ``t = x/(L + 1)``; then halved.
    Returns [B, M] in the scores' dtype.
    """
    length = is_mask.shape[-1]
    s = scores * weights[:, None, :].astype(scores.dtype)
    if weighting == "none":
        return 0.5 * jnp.sum(s, axis=-1)
    if weighting != "elbo":
        raise ValueError(f"unknown weighting {weighting!r}; expected 'none' or 'elbo'")
    t = mask_ratio(num_masked, length).astype(scores.dtype)                        # [B, M]
    tc = (length - num_masked).astype(scores.dtype) / (length + 1)                 # (L - x)/(L + 1)
    inv_t = jnp.where(t > 0, 1.0 / jnp.where(t > 0, t, 1.0), 0.0)
    inv_tc = jnp.where(tc > 0, 1.0 / jnp.where(tc > 0, tc, 1.0), 0.0)
    wpos = jnp.where(is_mask, inv_t[..., None], inv_tc[..., None])
    return 0.5 * jnp.sum(s * wpos, axis=-1)


def coupled_statistic(params: Mapping, model_cfg: DenoiserConfig, batch: RolloutBatch, masks: Mapping, *,
                      weighting: str, kind: str = "logprob", centring: str | None = None, topk: int = 0,
                      score_positions: str = "all", use_attention_mask: bool = False,
                      vocab_chunk: int | None = 8192, seq_chunk: int | None = 128,
                      lora: Mapping | None = None, mesh: Mesh | None = None) -> jax.Array:
    """ℓ(b, m) [B, M] (float32) of the GDSD / GDSD-TLC / ESPO family under ``masks`` from
    :func:`~gdsd_jax.objectives.masking.coupled_masks`."""
    is_mask = masks["is_mask"]
    b, m, length = is_mask.shape
    h = coupled_hidden(params, model_cfg, batch, is_mask, use_attention_mask=use_attention_mask, lora=lora,
                       mesh=mesh)
    targets = jnp.broadcast_to(batch.completion[:, None, :], (b, m, length)).reshape(b * m, length)
    s = token_scores(h, params["lm_head"], targets, kind=kind, centring=centring, topk=topk,
                     vocab_chunk=vocab_chunk, seq_chunk=seq_chunk, mesh=mesh).reshape(b, m, length)
    return coupled_loglik(s, is_mask, masks["num_masked"], position_weights(batch, score_positions), weighting)


def one_step_logprobs(params: Mapping, model_cfg: DenoiserConfig, batch: RolloutBatch, masks: Mapping, *,
                      use_attention_mask: bool = False, vocab_chunk: int | None = 8192,
                      seq_chunk: int | None = 128, lora: Mapping | None = None,
                      mesh: Mesh | None = None) -> jax.Array:
    """d1/wd1: per-token ``log p(x0_i | q', all completion masked)`` [B, L] (float32)."""
    tokens = d1_tokens(batch.sequences, batch.prompt_len, masks["prompt_is_mask"], model_cfg.mask_token_id)
    h = completion_hidden(params, model_cfg, tokens, batch.prompt_len, _attention(batch, use_attention_mask, 1),
                          lora=lora, mesh=mesh)
    return token_scores(h, params["lm_head"], batch.completion, vocab_chunk=vocab_chunk, seq_chunk=seq_chunk,
                        mesh=mesh)


def multi_mask_logprobs(params: Mapping, model_cfg: DenoiserConfig, batch: RolloutBatch, is_mask: jax.Array, *,
                        use_attention_mask: bool = False, vocab_chunk: int | None = 8192,
                        seq_chunk: int | None = 128, lora: Mapping | None = None,
                        mesh: Mesh | None = None) -> jax.Array:
    """SPG: per-token log-probs under T full-sequence masks is_mask [B, T, Lp+L] -> [B, T, L]."""
    b, t, total = is_mask.shape
    mask_id = jnp.asarray(model_cfg.mask_token_id, batch.sequences.dtype)
    tokens = jnp.where(is_mask, mask_id, batch.sequences[:, None, :]).reshape(b * t, total)
    h = completion_hidden(params, model_cfg, tokens, batch.prompt_len, _attention(batch, use_attention_mask, t),
                          lora=lora, mesh=mesh)
    targets = jnp.broadcast_to(batch.completion[:, None, :], (b, t, total - batch.prompt_len))
    s = token_scores(h, params["lm_head"], targets.reshape(b * t, -1), vocab_chunk=vocab_chunk,
                     seq_chunk=seq_chunk, mesh=mesh)
    return s.reshape(b, t, -1)
