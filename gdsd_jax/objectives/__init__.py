"""RL objectives as pure, jit-compatible functions: forward masking, memory-safe denoiser
log-likelihoods, advantages, KL estimators, GDSD, GDSD-TLC, GDSD logit matching and the baselines
(ESPO, SPG, diffu-GRPO/d1, wd1) behind one registry (see ``docs/objectives.md``)."""

from gdsd_jax.objectives.advantages import compute_advantages
from gdsd_jax.objectives.config import OBJECTIVE_NAMES, ObjectiveConfig, config_class, objective_config
from gdsd_jax.objectives.kl import k1, k2, k3, kl_estimate
from gdsd_jax.objectives.registry import Objective, get_objective, objective_names
from gdsd_jax.objectives.types import LossOutput, RolloutBatch, completion_mask_from_eos

__all__ = [
    "OBJECTIVE_NAMES", "LossOutput", "Objective", "ObjectiveConfig", "RolloutBatch", "completion_mask_from_eos",
    "compute_advantages", "config_class", "get_objective", "k1", "k2", "k3", "kl_estimate", "objective_config",
    "objective_names",
]
