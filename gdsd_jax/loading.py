"""``load_denoiser``: one entry point for upstream (Hugging Face) directories and params checkpoints.

It sits above ``models``, ``checkpoint`` and ``convert`` (it reads both formats into a model), so none of
those imports another upward (see docs/architecture.md)."""

from __future__ import annotations

import os

import jax
from jax.sharding import Mesh

from gdsd_jax.checkpoint.params_io import dtype_name, is_params_checkpoint, restore_params
from gdsd_jax.convert.hf_checkpoint import HFCheckpoint, is_hf_checkpoint
from gdsd_jax.models.denoiser import Denoiser, param_shardings


def load_denoiser(path: str | os.PathLike, mesh: Mesh | None = None, dtype=None, *, compute_dtype=None,
                  family: str | None = None, progress: bool = False) -> Denoiser:
    """Load a LLaDA / Dream denoiser.

    Args:
      path: a params checkpoint (``gdsd-jax convert`` / ``save_params`` output, recognised by its
        ``gdsd_checkpoint.json``) or an upstream Hugging Face directory (``config.json`` + safetensors).
      mesh: place every parameter with ``param_shardings(cfg, mesh)``; None: the first local device.
      dtype: parameter dtype override (``"bf16"``, ``"fp32"``, ``jnp.float32``...). Default: the checkpoint's
        (upstream directories: bf16 weights stay bf16, anything else becomes fp32).
      compute_dtype: activation/matmul dtype override (default: the config's, bf16 for converted models).
      family: ``"llada"`` / ``"dream"`` for upstream directories whose ``model_type`` is not recognised.
      progress: show a progress bar while reading upstream safetensors.
    Returns:
      A :class:`Denoiser`; ``model(tokens [B, L], attention_mask [B, L] | None) -> aligned logits [B, L, V]``.
    """
    if is_params_checkpoint(path):
        params, cfg = restore_params(path, mesh=mesh, dtype=dtype)
    else:
        if not is_hf_checkpoint(path):
            raise FileNotFoundError(
                f"{path}: neither a gdsd-jax params checkpoint (gdsd_checkpoint.json + params/) nor a Hugging "
                f"Face model directory (config.json + model.safetensors or model.safetensors.index.json)")
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
