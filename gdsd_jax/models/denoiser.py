"""The masked-diffusion denoiser (LLaDA and Dream families) as pure functions plus one NNX module.

Parameters are a nested dict of arrays (the "params tree"), with every per-layer tensor stacked on a
leading ``layers`` axis so the blocks run under ``lax.scan``:

====================  ======================  ==========================================
path                  shape                   logical axes
====================  ======================  ==========================================
embed                 [V, D]                  (vocab, embed)
layers/attn_norm      [N, D]                  (layers, act_embed)
layers/q              [N, D, H, Dh]           (layers, embed, heads, head_dim)
layers/k, layers/v    [N, D, KV, Dh]          (layers, embed, kv_heads, head_dim)
layers/q_bias         [N, H, Dh]              (layers, heads, head_dim)         Dream only
layers/k_bias, v_bias [N, KV, Dh]             (layers, kv_heads, head_dim)      Dream only
layers/o              [N, H, Dh, D]           (layers, heads, head_dim, embed)
layers/mlp_norm       [N, D]                  (layers, act_embed)
layers/gate, up       [N, D, F]               (layers, embed, mlp)
layers/down           [N, F, D]               (layers, mlp, embed)
final_norm            [D]                     (act_embed,)
lm_head               [D, V]                  (embed, vocab)
====================  ======================  ==========================================

Shape letters: B batch, L length, D model width, H query heads, KV key/value heads, Dh head dim,
F MLP width, V vocabulary, N layers, P selected positions.

The pure functions (:func:`hidden_states`, :func:`lm_head`, :func:`logits`) are what samplers, objectives
and the trainer call inside ``jit``. :class:`Denoiser` is the user-facing NNX module holding the same
tree as ``nnx.Param`` variables.

Optional LoRA adapters enter through ``lora``: a dict ``{target: {"a": ..., "b": ...}}`` with targets
among ``q, k, v, o, gate, up, down`` (shapes in :mod:`gdsd_jax.models.lora`); ``lora=None`` is the base model.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from gdsd_jax.distributed.mesh import constrain, named_sharding
from gdsd_jax.models.config import DenoiserConfig, execution_platform, resolve_execution
from gdsd_jax.models.splash import splash_attention

Params = dict[str, Any]

_NEG = float(np.finfo(np.float32).min)


# ---- parameter layout ---------------------------------------------------------------------------

def param_shapes(cfg: DenoiserConfig) -> dict:
    """Shapes of the params tree, as a nested dict of tuples."""
    n, d, h, kv, dh, f, v = (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                             cfg.mlp_dim, cfg.vocab_size)
    layers = {
        "attn_norm": (n, d), "q": (n, d, h, dh), "k": (n, d, kv, dh), "v": (n, d, kv, dh),
        "o": (n, h, dh, d), "mlp_norm": (n, d), "gate": (n, d, f), "up": (n, d, f), "down": (n, f, d),
    }
    if cfg.qkv_bias:
        layers.update(q_bias=(n, h, dh), k_bias=(n, kv, dh), v_bias=(n, kv, dh))
    out = {"embed": (v, d), "layers": layers, "final_norm": (d,), "lm_head": (d, v)}
    if cfg.learned_positions:
        out["pos_embed"] = (cfg.max_seq_len, d)
    return out


_LOGICAL = {
    "embed": ("vocab", "embed"),
    "attn_norm": ("layers", "act_embed"), "mlp_norm": ("layers", "act_embed"),
    "q": ("layers", "embed", "heads", "head_dim"), "k": ("layers", "embed", "kv_heads", "head_dim"),
    "v": ("layers", "embed", "kv_heads", "head_dim"), "o": ("layers", "heads", "head_dim", "embed"),
    "q_bias": ("layers", "heads", "head_dim"), "k_bias": ("layers", "kv_heads", "head_dim"),
    "v_bias": ("layers", "kv_heads", "head_dim"),
    "gate": ("layers", "embed", "mlp"), "up": ("layers", "embed", "mlp"), "down": ("layers", "mlp", "embed"),
    "final_norm": ("act_embed",), "lm_head": ("embed", "vocab"), "pos_embed": ("length", "embed"),
}


def param_logical_axes(cfg: DenoiserConfig) -> dict:
    """Logical axis names of every parameter, same structure as :func:`param_shapes`."""
    shapes = param_shapes(cfg)
    out = {
        "embed": _LOGICAL["embed"],
        "layers": {k: _LOGICAL[k] for k in shapes["layers"]},
        "final_norm": _LOGICAL["final_norm"],
        "lm_head": _LOGICAL["lm_head"],
    }
    if "pos_embed" in shapes:
        out["pos_embed"] = _LOGICAL["pos_embed"]
    return out


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def param_shardings(cfg: DenoiserConfig, mesh: Mesh) -> dict:
    """``NamedSharding`` of every parameter on ``mesh`` (mesh axes that do not divide a dim are dropped)."""
    shapes = param_shapes(cfg)
    axes = param_logical_axes(cfg)
    return jax.tree.map(lambda s, a: named_sharding(mesh, a, s), shapes, axes, is_leaf=_is_shape)


def abstract_params(cfg: DenoiserConfig, mesh: Mesh | None = None) -> dict:
    """``jax.ShapeDtypeStruct`` tree of the parameters (with shardings when ``mesh`` is given)."""
    shapes = param_shapes(cfg)
    dtype = cfg.params_dtype
    if mesh is None:
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes, is_leaf=_is_shape)
    shard = param_shardings(cfg, mesh)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, dtype, sharding=sh), shapes, shard,
                        is_leaf=_is_shape)


def init_params(cfg: DenoiserConfig, key: jax.Array, mesh: Mesh | None = None, std: float = 0.02) -> Params:
    """Random parameters (normal(std) matrices, unit norms, zero biases), created directly sharded."""
    shapes = param_shapes(cfg)
    dtype = cfg.params_dtype

    def make(key):
        flat, treedef = jax.tree.flatten_with_path(shapes, is_leaf=_is_shape)
        keys = jax.random.split(key, len(flat))
        out = []
        for (path, shape), k in zip(flat, keys):
            name = path[-1].key
            if name.endswith("norm"):
                out.append(jnp.ones(shape, dtype))
            elif name.endswith("bias"):
                out.append(jnp.zeros(shape, dtype))
            else:
                out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
        return jax.tree.unflatten(treedef, out)

    if mesh is None:
        return jax.jit(make)(key)
    return jax.jit(make, out_shardings=param_shardings(cfg, mesh))(key)


# ---- building blocks ----------------------------------------------------------------------------

def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``w * normalize(x.float()).to(x.dtype)``, the HF order of casts for both families."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * y.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """fp32 ``cos, sin`` of split-half RoPE. positions [B, L] -> [B, L, 1, Dh] each."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, L, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]        # [B, L, 1, Dh]
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, in_fp32: bool) -> jax.Array:
    """x [B, L, heads, Dh]. LLaDA rotates in fp32 and casts back; Dream casts the tables first."""
    if in_fp32:
        xf = x.astype(jnp.float32)
        return (xf * cos + _rotate_half(xf) * sin).astype(x.dtype)
    c, s = cos.astype(x.dtype), sin.astype(x.dtype)
    return x * c + _rotate_half(x) * s


