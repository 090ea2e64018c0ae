"""The host allocator switch (gdsd_jax/allocator.py): the environment variables and their errors, the
re-execution, and that a training run under tcmalloc is bitwise the run under glibc's malloc."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from gdsd_jax import allocator
from tests.test_rl_trainer import REPO, TINY, _final_trainable, _metrics


class _Exec(Exception):
    pass


@pytest.fixture
def exec_calls(monkeypatch):
    """Record os.execve instead of replacing the test process."""
    calls = []

    def fake_execve(path, argv, env):
        calls.append((path, argv, env))
        raise _Exec

    monkeypatch.setattr(allocator.os, "execve", fake_execve)
    monkeypatch.setattr(allocator.sys, "platform", "linux")
    for name in (allocator.ALLOCATOR_ENV, allocator.LIBRARY_ENV, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    return calls


def test_choice_defaults_to_tcmalloc_and_accepts_system():
    assert allocator.allocator_choice({}) == "tcmalloc"
    assert allocator.allocator_choice({allocator.ALLOCATOR_ENV: " System "}) == "system"


def test_a_bad_choice_names_the_variable_and_the_choices():
    with pytest.raises(ValueError, match=r"GDSD_JAX_ALLOCATOR='jemalloc'.*tcmalloc, system"):
        allocator.allocator_choice({allocator.ALLOCATOR_ENV: "jemalloc"})


def test_an_explicit_library_that_does_not_exist_is_an_error(tmp_path):
    missing = tmp_path / "libtcmalloc.so"
    with pytest.raises(FileNotFoundError, match="GDSD_JAX_TCMALLOC=.*no such file"):
        allocator.find_tcmalloc({allocator.LIBRARY_ENV: str(missing)})
    missing.write_bytes(b"")
    assert allocator.find_tcmalloc({allocator.LIBRARY_ENV: str(missing)}) == str(missing)


def test_reexec_puts_the_library_first_and_keeps_the_command(exec_calls, monkeypatch, tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    monkeypatch.setenv(allocator.LIBRARY_ENV, str(lib))
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    with pytest.raises(_Exec):
        allocator.preload_tcmalloc(["python", "-m", "gdsd_jax.cli", "train", "rl.seed=3"])
    (path, argv, env), = exec_calls
    assert path == sys.executable
    assert argv == [sys.executable, "-m", "gdsd_jax.cli", "train", "rl.seed=3"]
    assert env["LD_PRELOAD"] == f"{lib}:libother.so"


@pytest.mark.parametrize("env", [{allocator.ALLOCATOR_ENV: "system"},
                                 {"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4"}])
def test_no_reexec_when_system_is_asked_or_tcmalloc_is_loaded(exec_calls, monkeypatch, tmp_path, env):
    lib = tmp_path / "libtcmalloc.so"
    lib.write_bytes(b"")
    monkeypatch.setenv(allocator.LIBRARY_ENV, str(lib))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    allocator.preload_tcmalloc(["python", "x.py"])
    assert exec_calls == []


def test_no_reexec_without_a_library_or_off_linux(exec_calls, monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda environ=None: None)
    allocator.preload_tcmalloc(["python", "x.py"])
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda environ=None: "libtcmalloc.so.4")
    monkeypatch.setattr(allocator.sys, "platform", "darwin")
    allocator.preload_tcmalloc(["python", "x.py"])
    assert exec_calls == []


needs_tcmalloc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or allocator.find_tcmalloc() is None,
    reason="no tcmalloc library on this machine (Debian/Ubuntu: apt-get install libtcmalloc-minimal4)")


@needs_tcmalloc
@pytest.mark.slow
def test_the_cli_trains_under_tcmalloc_bitwise_like_under_the_system_allocator(tmp_path):
    runs = {}
    for choice in ("tcmalloc", "system"):
        out = tmp_path / choice
        env = dict(os.environ, PYTHONPATH=str(REPO), **{allocator.ALLOCATOR_ENV: choice})
        env.pop("LD_PRELOAD", None)
        proc = subprocess.run(
            [sys.executable, "-m", "gdsd_jax.cli", "train", "--config", str(REPO / "configs/sudoku_tiny.yaml"),
             "--no-progress", "--output-dir", str(out), *TINY, "rl.total_steps=2", "eval.every=1"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[choice] = (proc.stdout, out)
    assert "host allocator: libtcmalloc" in runs["tcmalloc"][0]
    assert "host allocator: system" in runs["system"][0]
    (s1, a), (s2, b) = (_final_trainable(runs[c][1]) for c in ("tcmalloc", "system"))
    assert s1 == s2 == 2
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert _metrics(runs["tcmalloc"][1] / "metrics.jsonl") == _metrics(runs["system"][1] / "metrics.jsonl")
