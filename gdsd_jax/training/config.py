"""Run configuration of RL training, SFT and evaluation (one YAML file per run, see ``configs/``).

Every setting of the official GDSD recipes (the GDSD paper, arXiv 2605.29398, §5.1) is a field here.
Sections whose fields belong to another module (``sampling`` -> :class:`gdsd_jax.sampling.SamplingConfig`,
``objective`` -> :class:`gdsd_jax.objectives.ObjectiveConfig`) are kept as mappings in the file and
validated by constructing those classes in :meth:`TrainConfig.validate`, so a wrong key still fails at
start naming the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

from gdsd_jax.config_io import ConfigError
from gdsd_jax.objectives import ObjectiveConfig
from gdsd_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    """Where the denoiser comes from: a preset (random init) or a checkpoint (HF dir or ours)."""
    preset: str | None = "sudoku_tiny"
    checkpoint: str | None = None
    tokenizer: str | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSection:
    name: str = "sudoku"
    format: Literal["compact", "chat"] = "compact"
    prompt_length: int = 17
    truncate: Literal["left", "error"] = "left"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Keys older configs may set that nothing reads any more: a clear error instead of a silent no-op.
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "system_prompt": "each task builds its official prompt, system text included"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLSection:
    prompts_per_step: int = 16          # P prompts per RL step (global): the groups trained on
    # Dynamic sampling (gdsd_jax/rl/dynamic_sampling.py): roll out this many prompts and train on the
    # prompts_per_step groups with the largest reward spread. None: roll out exactly prompts_per_step.
    rollout_prompts_per_step: int | None = None
    num_generations: int = 8            # G completions per prompt
    num_iterations: int = 1             # mu optimizer passes over one rollout buffer
    micro_batch_size: int = 128         # rows per gradient-accumulation micro-batch (global)
    total_steps: int = 300
    seed: int = 0
    advantage: Literal["loo", "group_mean"] = "loo"
    scale_std: bool = False
    reward_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    max_nonfinite_in_a_row: int = 5
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "reference_refresh_every": "the reference model is always the initial model"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimSection:
    lr: float = 3e-4
    schedule: Literal["constant", "constant_with_warmup", "cosine"] = "constant"
    warmup_steps: int = 0
    b1: float = 0.9
    b2: float = 0.99
    weight_decay: float = 0.01
    max_grad_norm: float = 0.2
    # Dtype of the trained weights in full fine-tuning: None keeps the checkpoint's (convert keeps bf16 for the
    # upstream models); "float32" holds fp32 master weights (compute stays in the model's compute dtype).
    # AdamW's moments are fp32 whatever this is. LoRA adapters are always fp32.
    param_dtype: Literal["float32", "bfloat16"] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSection:
    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    every: int = 100
    keep: int = 3
    keep_best: bool = False
    async_save: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSection:
    every: int = 0                      # 0 = only before and after training
    split: str = "test"
    max_examples: int | None = None
    batch_size: int = 96
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)   # overrides of the train sampling


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTSection:
    steps: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    b1: float = 0.9
    b2: float = 0.99
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    min_t: float = 1e-3
    eval_every: int = 10
    stop_at_reward: float | None = None     # stop at the first eval with test reward >= this
    seed: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class WarmStartSection:
    """How the RL run gets its initial weights when ``model.checkpoint`` is not set.

    ``sft``: run the project's own SFT (section ``sft``) first and cache the result under ``cache_dir``
    (keyed by a hash of the model, task and SFT settings), so later runs reuse it.
    """
    mode: Literal["none", "sft"] = "none"
    cache_dir: str = ".cache/warm_starts"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedSection:
    mesh: str = "data=1,fsdp=-1,tensor=1"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelSection = ModelSection()
    task: TaskSection = TaskSection()
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)
    objective: dict[str, Any] = dataclasses.field(default_factory=dict)
    rl: RLSection = RLSection()
    optim: OptimSection = OptimSection()
    lora: LoraSection = LoraSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalSection = EvalSection()
    sft: SFTSection = SFTSection()
    warm_start: WarmStartSection = WarmStartSection()
    distributed: DistributedSection = DistributedSection()
    output_dir: str = "runs/sudoku_tiny"
    tensorboard: bool = True

    def sampling_config(self, **extra):
        try:
            return SamplingConfig(**{**self.sampling, **extra})
        except (TypeError, ValueError) as e:
            raise ConfigError(f"sampling: {e}") from None

    def eval_sampling_config(self):
        return self.sampling_config(**self.eval.sampling)

    def objective_config(self):
        try:
            return ObjectiveConfig(**self.objective)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"objective: {e}") from None

    @property
    def rollout_prompts(self) -> int:
        """Prompts rolled out per RL step (global)."""
        return self.rl.rollout_prompts_per_step or self.rl.prompts_per_step

    def validate(self) -> "TrainConfig":
        """Check cross-field constraints and build the sub-configs once (errors name the key)."""
        rl = self.rl
        rows = rl.prompts_per_step * rl.num_generations
        if rl.num_generations < 2:
            raise ConfigError(f"rl.num_generations={rl.num_generations}: group advantages need at least 2")
        if rows % rl.micro_batch_size:
            raise ConfigError(f"rl.micro_batch_size={rl.micro_batch_size} must divide "
                              f"rl.prompts_per_step*rl.num_generations={rows}")
        for name in ("prompts_per_step", "num_iterations", "micro_batch_size", "total_steps"):
            if getattr(rl, name) <= 0:
                raise ConfigError(f"rl.{name} must be positive, got {getattr(rl, name)}")
        if rl.rollout_prompts_per_step is not None and rl.rollout_prompts_per_step < rl.prompts_per_step:
            raise ConfigError(f"rl.rollout_prompts_per_step={rl.rollout_prompts_per_step} must be >= "
                              f"rl.prompts_per_step={rl.prompts_per_step} (the groups trained on are chosen "
                              f"among the rolled-out ones), or null")
        if self.optim.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.optim.lr}")
        if self.optim.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.optim.warmup_steps}")
        if self.optim.schedule == "cosine" and self.optim.warmup_steps >= rl.total_steps:
            raise ConfigError(f"optim.warmup_steps={self.optim.warmup_steps} must be smaller than "
                              f"rl.total_steps={rl.total_steps} for the cosine schedule (it decays over the steps "
                              f"after the warm-up); lower it or set optim.schedule=constant")
        if self.model.preset is None and self.model.checkpoint is None:
            raise ConfigError("model: set model.preset or model.checkpoint")
        if self.lora.enabled and self.lora.rank <= 0:
            raise ConfigError(f"lora.rank must be positive, got {self.lora.rank}")
        self.sampling_config()
        self.eval_sampling_config()
        self.objective_config()
        return self