def positions_and_mask(cfg: DenoiserConfig, tokens: jax.Array,
                       attention_mask: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    """Position ids [B, L] and a boolean attention mask [B, 1, Lq, Lk] (or None) per family.

    * LLaDA: positions ``0..L-1`` over the padded row; key-padding mask (padded queries still attend).
    * Dream: positions count from the first real token (pads at 1); outer-AND mask (padded queries
      attend to nothing; their outputs are finite and never used).
    """
    b, length = tokens.shape
    arange = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    if attention_mask is None:
        return arange, None
    am = attention_mask.astype(bool)
    if cfg.family == "llada":
        return arange, jnp.broadcast_to(am[:, None, None, :], (b, 1, length, length))
    pos = jnp.cumsum(am.astype(jnp.int32), axis=-1) - 1
    pos = jnp.where(am, pos, 1)
    return pos, am[:, None, None, :] & am[:, None, :, None]


def _proj(x, w, spec: str, lora: Mapping | None, name: str, lora_scale: float, dtype,
          merge_token_dims: bool):
    """``einsum(spec, x, w)`` plus an optional low-rank update ``(x A) B * scale``.

    With ``merge_token_dims`` (``DenoiserConfig.merge_token_dims``) the token dims (``b, l``) are merged into
    one before the contraction and split again after. The result is the same; the reason is speed: with two
    token dims, the weight gradient contracts over both, and XLA:CPU then materialises a transposed copy of
    the activations fused with their elementwise producers (strided, cache-missing reads); that copy cost
    more than the matmuls (the backward of the tiny Sudoku model ran 11x its forward instead of ~2-3x).
    Merging leading dims is a free reshape on every backend; ``False`` is the plain einsum.
    """
    lhs, out = spec.split("->")
    xs, ws = lhs.split(",")
    keep = "".join(c for c in xs if c not in ws)
    lead = x.shape[:len(keep)]
    if merge_token_dims:
        x = x.reshape((-1,) + x.shape[len(keep):])
        xs, out, keep = "N" + xs[len(keep):], "N" + out[len(keep):], "N"
    y = jnp.einsum(f"{xs},{ws}->{out}", x, w.astype(dtype))
    if lora is not None and name in lora:
        a, b = lora[name]["a"].astype(dtype), lora[name]["b"].astype(dtype)
        # Contract x with A over the weight's input dims, then B maps the rank to the output dims.
        in_dims = "".join(c for c in ws if c in xs)
        out_dims = "".join(c for c in ws if c not in xs)
        mid = jnp.einsum(f"{xs},{in_dims}r->{keep}r", x, a)
        y = y + lora_scale * jnp.einsum(f"{keep}r,r{out_dims}->{out}", mid, b)
    return y.reshape(lead + y.shape[len(keep):])


def _merged_proj(x: jax.Array, weights: list, lora: Mapping | None, names: list, lora_scale: float, dtype,
                 merge: bool, merge_token_dims: bool) -> list:
    """x [B, L, D] times several weights that share the input, ``[D, *out_i]`` each -> ``[B, L, *out_i]``.

    Same values as one :func:`_proj` per weight (each output column is the same dot product), computed as
    ONE matmul with the weights concatenated along their outputs when ``merge``: the backward pass then
    transposes the activations once for all the weight gradients instead of once per weight (on XLA:CPU
    each of those transposes cost as much as a third of the matmul they feed). ``merge=False``
    (``DenoiserConfig.merge_projections`` off, or tensor parallelism, where the output dims are split over
    devices and a concatenation would regather them) runs the projections one by one.
    """
    if not merge:
        return [_proj(x, w, "bld,dhk->blhk" if w.ndim == 3 else "bld,df->blf", lora, n, lora_scale, dtype,
                      merge_token_dims) for w, n in zip(weights, names)]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])                                       # [N, D]
    flat = [w.astype(dtype).reshape(w.shape[0], -1) for w in weights]     # [D, out_i]
    y = jnp.dot(x2, jnp.concatenate(flat, axis=1))                        # [N, sum out_i]
    bounds = np.cumsum([f.shape[1] for f in flat])[:-1].tolist()
    outs = []
    for yi, w, name in zip(jnp.split(y, bounds, axis=1), weights, names):
        if lora is not None and name in lora:
            a, b = lora[name]["a"].astype(dtype), lora[name]["b"].astype(dtype)    # [D, r], [r, *out]
            yi = yi + lora_scale * jnp.dot(jnp.dot(x2, a), b.reshape(b.shape[0], -1))
        outs.append(yi.reshape(lead + w.shape[1:]))
    return outs


