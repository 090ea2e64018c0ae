"""Where a run's metrics go besides metrics.jsonl: Weights & Biases (offline here), and the diagnostics figure."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from gdsd_jax.config_io import ConfigError, load_config
from gdsd_jax.training.config import TrainConfig
from tests.test_rl_trainer import REPO

CONFIG = REPO / "configs/sudoku_tiny.yaml"


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` file: a 7-byte file header (``:W&B``, magic, version), then the LevelDB log
    format: 32 KiB blocks of chunks, each with a 7-byte header (CRC32C, length, type: 1 full, 2 first, 3 middle,
    4 last); a block's tail shorter than a header is padding."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, out, chunk = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        kind = data[pos + 6] if left >= 7 else 0
        if kind == 0:
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(chunk)
            chunk = b""
    return out


def _key(item) -> str:
    """A history or config item's name (W&B stores it in ``key`` or, split at dots, in ``nested_key``)."""
    return item.key or ".".join(item.nested_key)


def test_wandb_logging_is_off_by_default_and_needs_the_package(monkeypatch):
    assert load_config(TrainConfig, CONFIG, []).logging.wandb is False
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"logging\.wandb=true needs the wandb package: pip install 'gdsd-jax\[wandb\]'"):
        load_config(TrainConfig, CONFIG, ["logging.wandb=true"]).validate()


def test_wandb_offline_run_holds_every_record_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the optional wandb package (pip install 'gdsd-jax[wandb]') is not installed")
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    from gdsd_jax.training.metrics import MetricsLogger, wandb_settings

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "my_run"
    cfg = load_config(TrainConfig, CONFIG, ["logging.wandb=true", "logging.wandb_project=tiny"]).validate()
    settings = wandb_settings(cfg, run, "run0001")
    assert (settings["project"], settings["name"], settings["id"], settings["dir"]) == ("tiny", "my_run", "run0001",
                                                                                      str(run))
    logger = MetricsLogger(run, tensorboard=False, wandb=settings)
    logger.log(0, {"test_reward": 0.25, "test_accuracy": 0.0})
    logger.log(1, {"reward_mean": 0.5, "loss": 1e-3, "lr": 3e-4, "note": "text is not a metric"})
    logger.log(2, {"reward_mean": 0.75, "loss": 2e-3, "lr": 1e-4})
    logger.log(2, {"test_reward": 0.5, "test_accuracy": 0.125})           # the final evaluation, same step
    logger.close()

    (path,) = (run / "wandb").glob("offline-run-*/run-run0001.wandb")
    # W&B's service process may still be writing the file when finish() returns: wait for its exit record.
    deadline = time.monotonic() + 60
    while True:
        records = []
        for raw in _wandb_records(path):
            record = wandb_internal_pb2.Record()
            try:
                record.ParseFromString(raw)
            except DecodeError:          # a record still being written: read the file again
                break
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    history, config = [], None
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {_key(item): json.loads(item.value_json) for item in record.history.item}
            history.append({k: v for k, v in row.items() if k not in ("_runtime", "_timestamp")})
        elif kind == "run":
            config = {_key(item): json.loads(item.value_json) for item in record.run.config.update}
    assert history == [{"_step": 0, "test_reward": 0.25, "test_accuracy": 0.0},
                       {"_step": 1, "reward_mean": 0.5, "loss": 1e-3, "lr": 3e-4},
                       {"_step": 2, "reward_mean": 0.75, "loss": 2e-3, "lr": 1e-4, "test_reward": 0.5,
                        "test_accuracy": 0.125}]
    assert config["objective"]["psi"] == 0.1 and config["logging"]["wandb_project"] == "tiny"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 1, 2, 2]                     # metrics.jsonl is unchanged by W&B


def _records() -> list[dict]:
    return [{"step": 0, "test_reward": 0.5}] + [
        {"step": s, "reward_mean": 0.4 + 0.01 * s, "loss": 1e-3 / s, "lr": 3e-4, "mean_abs_delta": 0.05,
         "inside_clip_frac": 1.0, "grad_norm": 0.1, "time_generation": 0.2, "time_update": 0.1} for s in (1, 2, 3)]


@pytest.mark.parametrize("clip_mode, beta, want", [
    ("none", 0.0, ["mean_abs_delta", "grad_norm"]),
    ("sequence", 0.0, ["mean_abs_delta", "inside_clip_frac", "grad_norm"]),
    ("sequence", 0.01, ["mean_abs_delta", "inside_clip_frac", "grad_norm"]),     # kl not logged: not plotted
])
def test_diagnostics_show_only_what_the_objective_uses(clip_mode, beta, want):
    from gdsd_jax.experiments.plots import diagnostic_keys

    objective = {"name": "gdsd", "psi": 1.0, "beta": beta, "clip_mode": clip_mode, "epsilon_low": 4e-4}
    assert diagnostic_keys(_records(), objective) == want
    assert diagnostic_keys(_records(), {"name": "spg"}) == ["mean_abs_delta", "grad_norm"]     # no clip band
    assert diagnostic_keys(_records(), None) == ["mean_abs_delta", "inside_clip_frac", "grad_norm"]


def test_plot_writes_both_figures_of_a_run(tmp_path):
    from gdsd_jax.experiments.plots import plot_run

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records()))
    (tmp_path / "config.json").write_text(json.dumps({"objective": {"name": "gdsd", "clip_mode": "none"}}))
    paths = plot_run(tmp_path)
    assert [Path(p).name for p in paths] == ["reward.png", "diagnostics.png"]
    for path in paths:
        data = Path(path).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
