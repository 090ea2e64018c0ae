"""Params checkpoints: the denoiser's params tree as an Orbax checkpoint plus its :class:`DenoiserConfig`.

Directory layout::

    CKPT/
      gdsd_checkpoint.json   format tag, DenoiserConfig, leaf shapes/dtypes/digests   (written last: the "valid" mark)
      params/                Orbax (v1 API) pytree checkpoint of the params tree
      hf_config.json         optional: upstream config.json the weights came from (used by export)
      hf_files/              optional: small upstream side files (tokenizer, remote code, generation config)

Writing is leaf by leaf (``orbax.checkpoint.v1.partial``) so the host never holds more than one leaf plus
Orbax's staging copy of it, whatever the model size; everything goes to a hidden sibling directory that
is renamed onto ``CKPT`` only when complete, so a failed or interrupted save never leaves anything that
looks valid. Restoring takes target shardings (``param_shardings(cfg, mesh)``), so a checkpoint written
from one mesh (or from host NumPy arrays by the converter) restores straight onto any other mesh.

Every leaf's save-time digest (:func:`gdsd_jax.checkpoint.integrity.state_digests`) is recorded in
``gdsd_checkpoint.json``; :func:`restore_params` and :func:`load_leaf_numpy` compare what they read with it, so
a damaged checkpoint is refused (:class:`~gdsd_jax.checkpoint.integrity.CheckpointIntegrityError`), never
used. Checkpoints written before digests were recorded must at least be finite.

Remote paths (``gs://...``) have no atomic directory rename: there the data are written in place (an
existing checkpoint is deleted first when overwriting) and the ``gdsd_checkpoint.json`` mark still comes
last, so an interrupted save is never mistaken for a complete one.

This module also holds the storage-path helpers every run output goes through (:func:`storage_path`):
local paths and ``gs://`` URLs become ``etils.epath.Path`` objects, and a ``gs://`` path whose filesystem
packages are missing fails at once with the packages to install, instead of deep inside a save.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import v1 as ocp
from orbax.checkpoint.options import AtomicityMode

from gdsd_jax.checkpoint.integrity import CheckpointIntegrityError, check_digests, state_digests
from gdsd_jax.models.config import DenoiserConfig, dtype_from_name
from gdsd_jax.models.denoiser import abstract_params, param_shapes

FORMAT = "gdsd-jax/params"
VERSION = 1
META_FILE = "gdsd_checkpoint.json"
PARAMS_DIR = "params"
HF_CONFIG_FILE = "hf_config.json"
HF_FILES_DIR = "hf_files"

#: Orbax storage chunks are capped at this many bytes so that restoring onto a mesh reads only (roughly)
#: the bytes each device needs instead of whole multi-GB leaves.
CHUNK_BYTES = 64 * 1024 * 1024


def dtype_name(dtype) -> str:
    """Canonical name ``"float32"`` / ``"bfloat16"`` of a dtype or a dtype name (``"bf16"``, ``jnp.float32``...)."""
    if isinstance(dtype, str):
        dt = dtype_from_name(dtype)
    else:
        dt = dtype
    name = np.dtype(dt).name
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"parameter dtype {name!r} not supported; expected float32 or bfloat16")
    return name


def _leaves(tree: Mapping, prefix: tuple[str, ...] = ()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _nest(path: tuple[str, ...], value) -> dict:
    out = value
    for k in reversed(path):
        out = {k: out}
    return out


# ---- storage paths -------------------------------------------------------------------------------

#: Remote URL schemes run outputs and checkpoints may use. ``gs://`` only: Orbax writes array data through
#: TensorStore, whose only remote driver Orbax selects from a path is GCS (other schemes would be taken
#: for relative local paths).
REMOTE_SCHEMES: tuple[str, ...] = ("gs",)


class StorageBackendError(RuntimeError):
    """A remote path was given but the packages that read and write it are not installed."""


def is_remote(path) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return "://" in os.fspath(path)


def _module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):   # a missing parent package ("google" of "google.cloud.storage")
        return False


def _fsspec_protocol_available(protocol: str) -> bool:
    """Whether fsspec can build a filesystem for ``protocol`` (its implementation package imports)."""
    try:
        import fsspec  # lazy: only remote (gs://) paths need it, and it may not be installed

        fsspec.get_filesystem_class(protocol)
        return True
    except (ImportError, ValueError):
        return False


def missing_storage_packages(scheme: str) -> list[str]:
    """Packages (pip names) that a ``scheme://`` path needs and that are not importable here.

    ``gs://``: ``etils.epath`` (Orbax's directory operations, our JSON/metrics files) reads and writes through
    fsspec's GCS filesystem, i.e. ``gcsfs`` (or TensorFlow's ``tf.io.gfile`` when TensorFlow is installed);
    Orbax deletes old checkpoints there with ``google-cloud-storage`` (it asks the bucket for hierarchical
    namespaces). The array data go through TensorStore's built-in GCS driver, which needs nothing more.
    """
    if scheme != "gs":
        raise ValueError(f"unsupported storage scheme {scheme!r}://; expected a local path or one of "
                         f"{', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    missing = []
    if not (_fsspec_protocol_available("gcs") or _module_available("tensorflow")):
        missing.append("gcsfs")
    if not _module_available("google.cloud.storage"):
        missing.append("google-cloud-storage")
    return missing


def check_storage(path) -> None:
    """Raise a clear error when ``path`` is a URL of an unsupported scheme or its packages are missing."""
    if not is_remote(path):
        return
    scheme = os.fspath(path).split("://", 1)[0]
    if scheme not in REMOTE_SCHEMES:
        raise ValueError(f"{path}: unsupported storage scheme {scheme!r}://; run outputs and checkpoints go to a "
                         f"local path or to {', '.join(s + '://' for s in REMOTE_SCHEMES)}")
    missing = missing_storage_packages(scheme)
    if missing:
        raise StorageBackendError(
            f"{path}: writing to {scheme}:// needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'}"
            f" not installed; install them with pip install \"gdsd-jax[gcs]\" (or pip install {' '.join(missing)})")


def storage_path(path, *, absolute: bool = False) -> epath.Path:
    """``etils.epath.Path`` of a local path or a ``gs://`` URL, checked with :func:`check_storage`.

    Args:
      path: a local path (str or path-like) or a ``gs://bucket/...`` URL.
      absolute: make a local path absolute (Orbax and TensorStore require absolute local paths); URLs are
        absolute already.
    """
    check_storage(path)
    if is_remote(path):
        return epath.Path(os.fspath(path))
    return epath.Path(os.path.abspath(os.fspath(path))) if absolute else epath.Path(path)


def _resolved(path) -> epath.Path:
    """Orbax wants absolute local paths; remote (``gs://``) paths pass through."""
    return storage_path(path, absolute=True)


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def is_params_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete params checkpoint written by this module."""
    p = storage_path(path)
    meta = p / META_FILE
    if not meta.exists() or not (p / PARAMS_DIR).exists():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def read_meta(path: str | os.PathLike) -> dict:
    """The ``gdsd_checkpoint.json`` of a checkpoint (clear errors when missing or corrupt)."""
    p = storage_path(path)
    meta_path = p / META_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"{p}: not a gdsd-jax params checkpoint (no {META_FILE}; an interrupted "
                                f"save leaves none)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path}: corrupt checkpoint metadata ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if int(meta.get("version", 0)) > VERSION:
        raise ValueError(f"{meta_path}: checkpoint version {meta.get('version')} is newer than this code "
                         f"(reads up to {VERSION})")
    return meta


def read_config(path: str | os.PathLike) -> DenoiserConfig:
    return DenoiserConfig.from_dict(read_meta(path)["config"])


def read_hf_config(path: str | os.PathLike) -> dict | None:
    p = storage_path(path) / HF_CONFIG_FILE
    return json.loads(p.read_text()) if p.exists() else None


class ParamsWriter:
    """Write a params checkpoint leaf by leaf; commit on success, remove everything on failure.

    Usage::

        with ParamsWriter(out, cfg, hf_config=...) as w:
            for path, array in leaves:        # any order, each leaf once
                w.write(path, array)          # path like ("layers", "q")
        # out/ now exists and is complete; on an exception nothing is left behind

    Arrays may be NumPy arrays (host) or ``jax.Array`` (sharded or not). Every process of a multi-host
    run must make the same calls.
    """

    def __init__(self, path: str | os.PathLike, cfg: DenoiserConfig, *, hf_config: Mapping | None = None,
                 overwrite: bool = False, source: Mapping | None = None):
        self.cfg = cfg
        self.source = dict(source) if source is not None else None
        self.remote = is_remote(path)
        self.final = storage_path(path) if self.remote else Path(path).absolute()
        if self.final.exists() and not overwrite:
            raise FileExistsError(f"{self.final} already exists; choose another output or allow overwriting")
        self.tmp = self.final if self.remote else self.final.parent / f".{self.final.name}.partial"
        self.expected = {p: tuple(s) for p, s in _leaves(param_shapes(cfg))}
        self.written: dict[tuple[str, ...], dict] = {}
        self.hf_config = dict(hf_config) if hf_config is not None else None
        self._done = False
        if jax.process_index() == 0:
            if not self.remote:
                self.final.parent.mkdir(parents=True, exist_ok=True)
                if self.tmp.exists():  # leftover of an interrupted save
                    shutil.rmtree(self.tmp)
            elif self.final.exists():  # remote and overwrite: no atomic rename there, replace in place
                self.final.rmtree()
            self.tmp.mkdir(parents=True, exist_ok=True)
        _barrier("gdsd_params_writer_init")
        self._ctx = ocp.Context()
        self._ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
        if self.remote:
            # Orbax's default on GCS (a commit file, no rename) does not support partial (leaf by leaf)
            # saves; its rename-based protocol does.
            self._ctx.atomicity.mode = AtomicityMode.ATOMIC_RENAME

    @property
    def directory(self):
        """The directory being written (hidden until commit); side files may be added there."""
        return self.tmp

    def write(self, path: tuple[str, ...], array: Any) -> None:
        path = tuple(path)
        if path not in self.expected:
            raise KeyError(f"params leaf {'/'.join(path)!r} is not part of a {self.cfg.family} model; expected "
                           f"one of {sorted('/'.join(p) for p in self.expected)}")
        if path in self.written:
            raise ValueError(f"params leaf {'/'.join(path)!r} written twice")
        if tuple(array.shape) != self.expected[path]:
            raise ValueError(f"params leaf {'/'.join(path)!r}: shape {tuple(array.shape)}, expected "
                             f"{self.expected[path]}")
        with self._ctx:
            ocp.partial.save(self.tmp / PARAMS_DIR, _nest(path, array))
        (digest,) = state_digests(_nest(path, array))[0].values()
        self.written[path] = {"shape": list(array.shape), "dtype": np.dtype(array.dtype).name, "digest": digest}

    def commit(self) -> Path:
        missing = sorted("/".join(p) for p in self.expected if p not in self.written)
        if missing:
            raise ValueError(f"params checkpoint incomplete: leaves {missing} were never written")
        with self._ctx:
            ocp.partial.finalize(self.tmp / PARAMS_DIR)
        if jax.process_index() == 0:
            if self.hf_config is not None:
                (self.tmp / HF_CONFIG_FILE).write_text(json.dumps(self.hf_config, indent=2) + "\n")
            meta = {"format": FORMAT, "version": VERSION, "config": self.cfg.to_dict(),
                    "leaves": {"/".join(p): v for p, v in sorted(self.written.items())}}
            if self.source is not None:
                meta["source"] = self.source
            (self.tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            if not self.remote:
                old = None
                if self.final.exists():
                    old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
                    os.rename(self.final, old)
                os.rename(self.tmp, self.final)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
        _barrier("gdsd_params_writer_commit")
        self._done = True
        return self.final

    def abort(self) -> None:
        if self._done:
            return
        # Orbax's pending partial saves live inside the hidden directory, so one removal cleans up all.
        if jax.process_index() == 0 and not self.remote and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def save_params(path: str | os.PathLike, params: Mapping, cfg: DenoiserConfig, *,
                hf_config: Mapping | None = None, overwrite: bool = True, source: Mapping | None = None,
                side_files: Sequence[str | os.PathLike] = (), dtype=None) -> Path:
    """Save a params tree (NumPy or ``jax.Array`` leaves, any sharding) with its config. Returns the path.

    Args:
      hf_config: the upstream ``config.json`` the weights descend from (kept for export).
      source: provenance recorded under ``"source"`` in ``gdsd_checkpoint.json`` (e.g. run directory, step).
      side_files: small upstream files (tokenizer, remote code) copied into ``hf_files/`` before the commit.
      dtype: cast floating-point leaves to this dtype while writing (``cfg.param_dtype`` is set to it).
    """
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype_name(dtype))
    target = np.dtype(dtype_from_name(cfg.param_dtype))
    with ParamsWriter(path, cfg, hf_config=hf_config, overwrite=overwrite, source=source) as w:
        for leaf_path, arr in _leaves(params):
            if jnp.issubdtype(arr.dtype, jnp.floating) and arr.dtype != target:
                arr = arr.astype(target)
            w.write(leaf_path, arr)
            del arr
        if side_files and jax.process_index() == 0:
            side = epath.Path(w.directory) / HF_FILES_DIR
            side.mkdir(parents=True, exist_ok=True)
            for f in side_files:
                f = storage_path(f)
                f.copy(side / f.name, overwrite=True)
    return w.final


def _check_leaves(path, meta: dict, cfg: DenoiserConfig, wanted) -> None:
    stored = meta.get("leaves", {})
    expected = {"/".join(p): tuple(s) for p, s in _leaves(param_shapes(cfg))}
    for name in wanted:
        if name not in stored:
            raise ValueError(f"{path}: checkpoint has no leaf {name!r} (has {sorted(stored)})")
        if tuple(stored[name]["shape"]) != expected[name]:
            raise ValueError(f"{path}: leaf {name!r} has shape {tuple(stored[name]['shape'])}, but the "
                             f"checkpoint's config implies {expected[name]}")


def restore_params(path: str | os.PathLike, mesh: jax.sharding.Mesh | None = None, dtype=None
                   ) -> tuple[dict, DenoiserConfig]:
    """Restore ``(params, cfg)``.

    Args:
      path: a checkpoint directory written by :func:`save_params` / the converter.
      mesh: restore every leaf with ``param_shardings(cfg, mesh)``; None puts the whole tree on the first
        local device.
      dtype: parameter dtype override (``"bf16"``, ``"float32"``, ``jnp.bfloat16``...); Orbax casts while
        reading. ``cfg.param_dtype`` is updated accordingly.
    """
    meta = read_meta(path)
    stored = DenoiserConfig.from_dict(meta["config"])
    cfg = stored.replace(param_dtype=dtype_name(dtype)) if dtype is not None else stored
    _check_leaves(path, meta, cfg, ["/".join(p) for p, _ in _leaves(param_shapes(cfg))])
    # Read in the stored dtype (what the digests describe), checked, then cast where another one was asked.
    if mesh is not None:
        target = abstract_params(stored, mesh)
    else:
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                              abstract_params(stored))
    params = _load(path, target)
    check_digests(params, _saved_digests(meta), where=str(path))
    if cfg.param_dtype != stored.param_dtype:
        _cast_floating(params, np.dtype(dtype_from_name(cfg.param_dtype)))
    return params, cfg


def _load(path, target: Any) -> Any:
    """``ocp.load`` of the params item; whatever Orbax / TensorStore raise on damaged files becomes one
    :class:`CheckpointIntegrityError` naming the checkpoint."""
    try:
        return ocp.load(_resolved(path) / PARAMS_DIR, target)
    except Exception as e:  # noqa: BLE001
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointIntegrityError(f"unreadable ({type(e).__name__}: {first})", where=str(path)) from e


def _saved_digests(meta: dict) -> dict[str, str] | None:
    """``{leaf path: digest}`` recorded at save time; None for a checkpoint written before digests existed."""
    leaves = meta.get("leaves", {})
    if not leaves or not all("digest" in v for v in leaves.values()):
        return None
    return {name: v["digest"] for name, v in leaves.items()}


def _cast_floating(tree: dict, dtype: np.dtype) -> None:
    """Cast the floating-point leaves of a nested dict in place, one at a time (one extra leaf in memory)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            _cast_floating(value, dtype)
        elif jnp.issubdtype(value.dtype, jnp.floating) and value.dtype != dtype:
            tree[key] = value.astype(dtype)
            del value


def load_leaf_numpy(path: str | os.PathLike, leaf: tuple[str, ...], meta: dict | None = None) -> np.ndarray:
    """Read one leaf into host memory as a NumPy array in its stored dtype (used by export)."""
    meta = read_meta(path) if meta is None else meta
    name = "/".join(leaf)
    info = meta.get("leaves", {}).get(name)
    if info is None:
        raise ValueError(f"{path}: checkpoint has no leaf {name!r}")
    dt = dtype_from_name(info["dtype"]) if info["dtype"] in ("float32", "bfloat16") else np.dtype(info["dtype"])
    # np.empty only reserves address space: the template costs no resident memory.
    template = _nest(leaf, np.empty(tuple(info["shape"]), dt))
    ctx = ocp.Context()
    ctx.pytree.loading.partial_load = True
    with ctx:
        out = _load(path, template)
    saved = _saved_digests(meta)
    check_digests(out, None if saved is None else {name: saved[name]}, where=str(path))
    for k in leaf:
        out = out[k]
    return np.asarray(out)
