"""The trained policy of a run directory, as full denoiser parameters.

A run directory (``gdsd-jax train --output-dir RUN``) holds::

    RUN/
      checkpoints/STEP/   Orbax train states (trainable tree = full weights or LoRA adapters, optimizer, ...)
      policy/             params checkpoint of the policy at the end of the run (LoRA merged into the base,
                          in the base's dtype; ``source`` in its gdsd_checkpoint.json names the run and step)
      base/               params checkpoint of the LoRA base, only when the run did not start from a
                          checkpoint on disk (a preset or an SFT warm start)

:func:`restore_run_policy` gives the policy of any saved step: ``policy/`` when it is that step, otherwise
the step's trainable tree (without the optimizer state) merged with the base. :func:`write_policy` writes
a params checkpoint atomically (hidden temporary directory renamed when complete) and carries the upstream
``config.json`` and side files (tokenizer, remote code) of the model the run started from, so that the
policy exports to the Hugging Face layout like a converted checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
from etils import epath
from jax.sharding import Mesh

from gdsd_jax.checkpoint.params_io import (
    HF_FILES_DIR, dtype_name, is_params_checkpoint, read_hf_config, read_meta, restore_params, save_params,
    storage_path)
from gdsd_jax.checkpoint.train_state import RunCheckpointer
from gdsd_jax.models.config import DenoiserConfig

POLICY_DIR = "policy"
BASE_DIR = "base"
CHECKPOINTS_DIR = "checkpoints"
RUN_CONFIG_FILE = "config.json"


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a training run directory (train states under ``checkpoints/`` or a ``policy/``)."""
    p = storage_path(path)
    return (p / CHECKPOINTS_DIR).is_dir() or is_params_checkpoint(p / POLICY_DIR)


def upstream_files(checkpoint: str | os.PathLike | None) -> tuple[dict | None, list[epath.Path]]:
    """``(config.json, side files)`` of the upstream model behind ``checkpoint`` (a params checkpoint or a
    Hugging Face directory); ``(None, [])`` for None (a preset)."""
    if not checkpoint:
        return None, []
    if is_params_checkpoint(checkpoint):
        side = storage_path(checkpoint) / HF_FILES_DIR
        return read_hf_config(checkpoint), sorted(f for f in side.iterdir() if f.is_file()) if side.is_dir() else []
    from gdsd_jax.convert.hf_checkpoint import side_files
    from gdsd_jax.convert.hf_config import read_config_json

    return read_config_json(checkpoint), [epath.Path(f) for f in side_files(checkpoint)]


def write_policy(out: str | os.PathLike, params: Mapping, cfg: DenoiserConfig, *,
                 upstream: str | os.PathLike | None = None, source: Mapping | None = None, dtype=None,
                 overwrite: bool = True) -> epath.Path:
    """Write full policy parameters as a params checkpoint at ``out`` (atomically).

    Args:
      params: the policy's full parameter tree (LoRA already merged).
      cfg: its config; floating-point leaves are written in ``cfg.param_dtype`` (the base's dtype) unless
        ``dtype`` says otherwise.
      upstream: the checkpoint the run started from; its upstream ``config.json`` and side files are kept.
      source: provenance for ``gdsd_checkpoint.json`` (run directory, step).
    """
    hf_config, files = upstream_files(upstream)
    return save_params(out, params, cfg, hf_config=hf_config, source=source, side_files=files, dtype=dtype,
                       overwrite=overwrite)


def run_base_checkpoint(run_dir: str | os.PathLike, train_config: Mapping) -> str | None:
    """Where the run's starting weights are on disk: ``model.checkpoint``, else ``RUN/base`` when written."""
    if train_config["model"].get("checkpoint"):
        return os.fspath(train_config["model"]["checkpoint"])
    base = storage_path(run_dir) / BASE_DIR
    return os.fspath(base) if is_params_checkpoint(base) else None


def _policy_step(run_dir: epath.Path) -> int | None:
    policy = run_dir / POLICY_DIR
    if not is_params_checkpoint(policy):
        return None
    return read_meta(policy).get("source", {}).get("step")


