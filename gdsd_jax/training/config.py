"""Run configuration of RL training, SFT and evaluation (one YAML file per run, see ``configs/``).

Every setting of the official GDSD recipes (the GDSD paper, arXiv 2605.29398, §5.1) is a field here.
The ``sampling`` and ``objective`` sections are the classes of the modules that read them
(:class:`gdsd_jax.sampling.SamplingConfig`; the chosen method's :class:`gdsd_jax.objectives.ObjectiveConfig`
subclass, picked by ``objective.name``), so their defaults, ranges and errors live in one place; a wrong key
fails at start naming it. ``eval.sampling`` is a partial override: the keys it sets replace the rollout
``sampling``'s for evaluation (:meth:`TrainConfig.eval_sampling_config`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Any, ClassVar, Literal

from gdsd_jax.config_io import ConfigError, build, check_ranges, ranged, to_dict
from gdsd_jax.distributed.mesh import mesh_shape, parse_mesh_spec
from gdsd_jax.loading import peek_model_config
from gdsd_jax.models.config import EXECUTION_FIELDS, DenoiserConfig
from gdsd_jax.models.lora import TARGETS as LORA_TARGETS
from gdsd_jax.objectives import ObjectiveConfig, get_objective, objective_config
from gdsd_jax.sampling import SamplingConfig
from gdsd_jax.tasks.base import check_task_arguments, task_class
from gdsd_jax.training.presets import model_preset
from gdsd_jax.training.task_adapter import check_compact_vocabulary


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSection:
    """Where the denoiser comes from: a preset (random init) or a checkpoint (HF dir or ours).

    ``overrides`` change fields of the model config. Architecture fields (width, vocabulary, learned
    positions...) belong to the preset: with ``checkpoint`` set they are not applied, since a checkpoint
    brings its own architecture (the run logs which were left out); the execution fields of
    :data:`~gdsd_jax.models.config.EXECUTION_FIELDS` (dtypes, remat, layer scan...) apply to either.
    """
    preset: str | None = "sudoku_tiny"
    checkpoint: str | None = None
    tokenizer: str | None = None
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    def split_overrides(self) -> tuple[dict[str, Any], list[str]]:
        """``(applied, left_out)``: the overrides applied to the model, and the architecture keys left out
        because ``checkpoint`` brings its own architecture (empty for a preset)."""
        if not self.checkpoint:
            return dict(self.overrides), []
        applied = {k: v for k, v in self.overrides.items() if k in EXECUTION_FIELDS}
        return applied, sorted(set(self.overrides) - set(applied))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskSection:
    name: str = "sudoku"
    format: Literal["compact", "chat"] = "compact"
    prompt_length: int = ranged(17, gt=0)
    truncate: Literal["left", "error"] = "left"
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Keys older configs may set that nothing reads any more: a clear error instead of a silent no-op.
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "system_prompt": "each task builds its official prompt, system text included"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLSection:
    prompts_per_step: int = ranged(16, gt=0)   # P prompts per RL step (global): the groups trained on
    # Dynamic sampling (gdsd_jax/rl/dynamic_sampling.py): roll out this many prompts and train on the
    # prompts_per_step groups with the largest reward spread. None: roll out exactly prompts_per_step.
    rollout_prompts_per_step: int | None = ranged(None, gt=0)
    num_generations: int = ranged(8, ge=2, why="group advantages need at least 2")   # G per prompt
    num_iterations: int = ranged(1, gt=0)      # mu optimizer passes over one rollout buffer
    micro_batch_size: int = ranged(128, gt=0)  # rows per gradient-accumulation micro-batch (global)
    total_steps: int = ranged(300, gt=0)
    seed: int = ranged(0, ge=0, le=2**32 - 1)
    # Group-relative advantages (gdsd_jax/objectives/advantages.py). None (the default) takes the objective's
    # own choice (Objective.advantage_method / advantage_scale_std: leave-one-out for the GDSD family and
    # ESPO, group mean for SPG and wd1, std-scaled group mean for d1); a value here overrides it (logged).
    advantage: Literal["loo", "group_mean"] | None = None
    scale_std: bool | None = None
    reward_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    max_nonfinite_in_a_row: int = ranged(5, ge=1)
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "reference_refresh_every": "the reference model is always the initial model"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimSection:
    lr: float = ranged(3e-4, gt=0)
    schedule: Literal["constant", "constant_with_warmup", "cosine"] = "constant"
    warmup_steps: int = ranged(0, ge=0)
    b1: float = ranged(0.9, ge=0, lt=1)
    b2: float = ranged(0.99, ge=0, lt=1)
    weight_decay: float = ranged(0.01, ge=0)
    max_grad_norm: float = ranged(0.2, gt=0)
    # Dtype of the trained weights in full fine-tuning: None keeps the checkpoint's (convert keeps bf16 for the
    # upstream models); "float32" holds fp32 master weights (compute stays in the model's compute dtype).
    # AdamW's moments are fp32 whatever this is. LoRA adapters are always fp32.
    param_dtype: Literal["float32", "bfloat16"] | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraSection:
    enabled: bool = False
    rank: int = ranged(8, gt=0)
    alpha: float = ranged(16.0, gt=0)
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    REMOVED_KEYS: ClassVar[dict[str, str]] = {
        "dropout": "adapter dropout is not implemented: the adapters are deterministic and the official "
                   "recipes' 0.05 is not reproduced"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    every: int = ranged(100, ge=0)
    keep: int = ranged(3, ge=1)     # the newest is always kept; keep >= 2 lets a resume fall back from a damaged one
    keep_best: bool = False
    async_save: bool = True


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSection:
    every: int = ranged(0, ge=0)        # 0 = only before and after training
    # "validation" where the task ships one (hyper-parameter selection)
    split: Literal["train", "validation", "test"] = "test"
    # Evaluate the starting weights at step 0. An experiment whose runs share one warm start measures it once
    # and turns this off in every run.
    initial: bool = True
    max_examples: int | None = ranged(None, gt=0)   # None: the whole split
    batch_size: int = ranged(96, gt=0)
    # Partial override of the rollout sampling: only the keys set here differ from the run's ``sampling``
    # (e.g. ``{temperature: 0.0}`` for greedy evaluation); see TrainConfig.eval_sampling_config.
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTSection:
    steps: int = ranged(200, ge=0)
    batch_size: int = ranged(128, gt=0)
    lr: float = ranged(1e-3, gt=0)
    b1: float = ranged(0.9, ge=0, lt=1)
    b2: float = ranged(0.99, ge=0, lt=1)
    weight_decay: float = ranged(0.01, ge=0)
    max_grad_norm: float = ranged(1.0, gt=0)
    min_t: float = ranged(1e-3, gt=0, lt=1)
    eval_every: int = ranged(10, ge=0)
    stop_at_reward: float | None = ranged(None)     # stop at the first eval with test reward >= this
    seed: int = ranged(0, ge=0, le=2**32 - 1)


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
    # Multi-slice TPU: slices joined over DCN, laid along the data axis (gdsd_jax/distributed/mesh.py).
    num_slices: int = ranged(1, gt=0)
    coordinator_address: str | None = None
    num_processes: int | None = ranged(None, gt=0)
    process_id: int | None = ranged(None, ge=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoggingSection:
    """Where metrics go besides ``metrics.jsonl`` (and TensorBoard, ``tensorboard``).

    ``wandb``: also log every record to Weights & Biases (the optional ``wandb`` package: ``pip install
    'gdsd-jax[wandb]'``; ``WANDB_MODE=offline`` keeps the run local). A resumed run continues the same W&B run.
    """
    wandb: bool = False
    wandb_project: str = "gdsd-jax"
    wandb_entity: str | None = None
    wandb_name: str | None = None      # None: the run directory's name


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    model: ModelSection = ModelSection()
    task: TaskSection = TaskSection()
    sampling: SamplingConfig = SamplingConfig()
    objective: ObjectiveConfig = objective_config()
    rl: RLSection = RLSection()
    optim: OptimSection = OptimSection()
    lora: LoraSection = LoraSection()
    checkpoint: CheckpointSection = CheckpointSection()
    eval: EvalSection = EvalSection()
    sft: SFTSection = SFTSection()
    warm_start: WarmStartSection = WarmStartSection()
    distributed: DistributedSection = DistributedSection()
    logging: LoggingSection = LoggingSection()
    output_dir: str = "runs/sudoku_tiny"
    tensorboard: bool = True

    def eval_sampling_config(self) -> SamplingConfig:
        """The evaluation's sampler: the rollout ``sampling`` with the keys ``eval.sampling`` sets replaced
        (errors name ``eval.sampling.KEY``)."""
        return build(SamplingConfig, {**to_dict(self.sampling), **self.eval.sampling}, "eval.sampling")

    def advantage_settings(self) -> tuple[str, bool]:
        """``(method, scale_std)`` of the run's advantages: ``rl.advantage`` / ``rl.scale_std`` where set,
        otherwise the objective's own (:class:`gdsd_jax.objectives.registry.Objective`)."""
        objective = get_objective(self.objective.name)
        method = objective.advantage_method if self.rl.advantage is None else self.rl.advantage
        scale_std = objective.advantage_scale_std if self.rl.scale_std is None else self.rl.scale_std
        return method, scale_std

    @property
    def rollout_prompts(self) -> int:
        """Prompts rolled out per RL step (global)."""
        return self.rl.rollout_prompts_per_step or self.rl.prompts_per_step

    def validate(self, num_devices: int | None = None, num_processes: int = 1) -> "TrainConfig":
        """Check every value and cross-field constraint and build the sub-configs once (errors name the key).

        Nothing here loads a model or touches the run directory, so a wrong value fails before anything is
        written. ``num_devices`` / ``num_processes`` (known once the distributed runtime is up) also check the
        global batches against the mesh.
        """
        check_ranges(self)
        rl = self.rl
        rows = rl.prompts_per_step * rl.num_generations
        if rows % rl.micro_batch_size:
            raise ConfigError(f"rl.micro_batch_size={rl.micro_batch_size} must divide "
                              f"rl.prompts_per_step*rl.num_generations={rows}")
        if rl.rollout_prompts_per_step is not None and rl.rollout_prompts_per_step < rl.prompts_per_step:
            raise ConfigError(f"rl.rollout_prompts_per_step={rl.rollout_prompts_per_step} must be >= "
                              f"rl.prompts_per_step={rl.prompts_per_step} (the groups trained on are chosen "
                              f"among the rolled-out ones), or null")
        if rl.reward_weights and self.task.format != "chat":
            raise ConfigError(f"rl.reward_weights={dict(rl.reward_weights)} weighs the chat format's reward functions; "
                              f"task.format={self.task.format} scores with the task's single compact reward: remove "
                              f"rl.reward_weights or set task.format=chat")
        for name, weight in rl.reward_weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ConfigError(f"rl.reward_weights.{name}={weight!r}: expected a finite number")
        if self.lora.enabled:
            if not self.lora.targets or set(self.lora.targets) - set(LORA_TARGETS):
                raise ConfigError(f"lora.targets={list(self.lora.targets)}: expected a non-empty subset of "
                                  f"{list(LORA_TARGETS)}")
        model_cfg = self._model_config()
        family = model_cfg.family if model_cfg is not None else None
        max_len = model_cfg.max_seq_len if model_cfg is not None else None
        self._check_task()
        if model_cfg is not None and self.task.format == "compact":
            try:
                check_compact_vocabulary(task_class(self.task.name), model_cfg)
            except ValueError as e:
                source = ("model.checkpoint" if self.model.checkpoint else
                          f"model.preset={self.model.preset}" + (" with model.overrides" if self.model.overrides else ""))
                raise ConfigError(f"{e} ({source}); use a model made for this format or task.format=chat with a "
                                  f"tokenizer") from None
        if self.logging.wandb and importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.wandb=true needs the wandb package: pip install 'gdsd-jax[wandb]' "
                              "(or pip install wandb)")
        for key, scfg in (("sampling", self.sampling), ("eval.sampling", self.eval_sampling_config())):
            _check_sampler_layout(key, scfg, family)
            total = self.task.prompt_length + scfg.gen_length
            if max_len is not None and total > max_len:
                raise ConfigError(f"{key}.gen_length={scfg.gen_length} + task.prompt_length={self.task.prompt_length} "
                                  f"= {total} exceeds the model's max_seq_len={max_len}; lower them (at most "
                                  f"{max_len - self.task.prompt_length} tokens of generation)")
        mesh = self._mesh_axes()
        if num_devices is not None:
            self._check_batches(mesh, num_devices, num_processes)
        return self

    def _model_config(self) -> DenoiserConfig | None:
        """The model config when it is known without loading weights (a preset, or a checkpoint's config),
        with the overrides that apply to it."""
        applied, _ = self.model.split_overrides()
        if self.model.checkpoint:
            cfg = peek_model_config(self.model.checkpoint)
            return cfg.replace(**applied) if cfg is not None else None
        if self.model.preset is None:
            raise ConfigError("model: set model.preset or model.checkpoint")
        try:
            return model_preset(self.model.preset, **applied)
        except TypeError as e:
            raise ConfigError(f"model.overrides: {e}") from None
        except ValueError as e:
            raise ConfigError(f"model.preset: {e}") from None

    def _check_task(self) -> None:
        """The task exists, takes ``task.kwargs`` and offers the evaluation protocol they ask for (the
        official one evaluates chat prompts)."""
        try:
            check_task_arguments(self.task.name, self.task.kwargs)
        except ValueError as e:
            raise ConfigError(f"task: {e}") from None
        if self.task.kwargs.get("protocol", "project") == "official" and self.task.format != "chat":
            raise ConfigError("task.kwargs.protocol=official evaluates the official chat prompts: it needs "
                              f"task.format=chat, got {self.task.format!r}")

    def _mesh_axes(self) -> dict[str, int]:
        try:
            axes = parse_mesh_spec(self.distributed.mesh)
        except ValueError as e:
            raise ConfigError(f"distributed.mesh={self.distributed.mesh!r}: {e}") from None
        slices = self.distributed.num_slices
        if slices > 1 and axes["data"] != -1 and axes["data"] % slices:
            raise ConfigError(f"distributed.num_slices={slices}: the slices are laid along the data axis, so "
                              f"distributed.mesh needs data a multiple of {slices}, got {self.distributed.mesh!r}")
        return axes

    def _check_batches(self, axes: dict[str, int], num_devices: int, num_processes: int) -> None:
        """Every global batch must split evenly over the data-parallel devices (data x fsdp) and processes."""
        try:
            shape = mesh_shape(num_devices, **axes)
        except ValueError as e:
            raise ConfigError(f"distributed.mesh={self.distributed.mesh!r}: {e}") from None
        ways = shape["data"] * shape["fsdp"]
        devices = f"{ways} data-parallel devices (data x fsdp of mesh {shape})"
        g = self.rl.num_generations
        rollout = "rl.rollout_prompts_per_step" if self.rl.rollout_prompts_per_step else "rl.prompts_per_step"
        batches = [(f"{rollout}*rl.num_generations", self.rollout_prompts * g, ways, devices),
                   ("rl.prompts_per_step*rl.num_generations", self.rl.prompts_per_step * g, ways, devices),
                   (rollout, self.rollout_prompts, num_processes, f"{num_processes} processes")]
        if self.warm_start.mode == "sft":
            batches.append(("sft.batch_size", self.sft.batch_size, ways, devices))
        for key, n, parts, what in batches:
            if n % parts:
                raise ConfigError(f"{key}={n} does not split evenly over {what}; make it a multiple of {parts}")


def _check_sampler_layout(key: str, scfg, family: str | None) -> None:
    """The LLaDA sampler's block layout, checked now rather than at the first rollout.

    With the family unknown, an explicit ``block_length`` is still checked: only the LLaDA sampler reads it.
    """
    sampler = scfg.sampler if scfg.sampler != "auto" else family
    if sampler == "llada" or (sampler is None and scfg.block_length is not None):
        try:
            scfg.check_blocks()
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