def _merge_projections(cfg: DenoiserConfig, mesh: Mesh | None) -> bool:
    """Merge the q/k/v and gate/up matmuls (``cfg.merge_projections``) unless output dims are split over a
    ``tensor`` mesh axis."""
    return cfg.merge_projections and (mesh is None or dict(mesh.shape).get("tensor", 1) == 1)


def _to_kv_major(x: jax.Array, kv_heads: int) -> jax.Array:
    """[B, L, KV*G, Dh] -> [B, KV, G*L, Dh]: head ``h`` -> kv head ``h // G``, the G query heads of one kv
    head stacked along the rows, so every attention matmul is a plain batched matmul over (B, KV)."""
    b, length, heads, dh = x.shape
    g = heads // kv_heads
    return x.reshape(b, length, kv_heads, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * length, dh)


def _from_kv_major(x: jax.Array, length: int) -> jax.Array:
    """Inverse of :func:`_to_kv_major`: [B, KV, G*L, Dh] -> [B, L, KV*G, Dh]."""
    b, kv_heads, gl, dh = x.shape
    g = gl // length
    return x.reshape(b, kv_heads, g, length, dh).transpose(0, 3, 1, 2, 4).reshape(b, length, kv_heads * g, dh)


def _masked(x: jax.Array, mask: jax.Array | None, fill: float) -> jax.Array:
    """x [B, KV, G*Lq, Lk] where ``mask`` [B, 1, Lq, Lk] (shared by all heads) is True, else ``fill``."""
    if mask is None:
        return x
    b, kv_heads, gl, lk = x.shape
    lq = mask.shape[2]
    y = jnp.where(mask[:, :, None], x.reshape(b, kv_heads, gl // lq, lq, lk), jnp.asarray(fill, x.dtype))
    return y.reshape(x.shape)


def _check_attention_shapes(q, k, v, mask) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"attention: expected q [B, Lq, H, Dh] and k, v [B, Lk, KV, Dh] of equal shape, got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[-1] != k.shape[-1] or q.shape[0] != k.shape[0]:
        raise ValueError(f"attention: q {q.shape} and k {k.shape} must share the batch and head dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: num_heads {q.shape[2]} is not a multiple of num_kv_heads {k.shape[2]}")
    if mask is not None and (mask.shape != (q.shape[0], 1, q.shape[1], k.shape[1]) or mask.dtype != jnp.bool_):
        raise ValueError(f"attention: mask must be bool [B, 1, Lq, Lk] = {(q.shape[0], 1, q.shape[1], k.shape[1])}, "
                         f"got {mask.dtype} {mask.shape}")


def _attention_fwd(q, k, v, mask, divisor):
    _check_attention_shapes(q, k, v, mask)
    length = q.shape[1]
    kv_heads = k.shape[2]
    qt = _to_kv_major(q, kv_heads)                                       # [B, KV, G*Lq, Dh]
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)            # [B, KV, Lk, Dh]
    scores = jnp.einsum("bkqd,bksd->bkqs", qt, kt, preferred_element_type=jnp.float32)
    if divisor is not None:
        scores = scores / np.float32(divisor)
    probs = jax.nn.softmax(_masked(scores, mask, _NEG), axis=-1)        # fp32 [B, KV, G*Lq, Lk]
    out = jnp.einsum("bkqs,bksd->bkqd", probs.astype(q.dtype), vt)      # [B, KV, G*Lq, Dh]
    return _from_kv_major(out, length), (qt, kt, vt, out, probs, mask)


def _attention_bwd(divisor, res, g):
    qt, kt, vt, out, probs, mask = res
    dtype = qt.dtype
    kv_heads, length = kt.shape[1], g.shape[1]
    dout = _to_kv_major(g.astype(dtype), kv_heads)                       # [B, KV, G*Lq, Dh]
    dv = jnp.einsum("bkqs,bkqd->bksd", probs.astype(dtype), dout)
    dprobs = jnp.einsum("bkqd,bksd->bkqs", dout, vt, preferred_element_type=jnp.float32)
    # Softmax backward: dS = P (dP - sum_s P dP). sum_s P_qs dP_qs = sum_s P_qs sum_d dO_qd V_sd = sum_d dO_qd O_qd,
    # a reduction over the head dim of [.., Lq, Dh] instead of over the keys of [.., Lq, Lk].
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    # Masked scores were replaced by a constant, so they get no gradient (needed: the fully masked query rows
    # of Dream pads have uniform P, not zeros).
    dscores = _masked(probs * (dprobs - delta), mask, 0.0)
    if divisor is not None:
        dscores = dscores / np.float32(divisor)
    dscores = dscores.astype(dtype)
    dq = jnp.einsum("bkqs,bksd->bkqd", dscores, kt)
    dk = jnp.einsum("bkqs,bkqd->bksd", dscores, qt)
    return _from_kv_major(dq, length), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
              divisor: float | None = None) -> jax.Array:
    """Softmax attention core: ``softmax(where(mask, q k^T / divisor, min)) v`` per head, fp32 softmax.

    q [B, Lq, H, Dh], k and v [B, Lk, KV, Dh] (grouped-query: query head ``h`` reads kv head ``h // (H/KV)``),
    mask None or bool [B, 1, Lq, Lk] (True = attend; a fully masked query row gets uniform weights, finite),
    ``divisor`` a static scale for the scores (None: q is already scaled) -> [B, Lq, H, Dh] in q's dtype.
    Scores, softmax and the softmax backward run in fp32; the matmuls take the compute dtype.

    The values are those of the plain einsum/softmax/einsum composition; the custom VJP is for speed. The
    backward computes dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)) (the FlashAttention identity,
    using the saved output O), dQ = dS K, dK = dS^T Q, all in a [B, KV, G*L, Dh] layout where each is one
    batched matmul with no strided copies. Autodiff of the composition instead let XLA:CPU fuse dP with the
    softmax gradient's row sum over the keys into one slow kernel and transpose the score gradient for dK.
    Residuals: q, k, v, O and the fp32 probabilities (what autodiff saved too). In fp32 the gradients equal
    autodiff's up to rounding; in bf16 the row sums use the bf16 O (as FlashAttention does). Reverse mode
    only: ``jax.jvp`` / ``jax.jacfwd`` through a ``custom_vjp`` function raise.
    """
    return attention_reference(q, k, v, mask, divisor)


