"""LLaDA's block-wise semi-autoregressive sampler (``generate`` in LLaDA's ``generate.py``) as one loop.

Per step (``steps // num_blocks`` steps per block, blocks left to right):

1. logits of the current block's positions (with classifier-free guidance: a second pass where the
   prompt is replaced by mask tokens, ``un + (cfg_scale + 1) * (cond - un)``);
2. a candidate token per position by Gumbel-max at temperature T (argmax at T = 0);
3. a confidence per position: the un-tempered probability of the candidate (``low_confidence``) or a
   uniform draw (``random``); already revealed positions get -inf;
4. the ``k_i`` most confident masked positions of the block are revealed, ``k_i`` from the exact integer
   schedule (:func:`~gdsd_jax.sampling.schedules.llada_transfer_schedule`).

Only the current block is scored by the LM head: positions beyond it are never selected upstream
(their confidence is -inf), and positions before it are all revealed by the time the block starts.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gdsd_jax.distributed.mesh import constrain
from gdsd_jax.models import denoiser
from gdsd_jax.models.config import DenoiserConfig
from gdsd_jax.sampling.blockwise import decode_blocks
from gdsd_jax.sampling.common import (
    NEG_INF,
    ban_mask_token,
    gumbel_argmax,
    initial_canvas,
    log_prob_of,
    select_parallel,
    select_top,
    set_columns,
)
from gdsd_jax.sampling.config import SamplingConfig
from gdsd_jax.sampling.schedules import llada_transfer_schedule


def llada_generate(params, model_cfg: DenoiserConfig, prompt_ids: jax.Array, prompt_mask: jax.Array | None,
                   key: jax.Array, cfg: SamplingConfig, *, mesh: Mesh | None = None,
                   lora: Mapping | None = None, lora_scale: float = 1.0
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Run the LLaDA sampler. prompt_ids [B, Lp] int32, prompt_mask [B, Lp] or None.

    Returns ``(sequences [B, Lp + Lg], unmask_step [B, Lg], nfe [B], tokens_processed [B])``, int32;
    ``unmask_step`` is the global step (``block * steps_per_block + i``; with parallel
    decoding ``block * block_length + i``) at which each completion token was revealed. A cache or parallel
    decoding (``threshold`` / ``factor``) runs the fast block-wise decoder (:mod:`gdsd_jax.sampling.blockwise`)
    with this sampler's step.
    """
    cfg.check_blocks()
    bsz, lp = prompt_ids.shape
    lg, blk, spb = cfg.gen_length, cfg.llada_block_length, cfg.steps_per_block
    mask_id = model_cfg.mask_token_id
    counts = jnp.asarray(llada_transfer_schedule(blk, spb))            # [spb], static table

    x, am = initial_canvas(prompt_ids, prompt_mask, lg, mask_id, mesh)

    no_conf = [model_cfg.eos_token_id] + ([cfg.eot_token_id] if cfg.eot_token_id is not None else [])

    def step_fn(logits, cur, masked, i, key):
        """One step on the block: logits [B, blk, V] f32 -> (tokens [B, blk], positions to reveal [B, blk])."""
        k_tok, k_conf = jax.random.split(key)
        logits = ban_mask_token(logits, mask_id, cfg)
        if cfg.logits_eos_inf:
            logits = set_columns(logits, [model_cfg.eos_token_id], NEG_INF)
        x0 = gumbel_argmax(logits, cfg.temperature, k_tok)               # [B, blk]
        if cfg.remasking == "low_confidence":
            conf_logits = set_columns(logits, no_conf, NEG_INF) if cfg.confidence_eos_eot_inf else logits
            conf = jnp.exp(log_prob_of(conf_logits, x0))                 # un-tempered p(x0), float32
        else:
            conf = jax.random.uniform(k_conf, (bsz, blk), jnp.float32)
        if cfg.parallel:
            return x0, select_parallel(conf, masked, cfg.threshold, cfg.factor)
        return x0, select_top(jnp.where(masked, conf, NEG_INF), counts[i]) & masked

    if cfg.blockwise:
        return decode_blocks(params, model_cfg, x, am, lp, key, cfg, step_fn, mesh=mesh, lora=lora,
                             lora_scale=lora_scale)

    def block_logits(x, start):
        pos = jnp.broadcast_to(start + jnp.arange(blk, dtype=jnp.int32), (bsz, blk))
        if cfg.cfg_scale > 0:
            # Unconditional pass: the whole prompt region (pads included, as upstream's prompt_index) masked.
            un_x = x.at[:, :lp].set(mask_id)
            both = constrain(jnp.concatenate([x, un_x], axis=0), mesh, ("batch", "length"))
            am2 = None if am is None else jnp.concatenate([am, am], axis=0)
            out = denoiser.logits(params, model_cfg, both, am2, positions=jnp.concatenate([pos, pos], axis=0),
                                  mesh=mesh, lora=lora, lora_scale=lora_scale).astype(jnp.float32)
            cond, un = out[:bsz], out[bsz:]
            return un + jnp.float32(cfg.cfg_scale + 1.0) * (cond - un)
        out = denoiser.logits(params, model_cfg, x, am, positions=pos, mesh=mesh, lora=lora,
                              lora_scale=lora_scale)
        return out.astype(jnp.float32)                                  # [B, blk, V]

    def body(step, carry):
        x, unmask = carry
        b, i = step // spb, step % spb
        start = lp + b * blk
        cur = jax.lax.dynamic_slice_in_dim(x, start, blk, axis=1)
        x0, chosen = step_fn(block_logits(x, start), cur, cur == mask_id, i, jax.random.fold_in(key, step))
        x = jax.lax.dynamic_update_slice_in_dim(x, jnp.where(chosen, x0, cur), start, axis=1)
        x = constrain(x, mesh, ("batch", "length"))
        revealed = chosen & (x0 != mask_id)                               # a drawn mask id reveals nothing
        ublk = jax.lax.dynamic_slice_in_dim(unmask, b * blk, blk, axis=1)
        unmask = jax.lax.dynamic_update_slice_in_dim(unmask, jnp.where(revealed, step, ublk), b * blk, axis=1)
        return x, unmask

    x, unmask = jax.lax.fori_loop(0, cfg.steps, body, (x, jnp.full((bsz, lg), -1, jnp.int32)))
    forwards = cfg.steps * (2 if cfg.cfg_scale > 0 else 1)
    nfe = jnp.full((bsz,), forwards, jnp.int32)
    return x, unmask, nfe, nfe * x.shape[1]
