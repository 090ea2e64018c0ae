"""Two JAX processes on localhost (CPU collectives, 4 fake devices each) against one process with 8.

The global batch does not depend on the number of processes (see ``gdsd_jax.training.setup.index_iterator``) and
random numbers do not depend on the sharding (``jax_threefry_partitionable``), so the two runs compute the
same thing; they may differ only by the order of floating-point reductions across processes.
Tolerance: 1e-5 absolute on parameters of magnitude ~0.1 after 3 Adam steps (fp32 round-off).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.test_rl_trainer import REPO, TINY, _final_trainable, _metrics, tiny_cfg

pytestmark = pytest.mark.slow

STEPS = ["rl.total_steps=3"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_process_run(out: Path, *extra: str, timeout: float = 600) -> None:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = []
    for pid in range(2):
        cmd = [sys.executable, "-m", "gdsd_jax.cli", "train", "--config", str(REPO / "configs/sudoku_tiny.yaml"),
               "--no-progress", "--output-dir", str(out), "--coordinator-address", f"127.0.0.1:{port}",
               "--num-processes", "2", "--process-id", str(pid), *TINY, *STEPS, *extra]
        procs.append(subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    outputs = []
    try:
        for p in procs:
            stdout, _ = p.communicate(timeout=timeout)
            outputs.append(stdout.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("two-process training did not finish in time")
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]


def test_two_processes_match_one_process_and_checkpoints_move_between_them(tmp_path):
    from gdsd_jax.rl.run import run_train

    one = tmp_path / "one"
    run_train(tiny_cfg(one, *STEPS), progress=False)
    two = tmp_path / "two"
    two.mkdir()
    _two_process_run(two)

    s1, a = _final_trainable(one)          # the two-process checkpoint restores in this one process
    s2, b = _final_trainable(two)
    assert s1 == s2 == 3
    for x, y in zip(jax.tree.leaves(a["trainable"]), jax.tree.leaves(b["trainable"])):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    m1 = [r for r in _metrics(one / "metrics.jsonl") if "reward_mean" in r]
    m2 = [r for r in _metrics(two / "metrics.jsonl") if "reward_mean" in r]
    assert [r["reward_mean"] for r in m1] == pytest.approx([r["reward_mean"] for r in m2], abs=1e-6)
    assert not (two / "metrics.jsonl.1").exists()  # only process 0 writes logs

    # ...and a one-process checkpoint resumes in two processes.
    shutil.copytree(one, tmp_path / "resumed")
    _two_process_run(tmp_path / "resumed", "rl.total_steps=4", "--resume")
    s3, c = _final_trainable(tmp_path / "resumed")
    assert s3 == 4
    assert any(np.abs(x - y).max() > 0 for x, y in zip(jax.tree.leaves(c["trainable"]),
                                                        jax.tree.leaves(a["trainable"])))
