"""Hugging Face model directory -> params tree / params checkpoint, streaming tensor by tensor.

An upstream directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json`` (whose shards interleave layers: LLaDA's first shard holds tensors of
every layer). Everything is validated from the headers before any tensor is read: unknown or missing
names, shapes and dtypes, missing shards and corrupt files all fail with the file, the tensor and what
was expected.

Memory: the stacked leaves (``layers/q`` = all layers' q kernels, ...) are filled one leaf at a time by
seeking to each of its tensors, wherever they are, and the finished leaf is handed to the consumer
(:class:`~gdsd_jax.checkpoint.params_io.ParamsWriter` for ``convert``) before the next one is allocated.
Peak host memory of a conversion is therefore about twice the largest leaf (the leaf plus the writer's
staging copy) plus one tensor, not the model size (see ``benchmarks/README.md``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gdsd_jax.checkpoint.params_io import HF_FILES_DIR, META_FILE, ParamsWriter, dtype_name, is_params_checkpoint
from gdsd_jax.convert.hf_config import checkpoint_dtype, config_from_hf, infer_family, read_config_json
from gdsd_jax.convert.names import IGNORED_SUFFIXES, TensorSpec, guess_family_from_names, name_map, specs_by_leaf
from gdsd_jax.convert.safetensors_io import (
    DTYPES,
    FLOAT_DTYPES,
    CheckpointFormatError,
    TensorInfo,
    TensorReader,
    copy_into,
    copy_transposed,
    read_header,
)
from gdsd_jax.models.config import DenoiserConfig, dtype_from_name

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: Side files (tokenizer, remote code, generation config) up to this size travel with the checkpoint.
MAX_SIDE_FILE_BYTES = 64 * 1024 * 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".npz")
_CANONICAL = {"BF16": "bfloat16", "F32": "float32", "F16": "float16", "F64": "float64"}


def is_hf_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like an upstream model directory (config.json plus safetensors weights)."""
    p = Path(path)
    return (p / "config.json").is_file() and (
        (p / INDEX_FILE).is_file() or (p / SINGLE_FILE).is_file() or any(p.glob("*.safetensors")))


def _short(names, k: int = 5) -> str:
    names = sorted(names)
    more = f" (+{len(names) - k} more)" if len(names) > k else ""
    return ", ".join(repr(n) for n in names[:k]) + more


