"""``load_denoiser``: one entry point for upstream (Hugging Face) directories, params checkpoints and the
trained policy of a run directory; and the policy of a run written and read back (``write_policy``,
``restore_run_policy``; the run directory's layout is :mod:`gdsd_jax.checkpoint.policy`).

It sits above ``models``, ``checkpoint`` and ``convert`` (it reads every format into a model), so none of
those imports another upward (see docs/architecture.md)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
from etils import epath
from jax.sharding import Mesh

from gdsd_jax.checkpoint.params_io import (
    HF_FILES_DIR,
    META_FILE,
    dtype_name,
    is_params_checkpoint,
    read_hf_config,
    restore_params,
    save_params,
    storage_path,
)
from gdsd_jax.checkpoint.policy import (
    BASE_DIR,
    CHECKPOINTS_DIR,
    POLICY_DIR,
    is_run_dir,
    policy_step,
    run_base_checkpoint,
)
from gdsd_jax.checkpoint.train_state import RunCheckpointer
from gdsd_jax.convert.hf_checkpoint import HFCheckpoint, is_hf_checkpoint, side_files
from gdsd_jax.convert.hf_config import config_from_hf, read_config_json
from gdsd_jax.models.config import DenoiserConfig
from gdsd_jax.models.denoiser import Denoiser, param_shardings
from gdsd_jax.models.lora import lora_scale, lora_shardings, merge_lora


def load_denoiser(path: str | os.PathLike, mesh: Mesh | None = None, dtype=None, *, compute_dtype=None,
                  family: str | None = None, step: int | None = None, progress: bool = False) -> Denoiser:
    """Load a LLaDA / Dream denoiser.

    Args:
      path: a params checkpoint (``gdsd-jax convert`` / ``save_params`` output, recognised by its
        ``gdsd_checkpoint.json``), an upstream Hugging Face directory (``config.json`` + safetensors), or a
        ``gdsd-jax train`` run directory (its trained policy, LoRA merged; see ``step``).
      mesh: place every parameter with ``param_shardings(cfg, mesh)``; None: the first local device.
      dtype: dtype of the parameters *and* of the computation (``"bf16"``, ``"fp32"``, ``jnp.float32``...):
        asking for fp32 gives fp32 weights and fp32 arithmetic. Default: the checkpoint's parameter dtype
        (upstream directories: bf16 weights stay bf16, anything else becomes fp32) and compute dtype.
      compute_dtype: activation/matmul dtype; overrides what ``dtype`` implies (default: ``dtype`` when
        given, else the config's, bf16 for converted models).
      family: ``"llada"`` / ``"dream"`` for upstream directories whose ``model_type`` is not recognised.
      step: for a run directory, the saved train-state step (default: the latest).
      progress: show a progress bar while reading upstream safetensors.
    Returns:
      A :class:`Denoiser`; ``model(tokens [B, L], attention_mask [B, L] | None) -> aligned logits [B, L, V]``.
    """
    if compute_dtype is None and dtype is not None:
        compute_dtype = dtype
    if step is not None and not is_run_dir(path):
        raise ValueError(f"step={step} was given, but {path} is not a run directory (only a run directory "
                         f"holds several steps)")
    if is_params_checkpoint(path):
        params, cfg = restore_params(path, mesh=mesh, dtype=dtype)
    elif is_run_dir(path):
        params, cfg, _ = restore_run_policy(path, step, mesh=mesh, dtype=dtype)
    else:
        if not is_hf_checkpoint(path):
            raise FileNotFoundError(
                f"{path}: neither a gdsd-jax params checkpoint (gdsd_checkpoint.json + params/) nor a Hugging "
                f"Face model directory (config.json + model.safetensors or model.safetensors.index.json) nor a "
                f"gdsd-jax run directory (checkpoints/ or policy/)")
        ck = HFCheckpoint(path, family)
        cfg = ck.config(dtype_name(dtype) if dtype is not None else None)
        ck.validate(cfg)
        shardings = param_shardings(cfg, mesh) if mesh is not None else None
        device = jax.local_devices()[0]
        params: dict = {}
        # One host leaf at a time: it is placed (and dropped) before the next is read.
        for leaf_path, arr in ck.iter_leaves(cfg, progress=progress):
            target = shardings
            node = params
            for k in leaf_path[:-1]:
                node = node.setdefault(k, {})
                target = target[k] if target is not None else None
            target = target[leaf_path[-1]] if target is not None else device
            node[leaf_path[-1]] = jax.device_put(arr, target)
            del arr
    if compute_dtype is not None:
        cfg = cfg.replace(compute_dtype=dtype_name(compute_dtype))
    return Denoiser(cfg, params, mesh=mesh)


__all__ = ["load_denoiser"]


def peek_model_config(path: str | os.PathLike) -> DenoiserConfig | None:
    """The model config recorded in a params checkpoint or an HF ``config.json``, read without loading
    weights; None if it cannot be read cheaply (a remote path, a run directory, an unusual layout or config:
    :func:`load_denoiser` reports any problem when it reads the weights)."""
    p = Path(path)
    try:
        if (p / META_FILE).is_file():
            return DenoiserConfig.from_dict(json.loads((p / META_FILE).read_text())["config"])
        if (p / "config.json").is_file():
            return config_from_hf(json.loads((p / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


# ---- the policy of a run directory ----------------------------------------------------------------

def upstream_files(checkpoint: str | os.PathLike | None) -> tuple[dict | None, list[epath.Path]]:
    """``(config.json, side files)`` of the upstream model behind ``checkpoint`` (a params checkpoint or a
    Hugging Face directory); ``(None, [])`` for None (a preset)."""
    if not checkpoint:
        return None, []
    if is_params_checkpoint(checkpoint):
        side = storage_path(checkpoint) / HF_FILES_DIR
        return read_hf_config(checkpoint), sorted(f for f in side.iterdir() if f.is_file()) if side.is_dir() else []
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
            step = max(steps) if steps else policy_step(run)
            if step is None:
                raise FileNotFoundError(f"{run}: no train state under {CHECKPOINTS_DIR}/ and no {POLICY_DIR}/; "
                                        f"expected a gdsd-jax train output directory")
        # policy/ is in the base's dtype: another dtype is rebuilt from the train state when it is kept.
        if policy_step(run) == step and (dtype is None or step not in steps):
            params, cfg = restore_params(run / POLICY_DIR, mesh=mesh, dtype=dtype)
            return params, cfg, step
        if step not in steps:
            raise FileNotFoundError(f"{run}: no saved step {step}; saved steps: {sorted(steps)}"
                                    + (f", policy/ (step {policy_step(run)})" if policy_step(run) else ""))
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
    lora = meta["config"]["lora"]
    if not lora["enabled"]:
        trainable = ck.restore_trainable(step, param_shardings(cfg, mesh) if mesh is not None else None)
        return jax.tree.map(lambda x: x.astype(cfg.params_dtype), trainable)
    base_path = run_base_checkpoint(run, meta["config"])
    if base_path is None:
        raise FileNotFoundError(f"{run}: the LoRA base is neither model.checkpoint nor {BASE_DIR}/ (a run written "
                                f"before base weights were kept); only {POLICY_DIR}/ can be loaded")
    base = load_denoiser(base_path, mesh=mesh, dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype).params()
    adapters = ck.restore_trainable(
        step, lora_shardings(cfg, lora["rank"], lora["targets"], mesh) if mesh is not None else None)
    return merge_lora(base, adapters, lora_scale(lora["rank"], lora["alpha"]))
