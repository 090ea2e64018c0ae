"""Orbax checkpoints of a training run: state pytree + JSON metadata.

One checkpoint step holds two items:

* ``state``: the training state pytree (trainable parameters or LoRA adapters, optimizer state, step,
  RNG key data) saved with ``StandardSave`` and restored onto the target shardings, so a run can resume on
  a different mesh;
* ``meta``: JSON with the run config, counters, the best eval reward so far and the index iterator's state
  (``data_state``: the data resume with exactly the next batch; the iterator is never fast-forwarded).

Saves are asynchronous (``async_save``); :meth:`RunCheckpointer.wait` blocks until they are durable.
Every process of a multi-host run calls save and restore (Orbax synchronises them).

The directory is a local path or a ``gs://`` URL (``etils.epath``; see
:func:`gdsd_jax.checkpoint.params_io.storage_path` for the packages a bucket needs). On GCS Orbax marks a
finished step with a ``commit_success.txt`` file instead of renaming a temporary directory.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from gdsd_jax.checkpoint.params_io import storage_path


class RunCheckpointer:
    """Keeps the last ``keep`` checkpoints (plus the best one by eval reward when ``keep_best``)."""

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, keep_best: bool = False,
                 async_save: bool = True):
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
        metrics = {"eval_reward": eval_reward} if eval_reward is not None else None
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """Restore ``state`` onto the shardings of ``abstract_state``; returns ``(state, meta)``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {self.directory}")
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))
        return out["state"], out["meta"]

    def restore_on_one_device(self, step: int | None = None) -> Any:
        """The ``state`` item on this process's first device, whatever topology wrote it (inspection,
        export, tests). Training resumes use :meth:`restore` with the target shardings instead."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        tree = self._mngr.item_metadata(step)["state"]
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), tree)
        return self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStruct tree (with shardings) of a concrete pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
