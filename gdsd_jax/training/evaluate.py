"""Evaluation: decode a task's test set with the jitted sampler and score it.

Two kinds of numbers come out: the training reward on the test set (``mean_reward``, what training
compares across checkpoints) and the task's evaluation metrics under its protocol (``metrics``; the
headline is ``metrics["accuracy"]``): per completion from the adapter's ``eval_metrics`` (the task's
``eval_metrics`` for chat prompts), aggregated over the whole set by the task's ``aggregate_metrics``
(e.g. Sudoku's official protocol pools cells over puzzles).

Batches have a fixed size (the last one is padded by repeating examples and the padding is discarded),
so one compiled program serves the whole set.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from gdsd_jax.checkpoint.params_io import storage_path
from gdsd_jax.distributed import multihost
from gdsd_jax.distributed.mesh import batch_sharding
from gdsd_jax.models.config import DenoiserConfig
from gdsd_jax.sampling import generate


@dataclasses.dataclass
class EvalResult:
    mean_reward: float
    metrics: dict[str, float]       # the task's aggregated evaluation metrics ("accuracy" is the headline)
    rewards: np.ndarray             # [N]
    records: list[dict]             # per example: prompt ids, completion ids/text, reward, metrics
    protocol: str = "project"       # the task's evaluation protocol

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]

    def summary(self) -> dict:
        return {"protocol": self.protocol, "mean_reward": self.mean_reward, **self.metrics,
                "num_examples": len(self.rewards)}


_GEN_CACHE: dict = {}


def _generate_fn(mesh):
    if mesh not in _GEN_CACHE:
        def run(params, lora, prompt_ids, prompt_mask, key, model_cfg, scfg):
            return generate(params, model_cfg, prompt_ids, prompt_mask, key, scfg, mesh=mesh, lora=lora)
        _GEN_CACHE[mesh] = jax.jit(run, static_argnums=(5, 6))
    return _GEN_CACHE[mesh]


def evaluate(params, model_cfg: DenoiserConfig, adapter, examples: Sequence[dict], sampling_cfg, mesh: Mesh, *,
             lora=None, batch_size: int = 96, key: jax.Array | None = None, progress: bool = False) -> EvalResult:
    """Greedy (or sampled, per ``sampling_cfg``) decoding over ``examples``; returns the training rewards,
    the task's aggregated metrics and one record per example."""
    if not examples:
        raise ValueError("evaluate: the evaluation set is empty")
    key = jax.random.key(0) if key is None else key
    gen = _generate_fn(mesh)
    n = len(examples)
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = max(data_ways, (min(batch_size, n) + data_ways - 1) // data_ways * data_ways)
    rewards, records = [], []
    metrics: dict[str, list[float]] = {}
    it = range(0, n, batch_size)
    for start in tqdm(it, desc="eval", disable=not progress, leave=False):
        chunk = list(examples[start:start + batch_size])
        real = len(chunk)
        chunk += [chunk[-1]] * (batch_size - real)
        ids, mask = adapter.encode(chunk)
        sh = batch_sharding(mesh, 2)
        out = gen(params, lora, multihost.shard_rows(ids, sh), multihost.shard_rows(mask, sh),
                  jax.random.fold_in(key, start), model_cfg, sampling_cfg)
        seqs = multihost.to_host(out.sequences)[:real]
        cmask = multihost.to_host(out.completion_mask)[:real]
        comp = seqs[:, ids.shape[1]:]
        scores = adapter.score(comp, cmask, chunk[:real])
        per_example, texts = adapter.eval_metrics(comp, cmask, chunk[:real])
        for name, values in per_example.items():
            metrics.setdefault(name, []).extend(values)
        for i in range(real):
            records.append({"prompt_ids": [int(t) for t, m in zip(ids[i], mask[i]) if m],
                            "completion_ids": comp[i].tolist(), "completion": texts[i],
                            "reward": float(scores.rewards[i]),
                            "metrics": {name: values[i] for name, values in per_example.items()}})
        rewards.append(scores.rewards)
    r = np.concatenate(rewards)
    return EvalResult(float(r.mean()), adapter.task.aggregate_metrics(metrics), r, records, adapter.task.protocol)


def write_eval(result: EvalResult, out_dir: str | os.PathLike, name: str = "eval") -> None:
    """``<out_dir>/<name>.jsonl`` (one record per example) and ``<name>_summary.json``; local or ``gs://``."""
    out = storage_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{name}.jsonl").open("w") as f:
        for rec in result.records:
            f.write(json.dumps(rec) + "\n")
    (out / f"{name}_summary.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
