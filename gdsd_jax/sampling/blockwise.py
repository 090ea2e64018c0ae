"""Fast block-wise decoding shared by both samplers: Fast-dLLM's block KV cache and confidence-aware
parallel decoding (arXiv 2505.22618), as one compiled loop.

Blocks of ``block_length`` positions are decoded left to right. Inside a block, each step

1. computes the block's logits: a full forward (every step with ``cache="none"``; with a cache, at the
   block's first step and every ``cache_refresh_every`` steps, also refreshing the keys/values of every
   position), or a cached forward over a window (``prefix``: the block and the suffix after it; ``dual``: the
   block only) attending to the cached keys/values of every other position;
2. hands them to the sampler's step function (its token proposal and schedule, or its threshold / factor rule), which
   says which masked positions of the block to reveal and with what.

The block loop is a ``lax.while_loop`` bounded by ``max_steps_per_block`` that stops once no row has a
masked position left in the block; a row whose block is done stops changing (and stops counting forwards).
No host round trip per step. ``prefix`` unrolls the blocks in Python (its window shrinks block by block,
so every block has its own static shape); the other modes loop over blocks with ``lax.fori_loop``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gdsd_jax.distributed.mesh import constrain
from gdsd_jax.models import denoiser
from gdsd_jax.models.config import DenoiserConfig
from gdsd_jax.sampling.config import SamplingConfig

#: ``step_fn(logits [B, blk, V] f32, cur [B, blk] int32, masked [B, blk] bool, i, key) -> (x0, chosen)``:
#: proposed tokens int32 [B, blk] and the positions to reveal bool [B, blk] at in-block step ``i``.
StepFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def empty_cache(model_cfg: DenoiserConfig, batch: int, length: int, mesh: Mesh | None) -> denoiser.KVCache:
    """The cache, preallocated once per rollout: k, v [N, B, L, KV, Dh] zeros in the compute dtype."""
    shape = (model_cfg.num_layers, batch, length, model_cfg.num_kv_heads, model_cfg.head_dim)
    zeros = constrain(jnp.zeros(shape, model_cfg.dtype), mesh, denoiser.CACHE_AXES)
    return denoiser.KVCache(zeros, zeros)


def decode_blocks(params, model_cfg: DenoiserConfig, x: jax.Array, am: jax.Array | None, prompt_len: int,
                  key: jax.Array, cfg: SamplingConfig, step_fn: StepFn, *, mesh: Mesh | None = None,
                  lora: Mapping | None = None, lora_scale: float = 1.0
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Decode the masked completion of ``x`` [B, L] (prompt of ``prompt_len`` then ``gen_length`` masks).

    ``am`` [B, L] or None is the attention mask of the full row. The PRNG key of step ``i`` of block ``b`` is
    ``fold_in(key, b * max_steps_per_block + i)``, which is also the step recorded in ``unmask_step``; with
    the fixed schedule this is the exact samplers' numbering, so ``cache_refresh_every=1`` reproduces them.

    Returns ``(sequences [B, L], unmask_step [B, Lg], nfe [B], tokens_processed [B])``, int32.
    """
    bsz, length = x.shape
    blk, nb, max_steps = cfg.llada_block_length, cfg.num_blocks, cfg.max_steps_per_block
    refresh = cfg.cache_refresh_every or max_steps
    mask_id = model_cfg.mask_token_id
    lead = denoiser.context_lead(model_cfg)
    model_kw = dict(mesh=mesh, lora=lora, lora_scale=lora_scale)

    def block_logits(x, cache, start, width, i):
        """Logits [B, blk, V] f32, the (possibly refreshed) cache, positions run through the layers."""
        pos = jnp.broadcast_to(start + jnp.arange(blk, dtype=jnp.int32), (bsz, blk))
        if cache is None:
            return denoiser.logits(params, model_cfg, x, am, positions=pos, **model_kw), None, length

        def full(cache):
            return denoiser.logits_and_cache(params, model_cfg, x, am, positions=pos, **model_kw)

        def cached(cache):
            return denoiser.cached_logits(params, model_cfg, cache, x, am, start, width, blk, **model_kw), cache

        now = i % refresh == 0
        out, cache = jax.lax.cond(now, full, cached, cache)
        return out, cache, jnp.where(now, length, width + lead)

    def decode_block(b, carry):
        start = prompt_len + b * blk
        # The prefix window (block + suffix) has a static width only for a static block index.
        width = length - start if cfg.cache == "prefix" else blk

        def block_of(x):
            return jax.lax.dynamic_slice_in_dim(x, start, blk, axis=1)

        def not_done(state):
            i, x = state[0], state[1]
            return (i < max_steps) & jnp.any(block_of(x) == mask_id)

        def step(state):
            i, x, unmask, nfe, ntok, cache = state
            cur = block_of(x)
            masked = cur == mask_id
            active = jnp.any(masked, axis=1).astype(jnp.int32)                  # [B]
            global_step = b * max_steps + i
            out, cache, processed = block_logits(x, cache, start, width, i)
            x0, chosen = step_fn(out.astype(jnp.float32), cur, masked, i, jax.random.fold_in(key, global_step))
            chosen = chosen & masked
            x = jax.lax.dynamic_update_slice_in_dim(x, jnp.where(chosen, x0, cur), start, axis=1)
            x = constrain(x, mesh, ("batch", "length"))
            ublk = jax.lax.dynamic_slice_in_dim(unmask, b * blk, blk, axis=1)
            revealed = chosen & (x0 != mask_id)                                 # a drawn mask id reveals nothing
            unmask = jax.lax.dynamic_update_slice_in_dim(unmask, jnp.where(revealed, global_step, ublk),
                                                         b * blk, axis=1)
            return i + 1, x, unmask, nfe + active, ntok + active * processed, cache

        _, *carry = jax.lax.while_loop(not_done, step, (jnp.int32(0), *carry))
        return tuple(carry)

    unmask = jnp.full((bsz, cfg.gen_length), -1, jnp.int32)
    zeros = jnp.zeros((bsz,), jnp.int32)
    cache = None if cfg.cache == "none" else empty_cache(model_cfg, bsz, length, mesh)
    carry = (x, unmask, zeros, zeros, cache)
    if cfg.cache == "prefix":
        for b in range(nb):
            carry = decode_block(b, carry)
    else:
        carry = jax.lax.fori_loop(0, nb, decode_block, carry)
    x, unmask, nfe, ntok, _ = carry
    return x, unmask, nfe, ntok