class HFCheckpoint:
    """The tensors (from the safetensors headers) and config of one upstream model directory."""

    def __init__(self, hf_dir: str | os.PathLike, family: str | None = None):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"{self.dir}: not a directory (expected a Hugging Face model directory)")
        self.hf_config = read_config_json(self.dir)
        self.family = infer_family(self.hf_config, family)
        self.tensors: dict[str, TensorInfo] = self._discover()

    # ---- discovery ------------------------------------------------------------------------------
    def _discover(self) -> dict[str, TensorInfo]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise CheckpointFormatError(f"{index}: corrupt index (expected JSON with a 'weight_map' object "
                                            f"of tensor name -> shard file)") from None
            files: dict[str, list[str]] = {}
            for name, fname in weight_map.items():
                files.setdefault(fname, []).append(name)
            for fname, names in sorted(files.items()):
                if not (self.dir / fname).is_file():
                    raise CheckpointFormatError(
                        f"{self.dir}: missing shard {fname!r}: {INDEX_FILE} lists {len(names)} tensor(s) in it "
                        f"(e.g. {sorted(names)[0]!r}) but the file does not exist")
            paths = [self.dir / f for f in sorted(files)]
        elif (self.dir / SINGLE_FILE).is_file():
            weight_map, paths = None, [self.dir / SINGLE_FILE]
        else:
            paths = sorted(self.dir.glob("*.safetensors"))
            weight_map = None
            if not paths:
                raise CheckpointFormatError(f"{self.dir}: no weights found; expected {SINGLE_FILE} or "
                                            f"{INDEX_FILE} with its shards")
        tensors: dict[str, TensorInfo] = {}
        for path in paths:
            header, _ = read_header(path)
            for name, info in header.items():
                if name in tensors:
                    raise CheckpointFormatError(f"tensor {name!r} is stored twice: in {tensors[name].path.name} "
                                                f"and {path.name}")
                tensors[name] = info
        if weight_map is not None:
            for name, fname in weight_map.items():
                if name not in tensors or tensors[name].path.name != fname:
                    where = f"found in {tensors[name].path.name}" if name in tensors else "not found in any shard"
                    raise CheckpointFormatError(f"{self.dir / fname}: {INDEX_FILE} maps tensor {name!r} to this "
                                                f"shard, but it is {where} (corrupt or mismatched shard)")
        return tensors

    # ---- config and validation ------------------------------------------------------------------
    def stored_dtype(self) -> str:
        """Canonical name of the dtype the weights are stored in (``config.json``'s, else the tensors')."""
        declared = checkpoint_dtype(self.hf_config)
        if declared is not None:
            return declared
        names = sorted({i.dtype for i in self.tensors.values()})
        return _CANONICAL.get(names[0], names[0]) if len(names) == 1 else "float32"

    def default_param_dtype(self) -> str:
        """Parameter dtype a conversion keeps by default: bfloat16 for bf16 weights, else float32."""
        return "bfloat16" if self.stored_dtype() == "bfloat16" else "float32"

    def config(self, param_dtype: str | None = None, compute_dtype: str = "bfloat16") -> DenoiserConfig:
        return config_from_hf(self.hf_config, self.family, param_dtype=param_dtype or self.default_param_dtype(),
                              compute_dtype=compute_dtype)

    def validate(self, cfg: DenoiserConfig) -> dict[str, TensorSpec]:
        """Check names, shapes and dtypes of every tensor against ``cfg``; returns the name map."""
        specs = name_map(cfg)
        present = {n for n in self.tensors if not n.endswith(IGNORED_SUFFIXES)}
        unknown = present - set(specs)
        if unknown:
            first = self.tensors[sorted(unknown)[0]].path.name
            guess = guess_family_from_names(unknown)
            hint = (f"; these names look like a {guess} checkpoint (check --family / model_type)"
                    if guess is not None and guess != cfg.family else "")
            example = next(iter(specs))
            raise CheckpointFormatError(
                f"{self.dir}: unknown tensor name(s) {_short(unknown)} (e.g. in {first}) for a {cfg.family} "
                f"model with {cfg.num_layers} layers; expected names like {example!r}{hint}")
        missing = set(specs) - present
        if missing:
            raise CheckpointFormatError(
                f"{self.dir}: missing tensor(s) {_short(missing)}: config.json describes a {cfg.family} model "
                f"with {cfg.num_layers} layers, but no safetensors file holds them")
        declared = checkpoint_dtype(self.hf_config)
        expected_dt = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}.get(declared)
        reason = f"config.json torch_dtype={declared}"
        for name, spec in specs.items():
            info = self.tensors[name]
            if info.shape != spec.hf_shape:
                raise CheckpointFormatError(f"{info.path.name}: tensor {name!r} has shape {list(info.shape)}, "
                                            f"expected {list(spec.hf_shape)} from config.json")
            if info.dtype not in FLOAT_DTYPES:
                raise CheckpointFormatError(f"{info.path.name}: tensor {name!r} has dtype {info.dtype}, expected a "
                                            f"floating dtype ({'/'.join(FLOAT_DTYPES)})")
            if expected_dt is None:
                expected_dt, reason = info.dtype, f"the dtype of {name!r}: one dtype per checkpoint"
            elif info.dtype != expected_dt:
                raise CheckpointFormatError(f"{info.path.name}: tensor {name!r} has dtype {info.dtype}, expected "
                                            f"{expected_dt} ({reason})")
        return specs

    # ---- streaming ------------------------------------------------------------------------------
    def iter_leaves(self, cfg: DenoiserConfig, *, progress: bool = True
                    ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
        """Yield ``(leaf_path, array)`` one stacked leaf at a time, in ``cfg.param_dtype``.

        Call :meth:`validate` first. Only the current leaf (plus one tensor being transposed) is held.
        """
        target = np.dtype(dtype_from_name(cfg.param_dtype))
        total = sum(len(s) for _, _, s in specs_by_leaf(cfg))
        bar = tqdm(total=total, desc=f"convert {self.dir.name}", unit="tensor", disable=not progress)
        try:
            with TensorReader(self.tensors) as reader:
                for path, shape, specs in specs_by_leaf(cfg):
                    dest = np.empty(shape, target)
                    for spec in specs:
                        info = self.tensors[spec.hf_name]
                        slot = dest if spec.layer is None else dest[spec.layer]
                        if not spec.transpose and info.np_dtype == target:
                            reader.read(spec.hf_name, out=slot)   # bytes land in their final place
                        elif spec.transpose:
                            # [out, in] -> [in, out], then the head split is a free reshape of the slot
                            x = reader.read(spec.hf_name)
                            copy_transposed(slot.reshape(x.shape[::-1]), x)
                            del x
                        else:
                            copy_into(slot, spec.to_ours(reader.read(spec.hf_name)))
                        _check_finite(slot, info)
                        bar.update(1)
                    yield path, dest
                    del dest
        finally:
            bar.close()


def _check_finite(array: np.ndarray, info: TensorInfo, chunk: int = 1 << 24) -> None:
    """Raise naming the tensor if it holds NaN or inf (counted in chunks: no full-size boolean copy)."""
    flat = array.reshape(-1)
    bad = sum(int(np.count_nonzero(~np.isfinite(flat[i:i + chunk]))) for i in range(0, flat.size, chunk))
    if bad:
        raise CheckpointFormatError(f"{info.path.name}: tensor {info.name!r} holds {bad} non-finite value(s) "
                                    f"(NaN or inf) of {flat.size}; the weights are corrupt")


def _check_replaceable(out: Path) -> None:
    """``--overwrite`` replaces a params checkpoint (or an empty directory), never anything else."""
    if not out.exists() or is_params_checkpoint(out) or (out.is_dir() and not any(out.iterdir())):
        return
    raise FileExistsError(f"{out} exists and is not a gdsd-jax params checkpoint (no {META_FILE}); --overwrite "
                          f"replaces only a checkpoint: remove it yourself or choose another output")


def side_files(src_dir: str | os.PathLike) -> list[Path]:
    """The small upstream files of a model directory kept next to converted weights: tokenizer, remote
    code, generation config (not ``config.json``, the weights, their index or anything large)."""
    return [f for f in sorted(Path(src_dir).iterdir())
            if f.is_file() and not f.name.startswith(".") and f.name not in ("config.json", INDEX_FILE)
            and not f.name.endswith(_WEIGHT_SUFFIXES) and f.stat().st_size <= MAX_SIDE_FILE_BYTES]


def _copy_side_files(src_dir: Path, dst_dir: Path) -> list[str]:
    copied = []
    for f in side_files(src_dir):
        dst_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, dst_dir / f.name)
        copied.append(f.name)
    return copied


