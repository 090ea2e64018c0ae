"""The layout of a run directory: where its train states, trained policy and LoRA base live.

A run directory (``gdsd-jax train --output-dir RUN``) holds::

    RUN/
      checkpoints/STEP/   Orbax train states (trainable tree = full weights or LoRA adapters, optimizer, ...)
      policy/             params checkpoint of the policy at the end of the run (LoRA merged into the base,
                          in the base's dtype; ``source`` in its gdsd_checkpoint.json names the run and step)
      base/               params checkpoint of the LoRA base, only when the run did not start from a
                          checkpoint on disk (a preset or an SFT warm start)

This module knows the layout; reading a policy back (which may load a LoRA base from a Hugging Face
directory) and writing one are :func:`gdsd_jax.loading.restore_run_policy` and
:func:`gdsd_jax.loading.write_policy`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

from etils import epath

from gdsd_jax.checkpoint.params_io import (
    HF_FILES_DIR,
    is_params_checkpoint,
    read_meta,
    storage_path,
)

POLICY_DIR = "policy"
BASE_DIR = "base"
CHECKPOINTS_DIR = "checkpoints"
RUN_CONFIG_FILE = "config.json"
#: What a training run writes at the top of its directory: a directory holding any of these holds an earlier
#: run, which a new run neither mixes with nor silently replaces (``gdsd-jax train --resume`` / ``--overwrite``).
RUN_FILES = (CHECKPOINTS_DIR, POLICY_DIR, BASE_DIR, RUN_CONFIG_FILE, "metrics.jsonl", "eval_final.jsonl",
             "eval_final_summary.json", "tensorboard", "plots", "wandb")


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a training run directory (train states under ``checkpoints/`` or a ``policy/``)."""
    p = storage_path(path)
    return (p / CHECKPOINTS_DIR).is_dir() or is_params_checkpoint(p / POLICY_DIR)


def earlier_run_files(run_dir: str | os.PathLike) -> list[str]:
    """The :data:`RUN_FILES` present in ``run_dir`` (empty for a new or unrelated directory)."""
    p = storage_path(run_dir)
    return [name for name in RUN_FILES if (p / name).exists()]


def run_base_checkpoint(run_dir: str | os.PathLike, train_config: Mapping) -> str | None:
    """Where the run's starting weights are on disk: ``model.checkpoint``, else ``RUN/base`` when written."""
    if train_config["model"].get("checkpoint"):
        return os.fspath(train_config["model"]["checkpoint"])
    base = storage_path(run_dir) / BASE_DIR
    return os.fspath(base) if is_params_checkpoint(base) else None


def policy_step(run_dir: epath.Path) -> int | None:
    """The step of the run's ``policy/`` (from its provenance record), or None without one."""
    policy = run_dir / POLICY_DIR
    if not is_params_checkpoint(policy):
        return None
    return read_meta(policy).get("source", {}).get("step")


def run_config(run_dir: str | os.PathLike) -> dict:
    """The run config (``RUN/config.json``) of a run directory."""
    path = storage_path(run_dir) / RUN_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; expected a gdsd-jax train output directory")
    return json.loads(path.read_text())


#: Files that make a directory a tokenizer directory (one of them suffices).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def find_tokenizer_dir(path: str | os.PathLike) -> str | None:
    """The tokenizer directory of a model path (:func:`tokenizer_source`, or its ``hf_files/`` where a
    converted checkpoint keeps the upstream tokenizer), or None when neither holds tokenizer files."""
    src = storage_path(tokenizer_source(path))
    for d in (src, src / HF_FILES_DIR):
        if d.is_dir() and any((d / f).is_file() for f in TOKENIZER_FILES):
            return os.fspath(d)
    return None


def tokenizer_source(path: str | os.PathLike) -> str:
    """Where the tokenizer of a model path lives: for a run directory, the run's ``model.tokenizer`` or
    ``model.checkpoint`` when it names one; otherwise the path itself."""
    if not is_run_dir(path):
        return os.fspath(path)
    model = run_config(path)["model"]
    return os.fspath(model.get("tokenizer") or model.get("checkpoint") or path)
