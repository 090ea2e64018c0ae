"""Model presets of a run config (``model.preset``): the architectures of :mod:`gdsd_jax.models` and the tiny
models of the compact task formats, whose vocabularies are the tasks' (so they live next to the tasks)."""

from __future__ import annotations

from gdsd_jax.config_io import ConfigError
from gdsd_jax.models.config import PRESETS, DenoiserConfig
from gdsd_jax.tasks import sudoku

#: Model presets by name: the architectures of gdsd_jax.models and the tiny models of the compact task formats
#: (their vocabularies are the tasks').
MODEL_PRESETS = {**PRESETS, "sudoku_tiny": sudoku.tiny_model}


def model_preset(name: str, **overrides) -> DenoiserConfig:
    """The model config of preset ``name`` (see :data:`MODEL_PRESETS`) with ``overrides``."""
    try:
        fn = MODEL_PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; expected one of {sorted(MODEL_PRESETS)}") from None
    return fn(**overrides)
