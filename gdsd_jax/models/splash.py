"""Bidirectional attention with the Pallas TPU flash-attention kernel (splash attention), key padding by
segment ids.

The denoiser's attention is full (bidirectional) attention under a padding mask. Every mask the model
builds factors into a query validity and a key validity: LLaDA's key-padding mask (``mask[q, k] =
real[k]``), Dream's outer-AND mask (``real[q] and real[k]``) and the cached block's masks (the window's
rows against the cached and fresh keys). Splash attention takes such masks as segment ids (a query attends
the keys of its own segment), so the static mask is a ``FullMask`` (no block is skipped) and the padding
pattern is data: real queries and keys get segment 1, keys masked for every query get 0 and queries
masked against every key get 0.

What each row receives:

* queries with a real key set (every real token; LLaDA's pad rows too, which attend the real keys in
  LLaDA's mask): exactly the einsum path's attention over the same keys;
* Dream's pad rows (masked against every key; the einsum path gives them uniform weights over all keys):
  here they attend the pad keys only. Their outputs differ from the einsum path's, stay finite, and never
  reach a real position (no real query attends a pad key, in any layer) nor a loss (pad positions are
  never scored).

Sequence lengths: the kernel tiles keys and queries in blocks of :data:`BLOCK` = 128 (the TPU's lanes;
with segment ids the key/value-gradient kernel requires query blocks of a multiple of 128 too). Lengths
that are not multiples (GSM8K's 656 = 400 + 256, the tiny test shapes) are padded inside
:func:`splash_attention` to the next multiple with segment id 2, which no real query shares: the padded
queries attend the padded keys only and are cut off again. Padding rather than a block that divides every
length keeps the 128-lane tiles the TPU wants; the cost is at most one block of wasted rows or keys
(656 -> 768: 17% more score work). The forward-only call of the cached block (``backward=False``: a
sampler's 32- or 33-query window) uses one query block of the window rounded up to :data:`ROW_TILE` rows
instead, and has no backward kernels.

The kernel is a Mosaic (TPU) kernel: on a mesh it runs inside ``jax.shard_map``, the batch split over the
mesh axes the ``batch`` logical axis uses and the heads over ``tensor`` (as the activations are laid out,
so no collective is needed); off the TPU it runs in Pallas interpret mode (slow, for tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from gdsd_jax.distributed.mesh import logical_to_spec

#: Key block (and largest query block) of the kernel, forward and backward: one 128-lane tile.
BLOCK = 128
#: Forward-only query blocks are rounded to this many rows (bf16 packs 16 rows per TPU vreg tile).
ROW_TILE = 16
#: Segment ids: real (attended) tokens, masked tokens, and the positions added to reach a block multiple.
REAL, MASKED, FILL = 1, 0, 2


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def query_block(length: int, backward: bool) -> int:
    """Query rows per kernel block for ``length`` queries: :data:`BLOCK` when the backward kernels are built;
    forward only, one block of ``length`` rounded up to :data:`ROW_TILE` when that is at most :data:`BLOCK`
    (a sampler's window)."""
    return BLOCK if backward else min(BLOCK, _round_up(length, ROW_TILE))


def segment_ids(mask: jax.Array | None, batch: int, lq: int, lk: int) -> tuple[jax.Array, jax.Array]:
    """Segment ids of the queries [B, Lq] and keys [B, Lk] (int32) from a bool mask [B, 1, Lq, Lk] (or None).

    A key is :data:`REAL` if some query may attend it, a query if it may attend some key; else
    :data:`MASKED`. For a mask that factors into query and key validity, real queries then see exactly
    the mask's keys (see the module docstring for the rows that see none).
    """
    if mask is None:
        return jnp.full((batch, lq), REAL, jnp.int32), jnp.full((batch, lk), REAL, jnp.int32)
    m = mask[:, 0]
    q_seg = jnp.where(jnp.any(m, axis=2), REAL, MASKED).astype(jnp.int32)
    kv_seg = jnp.where(jnp.any(m, axis=1), REAL, MASKED).astype(jnp.int32)
    return q_seg, kv_seg


def _pad_to(x: jax.Array, axis: int, length: int, value) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _local_attention(q, k, v, q_seg, kv_seg, *, backward: bool, interpret: bool):
    """The kernel on one device's shard: q [b, H, Lq, Dh], k, v [b, KV, Lk, Dh], segment ids [b, Lq], [b, Lk]
    (block multiples) -> [b, H, Lq, Dh]."""
    heads, lq, lk = q.shape[1], q.shape[2], k.shape[2]
    bq = query_block(lq, backward)
    if backward:
        sizes = sa.BlockSizes(block_q=bq, block_kv=BLOCK, block_kv_compute=BLOCK, block_q_dkv=bq,
                              block_kv_dkv=BLOCK, block_kv_dkv_compute=BLOCK, block_q_dq=bq, block_kv_dq=BLOCK)
    else:
        sizes = sa.BlockSizes(block_q=bq, block_kv=BLOCK, block_kv_compute=BLOCK)
    mask = sa.MultiHeadMask([sa.FullMask((lq, lk)) for _ in range(heads)])
    kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    return jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=sa.SegmentIds(qs, ks)))(
        q, k, v, q_seg, kv_seg)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                     divisor: float | None = None, *, mesh: Mesh | None = None, backward: bool = True,
                     interpret: bool = False) -> jax.Array:
    """Softmax attention ``softmax(where(mask, q k^T / divisor, min)) v`` per head with the splash kernel.

    q [B, Lq, H, Dh], k and v [B, Lk, KV, Dh] (query head ``h`` reads kv head ``h // (H / KV)``), mask None
    or bool [B, 1, Lq, Lk] factoring into query and key validity (module docstring), ``divisor`` a static
    score scale (None: q is already scaled; else q is divided by it in fp32 before the kernel) -> [B, Lq,
    H, Dh] in q's dtype. ``backward``: build the kernel's own backward (dq and dk/dv kernels); ``False`` for
    forward-only calls (smaller query blocks; differentiating raises). ``mesh``: run under ``jax.shard_map``
    on it (batch over the data axes, heads over ``tensor``); ``interpret``: Pallas interpret mode (required
    off the TPU).
    """
    b, lq, heads, dh = q.shape
    lk, kv_heads = k.shape[1], k.shape[2]
    q_seg, kv_seg = segment_ids(mask, b, lq, lk)
    if divisor is not None:
        q = (q.astype(jnp.float32) / np.float32(divisor)).astype(q.dtype)
    lq_pad, lk_pad = _round_up(lq, query_block(lq, backward)), _round_up(lk, BLOCK)
    qt = _pad_to(q.transpose(0, 2, 1, 3), 2, lq_pad, 0)                  # [B, H, Lq', Dh]
    kt = _pad_to(k.transpose(0, 2, 1, 3), 2, lk_pad, 0)                  # [B, KV, Lk', Dh]
    vt = _pad_to(v.transpose(0, 2, 1, 3), 2, lk_pad, 0)
    q_seg, kv_seg = _pad_to(q_seg, 1, lq_pad, FILL), _pad_to(kv_seg, 1, lk_pad, FILL)
    local = functools.partial(_local_attention, backward=backward, interpret=interpret)
    if mesh is None:
        out = local(qt, kt, vt, q_seg, kv_seg)
    else:
        q_spec = logical_to_spec(("batch", "heads", "length", "head_dim"), qt.shape, mesh)
        kv_spec = logical_to_spec(("batch", "kv_heads", "length", "head_dim"), kt.shape, mesh)
        if kv_spec[1] != q_spec[1]:
            # The kv heads do not split like the query heads (e.g. Dream's 4 kv heads on a tensor axis of
            # 8): give every query head its own copy of its kv head, so each shard holds the kv heads of
            # its query heads.
            kt, vt = (jnp.repeat(x, heads // kv_heads, axis=1) for x in (kt, vt))
        kv_spec = q_spec
        seg_spec = P(q_spec[0], None)
        out = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
                            out_specs=q_spec, check_vma=False)(qt, kt, vt, q_seg, kv_seg)
    return out[:, :, :lq].transpose(0, 2, 1, 3)
