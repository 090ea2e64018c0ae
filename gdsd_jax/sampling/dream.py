"""Dream's sampler (``diffusion_generate`` / ``_sample`` in Dream's ``generation_utils.py``) as one loop.

Per step ``i`` with float32 timesteps ``t = ts[i]``, ``s = ts[i + 1]`` of ``linspace(1, eps, steps + 1)``:

* ``origin``: every still-masked token is revealed with probability ``1 - s/t`` (1 at the last step),
  with a token drawn by :func:`sample_tokens`;
* ``maskgit_plus`` / ``topk_margin`` / ``entropy``: a token and a confidence per masked position
  (probability of the token / top-1 minus top-2 probability / negative entropy), then the ``k_i`` most
  confident positions are revealed (``alg_temp > 0``: ``k_i`` positions drawn without replacement from
  ``softmax(confidence / alg_temp)``, done here as Gumbel-top-k). ``k_i`` follows
  :func:`~gdsd_jax.sampling.schedules.dream_transfer_schedule`.

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
from gdsd_jax.sampling.common import NEG_INF, gumbel_argmax, select_top, set_columns, top_k_filter, top_p_filter
from gdsd_jax.sampling.config import SamplingConfig
from gdsd_jax.sampling.schedules import dream_origin_probs, dream_transfer_schedule


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
                   lora: Mapping | None = None, lora_scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Run the Dream sampler. prompt_ids [B, Lp] int32, prompt_mask [B, Lp] or None.

    Returns ``(sequences [B, Lp + Lg] int32, unmask_step [B, Lg] int32)``.
    """
    bsz, lp = prompt_ids.shape
    lg, steps = cfg.gen_length, cfg.steps
    mask_id = model_cfg.mask_token_id
    if cfg.alg == "origin":
        table = jnp.asarray(dream_origin_probs(steps, cfg.eps))          # float32 [steps]
    else:
        table = jnp.asarray(dream_transfer_schedule(lg, steps, cfg.eps))  # int32 [steps]
    greedy_select = cfg.alg_temp is None or cfg.alg_temp == 0

    x = jnp.concatenate([prompt_ids.astype(jnp.int32), jnp.full((bsz, lg), mask_id, jnp.int32)], axis=1)
    x = constrain(x, mesh, ("batch", "length"))
    am = None
    if prompt_mask is not None:
        am = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.ones((bsz, lg), jnp.int32)], axis=1)
        am = constrain(am, mesh, ("batch", "length"))
    pos = jnp.broadcast_to(lp + jnp.arange(lg, dtype=jnp.int32), (bsz, lg))
    unmask = jnp.full((bsz, lg), -1, jnp.int32)

    def body(step, carry):
        x, unmask = carry
        k_tok, k_sel = jax.random.split(jax.random.fold_in(key, step))
        out = denoiser.logits(params, model_cfg, x, am, positions=pos, mesh=mesh, lora=lora,
                              lora_scale=lora_scale).astype(jnp.float32)          # [B, Lg, V]
        # The mask token is never a sampling outcome (see docs/sampling.md).
        out = set_columns(out, [mask_id], NEG_INF)
        conf, x0 = sample_tokens(out, k_tok, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                                 confidence=_CONFIDENCE[cfg.alg])
        cur = x[:, lp:]
        masked = cur == mask_id
        if cfg.alg == "origin":
            chosen = masked & (jax.random.uniform(k_sel, (bsz, lg), jnp.float32) < table[step])
        else:
            scores = jnp.where(masked, conf, NEG_INF)
            if not greedy_select:
                g = jax.random.gumbel(k_sel, (bsz, lg), jnp.float32)
                scores = jnp.where(masked, scores / jnp.float32(cfg.alg_temp) + g, NEG_INF)
            chosen = select_top(scores, table[step]) & masked
        x = x.at[:, lp:].set(jnp.where(chosen, x0, cur))
        x = constrain(x, mesh, ("batch", "length"))
        unmask = jnp.where(chosen, step, unmask)
        return x, unmask

    x, unmask = jax.lax.fori_loop(0, steps, body, (x, unmask))
    return x, unmask
