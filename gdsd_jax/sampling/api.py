"""Entry points: :func:`generate` (pure, traceable inside any ``jit``) and :data:`generate_jit`."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gdsd_jax.models.config import DenoiserConfig
from gdsd_jax.sampling.common import SampleOutput, completion_mask
from gdsd_jax.sampling.config import SamplingConfig
from gdsd_jax.sampling.dream import dream_generate
from gdsd_jax.sampling.llada import llada_generate


def check_inputs(model_cfg: DenoiserConfig, prompt_shape: tuple[int, ...], mask_shape: tuple[int, ...] | None,
                 cfg: SamplingConfig) -> str:
    """Validate static shapes and settings against the model; return the sampler to run.

    Raises ``ValueError`` naming the offending setting (run at trace time, so also inside an outer jit).
    """
    if not isinstance(cfg, SamplingConfig):
        raise TypeError(f"sampling_cfg must be a SamplingConfig, got {type(cfg).__name__}")
    if len(prompt_shape) != 2:
        raise ValueError(f"prompt_ids must be [batch, prompt_length], got shape {tuple(prompt_shape)}")
    if mask_shape is not None and tuple(mask_shape) != tuple(prompt_shape):
        raise ValueError(f"prompt_mask shape {tuple(mask_shape)} differs from prompt_ids shape {tuple(prompt_shape)}")
    sampler = cfg.resolve_sampler(model_cfg.family)
    total = prompt_shape[1] + cfg.gen_length
    if total > model_cfg.max_seq_len:
        raise ValueError(f"prompt length {prompt_shape[1]} + gen_length {cfg.gen_length} = {total} exceeds the "
                         f"model's max_seq_len {model_cfg.max_seq_len}")
    if sampler == "llada":
        cfg.check_blocks()
    elif prompt_shape[1] < 1:
        raise ValueError("the Dream sampler needs a non-empty prompt: its logit at position i comes from "
                         "the token at i - 1")
    if cfg.eot_token_id is not None and cfg.eot_token_id >= model_cfg.vocab_size:
        raise ValueError(f"SamplingConfig.eot_token_id={cfg.eot_token_id} outside the vocabulary "
                         f"[0, {model_cfg.vocab_size})")
    return sampler


def generate(params, model_cfg: DenoiserConfig, prompt_ids: jax.Array, prompt_mask: jax.Array | None,
             key: jax.Array, sampling_cfg: SamplingConfig, *, mesh: Mesh | None = None,
             lora: Mapping | None = None, lora_scale: float = 1.0) -> SampleOutput:
    """Generate ``sampling_cfg.gen_length`` tokens after each prompt with the LLaDA or Dream sampler.

    Pure and traceable: call it inside your own ``jit`` (with ``model_cfg``, ``sampling_cfg`` and ``mesh``
    static), or use :data:`generate_jit`. The denoising loop is a ``lax.fori_loop`` (one compiled program per
    shapes and settings; a ``while_loop`` per block when decoding fast), all randomness comes from ``key`` (same key, same output, sharded or not).

    Args:
      params: the denoiser's params tree (:mod:`gdsd_jax.models.denoiser`).
      model_cfg: its :class:`~gdsd_jax.models.config.DenoiserConfig`.
      prompt_ids: int [B, Lp], left-padded prompts. Tokens equal to the mask id are kept as they are.
      prompt_mask: int/bool [B, Lp], 1 = real token, 0 = padding; ``None`` when nothing is padded.
      key: a ``jax.random`` key.
      sampling_cfg: :class:`~gdsd_jax.sampling.config.SamplingConfig`.
      mesh: the device mesh; the batch is sharded over its data axes (``None``: single device).
      lora / lora_scale: optional LoRA adapters passed through to the model.

    Returns:
      :class:`SampleOutput` (sequences [B, Lp + Lg], completion_mask [B, Lg], unmask_step [B, Lg], nfe [B],
      tokens_processed [B]).
    """
    prompt_ids = jnp.asarray(prompt_ids)
    if not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
        raise ValueError(f"prompt_ids must hold integer token ids, got dtype {prompt_ids.dtype}")
    if prompt_mask is not None:
        prompt_mask = jnp.asarray(prompt_mask)
    sampler = check_inputs(model_cfg, prompt_ids.shape, None if prompt_mask is None else prompt_mask.shape,
                           sampling_cfg)
    run = llada_generate if sampler == "llada" else dream_generate
    seqs, unmask, nfe, processed = run(params, model_cfg, prompt_ids.astype(jnp.int32), prompt_mask, key, sampling_cfg,
                       mesh=mesh, lora=lora, lora_scale=lora_scale)
    lp = prompt_ids.shape[1]
    if sampling_cfg.stop_at_eos:
        cmask = completion_mask(seqs[:, lp:], model_cfg.eos_token_id)
    else:
        cmask = jnp.ones((seqs.shape[0], sampling_cfg.gen_length), jnp.int32)
    if not sampling_cfg.return_unmask_step:
        unmask = jnp.full_like(unmask, -1)
    return SampleOutput(sequences=seqs, completion_mask=cmask, unmask_step=unmask, nfe=nfe,
                        tokens_processed=processed)


@functools.partial(jax.jit, static_argnums=(1, 5), static_argnames=("model_cfg", "sampling_cfg", "mesh"))
def generate_jit(params, model_cfg: DenoiserConfig, prompt_ids: jax.Array, prompt_mask: jax.Array | None,
                 key: jax.Array, sampling_cfg: SamplingConfig, *, mesh: Mesh | None = None,
                 lora: Mapping | None = None, lora_scale: float = 1.0) -> SampleOutput:
    """:func:`generate` compiled once per (shapes, ``model_cfg``, ``sampling_cfg``, ``mesh``)."""
    return generate(params, model_cfg, prompt_ids, prompt_mask, key, sampling_cfg, mesh=mesh, lora=lora,
                    lora_scale=lora_scale)
