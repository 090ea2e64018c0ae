"""``load_denoiser``: one entry point for upstream (Hugging Face) directories, params checkpoints and the
trained policy of a run directory."""

from __future__ import annotations

import os

import jax
from jax.sharding import Mesh

from gdsd_jax.models.denoiser import Denoiser


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
    from gdsd_jax.checkpoint.params_io import dtype_name, is_params_checkpoint, restore_params
    from gdsd_jax.checkpoint.policy import is_run_dir, restore_run_policy

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
        from gdsd_jax.convert.hf_checkpoint import HFCheckpoint, is_hf_checkpoint
        from gdsd_jax.models.denoiser import param_shardings

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