attention.defvjp(_attention_fwd, _attention_bwd)


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                        divisor: float | None = None) -> jax.Array:
    """:func:`attention` as the plain composition, differentiated by JAX's autodiff (the portable path,
    ``DenoiserConfig.attention_impl="xla"``; forward and reverse mode). Same shapes and values."""
    return _attention_fwd(q, k, v, mask, divisor)[0]


def _masked_concat_attention(q, k_cache, v_cache, k_new, v_new, mask_cache, mask_new, divisor):
    """Attention of fresh queries over two key sets without concatenating the keys (no cache copy).

    q [B, W, H, Dh]; k_cache, v_cache [B, L, KV, Dh]; k_new, v_new [B, W, KV, Dh]; mask_cache [B, 1, W, L] and
    mask_new [B, 1, W, W] bool -> [B, W, H, Dh]. One fp32 softmax over the concatenated scores, so the result
    is :func:`attention` over the keys ``k_cache ++ k_new`` (up to summation order). Inference only.
    """
    width, kv_heads = q.shape[1], k_cache.shape[2]
    qt = _to_kv_major(q, kv_heads)                                        # [B, KV, G*W, Dh]

    def scores(k, mask):
        s = jnp.einsum("bkqd,bksd->bkqs", qt, k.transpose(0, 2, 1, 3), preferred_element_type=jnp.float32)
        if divisor is not None:
            s = s / np.float32(divisor)
        return _masked(s, mask, _NEG)

    probs = jax.nn.softmax(jnp.concatenate([scores(k_cache, mask_cache), scores(k_new, mask_new)], axis=-1),
                           axis=-1).astype(q.dtype)
    n_cache = k_cache.shape[1]
    out = (jnp.einsum("bkqs,bksd->bkqd", probs[..., :n_cache], v_cache.transpose(0, 2, 1, 3))
           + jnp.einsum("bkqs,bksd->bkqd", probs[..., n_cache:], v_new.transpose(0, 2, 1, 3)))
    return _from_kv_major(out, width)


