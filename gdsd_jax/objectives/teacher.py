"""The advantage-guided self-teacher, explicitly, as pure functions.

The paper's closed-form optimum of reverse-KL regularised RL is ``p* ∝ p_old^(1-β) p_ref^β exp(ψ A)``
(GDSD, arXiv 2605.29398). The text of the paper's Section 3 (Method) was not available, so the
token-level form below is a **reconstruction** from the paper's description (see docs/objectives.md).

(a) Per-sequence target (:func:`teacher_sequence_target`): the value of the denoiser statistic ℓθ that the
    official GDSD regression pulls towards, ``ℓold + ψ A L`` (Δ/L = ψ A; ψ per token as in the released
    code, β enters only through the separate k2 penalty), and the geometric-teacher variant
    ``(1-β) ℓold + β ℓref + ψ A L``.

(b) Teacher **logits** at a scored position i of rollout b (token y = x0_i, energy e_b = ψ·A_b/L, with ψ the
    sequence-level guidance of the paper, spread evenly over the L tokens):

        z*_v = (1-β)·(z_old,v - mean z_old) + β·(z_ref,v - mean z_ref) + e_b·(1[v = y] - 1/V)

    i.e. token-logit-centred old/ref mixture plus the (centred) advantage energy on the sampled token. The
    ``gdsd_logit`` objective matches the student's centred logits ``z_v - mean z`` to z* with a squared
    distance over the vocabulary, without any log-softmax: the paper's "normalization-free" matching of
    "energy-guided logits" read as dropping the vocabulary normaliser, with token logit centring as the
    gauge fix (logits are only defined up to a per-position constant).
    :func:`logit_match_sqdist` computes ``Σ_v (z~θ_v - z*_v)²`` in vocabulary chunks from hidden states,
    so no ``[.., V]`` array is formed; :func:`teacher_logits` builds z* explicitly (small shapes only).

Shape letters: R rows, P positions, D width, V vocabulary.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from gdsd_jax.distributed.mesh import constrain
from gdsd_jax.objectives.loglik import (
    acc_dtype,
    dynamic_slice,
    head_backward,
    head_logits,
    over_positions,
    over_vocab,
    vocab_mean_logit,
)


def teacher_sequence_target(ell_old: jax.Array, advantages: jax.Array, length, *, psi: float, beta: float = 0.0,
                            ell_ref: jax.Array | None = None, form: str = "official") -> jax.Array:
    """Target of the per-sequence statistic ℓθ [B, M].

    ell_old [B, M], advantages [B], length: scalar or [B] (L, or the scored length).
    ``form="official"``: ``ℓold + ψ A L`` (the GDSD regression's fixed point, Δ/L = ψA).
    ``form="geometric"``: ``(1-β) ℓold + β ℓref + ψ A L`` (log of p_old^(1-β) p_ref^β e^(ψAL), up to log Z).
    """
    length = jnp.asarray(length, ell_old.dtype)
    energy = (psi * advantages.astype(ell_old.dtype) * length)[..., None]
    if form == "official":
        return ell_old + energy
    if form == "geometric":
        if ell_ref is None:
            raise ValueError("teacher_sequence_target(form='geometric') needs ell_ref")
        return (1.0 - beta) * ell_old + beta * ell_ref + energy
    raise ValueError(f"unknown teacher target form {form!r}; expected 'official' or 'geometric'")


def centred_logits(h: jax.Array, w: jax.Array) -> jax.Array:
    """[..., V] token-logit-centred logits ``z - mean_v z`` (materialises V: small shapes only)."""
    z = head_logits(h, w)
    return z - jnp.mean(z, axis=-1, keepdims=True)


def teacher_logits(h_old: jax.Array, w_old: jax.Array, h_ref: jax.Array, w_ref: jax.Array, targets: jax.Array,
                   energy: jax.Array, beta: float) -> jax.Array:
    """The teacher's centred logits z* [..., V] (materialised; for inspection and small shapes).

    h_old / h_ref [..., D] hidden states of the old / reference model at the scored positions (same masks),
    w_old / w_ref [D, V] their LM heads, targets [...] the sampled tokens, energy [...] = ψ·A/L per position.
    """
    v = w_old.shape[1]
    z = (1.0 - beta) * centred_logits(h_old, w_old) + beta * centred_logits(h_ref, w_ref)
    onehot = jax.nn.one_hot(targets, v, dtype=z.dtype)
    return z + energy.astype(z.dtype)[..., None] * (onehot - 1.0 / v)


def logit_match_sqdist(h: jax.Array, w: jax.Array, teachers: Sequence[tuple[float, jax.Array, jax.Array]],
                       targets: jax.Array, energy: jax.Array, *, vocab_chunk: int | None = 8192,
                       seq_chunk: int | None = 128, mesh: Mesh | None = None) -> jax.Array:
    """``Σ_v (z~θ_v - z*_v)²`` per position [R, P], in chunks.

    h [R, P, D], w [D, V]: the student (differentiable). teachers: ``(coef, h_t [R, P, D], w_t [D, V])``
    terms whose centred logits are mixed with ``coef`` (e.g. ``[(1-β, h_old, W), (β, h_ref, W)]``, or one
    term ``(1, (1-β) h_old + β h_ref, W)`` when the heads are shared, since centring is linear); they are
    constants (``stop_gradient``). targets [R, P], energy [R, P] (ψ·A/L broadcast per row).
    Both chunk sizes ``None``: the naive full-logits computation.
    """
    teachers = [(float(c), lax.stop_gradient(ht), lax.stop_gradient(wt)) for c, ht, wt in teachers]
    energy = lax.stop_gradient(energy)
    v = w.shape[1]
    acc = acc_dtype(h.dtype)

    if vocab_chunk is None and seq_chunk is None:
        zs = centred_logits(h, w)
        zt = sum(c * centred_logits(ht, wt) for c, ht, wt in teachers)
        onehot = jax.nn.one_hot(targets, v, dtype=zs.dtype)
        d = zs - zt - energy.astype(zs.dtype)[..., None] * (onehot - 1.0 / v)
        return jnp.sum(d * d, axis=-1)

    h = constrain(h, mesh, ("batch", "length", "act_embed"))
    coefs = tuple(c for c, _, _ in teachers)
    hts = tuple(ht for _, ht, _ in teachers)
    wts = tuple(wt for _, _, wt in teachers)
    return _sqdist_op(h, w, hts, wts, targets, energy.astype(acc), coefs, vocab_chunk, seq_chunk, mesh)


def _residual(h_c, w_c, cols, fresh, hts_c, wts, coefs, t_c, e_c, off_c, mesh):
    """d_v = [z_v - Σ c z_t,v] - offset - e·1[v = y] on one vocabulary chunk (0 on stale columns)."""
    z = head_logits(h_c, w_c)
    for c, x, wt in zip(coefs, hts_c, wts):
        z = z - c * head_logits(x, dynamic_slice(wt, cols[0], w_c.shape[1], axis=1))
    z = constrain(z, mesh, ("batch", "length", "vocab"))
    d = z - off_c[..., None] - jnp.where(cols == t_c[..., None], e_c[..., None], 0.0)
    return jnp.where(fresh, d, 0.0)


def _sqdist_forward(h, w, hts, wts, targets, energy, coefs, vocab_chunk, seq_chunk, mesh):
    """(Σ_v d², Σ_v d, offset), each [R, P]; the offset gathers the student mean, the teacher means and
    the energy's -1/V share."""
    v = w.shape[1]
    offset = vocab_mean_logit(h, w) - sum(c * vocab_mean_logit(x, wt) for c, x, wt in zip(coefs, hts, wts)) \
        - energy / v
    acc = acc_dtype(h.dtype)

    def chunk_fn(h_c, t_c, e_c, off_c, *hts_c):
        def step(carry, w_c, cols, fresh):
            d = _residual(h_c, w_c, cols, fresh, hts_c, wts, coefs, t_c, e_c, off_c, mesh)
            return carry[0] + jnp.sum(d * d, axis=-1), carry[1] + jnp.sum(d, axis=-1)
        zero = jnp.zeros(t_c.shape, acc)
        return over_vocab(w, vocab_chunk, step, (zero, zero), remat=False)

    s2, s1 = over_positions(chunk_fn, seq_chunk, targets.shape[1], h, targets, energy, offset, *hts, remat=False)
    return s2, s1, offset


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _sqdist_op(h, w, hts, wts, targets, energy, coefs, vocab_chunk, seq_chunk, mesh):
    return _sqdist_forward(h, w, hts, wts, targets, energy, coefs, vocab_chunk, seq_chunk, mesh)[0]


def _sqdist_op_fwd(h, w, hts, wts, targets, energy, coefs, vocab_chunk, seq_chunk, mesh):
    s2, s1, offset = _sqdist_forward(h, w, hts, wts, targets, energy, coefs, vocab_chunk, seq_chunk, mesh)
    return s2, (h, w, hts, wts, targets, energy, offset, s1)


def _sqdist_op_bwd(coefs, vocab_chunk, seq_chunk, mesh, res, g):
    """d Σ_v d_v² / d z_u = 2 d_u - (2/V) Σ_v d_v (the second term from the student's own centring; it
    vanishes in exact arithmetic because every centred term sums to zero). The teachers are constants."""
    h, w, hts, wts, targets, energy, offset, s1 = res
    acc = acc_dtype(h.dtype)
    v = w.shape[1]
    fresh_all = jnp.ones((1,), bool)                 # staleness is handled by head_backward

    def dz_fn(h_c, w_c, cols, t_c, e_c, off_c, s1_c, g_c, *hts_c):
        d = _residual(h_c, w_c, cols, fresh_all, hts_c, wts, coefs, t_c, e_c, off_c, mesh)
        return g_c[..., None] * (2.0 * d - (2.0 / v) * s1_c[..., None])

    dh, dw = head_backward(h, w, [targets, energy, offset, s1, g.astype(acc), *hts], dz_fn, vocab_chunk, seq_chunk)
    return dh, dw, None, None, None, None


_sqdist_op.defvjp(_sqdist_op_fwd, _sqdist_op_bwd)
