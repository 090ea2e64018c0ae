"""Diffusion samplers for masked diffusion LMs: LLaDA's block-wise low-confidence / random remasking and
Dream's ``origin`` / ``maskgit_plus`` / ``topk_margin`` / ``entropy``, each one jitted ``fori_loop``.

Usage::

    from gdsd_jax.sampling import SamplingConfig, generate_jit
    out = generate_jit(params, model_cfg, prompt_ids, prompt_mask, jax.random.key(0),
                       SamplingConfig(gen_length=256, steps=128, block_length=32, temperature=1.0))
    out.sequences, out.completion_mask

``cache="prefix"|"dual"`` and ``threshold=...`` (or ``factor=...``) switch on Fast-dLLM's block KV cache and
confidence-aware parallel decoding (:mod:`gdsd_jax.sampling.blockwise`); ``out.nfe`` counts the model forwards per row.

See ``docs/sampling.md`` for the algorithms and where they differ from the upstream PyTorch code.
"""

from gdsd_jax.sampling.api import check_inputs, generate, generate_jit
from gdsd_jax.sampling.common import SampleOutput, completion_mask
from gdsd_jax.sampling.config import ALGORITHMS, CACHES, DREAM_OFFICIAL_TOP_K, REMASKING, SAMPLERS, SamplingConfig
from gdsd_jax.sampling.dream import dream_generate, sample_tokens
from gdsd_jax.sampling.llada import llada_generate
from gdsd_jax.sampling.schedules import (
                                         dream_origin_probs,
                                         dream_timesteps,
                                         dream_transfer_fractions,
                                         dream_transfer_schedule,
                                         llada_transfer_schedule,
)

__all__ = [
    "ALGORITHMS", "CACHES", "DREAM_OFFICIAL_TOP_K", "REMASKING", "SAMPLERS", "SampleOutput", "SamplingConfig", "check_inputs",
    "completion_mask", "dream_generate", "dream_origin_probs", "dream_timesteps", "dream_transfer_fractions",
    "dream_transfer_schedule", "generate", "generate_jit", "llada_generate", "llada_transfer_schedule",
    "sample_tokens",
]
