"""Run metrics: a JSONL file (one object per step), TensorBoard event files, optionally Weights & Biases, and
the console bar.

Only process 0 writes. On resume the JSONL is truncated to the restored step so that steps replayed
after a crash are not recorded twice. A last line cut short by a crash in the middle of a write is dropped
with a warning (when resuming and when reading the file); an unreadable line anywhere else is an error
naming the line.

The run directory may be local or a ``gs://`` URL (``etils.epath``). Object stores cannot append to an
object, so for a remote directory the logger keeps the file's lines and rewrites the whole object after
every record (a few hundred kB for a long run, small next to one RL step of a real model); locally it
appends. TensorBoard event files of a remote run are written to a local temporary directory (the log
line at start names it) and copied to ``<run>/tensorboard/`` every ``tb_sync_seconds`` and when the
logger closes; see docs/training.md. Weights & Biases (``logging.wandb``, the optional ``wandb`` package) gets
every record under its step; its local files go to ``<run>/wandb`` (a temporary directory for a remote run).
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import jax
from tqdm.auto import tqdm

from gdsd_jax.checkpoint.params_io import is_remote, storage_path


def log(msg: str) -> None:
    """One console line from process 0, printed above any progress bar."""
    if jax.process_index() == 0:
        tqdm.write(msg, file=sys.stdout)


def wandb_settings(cfg, output_dir: str | os.PathLike, run_id: str) -> dict[str, Any]:
    """Keyword arguments of ``wandb.init`` for a run config's ``logging`` section: the project, entity and name
    (default: the run directory's name), the whole run config, and ``run_id``, which a resumed run reuses so
    that it continues the same W&B run."""
    from gdsd_jax.config_io import to_dict

    lg = cfg.logging
    local = None if is_remote(output_dir) else os.fspath(storage_path(output_dir))
    return {"project": lg.wandb_project, "entity": lg.wandb_entity, "id": run_id, "resume": "allow",
            "name": lg.wandb_name or storage_path(output_dir).name, "config": to_dict(cfg),
            "dir": local or tempfile.mkdtemp(prefix="gdsd-wandb-")}


def new_wandb_id() -> str:
    """A fresh W&B run id (stored in the run's checkpoints so that a resume continues the same W&B run)."""
    import uuid

    return uuid.uuid4().hex[:16]


def _clean(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """``metrics.jsonl`` (+ TensorBoard) of a run directory; a no-op on processes other than 0.

    Args:
      output_dir: run directory, local or ``gs://``.
      tensorboard: also write TensorBoard scalars under ``<output_dir>/tensorboard``.
      filename: name of the JSONL file.
      resume_step: keep only the records up to this step of an existing file (None: start a new file).
      tb_sync_seconds: remote runs only: copy the local event files to the run directory at most this often
        (and always on :meth:`close`).
      wandb: keyword arguments of ``wandb.init`` (:func:`wandb_settings`) to also log to Weights & Biases;
        None: no W&B.
    """

    def __init__(self, output_dir: str | os.PathLike, *, tensorboard: bool = True, filename: str = "metrics.jsonl",
                 resume_step: int | None = None, tb_sync_seconds: float = 600.0,
                 wandb: Mapping[str, Any] | None = None):
        self.enabled = jax.process_index() == 0
        self.remote = is_remote(output_dir)
        self.dir = storage_path(output_dir)
        self.path = self.dir / filename
        self._tb = None
        self._tb_local: str | None = None       # remote runs: local directory the events are written to
        self._tb_sync_seconds = tb_sync_seconds
        self._tb_synced = time.monotonic()
        self._lines: list[str] = []
        self._wandb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._lines = [json.dumps(r) + "\n" for r in parse_records(self.path.read_text(), self.path)
                           if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(self._lines))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            from tensorboardX import SummaryWriter  # lazy: heavy, and only with tensorboard=True

            if self.remote:
                # tensorboardX writes remote event files through google-cloud-storage (gs://) or boto3 (s3://)
                # only, with a client of its own; a local file copied with epath works for any scheme epath
                # reads and needs no further package.
                self._tb_local = tempfile.mkdtemp(prefix="gdsd-tensorboard-")
                tqdm.write(f"tensorboard: event files go to the local directory {self._tb_local} and are copied "
                           f"to {self.dir / 'tensorboard'} every {tb_sync_seconds:.0f} s and at the end of the run",
                           file=sys.stdout)
                self._tb = SummaryWriter(self._tb_local)
            else:
                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        if wandb is not None:
            import wandb as wandb_lib  # lazy and optional: only with logging.wandb (validate checks it is installed)

            os.makedirs(wandb["dir"], exist_ok=True)
            self._wandb = wandb_lib.init(**wandb)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        if self.remote:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
        else:
            with self.path.open("a") as f:
                f.write(line)
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            if self._tb_local is not None and time.monotonic() - self._tb_synced >= self._tb_sync_seconds:
                self._sync_tensorboard()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                            step=int(step))

    def _sync_tensorboard(self) -> None:
        """Copy the local event files of a remote run to ``<run>/tensorboard/`` (whole files: they are small)."""
        self._tb.flush()
        dest = self.dir / "tensorboard"
        dest.mkdir(parents=True, exist_ok=True)
        for root, _, files in os.walk(self._tb_local):
            for name in files:
                src = os.path.join(root, name)
                target = dest / os.path.relpath(src, self._tb_local)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(src, "rb") as f:
                    target.write_bytes(f.read())
        self._tb_synced = time.monotonic()

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._tb is not None:
            self._tb.flush()
            if self._tb_local is not None:
                self._sync_tensorboard()
            self._tb.close()
            self._tb = None


def parse_records(text: str, source: Any) -> list[dict]:
    """The records (one JSON object per line) of a metrics file's ``text``; ``source`` names it in messages.

    A last line that is not a JSON object is what a crash in the middle of a write leaves: it is dropped
    with a warning. Such a line anywhere else means the file was damaged: ValueError naming the line.
    """
    lines = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for n, (i, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif n == len(lines) - 1:
            tqdm.write(f"warning: {source}, line {i}: incomplete last record (a write cut short) dropped",
                       file=sys.stderr)
        else:
            raise ValueError(f"{source}, line {i}: not a JSON record ({line[:60]!r}); only the last line may be "
                             f"incomplete (a write cut short), so the file was damaged: fix or remove that line")
    return records


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a ``metrics.jsonl`` file, or of the one in a run directory (local or ``gs://``)."""
    p = storage_path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.exists():
        raise FileNotFoundError(f"no metrics file at {p}")
    return parse_records(p.read_text(), p)
