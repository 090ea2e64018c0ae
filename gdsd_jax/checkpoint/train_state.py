"""Orbax checkpoints of a training run: state pytree + JSON metadata.

One checkpoint step holds two items:

* ``state``: the training state pytree (trainable parameters or LoRA adapters, optimizer state, step,
  RNG key data) saved with ``StandardSave`` and restored onto the target shardings, so a run can resume on
  a different mesh;
* ``meta``: JSON with the run config, counters, the best eval reward so far and the index iterator's state
  (``data_state``: the data resume with exactly the next batch; the iterator is never fast-forwarded), plus
  ``integrity``: the save-time digest of every state array and of the rest of ``meta``
  (:mod:`gdsd_jax.checkpoint.integrity`), committed with the step.

A state with a NaN or inf is never saved. :meth:`RunCheckpointer.restore` checks the restored arrays and
metadata against the save-time digests, and :meth:`RunCheckpointer.restore_newest_intact` falls back from a
step that fails (corrupted, truncated or missing files, or a mismatch) to the newest step that passes,
moving the rejected steps aside to ``<directory>.rejected/`` so that the run can write those step numbers
again.

Saves are asynchronous (``async_save``); :meth:`RunCheckpointer.wait` blocks until they are durable.
Every process of a multi-host run calls save and restore (Orbax synchronises them).

The directory is a local path or a ``gs://`` URL (``etils.epath``; see
:func:`gdsd_jax.checkpoint.params_io.storage_path` for the packages a bucket needs). On GCS Orbax marks a
finished step with a ``commit_success.txt`` file instead of renaming a temporary directory.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from gdsd_jax.checkpoint.integrity import CheckpointIntegrityError, check_digests, meta_digest, state_digests
from gdsd_jax.checkpoint.params_io import is_remote, storage_path
from gdsd_jax.distributed.multihost import host_allgather

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Restored:
    """The outcome of :meth:`RunCheckpointer.restore_newest_intact`.

    ``rejected`` lists the newer steps that failed, newest first, as ``(step, reason, where it was moved)``.
    """
    step: int
    state: Any
    meta: dict
    rejected: list[tuple[int, str, str]]


def _root_cause(e: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of the innermost exception behind ``e`` (Orbax wraps the specific TensorStore or
    file error in generic ones), without TensorStore's spec dump, at most ``limit`` characters."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    lines = str(e).strip().splitlines()
    text = lines[0].split(" [tensorstore_spec")[0] if lines else ""
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def written_bytes(state: Any) -> int:
    """Bytes of array data this process writes when it saves ``state``: the first replica of each of its
    shards (Orbax writes one copy of a replicated array)."""
    total = 0
    for leaf in jax.tree.leaves(state):
        if isinstance(leaf, jax.Array):
            total += sum(s.data.nbytes for s in leaf.addressable_shards if s.replica_id == 0)
        else:
            total += np.asarray(leaf).nbytes
    return total


def _on_every_process(ok: bool) -> bool:
    """True when ``ok`` holds on every process (all processes then take the same branch)."""
    return bool(np.all(host_allgather(np.asarray([ok]))))


class RunCheckpointer:
    """Keeps the last ``keep`` checkpoints (plus the best one by eval reward when ``keep_best``)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, keep_best: bool = False,
                 async_save: bool = True):
        if keep < 1:
            raise ValueError(f"keep={keep}: at least the newest checkpoint must be kept")
        self.directory = storage_path(directory, absolute=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            best_fn=(lambda m: m.get("eval_reward", float("-inf"))) if keep_best else None,
            best_mode="max",
            keep_checkpoints_without_metrics=True,
        )
        self._mngr = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
            options=options)

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, eval_reward: float | None = None,
             force: bool = True) -> None:
        """Save ``state`` and ``meta`` (JSON) as ``step``, with the digests that :meth:`restore` checks.

        Raises ValueError, and writes nothing, if ``state`` holds a NaN or inf; OSError (ENOSPC), and writes
        nothing, if a local disk has less free space than the arrays take.
        """
        digests, nonfinite = state_digests(state)
        if nonfinite:
            raise ValueError(f"refusing to save checkpoint step {step} in {self.directory}: non-finite values in "
                             f"{', '.join(nonfinite)}")
        self._check_free_space(step, state)
        meta = dict(meta, integrity={"state": digests, "meta": meta_digest(meta)})
        metrics = {"eval_reward": eval_reward} if eval_reward is not None else None
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

    def _check_free_space(self, step: int, state: Any) -> None:
        """Raise ``OSError(ENOSPC)``, before anything is written, when a local disk has less free space than
        the step's arrays take uncompressed. A save that fills the disk half-way fails inside Orbax's
        background writers, each of which prints a traceback of its own; the checkpoints already written stay
        intact either way. Remote storage is not checked."""
        if is_remote(self.directory):
            return
        need = written_bytes(state)
        existing = os.fspath(self.directory)
        while not os.path.exists(existing):        # the directory itself may not be created yet
            existing = os.path.dirname(existing)
        free = shutil.disk_usage(existing).free
        if not _on_every_process(free >= need):
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (checkpoint step {step} needs "
                          f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free)",
                          os.fspath(self.directory / str(step)))

    def _read(self, step: int, items: dict) -> dict:
        """Orbax restore of ``items``; any failure to read them is a :class:`CheckpointIntegrityError`."""
        error = None
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        # Missing, truncated or garbled files surface as whatever Orbax, TensorStore or json raise (OSError,
        # ValueError, KeyError, JSONDecodeError, ...): all of them mean this step cannot be used.
        except Exception as e:  # noqa: BLE001
            error = e
        if not _on_every_process(error is None):
            why = _root_cause(error) if error else "on another process"
            raise CheckpointIntegrityError(f"unreadable ({why})", step) from error
        return out

    @staticmethod
    def _checked_meta(step: int, meta: dict) -> tuple[dict, dict | None]:
        """``meta`` without its integrity record, after checking the record's metadata digest."""
        meta = dict(meta)
        record = meta.pop("integrity", None)
        if record is None:        # written before digests were recorded: nothing to compare with
            return meta, None
        if not isinstance(record, dict) or record.get("meta") != meta_digest(meta):
            raise CheckpointIntegrityError("its metadata differs from the save-time digest", step)
        return meta, record

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """Restore ``state`` onto the shardings of ``abstract_state``, checked
        against the save-time digests (checkpoints from before digests were recorded: checked for finite
        values). Raises :class:`CheckpointIntegrityError` naming what failed."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.directory}")
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        out = self._read(step, items)
        meta, record = self._checked_meta(step, out["meta"])
        check_digests(out["state"], None if record is None else record.get("state") or {}, step=step)
        return out["state"], meta

    def _newest(self, read: Callable[[int], T]) -> tuple[int, T, list[tuple[int, str]]]:
        """``read`` of the newest step it succeeds on, and the newer steps it failed on (newest first)."""
        failed: list[tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return step, read(step), failed
            except CheckpointIntegrityError as e:
                failed.append((step, e.reason))
        if not failed:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        raise CheckpointIntegrityError(f"no intact checkpoint in {self.directory}: " + "; ".join(
            f"step {s}: {r}" for s, r in failed))

    def newest_meta(self) -> tuple[int, dict]:
        """(step, metadata) of the newest step whose metadata reads and matches its digest."""
        step, meta, _ = self._newest(self.read_meta)
        return step, meta

    def restore_newest_intact(self, abstract_state: Any) -> Restored:
        """Restore the newest step that passes :meth:`restore`'s checks; newer steps that fail are moved to
        ``<directory>.rejected/`` (kept for inspection, and out of the way of the steps the run saves next)."""
        step, (state, meta), failed = self._newest(lambda s: self.restore(s, abstract_state))
        moved = self._set_aside([s for s, _ in failed])
        return Restored(step, state, meta, [(s, r, m) for (s, r), m in zip(failed, moved)])

    def _set_aside(self, steps: list[int]) -> list[str]:
        """Move step directories to ``<directory>.rejected/`` (process 0; every process then reloads)."""
        if not steps:
            return []
        root = self.directory.parent / f"{self.directory.name}.rejected"
        dests = []
        for step in steps:
            dest, n = root / str(step), 0
            while dest.exists():
                n += 1
                dest = root / f"{step}.{n}"
            dests.append(dest)
            if jax.process_index() == 0:
                root.mkdir(parents=True, exist_ok=True)
                (self.directory / str(step)).rename(dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("gdsd_jax:checkpoints_set_aside")
        self._mngr.reload()
        return [os.fspath(d) for d in dests]

    def restore_on_one_device(self, step: int | None = None) -> Any:
        """The ``state`` item on this process's first device, whatever topology wrote it (inspection,
        export, tests), checked against the save-time digests like :meth:`restore`. Training resumes use
        :meth:`restore` with the target shardings instead."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        record = self._integrity_record(step)
        try:
            tree = self._mngr.item_metadata(step)["state"]
            dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)
            state = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:  # noqa: BLE001 - whatever Orbax raises on damaged files: this step is unusable
            raise CheckpointIntegrityError(f"unreadable ({_root_cause(e)})", step) from e
        check_digests(state["state"], record, step=step)
        return state["state"]

    def _integrity_record(self, step: int) -> dict | None:
        """The save-time state digests of ``step`` (None for steps written before digests were recorded),
        after checking its metadata against its own digest."""
        raw = self._read(step, dict(meta=ocp.args.JsonRestore()))["meta"]
        _, record = self._checked_meta(step, raw)
        return None if record is None else record.get("state") or {}

    def restore_trainable(self, step: int, shardings: Any = None) -> Any:
        """``state["trainable"]`` of ``step`` alone (the optimizer state is not read), on ``shardings`` (a tree
        like it) or, when None, this process's first device, checked against its save-time digests (a damaged
        step raises :class:`CheckpointIntegrityError` naming it). Used to take the policy out of a run."""
        record = self._integrity_record(step)
        try:
            stored = self._mngr.item_metadata(step)["state"]["trainable"]
            if shardings is None:
                dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
                shardings = jax.tree.map(lambda _: dev, stored)
            target = {"trainable": jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s),
                                                stored, shardings)}
            args = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                          partial_restore=True)
            with ocp.PyTreeCheckpointer() as reader:
                trainable = reader.restore(self.directory / str(step) / "state", args=args)["trainable"]
        except Exception as e:  # noqa: BLE001 - whatever Orbax raises on damaged files: this step is unusable
            raise CheckpointIntegrityError(f"unreadable ({_root_cause(e)})", step) from e
        check_digests(trainable, record, step=step, prefix="trainable/")
        return trainable

    def read_meta(self, step: int | None = None) -> dict:
        """The ``meta`` item of ``step`` (default: the latest), checked against its save-time digest."""
        step = self.latest_step() if step is None else step
        return self._checked_meta(step, self._read(step, dict(meta=ocp.args.JsonRestore()))["meta"])[0]

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStruct tree (with shardings) of a concrete pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