def load_hf_params(hf_dir: str | os.PathLike, family: str | None = None, dtype=None, *,
                   progress: bool = False) -> tuple[dict, DenoiserConfig, dict]:
    """Read an upstream directory into a host (NumPy) params tree: ``(params, cfg, hf_config)``."""
    ck = HFCheckpoint(hf_dir, family)
    cfg = ck.config(dtype_name(dtype) if dtype is not None else None)
    ck.validate(cfg)
    params: dict = {}
    for path, arr in ck.iter_leaves(cfg, progress=progress):
        node = params
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = arr
    return params, cfg, ck.hf_config


def convert_checkpoint(hf_dir: str | os.PathLike, out: str | os.PathLike, *, family: str | None = None,
                       dtype=None, overwrite: bool = False, progress: bool = True) -> Path:
    """Convert an upstream LLaDA / Dream directory into a params checkpoint at ``out``.

    Args:
      hf_dir: directory with ``config.json`` and safetensors weights.
      out: output directory; written under a hidden temporary name and renamed when complete.
      family: ``"llada"`` / ``"dream"``; inferred from ``model_type`` when None.
      dtype: parameter dtype of the checkpoint (``"bf16"`` / ``"fp32"``...), also recorded as its compute
        dtype (asking for fp32 weights means fp32 arithmetic too); default: keep bf16 weights in bf16,
        anything else in fp32, with bf16 compute.
      overwrite: replace an existing ``out`` (only after the new checkpoint is complete); only a params
        checkpoint or an empty directory is replaced.
    Returns:
      The output path.
    """
    ck = HFCheckpoint(hf_dir, family)
    cfg = ck.config(dtype_name(dtype), compute_dtype=dtype_name(dtype)) if dtype is not None else ck.config()
    ck.validate(cfg)
    if overwrite:
        _check_replaceable(Path(out))
    with ParamsWriter(out, cfg, hf_config=ck.hf_config, overwrite=overwrite) as w:
        for path, arr in ck.iter_leaves(cfg, progress=progress):
            w.write(path, arr)
            del arr
        _copy_side_files(ck.dir, Path(w.directory) / HF_FILES_DIR)
    return w.final


__all__ = ["HFCheckpoint", "convert_checkpoint", "load_hf_params", "is_hf_checkpoint", "CheckpointFormatError",
           "DTYPES"]
