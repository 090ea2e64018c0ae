"""A wheel install runs the embedded default from any directory: the run configs ship as package data."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from gdsd_jax.config_io import ConfigError, resolve_config_path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))


def test_config_paths_resolve_to_the_shipped_configs_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(None).read_text() == (REPO / "configs/sudoku_tiny.yaml").read_text()
    for name in ("configs/llada_8b_math.yaml", "llada_8b_math.yaml"):
        assert resolve_config_path(name).read_text() == (REPO / "configs/llada_8b_math.yaml").read_text()
    # An experiment names its task configs by the same paths.
    from gdsd_jax.experiments.spec import load_experiment
    exp = load_experiment("configs/experiments/tiny_baselines.yaml")
    assert Path(exp.tasks["sudoku"].config).read_text() == (REPO / "configs/sudoku_tiny.yaml").read_text()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/sudoku_tiny.yaml").write_text("rl: {total_steps: 3}\n")
    assert resolve_config_path(None) == Path("configs/sudoku_tiny.yaml")        # a local file wins
    with pytest.raises(ConfigError, match=r"'configs/nope\.yaml' not found.*sudoku_tiny\.yaml"):
        resolve_config_path("configs/nope.yaml")


def _build_wheel(out: Path) -> Path:
    """Build the wheel from a copy of the sources (the build writes into its source tree)."""
    src = out / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "configs", src / "configs")
    shutil.copytree(REPO / "gdsd_jax", src / "gdsd_jax", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(out / "dist"), str(src)], check=True)
    (wheel,) = (out / "dist").glob("gdsd_jax-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_install_trains_the_embedded_default_from_any_directory(tmp_path):
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        shipped = sorted(n.removeprefix("gdsd_jax/configs/") for n in z.namelist()
                         if n.startswith("gdsd_jax/configs/"))
        assert shipped == CONFIGS
        assert z.read("gdsd_jax/configs/sudoku_tiny.yaml") == (REPO / "configs/sudoku_tiny.yaml").read_bytes()

    # A fresh venv holding only the wheel; the dependencies come from this environment's site-packages,
    # appended after the venv's own (a path line in a .pth file), so the wheel's gdsd_jax is the one imported.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"

    def run(*cmd):
        return subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True, text=True).stdout

    assert "--config" in run(str(venv / "bin" / "gdsd-jax"), "train", "--help")
    out = run(str(python), "-c", """
import gdsd_jax
from gdsd_jax.commands.train import add_arguments
from gdsd_jax.commands._common import load_train_config
import argparse
p = argparse.ArgumentParser(); add_arguments(p)
for argv in ([], ["--config", "configs/dream_7b_sudoku.yaml"]):
    cfg = load_train_config(p.parse_args(argv)).validate()
    print(gdsd_jax.__file__, cfg.task.name, cfg.model.preset)
""")
    lines = out.strip().splitlines()
    assert all(line.startswith(str(site / "gdsd_jax")) for line in lines), out
    assert [line.split()[1:] for line in lines] == [["sudoku", "sudoku_tiny"], ["sudoku", "None"]]
