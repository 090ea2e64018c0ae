"""gdsd-jax: GDSD (Guided Denoiser Self-Distillation) RL post-training of masked diffusion LMs in JAX.

``gdsd_jax.load_denoiser(path, mesh=None, dtype=None)`` loads a LLaDA / Dream denoiser from a Hugging Face
directory, a gdsd-jax checkpoint or the trained policy of a ``gdsd-jax train`` run directory. Submodules are imported on first use, so ``import gdsd_jax`` is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from gdsd_jax.loading import load_denoiser

__all__ = ["load_denoiser", "__version__"]


def __getattr__(name: str):
    if name == "load_denoiser":
        from gdsd_jax.loading import load_denoiser

        return load_denoiser
    raise AttributeError(f"module 'gdsd_jax' has no attribute {name!r}")
