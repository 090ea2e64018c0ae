"""Building a run from its config: the mesh, the model, the task with its adapter, the data order."""

from __future__ import annotations

import grain
import jax
import numpy as np

from gdsd_jax.config_io import ConfigError
from gdsd_jax.data.tokenizer import load_tokenizer
from gdsd_jax.distributed import multihost
from gdsd_jax.distributed.mesh import make_mesh, parse_mesh_spec
from gdsd_jax.loading import load_denoiser
from gdsd_jax.models.config import DenoiserConfig
from gdsd_jax.models.denoiser import init_params
from gdsd_jax.tasks.base import Task, get_task
from gdsd_jax.training.config import TrainConfig
from gdsd_jax.training.presets import model_preset
from gdsd_jax.training.task_adapter import make_adapter


def build_mesh(cfg: TrainConfig):
    return make_mesh(**parse_mesh_spec(cfg.distributed.mesh), num_slices=cfg.distributed.num_slices)


def build_model(cfg: TrainConfig, mesh) -> tuple[DenoiserConfig, dict]:
    """Model config and parameters: from ``model.checkpoint`` (HF dir or ours) or a random preset; a
    checkpoint takes only the execution fields of ``model.overrides`` (``ModelSection.split_overrides``)."""
    overrides, _ = cfg.model.split_overrides()
    if cfg.model.checkpoint:
        model = load_denoiser(cfg.model.checkpoint, mesh=mesh)
        model_cfg = model.config.replace(**overrides) if overrides else model.config
        return model_cfg, model.params()
    try:
        model_cfg = model_preset(cfg.model.preset, **overrides)
    except TypeError as e:
        raise ConfigError(f"model.overrides: {e}") from None
    return model_cfg, init_params(model_cfg, jax.random.key(cfg.rl.seed + 17), mesh)


def build_task(cfg: TrainConfig) -> Task:
    """The run's task, checked against the settings that need it, before any model is built or anything
    written: its isolation layers (the code task's sandbox is made now and refuses to run without a
    required layer), ``eval.split``, the compact prompts against ``task.prompt_length``, and the names in
    ``rl.reward_weights`` against the task's reward functions. Each failure is one :class:`ConfigError`
    (or the task's own :class:`~gdsd_jax.errors.UserError`) naming the setting."""
    task = get_task(cfg.task.name, **cfg.task.kwargs)
    if cfg.rl.reward_weights:
        names = [wr.name for wr in task.rewards()]
        unknown = sorted(set(cfg.rl.reward_weights) - set(names))
        if unknown:
            raise ConfigError(f"rl.reward_weights names unknown reward function(s) {unknown}; task "
                              f"{cfg.task.name!r} has {names}")
    try:
        evaluated = task.examples(cfg.eval.split)
    except ValueError as e:
        raise ConfigError(f"eval.split={cfg.eval.split!r}: {e}") from None
    if cfg.task.format == "compact" and getattr(task, "supports_compact", False):
        prompts = [*task.examples("train"), *evaluated]
        longest = max((len(task.compact_prompt(ex)) for ex in prompts), default=0)
        if longest > cfg.task.prompt_length:
            raise ConfigError(f"task.prompt_length={cfg.task.prompt_length} is shorter than the task's longest "
                              f"prompt ({longest} tokens); set task.prompt_length={longest} or more")
    return task


def build_task_and_adapter(cfg: TrainConfig, model_cfg: DenoiserConfig, split: str = "train",
                           task: Task | None = None):
    """The task (``task``, made by :func:`build_task`, or made now) with its token adapter and tokenizer."""
    task = build_task(cfg) if task is None else task
    tokenizer = None
    if cfg.task.format == "chat":
        if not cfg.model.tokenizer and not cfg.model.checkpoint:
            raise ConfigError("task.format=chat needs model.tokenizer (a local tokenizer directory)")
        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.checkpoint)
    adapter = make_adapter(task, cfg.task.format, cfg.task.prompt_length, model_cfg, tokenizer,
                           **({} if cfg.task.format == "compact" else
                              {"split": split, "truncate": cfg.task.truncate,
                               "reward_weights": cfg.rl.reward_weights}))
    return task, adapter, tokenizer


def build_eval_adapter(cfg: TrainConfig, task, adapter, model_cfg: DenoiserConfig, tokenizer):
    """The adapter evaluation decodes with: the training one in the compact format; in the chat format the
    task's evaluation prompts (split ``"test"``: e.g. the official ``<reasoning>`` prefill)."""
    if cfg.task.format == "compact":
        return adapter
    return make_adapter(task, "chat", cfg.task.prompt_length, model_cfg, tokenizer, split="test",
                        truncate=cfg.task.truncate)


def index_iterator(num_examples: int, batch_size: int, seed: int):
    """Grain pipeline over example indices: seeded shuffle, repeat, global batch, this process's block.

    Every process walks the same (cheap) stream of index batches and keeps its contiguous block, then
    loads only those examples. Sharding after batching, rather than ``[process_index::process_count]``
    before it, makes the global batch independent of the number of processes: a run on 2 hosts sees
    exactly the prompts of a run on 1 host, and a checkpoint can move between topologies. The iterator
    state is saved in the checkpoint's metadata, so a resume continues with exactly the next batch.
    """
    if num_examples == 0:
        raise ValueError("the training set is empty")
    block = multihost.process_slice(batch_size)
    ds = (grain.MapDataset.range(num_examples).seed(seed).shuffle().repeat()
          .batch(batch_size, drop_remainder=True).map(lambda b: np.asarray(b)[block]))
    return iter(ds.to_iter_dataset())


def eval_examples(task, cfg: TrainConfig, split: str | None = None) -> list[dict]:
    """The first ``eval.max_examples`` examples of ``split`` (default ``eval.split``)."""
    split = split or cfg.eval.split
    ex = list(task.examples(split))
    if cfg.eval.max_examples:
        ex = ex[:cfg.eval.max_examples]
    if not ex:
        raise ValueError(f"task {task.name!r} has no examples in split {split!r}")
    return ex