def _core_attention(cfg: DenoiserConfig, mesh: Mesh | None, platform: str, q, k, v, mask, divisor):
    """The attention of ``cfg.attention_impl`` (resolved) over one key set; shapes as :func:`attention`."""
    if cfg.attention_impl == "splash":
        _check_attention_shapes(q, k, v, mask)
        return splash_attention(q, k, v, mask, divisor, mesh=mesh, interpret=platform != "tpu")
    core = attention if cfg.attention_impl == "custom_vjp" else attention_reference
    return core(q, k, v, mask, divisor)


def _cached_attention(cfg: DenoiserConfig, mesh: Mesh | None, platform: str, q, k_cache, v_cache, k_new, v_new,
                      mask_cache, mask_new, divisor):
    """The cached block's attention over the cached and the fresh keys; shapes as
    :func:`_masked_concat_attention`. The splash kernel takes one key set, so its path concatenates them
    (one copy of the layer's cache; forward-only kernel)."""
    if cfg.attention_impl == "splash":
        k, v = jnp.concatenate([k_cache, k_new], axis=1), jnp.concatenate([v_cache, v_new], axis=1)
        mask = jnp.concatenate([mask_cache, mask_new], axis=-1)
        _check_attention_shapes(q, k, v, mask)
        return splash_attention(q, k, v, mask, divisor, mesh=mesh, backward=False, interpret=platform != "tpu")
    return _masked_concat_attention(q, k_cache, v_cache, k_new, v_new, mask_cache, mask_new, divisor)


