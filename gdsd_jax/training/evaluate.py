"""Evaluation: decode a task's test set with the jitted sampler and score it.

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
    accuracy: float                 # fraction solved: reward >= max(1, best reward of the set), or >= max_reward
    rewards: np.ndarray             # [N]
    records: list[dict]             # per example: prompt ids, completion ids/text, reward

    def summary(self) -> dict:
        return {"mean_reward": self.mean_reward, "accuracy": self.accuracy, "num_examples": len(self.rewards)}


_GEN_CACHE: dict = {}


def solved_fraction(rewards: np.ndarray, max_reward: float | None = None) -> float:
    """Fraction of rewards [N] that reach the full reward.

    Rewards are normalised so that a correct answer scores at least 1 (Sudoku, Countdown: exactly 1;
    the GSM8K/MATH official sums: correctness 2 plus format terms). Without an explicit ``max_reward`` the
    bar is therefore the best reward of the set but never below 1: a set of merely well-formed answers
    (Countdown's 0.1) counts as unsolved.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.size == 0:
        return 0.0
    top = max_reward if max_reward is not None else max(float(r.max()), 1.0)
    return float(np.mean(r >= top - 1e-6))


def _generate_fn(mesh):
    if mesh not in _GEN_CACHE:
        def run(params, lora, prompt_ids, prompt_mask, key, model_cfg, scfg):
            return generate(params, model_cfg, prompt_ids, prompt_mask, key, scfg, mesh=mesh, lora=lora)
        _GEN_CACHE[mesh] = jax.jit(run, static_argnums=(5, 6))
    return _GEN_CACHE[mesh]


def evaluate(params, model_cfg: DenoiserConfig, adapter, examples: Sequence[dict], sampling_cfg, mesh: Mesh, *,
             lora=None, batch_size: int = 96, key: jax.Array | None = None, progress: bool = False,
             max_reward: float | None = None) -> EvalResult:
    """Greedy (or sampled, per ``sampling_cfg``) decoding over ``examples``; returns rewards and records."""
    if not examples:
        raise ValueError("evaluate: the evaluation set is empty")
    key = jax.random.key(0) if key is None else key
    gen = _generate_fn(mesh)
    n = len(examples)
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = max(data_ways, (min(batch_size, n) + data_ways - 1) // data_ways * data_ways)
    rewards, records = [], []
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
        texts = scores.texts if scores.texts is not None else adapter.decode(comp)
        for i in range(real):
            records.append({"prompt_ids": [int(t) for t, m in zip(ids[i], mask[i]) if m],
                            "completion_ids": comp[i].tolist(), "completion": texts[i],
                            "reward": float(scores.rewards[i])})
        rewards.append(scores.rewards)
    r = np.concatenate(rewards)
    acc = solved_fraction(r, max_reward)
    return EvalResult(float(r.mean()), acc, r, records)


def write_eval(result: EvalResult, out_dir: str | os.PathLike, name: str = "eval") -> None:
    """``<out_dir>/<name>.jsonl`` (one record per example) and ``<name>_summary.json``; local or ``gs://``."""
    out = storage_path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"{name}.jsonl").open("w") as f:
        for rec in result.records:
            f.write(json.dumps(rec) + "\n")
    (out / f"{name}_summary.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
