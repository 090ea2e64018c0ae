"""Run outputs and checkpoints on a ``gs://`` bucket, faked offline, and the error when GCS packages are missing.

The fake bucket: fsspec's ``gcs`` protocol (what ``etils.epath`` uses for ``gs://``) is registered as a
directory filesystem rooted in ``tmp_path``, and Orbax's TensorStore key-value specs for ``gs://`` paths
are redirected to TensorStore's ``file`` driver under the same root. Everything else runs unchanged:
our epath plumbing, Orbax's GCS code path (no directory renames, ``commit_success.txt`` marks, its GCS
``rmtree`` for old steps), the remote branches of the metrics logger and params checkpoints. Not covered
here: TensorStore's GCS driver itself, gcsfs, and google-cloud-storage (Orbax asks the bucket whether it
has a hierarchical namespace before deleting old steps; the fake answers no).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from etils import epath

from tests.test_rl_trainer import tiny_cfg

BUCKET = "gs://fake-bucket"


def _local(root, url: str):
    """Where the fake bucket keeps ``url`` on disk."""
    return root / url.removeprefix("gs://")


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    from etils.epath import backend as epath_backend
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem
    from fsspec.registry import _registry as registry
    from orbax.checkpoint._src.path import gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils

    from gdsd_jax.checkpoint import params_io

    root = tmp_path / "gcs"
    root.mkdir()

    class FakeGCS(DirFileSystem):
        """``gs://bucket/key`` -> ``root/bucket/key``; listings name ``bucket/key`` like gcsfs."""
        protocol = ("gs", "gcs")
        cachable = False

        def __init__(self, *args, **kwargs):   # epath passes finalize_on_close=True for GCS
            super().__init__(path=str(root), fs=LocalFileSystem())

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            for prefix in ("gs://", "gcs://"):
                path = path.removeprefix(prefix)
            return path.rstrip("/")

    for name in ("gs", "gcs"):
        monkeypatch.setitem(registry, name, FakeGCS)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()   # epath caches one filesystem per protocol

    original_tspec = tensorstore_utils.build_kvstore_tspec

    def file_tspec(directory, *args, **kwargs):
        if str(directory).startswith("gs://"):
            directory = str(_local(root, str(directory)))
        return original_tspec(directory, *args, **kwargs)

    monkeypatch.setattr(tensorstore_utils, "build_kvstore_tspec", file_tspec)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    # google-cloud-storage is what the fake stands in for; gcsfs is found through the fsspec registry.
    available = params_io._module_available
    monkeypatch.setattr(params_io, "_module_available",
                        lambda name: name == "google.cloud.storage" or available(name))
    yield root
    epath_backend.fsspec_backend._get_filesystem.cache_clear()


def _final_trainable(run_dir):
    from gdsd_jax.checkpoint.train_state import RunCheckpointer

    ck = RunCheckpointer(run_dir)
    step = ck.latest_step()
    state = ck.restore_on_one_device(step)
    ck.close()
    return step, jax.tree.map(np.asarray, state["trainable"])


@pytest.mark.slow
def test_training_run_writes_and_resumes_in_a_bucket(fake_gcs, tmp_path, capsys):
    """One step, stop, resume to step 2 in gs://: every output lands in the bucket and the resumed run's
    parameters equal those of an uninterrupted local run."""
    from gdsd_jax.rl.run import run_train

    url = f"{BUCKET}/runs/r1"
    args = ("rl.total_steps=2", "tensorboard=true")
    res = run_train(tiny_cfg(url, *args), progress=False, stop_after=1)
    assert res.steps == 1 and str(res.output_dir) == url
    assert "tensorboard: event files go to the local directory" in capsys.readouterr().out
    run = _local(fake_gcs, url)
    assert (run / "checkpoints" / "1" / "commit_success.txt").exists()   # Orbax's GCS commit mark
    run_train(tiny_cfg(url, *args), resume=True, progress=False)

    assert json.loads((run / "config.json").read_text())["output_dir"] == url
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 2]                    # before-eval, step 1, step 2, final eval
    summary = json.loads((run / "eval_final_summary.json").read_text())
    assert len((run / "eval_final.jsonl").read_text().splitlines()) == summary["num_examples"] == 16
    events = [p for p in (run / "tensorboard").rglob("*") if p.name.startswith("events.out.tfevents")]
    assert len(events) == 2 and all(p.stat().st_size > 0 for p in events)   # one event file per process run

    straight = tmp_path / "local"
    run_train(tiny_cfg(straight, *args), progress=False)
    s_remote, remote = _final_trainable(f"{url}/checkpoints")
    s_local, local = _final_trainable(straight / "checkpoints")
    assert s_remote == s_local == 2
    for a, b in zip(jax.tree.leaves(remote), jax.tree.leaves(local)):
        np.testing.assert_array_equal(a, b)

    from gdsd_jax.experiments.plots import plot_run
    from gdsd_jax.training.metrics import read_metrics

    assert [r["step"] for r in read_metrics(url)] == steps
    for p in plot_run(url):
        assert str(p).startswith(url + "/plots/")
        assert (_local(fake_gcs, str(p))).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_params_checkpoint_round_trip_in_a_bucket(fake_gcs):
    from gdsd_jax.checkpoint.params_io import is_params_checkpoint, restore_params, save_params
    from gdsd_jax.models.config import tiny_llada
    from gdsd_jax.models.denoiser import init_params

    cfg = tiny_llada()
    params = init_params(cfg, jax.random.key(0))
    url = f"{BUCKET}/ckpt/tiny"
    save_params(url, params, cfg)
    assert is_params_checkpoint(url) and (_local(fake_gcs, url) / "gdsd_checkpoint.json").exists()
    restored, cfg2 = restore_params(url)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---- without the GCS packages ---------------------------------------------------------------------