def restore_run_policy(run_dir: str | os.PathLike, step: int | None = None, mesh: Mesh | None = None,
                       dtype=None) -> tuple[dict, DenoiserConfig, int]:
    """``(params, cfg, step)`` of the policy of a run at ``step`` (default: the latest saved step).

    Args:
      run_dir: a ``gdsd-jax train`` output directory.
      step: a saved train-state step; None takes the latest (or ``policy/`` if no train state is left).
      mesh: place the parameters with ``param_shardings(cfg, mesh)``; None: the first local device.
      dtype: parameter dtype (default: the base's). Full fine-tuning casts the trained weights (fp32 master
        weights survive ``dtype="float32"``); LoRA merges the adapters into the base in this dtype.
    Returns:
      Full parameters, the model config (``param_dtype`` set to theirs), and the step they belong to.
    """
    run = storage_path(run_dir, absolute=True)
    ckpt_dir = run / CHECKPOINTS_DIR
    ck = RunCheckpointer(ckpt_dir, async_save=False) if ckpt_dir.is_dir() else None
    try:
        steps = ck.all_steps() if ck is not None else []
        if step is None:
            step = max(steps) if steps else _policy_step(run)
            if step is None:
                raise FileNotFoundError(f"{run}: no train state under {CHECKPOINTS_DIR}/ and no {POLICY_DIR}/; "
                                        f"expected a gdsd-jax train output directory")
        # policy/ is in the base's dtype: another dtype is rebuilt from the train state when it is kept.
        if _policy_step(run) == step and (dtype is None or step not in steps):
            params, cfg = restore_params(run / POLICY_DIR, mesh=mesh, dtype=dtype)
            return params, cfg, step
        if step not in steps:
            raise FileNotFoundError(f"{run}: no saved step {step}; saved steps: {sorted(steps)}"
                                    + (f", policy/ (step {_policy_step(run)})" if _policy_step(run) else ""))
        meta = ck.read_meta(step)
        cfg = DenoiserConfig.from_dict(meta["model_config"])
        if dtype is not None:
            cfg = cfg.replace(param_dtype=dtype_name(dtype))
        return _merge_from_state(run, ck, step, meta, cfg, mesh), cfg, step
    finally:
        if ck is not None:
            ck.close()


def _merge_from_state(run: epath.Path, ck: RunCheckpointer, step: int, meta: dict, cfg: DenoiserConfig,
                      mesh: Mesh | None) -> dict:
    """Full parameters (in ``cfg.param_dtype``) from a saved train state: the trained weights, or the base
    with the adapters merged."""
    from gdsd_jax.models.denoiser import param_shardings

    lora = meta["config"]["lora"]
    if not lora["enabled"]:
        trainable = ck.restore_trainable(step, param_shardings(cfg, mesh) if mesh is not None else None)
        return jax.tree.map(lambda x: x.astype(cfg.params_dtype), trainable)
    from gdsd_jax.models.loading import load_denoiser
    from gdsd_jax.rl.lora import lora_scale, lora_shardings, merge_lora

    base_path = run_base_checkpoint(run, meta["config"])
    if base_path is None:
        raise FileNotFoundError(f"{run}: the LoRA base is neither model.checkpoint nor {BASE_DIR}/ (a run written "
                                f"before base weights were kept); only {POLICY_DIR}/ can be loaded")
    base = load_denoiser(base_path, mesh=mesh, dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype).params()
    adapters = ck.restore_trainable(
        step, lora_shardings(cfg, lora["rank"], lora["targets"], mesh) if mesh is not None else None)
    return merge_lora(base, adapters, lora_scale(lora["rank"], lora["alpha"]))


def run_config(run_dir: str | os.PathLike) -> dict:
    """The run config (``RUN/config.json``) of a run directory."""
    path = storage_path(run_dir) / RUN_CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; expected a gdsd-jax train output directory")
    return json.loads(path.read_text())


def tokenizer_source(path: str | os.PathLike) -> str:
    """Where the tokenizer of a model path lives: for a run directory, the run's ``model.tokenizer`` or
    ``model.checkpoint`` when it names one; otherwise the path itself."""
    if not is_run_dir(path):
        return os.fspath(path)
    model = run_config(path)["model"]
    return os.fspath(model.get("tokenizer") or model.get("checkpoint") or path)
