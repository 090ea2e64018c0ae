"""Host-side (NumPy) integer schedules of the two samplers.

Both schedules depend only on static settings (generation length, steps, block length, ``eps``), so they
are computed once on the host while tracing and enter the compiled loop as small constant tables. Doing the
arithmetic in NumPy ``float32`` makes the Dream schedule reproducible to the bit and testable against an
independent computation (the reference in the tests recomputes it step by step from the live mask count).

* LLaDA (``get_num_transfer_tokens`` in LLaDA's ``generate.py``): a block of ``n`` masked tokens decoded in
  ``s`` steps reveals ``n // s`` tokens per step plus one extra on each of the first ``n % s`` steps.
* Dream (``diffusion_generate`` in Dream's ``generation_utils.py``): float32 timesteps
  ``linspace(1, eps, steps + 1)``; at step ``i < steps - 1`` it reveals
  ``int(float32(n_i) * float32(1 - s_i / t_i))`` of the ``n_i`` still-masked tokens (truncation toward
  zero), and everything that is left at the last step.
"""

from __future__ import annotations

import numpy as np


def llada_transfer_schedule(block_length: int, steps_per_block: int) -> np.ndarray:
    """Tokens revealed at each step of one LLaDA block.

    Returns int32 ``[steps_per_block]``: ``block_length // steps_per_block`` everywhere, plus 1 on the first
    ``block_length % steps_per_block`` steps. It sums to ``block_length``.
    """
    if block_length <= 0 or steps_per_block <= 0:
        raise ValueError(f"block_length ({block_length}) and steps_per_block ({steps_per_block}) must be positive")
    base, rem = divmod(block_length, steps_per_block)
    counts = np.full((steps_per_block,), base, dtype=np.int32)
    counts[:rem] += 1
    return counts


def dream_timesteps(steps: int, eps: float) -> np.ndarray:
    """float32 ``[steps + 1]`` timesteps ``linspace(1, eps, steps + 1)``.

    Computed as NumPy does (in float64, rounded once to float32). PyTorch's float32 ``linspace`` (which
    upstream uses) rounds differently in the last bit for some lengths; the integer schedules derived from
    the two were compared for every ``steps <= gen_length`` with ``gen_length`` in {64, 128, 256, 512, 1024}
    (PyTorch on CPU) and differ in one of those 1,984 pairs (``gen_length=1024, steps=999``). The tests
    compare them for the recipes' settings and random step counts. See ``docs/sampling.md``.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    return np.linspace(1.0, eps, steps + 1, dtype=np.float32)


def dream_transfer_fractions(steps: int, eps: float) -> np.ndarray:
    """float32 ``[steps]``: the fraction ``1 - s_i / t_i`` of the still-masked tokens that Dream's
    confidence-based algorithms reveal at step ``i`` (float32 arithmetic as upstream), and exactly 1 at the
    last step (which reveals everything left). Step ``i`` reveals ``int(float32(n_i) * fraction_i)``."""
    ts = dream_timesteps(steps, eps)
    frac = (np.float32(1.0) - (ts[1:] / ts[:-1]).astype(np.float32)).astype(np.float32)
    frac[-1] = np.float32(1.0)
    return frac


def dream_transfer_schedule(gen_length: int, steps: int, eps: float) -> np.ndarray:
    """Tokens revealed per step by Dream's confidence-based algorithms (``maskgit_plus``, ``topk_margin``,
    ``entropy``) for a completion of ``gen_length`` masked tokens, when every revealed position receives a
    token (no mask id is drawn: then every row follows this schedule).

    Returns int32 ``[steps]`` summing to ``gen_length``.
    """
    n = int(gen_length)
    out = np.zeros((steps,), dtype=np.int32)
    for i, frac in enumerate(dream_transfer_fractions(steps, eps)):
        k = int(np.float32(np.float32(n) * frac))              # int() truncates toward zero, as upstream
        out[i] = k
        n -= k
    return out


def dream_origin_probs(steps: int, eps: float) -> np.ndarray:
    """float32 ``[steps]``: probability that a still-masked token is revealed at each step of Dream's
    ``origin`` algorithm: the same ``1 - s_i / t_i`` as :func:`dream_transfer_fractions` (1 at the last step)."""
    return dream_transfer_fractions(steps, eps)
