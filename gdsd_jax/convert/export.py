"""Params checkpoint -> upstream Hugging Face layout (safetensors + ``config.json``).

The output uses the upstream tensor names, shapes and dtype, a sharded ``model.safetensors.index.json``
when the weights exceed ``max_shard_size``, and an upstream ``config.json`` (``model_type: "llada"`` with
``auto_map`` to ``configuration_llada`` / ``modeling_llada``, or ``"Dream"`` with ``configuration_dream`` /
``modeling_dream``). Side files kept at conversion (tokenizer, the remote-code ``.py`` files, generation
config) are copied back, so an export of a converted checkpoint loads with the upstream remote code.
Upstream -> params checkpoint -> export is bit-exact (same bytes per tensor) whenever no training happened
in between and the export dtype equals the stored one (or the stored values are exactly representable).

Memory: leaves are read from the Orbax checkpoint one at a time and each tensor is written as soon as it
is transposed back, so the peak is about one leaf plus one tensor.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from gdsd_jax.checkpoint.params_io import HF_FILES_DIR, load_leaf_numpy, read_hf_config, read_meta
from gdsd_jax.convert.hf_checkpoint import INDEX_FILE, SINGLE_FILE
from gdsd_jax.convert.hf_config import checkpoint_dtype, config_to_hf
from gdsd_jax.convert.names import specs_by_leaf
from gdsd_jax.convert.safetensors_io import SafetensorsWriter, copy_transposed, dtype_name
from gdsd_jax.models.config import DenoiserConfig

DEFAULT_MAX_SHARD_SIZE = "5GB"
_EXPORT_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32),
                  "float16": np.dtype(np.float16)}
_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "float": "float32", "half": "float16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units as in ``transformers``), ``"2GiB"`` -> 2**31, ints as bytes."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"bad size {size!r}; expected e.g. 5GB, 500MB, 2GiB or a number of bytes")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def _export_dtype(dtype, cfg: DenoiserConfig, hf_config: dict | None) -> str:
    if dtype is not None:
        name = _ALIASES.get(str(dtype), str(dtype)) if isinstance(dtype, str) else np.dtype(dtype).name
        if name not in _EXPORT_DTYPES:
            raise ValueError(f"export dtype {dtype!r} not supported; expected bf16, fp16 or fp32")
        return name
    if hf_config is not None and checkpoint_dtype(hf_config) in _EXPORT_DTYPES:
        return checkpoint_dtype(hf_config)
    return cfg.param_dtype


def missing_model_code(hf_dir: str | os.PathLike) -> list[str]:
    """The ``.py`` files that the ``auto_map`` of an exported directory's ``config.json`` names but that are not
    in it: without them ``AutoModel.from_pretrained(hf_dir, trust_remote_code=True)`` cannot load the model.

    Export copies the remote code kept at conversion (the upstream ``*.py`` files); a checkpoint converted from
    a directory without them, or a model trained from a preset, has none to copy.
    """
    d = Path(hf_dir)
    auto_map = json.loads((d / "config.json").read_text()).get("auto_map") or {}
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, str)]
    modules = {r.split("--")[-1].rsplit(".", 1)[0] for r in refs}
    return sorted(f"{m}.py" for m in modules if not (d / f"{m}.py").is_file())


def plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Group consecutive tensors (by index) into shards of at most ``max_bytes`` (a larger tensor alone)."""
    shards: list[list[int]] = []
    cur, cur_bytes = [], 0
    for i, n in enumerate(sizes):
        if cur and cur_bytes + n > max_bytes:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += n
    if cur:
        shards.append(cur)
    return shards


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, dtype=None, overwrite: bool = False,
                      progress: bool = True) -> Path:
    """Write the upstream layout of a params checkpoint to ``out`` (temporary name, renamed when complete).

    Args:
      checkpoint: a params checkpoint directory (``gdsd-jax convert`` / ``save_params`` output).
      out: output directory.
      max_shard_size: shard the weights (``model-0000k-of-0000n.safetensors`` + index) above this size.
      dtype: tensor dtype to write; default: the dtype of the original upstream weights when known
        (``hf_config.json``), else the checkpoint's parameter dtype.
      overwrite: replace an existing ``out``.
    """
    ckpt = Path(checkpoint)
    meta = read_meta(ckpt)
    cfg = DenoiserConfig.from_dict(meta["config"])
    hf_config = read_hf_config(ckpt)
    out_name = _export_dtype(dtype, cfg, hf_config)
    out_dt = _EXPORT_DTYPES[out_name]
    hf_out = config_to_hf(cfg, hf_config, torch_dtype=out_name)   # before any write: fails if not expressible
    max_bytes = parse_size(max_shard_size)

    specs = [s for _, _, group in specs_by_leaf(cfg) for s in group]
    sizes = [math.prod(s.hf_shape) * out_dt.itemsize for s in specs]
    shards = plan_shards(sizes, max_bytes)
    n = len(shards)
    files = [SINGLE_FILE] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    final = Path(out).absolute()
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; choose another output or allow overwriting")
    tmp = final.parent / f".{final.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        bar = tqdm(total=len(specs), desc=f"export {final.name}", unit="tensor", disable=not progress)
        leaf_path, leaf = None, None
        weight_map = {}
        for fname, idx in zip(files, shards):
            layout = [(specs[i].hf_name, dtype_name(out_dt), specs[i].hf_shape) for i in idx]
            with SafetensorsWriter(tmp / fname, layout, {"format": "pt"}) as w:
                for i in idx:
                    spec = specs[i]
                    if spec.path != leaf_path:
                        leaf = None   # free the previous leaf before reading the next
                        leaf = load_leaf_numpy(ckpt, spec.path, meta)
                        leaf_path = spec.path
                    part = leaf if spec.layer is None else leaf[spec.layer]
                    if spec.transpose:
                        arr = np.empty(spec.hf_shape, out_dt)
                        copy_transposed(arr, part.reshape(spec.hf_shape[::-1]))
                    else:
                        arr = spec.to_hf(part).astype(out_dt, copy=False)
                    w.write(spec.hf_name, arr)
                    del arr
                    weight_map[spec.hf_name] = fname
                    bar.update(1)
        bar.close()
        leaf = None
        if n > 1:
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        side = ckpt / HF_FILES_DIR
        if side.is_dir():
            for f in sorted(side.iterdir()):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        (tmp / "config.json").write_text(json.dumps(hf_out, indent=2) + "\n")
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.rename(final, old)
        os.rename(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
