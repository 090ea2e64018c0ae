"""Dream's sampler (``diffusion_generate`` / ``_sample`` in Dream's ``generation_utils.py``) as one loop.

Per step ``i`` with float32 timesteps ``t = ts[i]``, ``s = ts[i + 1]`` of ``linspace(1, eps, steps + 1)``:

* ``origin``: every still-masked token is revealed with probability ``1 - s/t`` (1 at the last step),
  with a token drawn by :func:`sample_tokens`;
* ``maskgit_plus`` / ``topk_margin`` / ``entropy``: a token and a confidence per masked position
  (probability of the token / top-1 minus top-2 probability / negative entropy), then the ``k_i`` most
  confident positions are revealed (``alg_temp > 0``: ``k_i`` positions drawn without replacement from
  ``softmax(confidence / alg_temp)``, done here as Gumbel-top-k). ``k_i = int(n_i * (1 - s/t))`` of the
  row's ``n_i`` still-masked tokens (all at the last step): :func:`~gdsd_jax.sampling.schedules.
  dream_transfer_schedule` unless a drawn mask id left a position masked.

Dream's next-token shift is undone inside the model: the aligned logits used here are upstream's shifted
logits. Attention mask and positions for left-padded prompts are derived by the model from the mask.
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
    select_parallel,
    select_top,
    top_k_filter,
    top_p_filter,
)
from gdsd_jax.sampling.config import SamplingConfig
from gdsd_jax.sampling.schedules import dream_transfer_fractions


def sample_tokens(logits: jax.Array, key: jax.Array | None, *, temperature: float, top_p: float | None,
                  top_k: int | None, confidence: str) -> tuple[jax.Array, jax.Array]:
    """Dream's ``sample_tokens``: logits [..., V] float32 -> (confidence float32 [...], tokens int32 [...]).

    Temperature divides the logits (T > 0), then top-p, then top-k filtering; tokens are sampled from
    the filtered softmax (argmax at T = 0). ``confidence`` is ``"prob"`` (probability of the token),
    ``"margin"`` (top-1 minus top-2 probability) or ``"neg_entropy"`` (``sum p log(p + 1e-10)``), all of the
    filtered, tempered distribution as upstream.
    """
    if temperature > 0:
        logits = logits / jnp.float32(temperature)
    if top_p is not None and top_p < 1:
        logits = top_p_filter(logits, top_p)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    probs = jax.nn.softmax(logits, axis=-1)
    # Gumbel-max on the already tempered logits samples from `probs` itself.
    tokens = gumbel_argmax(logits, 1.0 if temperature > 0 else 0.0, key)
    if confidence == "prob":
        conf = jnp.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]
    elif confidence == "margin":
        top2 = jax.lax.top_k(probs, 2)[0]
        conf = top2[..., 0] - top2[..., 1]
    elif confidence == "neg_entropy":
        conf = jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
    else:
        raise ValueError(f"unknown confidence {confidence!r}; expected 'prob', 'margin' or 'neg_entropy'")
    return conf, tokens


_CONFIDENCE = {"origin": "prob", "maskgit_plus": "prob", "topk_margin": "margin", "entropy": "neg_entropy"}


def dream_generate(params, model_cfg: DenoiserConfig, prompt_ids: jax.Array, prompt_mask: jax.Array | None,
                   key: jax.Array, cfg: SamplingConfig, *, mesh: Mesh | None = None,
                   lora: Mapping | None = None, lora_scale: float = 1.0
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Run the Dream sampler. prompt_ids [B, Lp] int32, prompt_mask [B, Lp] or None.

    Returns ``(sequences [B, Lp + Lg], unmask_step [B, Lg], nfe [B], tokens_processed [B])``, int32. A cache
    or parallel decoding (``threshold`` / ``factor``) runs the fast block-wise decoder
    (:mod:`gdsd_jax.sampling.blockwise`) with this sampler's step, Dream's schedule applied per block of
    ``block_length`` (``None``: one block, upstream's schedule).
    """
    bsz, lp = prompt_ids.shape
    lg = cfg.gen_length
    mask_id = model_cfg.mask_token_id
    # The schedule of one block (the whole completion for the exact sampler). float32 [steps]: origin's
    # reveal probability, or the fraction of the block's still-masked tokens revealed at each step.
    steps = cfg.steps_per_block if cfg.blockwise else cfg.steps
    table = jnp.asarray(dream_transfer_fractions(steps, cfg.eps))
    greedy_select = cfg.alg_temp is None or cfg.alg_temp == 0
    # With parallel decoding, positions are revealed by the probability of their sampled token (Fast-dLLM).
    confidence = "prob" if cfg.parallel else _CONFIDENCE[cfg.alg]

    x, am = initial_canvas(prompt_ids, prompt_mask, lg, mask_id, mesh)

    def step_fn(logits, cur, masked, i, key):
        """One step on the block: logits [B, P, V] f32 -> (tokens [B, P], positions to reveal [B, P])."""
        k_tok, k_sel = jax.random.split(key)
        logits = ban_mask_token(logits, mask_id, cfg)
        conf, x0 = sample_tokens(logits, k_tok, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                 confidence=confidence)
        if cfg.parallel:
            return x0, select_parallel(conf, masked, cfg.threshold, cfg.factor)
        if cfg.alg == "origin":
            return x0, masked & (jax.random.uniform(k_sel, masked.shape, jnp.float32) < table[i])
        scores = jnp.where(masked, conf, NEG_INF)
        if not greedy_select:
            g = jax.random.gumbel(k_sel, masked.shape, jnp.float32)
            scores = jnp.where(masked, scores / jnp.float32(cfg.alg_temp) + g, NEG_INF)
        # k from the live mask count, per row (upstream runs at batch size 1): it follows
        # dream_transfer_schedule unless a mask id was drawn, which leaves its position masked.
        n_masked = jnp.sum(masked, axis=1, keepdims=True).astype(jnp.float32)
        return x0, select_top(scores, (n_masked * table[i]).astype(jnp.int32)) & masked

    if cfg.blockwise:
        return decode_blocks(params, model_cfg, x, am, lp, key, cfg, step_fn, mesh=mesh, lora=lora,
                             lora_scale=lora_scale)

    pos = jnp.broadcast_to(lp + jnp.arange(lg, dtype=jnp.int32), (bsz, lg))

    def body(step, carry):
        x, unmask = carry
        out = denoiser.logits(params, model_cfg, x, am, positions=pos, mesh=mesh, lora=lora,
                              lora_scale=lora_scale).astype(jnp.float32)          # [B, Lg, V]
        cur = x[:, lp:]
        x0, chosen = step_fn(out, cur, cur == mask_id, step, jax.random.fold_in(key, step))
        x = x.at[:, lp:].set(jnp.where(chosen, x0, cur))
        x = constrain(x, mesh, ("batch", "length"))
        unmask = jnp.where(chosen & (x0 != mask_id), step, unmask)   # a drawn mask id reveals nothing
        return x, unmask

    x, unmask = jax.lax.fori_loop(0, steps, body, (x, jnp.full((bsz, lg), -1, jnp.int32)))
    nfe = jnp.full((bsz,), steps, jnp.int32)
    return x, unmask, nfe, nfe * x.shape[1]