@pytest.fixture
def no_gcs_packages(monkeypatch):
    from gdsd_jax.checkpoint import params_io

    monkeypatch.setattr(params_io, "_module_available", lambda name: False)
    monkeypatch.setattr(params_io, "_fsspec_protocol_available", lambda protocol: False)


def test_bucket_without_gcs_packages_fails_at_start_naming_them(no_gcs_packages, tmp_path, monkeypatch):
    from gdsd_jax.checkpoint.params_io import StorageBackendError, storage_path
    from gdsd_jax.rl import run

    def not_reached(*a, **k):
        raise AssertionError("the run went past the output directory check")

    monkeypatch.setattr(run, "build_mesh", not_reached)
    with pytest.raises(StorageBackendError, match=r"gs://b/run1: .*gcsfs and google-cloud-storage.*"
                                                  r'pip install "gdsd-jax\[gcs\]"'):
        run.run_train(tiny_cfg("gs://b/run1"), progress=False)
    with pytest.raises(StorageBackendError, match="gcsfs"):
        storage_path(epath.Path("gs://b/ckpt"))
    with pytest.raises(ValueError, match=r"unsupported storage scheme 's3'.*gs://"):
        storage_path("s3://b/run")


def test_read_and_write_helpers_accept_strings_and_epath_objects(tmp_path, monkeypatch):
    """Local paths as ``str``, ``pathlib.Path`` and ``epath.Path`` reach the same files; relative local paths
    stay relative to the working directory (as before the epath change)."""
    from gdsd_jax.checkpoint.train_state import RunCheckpointer, abstract_like
    from gdsd_jax.training.evaluate import EvalResult, write_eval
    from gdsd_jax.training.metrics import MetricsLogger, read_metrics

    monkeypatch.chdir(tmp_path)
    for i, d in enumerate(["rel/a", tmp_path / "b", epath.Path(tmp_path / "c"), str(tmp_path / "d")]):
        log = MetricsLogger(d, tensorboard=False)
        log.log(0, {"x": np.float32(1.5)})
        log.log(1, {"x": float("nan")})
        log.close()
        assert read_metrics(d) == [{"step": 0, "x": 1.5}, {"step": 1, "x": "nan"}]
        assert read_metrics(os.path.join(os.fspath(d), "metrics.jsonl"))[0]["x"] == 1.5
        write_eval(EvalResult(0.5, {"accuracy": 0.25}, np.array([0.5]), [{"reward": 0.5}]), d, "ev")
        assert json.loads((tmp_path / os.fspath(d) / "ev_summary.json").read_text())["mean_reward"] == 0.5
        resumed = MetricsLogger(d, tensorboard=False, resume_step=0)    # keeps steps <= 0
        resumed.close()
        assert [r["step"] for r in read_metrics(d)] == [0]
        ck = RunCheckpointer(epath.Path(d) / "ck" if i % 2 else os.path.join(os.fspath(d), "ck"), async_save=False)
        state = {"w": jax.numpy.arange(4.0) + i}
        ck.save(3, state, {"i": i})
        got, meta = ck.restore(None, abstract_like(state))
        ck.close()
        assert meta == {"i": i} and np.asarray(got["w"]).tolist() == [i, i + 1.0, i + 2.0, i + 3.0]
    assert (tmp_path / "rel" / "a" / "metrics.jsonl").exists()