def block_with_kv(cfg: DenoiserConfig, layer: Mapping, h: jax.Array, cos: jax.Array, sin: jax.Array,
                  mask: jax.Array | None, mesh: Mesh | None, lora: Mapping | None, lora_scale: float,
                  past: tuple[jax.Array, jax.Array, jax.Array] | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One pre-norm transformer block that also returns its keys and values.

    h [B, W, D] -> (h [B, W, D], k, v [B, W, KV, Dh] after RoPE, in the compute dtype). Without ``past`` the W
    positions attend to each other (``mask`` [B, 1, W, W]). With ``past = (k_cache, v_cache, cache_mask)``
    ([B, L, KV, Dh] twice and bool [B, 1, W, L]) they attend to the cached keys where ``cache_mask`` is True
    plus their own fresh keys (``mask`` [B, 1, W, W], required): the cached forward of
    :func:`cached_logits`. ``"auto"`` execution switches of ``cfg`` are resolved here for the platform of
    ``mesh`` (:func:`~gdsd_jax.models.config.resolve_execution`).
    """
    platform = execution_platform(mesh)
    cfg = resolve_execution(cfg, platform)
    dtype = cfg.dtype
    merge, tokens = _merge_projections(cfg, mesh), cfg.merge_token_dims
    x = rms_norm(h, layer["attn_norm"], cfg.rms_eps)
    q, k, v = _merged_proj(x, [layer["q"], layer["k"], layer["v"]], lora, ["q", "k", "v"], lora_scale, dtype,
                           merge, tokens)
    if cfg.qkv_bias:
        q = q + layer["q_bias"].astype(dtype)
        k = k + layer["k_bias"].astype(dtype)
        v = v + layer["v_bias"].astype(dtype)
    q = constrain(q, mesh, ("batch", "length", "heads", "head_dim"))
    q = apply_rope(q, cos, sin, cfg.rope_in_fp32)
    k = apply_rope(k, cos, sin, cfg.rope_in_fp32)
    scale = np.sqrt(cfg.head_dim)
    exact = float(np.log2(scale)).is_integer()
    if exact:
        # 1/sqrt(Dh) is a power of two (Dh = 4, 16, 64, 256...): scaling q instead of the [.., L, L] scores
        # is bitwise the same and saves a pass over the largest activation, forward and backward.
        q = q * jnp.asarray(1.0 / scale, dtype)
    divisor = None if exact else float(scale)
    if past is None:
        attn = _core_attention(cfg, mesh, platform, q, k, v, mask, divisor)
    else:
        k_cache, v_cache, cache_mask = past
        attn = _cached_attention(cfg, mesh, platform, q, k_cache, v_cache, k, v, cache_mask, mask, divisor)
    attn = constrain(attn, mesh, ("batch", "length", "heads", "head_dim"))
    h = h + _proj(attn, layer["o"], "blhk,hkd->bld", lora, "o", lora_scale, dtype, tokens)
    h = constrain(h, mesh, ("batch", "length", "act_embed"))
    x = rms_norm(h, layer["mlp_norm"], cfg.rms_eps)
    g, u = _merged_proj(x, [layer["gate"], layer["up"]], lora, ["gate", "up"], lora_scale, dtype, merge, tokens)
    f = constrain(jax.nn.silu(g) * u, mesh, ("batch", "length", "mlp"))
    h = h + _proj(f, layer["down"], "blf,fd->bld", lora, "down", lora_scale, dtype, tokens)
    return constrain(h, mesh, ("batch", "length", "act_embed")), k, v


def block(cfg: DenoiserConfig, layer: Mapping, h: jax.Array, cos: jax.Array, sin: jax.Array,
          mask: jax.Array | None, mesh: Mesh | None, lora: Mapping | None, lora_scale: float) -> jax.Array:
    """One pre-norm transformer block. h [B, L, D] -> [B, L, D]."""
    return block_with_kv(cfg, layer, h, cos, sin, mask, mesh, lora, lora_scale)[0]


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    if policy == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"unknown remat policy {policy!r}")


class KVCache(NamedTuple):
    """Keys and values of every layer at every position: k, v [N, B, L, KV, Dh] in the compute dtype (keys
    after RoPE), sharded like the activations (batch over the data axes, kv heads over ``tensor``)."""

    k: jax.Array
    v: jax.Array


CACHE_AXES: tuple[str, ...] = ("layers", "batch", "length", "kv_heads", "head_dim")


def _embed(params: Params, cfg: DenoiserConfig, tokens: jax.Array, positions: jax.Array,
           mesh: Mesh | None) -> jax.Array:
    """tokens, positions [B, W] -> input states [B, W, D] (compute dtype)."""
    h = jnp.take(params["embed"], tokens, axis=0).astype(cfg.dtype)
    if cfg.learned_positions:
        h = h + jnp.take(params["pos_embed"], positions, axis=0).astype(cfg.dtype)
    return constrain(h, mesh, ("batch", "length", "act_embed"))


def _run_layers(params: Params, cfg: DenoiserConfig, h: jax.Array, cos: jax.Array, sin: jax.Array,
                mask: jax.Array | None, mesh: Mesh | None, lora: Mapping | None, lora_scale: float, *,
                past: tuple[KVCache, jax.Array] | None = None, collect: bool = False
                ) -> tuple[jax.Array, KVCache | None]:
    """All blocks over h [B, W, D] -> (final-normed raw states [B, W, D], this pass's KVCache if ``collect``).

    ``past = (cache, cache_mask)``: every layer also attends to its cached keys where ``cache_mask``
    [B, 1, W, L] is True (see :func:`block_with_kv`).
    """
    layer_lora = lora if lora else None

    def body(h, xs):
        layer, ll, kv = xs
        layer_past = None if kv is None else (kv[0], kv[1], past[1])
        h, k, v = block_with_kv(cfg, layer, h, cos, sin, mask, mesh, ll, lora_scale, layer_past)
        return h, ((k, v) if collect else None)

    body = _remat(body, cfg.remat)
    cached = None if past is None else (past[0].k, past[0].v)
    if cfg.scan_layers:
        h, kv = jax.lax.scan(body, h, (params["layers"], layer_lora, cached))
    else:
        outs = []
        for i in range(cfg.num_layers):
            take = functools.partial(jax.tree.map, lambda a: a[i])
            h, kv_i = body(h, (take(params["layers"]), take(layer_lora) if layer_lora else None,
                               take(cached) if cached is not None else None))
            outs.append(kv_i)
        kv = jax.tree.map(lambda *xs: jnp.stack(xs), *outs) if collect else None
    h = rms_norm(h, params["final_norm"], cfg.rms_eps)
    if not collect:
        return h, None
    cache = KVCache(constrain(kv[0], mesh, CACHE_AXES), constrain(kv[1], mesh, CACHE_AXES))
    return h, cache


def _align(cfg: DenoiserConfig, raw: jax.Array, has_previous: bool) -> jax.Array:
    """The one place Dream's next-token shift is undone: raw final states [B, W, D] of W consecutive
    positions -> aligned states (``lm_head(h)[:, j]`` scores the j-th returned position).

    LLaDA: unchanged. Dream (the raw state at ``i - 1`` predicts token ``i``): with ``has_previous`` the
    window starts one position before the first scored one and ``W - 1`` states are returned; otherwise the
    window starts at position 0, which keeps its own state, as upstream (it is never scored: a Dream prompt
    is never empty).
    """
    if not cfg.shifted_logits:
        return raw
    if has_previous:
        return raw[:, :-1]
    return jnp.concatenate([raw[:, :1], raw[:, :-1]], axis=1)


def _full_pass(params: Params, cfg: DenoiserConfig, tokens: jax.Array, attention_mask: jax.Array | None,
               mesh: Mesh | None, lora: Mapping | None, lora_scale: float, collect: bool
               ) -> tuple[jax.Array, KVCache | None]:
    tokens = constrain(tokens, mesh, ("batch", "length"))
    positions, mask = positions_and_mask(cfg, tokens, attention_mask)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    h = _embed(params, cfg, tokens, positions, mesh)
    return _run_layers(params, cfg, h, cos, sin, mask, mesh, lora, lora_scale, collect=collect)


def hidden_states(params: Params, cfg: DenoiserConfig, tokens: jax.Array,
                  attention_mask: jax.Array | None = None, *, mesh: Mesh | None = None,
                  lora: Mapping | None = None, lora_scale: float = 1.0, aligned: bool = True) -> jax.Array:
    """Final-normed hidden states, **aligned**: ``lm_head(h)[:, i]`` scores token ``i``.

    tokens [B, L] int, attention_mask [B, L] (1 real, 0 pad) or None -> [B, L, D] in the compute dtype.
    For Dream the raw state at ``i-1`` predicts token ``i``; it is moved to ``i`` here (position 0 keeps
    its own state, as upstream, and is never scored because a Dream prompt is never empty).
    """
    h, _ = _full_pass(params, cfg, tokens, attention_mask, mesh, lora, lora_scale, collect=False)
    return _align(cfg, h, has_previous=False) if aligned else h


def lm_head(params: Params, cfg: DenoiserConfig, hidden: jax.Array) -> jax.Array:
    """hidden [..., D] -> logits [..., V] (compute dtype, fp32 accumulation)."""
    return jnp.einsum("...d,dv->...v", hidden, params["lm_head"].astype(cfg.dtype),
                      preferred_element_type=jnp.float32).astype(cfg.dtype)


def _logits_at(params: Params, cfg: DenoiserConfig, h: jax.Array, positions: jax.Array | None,
               mesh: Mesh | None) -> jax.Array:
    if positions is not None:
        h = jnp.take_along_axis(h, positions[..., None].astype(jnp.int32), axis=1)
    out = lm_head(params, cfg, h)
    if mesh is not None:
        out = constrain(out, mesh, ("batch", "length", "vocab"))
    return out


def logits(params: Params, cfg: DenoiserConfig, tokens: jax.Array, attention_mask: jax.Array | None = None,
           *, positions: jax.Array | None = None, mesh: Mesh | None = None, lora: Mapping | None = None,
           lora_scale: float = 1.0) -> jax.Array:
    """Aligned logits. Without ``positions``: [B, L, V]. With positions [B, P] (int): [B, P, V], the LM
    head evaluated only there (the memory-saving path for losses and samplers)."""
    h = hidden_states(params, cfg, tokens, attention_mask, mesh=mesh, lora=lora, lora_scale=lora_scale)
    return _logits_at(params, cfg, h, positions, mesh)


def logits_and_cache(params: Params, cfg: DenoiserConfig, tokens: jax.Array,
                     attention_mask: jax.Array | None = None, *, positions: jax.Array | None = None,
                     mesh: Mesh | None = None, lora: Mapping | None = None, lora_scale: float = 1.0
                     ) -> tuple[jax.Array, KVCache]:
    """:func:`logits` (same values) plus the keys and values of every layer at every position.

    tokens [B, L] -> (logits [B, P, V] (or [B, L, V]), :class:`KVCache` [N, B, L, KV, Dh]). The cache feeds
    :func:`cached_logits`.
    """
    h, cache = _full_pass(params, cfg, tokens, attention_mask, mesh, lora, lora_scale, collect=True)
    return _logits_at(params, cfg, _align(cfg, h, has_previous=False), positions, mesh), cache


def context_lead(cfg: DenoiserConfig) -> int:
    """Positions before ``start`` that :func:`cached_logits` also runs (1 for Dream, whose logit at ``i``
    comes from the state at ``i - 1``; 0 for LLaDA)."""
    return int(cfg.shifted_logits)


def cached_logits(params: Params, cfg: DenoiserConfig, cache: KVCache, tokens: jax.Array,
                  attention_mask: jax.Array | None, start: jax.Array | int, width: int, num_logits: int, *,
                  mesh: Mesh | None = None, lora: Mapping | None = None, lora_scale: float = 1.0) -> jax.Array:
    """Aligned logits of positions ``[start, start + num_logits)`` from a forward over a window only.

    The layers run on the ``width + context_lead(cfg)`` positions ending at ``start + width`` (their fresh
    keys and values computed from ``tokens``); every other position enters only through ``cache``, its keys
    and values from an earlier :func:`logits_and_cache`. When the cache was computed from the same tokens the
    result equals :func:`logits` at those positions (up to summation order); otherwise it is Fast-dLLM's
    block-cache approximation (arXiv 2505.22618).

    tokens [B, L] int, attention_mask [B, L] or None (the full row's, as for :func:`logits`), ``start`` a
    static or traced int, ``width`` and ``num_logits <= width`` static -> [B, num_logits, V].
    """
    if not 0 < num_logits <= width:
        raise ValueError(f"cached_logits: num_logits={num_logits} must be in [1, width={width}]")
    lead = context_lead(cfg)
    q0, w = start - lead, width + lead
    b, length = tokens.shape
    tokens = constrain(tokens, mesh, ("batch", "length"))
    positions, mask = positions_and_mask(cfg, tokens, attention_mask)
    rows = (jnp.ones((b, 1, w, length), bool) if mask is None
            else jax.lax.dynamic_slice_in_dim(mask, q0, w, axis=2))           # [B, 1, W, L]
    keys = jnp.arange(length)
    outside = (keys < q0) | (keys >= q0 + w)                                   # cached keys: not recomputed
    cache_mask = rows & outside[None, None, None, :]
    window_mask = jax.lax.dynamic_slice_in_dim(rows, q0, w, axis=3)           # [B, 1, W, W]
    pos_w = jax.lax.dynamic_slice_in_dim(positions, q0, w, axis=1)
    cos, sin = rope_tables(pos_w, cfg.head_dim, cfg.rope_theta)
    h = _embed(params, cfg, jax.lax.dynamic_slice_in_dim(tokens, q0, w, axis=1), pos_w, mesh)
    h, _ = _run_layers(params, cfg, h, cos, sin, window_mask, mesh, lora, lora_scale, past=(cache, cache_mask))
    h = _align(cfg, h, has_previous=lead == 1)[:, :num_logits]
    return _logits_at(params, cfg, h, None, mesh)


def raw_logits(params: Params, cfg: DenoiserConfig, tokens: jax.Array,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """Logits in the upstream network's own convention [B, L, V] (Dream: unshifted next-token logits)."""
    h = hidden_states(params, cfg, tokens, attention_mask, aligned=False)
    return lm_head(params, cfg, h)


# ---- the NNX module -----------------------------------------------------------------------------

class Denoiser(nnx.Module):
    """User-facing NNX module: ``model(tokens, attention_mask=None) -> aligned logits [B, L, V]``.

    The parameters are ``nnx.Param`` leaves with the layout of :func:`param_shapes`; :meth:`params`
    returns them as the plain tree that the pure functions (samplers, objectives, trainer) take.
    """

    def __init__(self, config: DenoiserConfig, params: Params | None = None, *, rngs: nnx.Rngs | None = None,
                 mesh: Mesh | None = None):
        self.config = config
        self.mesh = mesh
        if params is None:
            key = rngs.params() if rngs is not None else jax.random.key(0)
            params = init_params(config, key, mesh)
        self.embed = nnx.Param(params["embed"])
        self.layers = nnx.Dict({k: nnx.Param(v) for k, v in params["layers"].items()})
        self.final_norm = nnx.Param(params["final_norm"])
        self.lm_head = nnx.Param(params["lm_head"])
        if config.learned_positions:
            self.pos_embed = nnx.Param(params["pos_embed"])

    def params(self) -> Params:
        out = {
            "embed": self.embed[...],
            "layers": {k: v[...] for k, v in self.layers.items()},
            "final_norm": self.final_norm[...],
            "lm_head": self.lm_head[...],
        }
        if self.config.learned_positions:
            out["pos_embed"] = self.pos_embed[...]
        return out

    def __call__(self, tokens: jax.Array, attention_mask: jax.Array | None = None, *,
                 positions: jax.Array | None = None) -> jax.Array:
        return _jit_logits(self.params(), self.config, jnp.asarray(tokens),
                           None if attention_mask is None else jnp.asarray(attention_mask),
                           None if positions is None else jnp.asarray(positions), self.mesh)

    def hidden(self, tokens: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        return hidden_states(self.params(), self.config, jnp.asarray(tokens),
                             None if attention_mask is None else jnp.asarray(attention_mask), mesh=self.mesh)

    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params()))


@functools.partial(jax.jit, static_argnums=(1, 5))
def _jit_logits(params, cfg, tokens, attention_mask, positions, mesh):
    return logits(params, cfg, tokens, attention_mask, positions=positions, mesh=mesh)
