"""The persistent compilation cache: where it lives, how it is switched off, and that a second process loads
the first one's programs instead of compiling them, with bitwise the same results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gdsd_jax import compile_cache
from gdsd_jax.compile_cache import CACHE_ENV, JAX_DIR_ENV, cache_directory, enable_compilation_cache

REPO = Path(__file__).resolve().parents[1]


def test_default_directory_is_a_user_cache_keyed_by_versions_and_host_cpu(tmp_path, monkeypatch):
    import importlib.metadata

    env = {"XDG_CACHE_HOME": str(tmp_path)}
    path = Path(cache_directory(env))
    assert path.parent == tmp_path / "gdsd-jax" / "xla"
    key = path.name
    assert f"jax{importlib.metadata.version('jax')}" in key and f"jaxlib{importlib.metadata.version('jaxlib')}" in key
    # Another host CPU (instruction-set flags) gets another directory.
    monkeypatch.setattr(compile_cache, "host_cpu_fingerprint", lambda: "000000000000")
    assert Path(cache_directory(env)).name != key and Path(cache_directory(env)).name.endswith("cpu000000000000")
    # Outside the repository by default: under HOME's .cache when XDG_CACHE_HOME is unset.
    assert cache_directory({}).startswith(os.path.join(os.path.expanduser("~"), ".cache", "gdsd-jax"))


def test_explicit_directory_off_and_users_own_jax_setting(tmp_path):
    assert cache_directory({CACHE_ENV: str(tmp_path / "c")}) == str(tmp_path / "c")
    assert cache_directory({CACHE_ENV: "off"}) is None and cache_directory({CACHE_ENV: "OFF"}) is None
    assert cache_directory({JAX_DIR_ENV: str(tmp_path / "j")}) == str(tmp_path / "j")
    # Ours wins over JAX's when both are set (the user asked gdsd-jax for it by name).
    assert cache_directory({CACHE_ENV: str(tmp_path / "c"), JAX_DIR_ENV: "x"}) == str(tmp_path / "c")


def test_enable_sets_what_child_processes_inherit(tmp_path):
    env = {CACHE_ENV: str(tmp_path / "c")}
    assert enable_compilation_cache(env) == str(tmp_path / "c")
    assert (tmp_path / "c").is_dir()
    assert env[JAX_DIR_ENV] == str(tmp_path / "c")
    assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0.0"     # small programs are cached too
    assert env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] == "-1"
    off = {CACHE_ENV: "off"}
    assert enable_compilation_cache(off) is None and off["JAX_ENABLE_COMPILATION_CACHE"] == "false"


def test_an_unwritable_directory_is_one_note_and_no_cache(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {CACHE_ENV: str(blocker / "sub")}
    assert enable_compilation_cache(env) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compilation cache off" in err[0] and str(blocker / "sub") in err[0]
    assert env["JAX_ENABLE_COMPILATION_CACHE"] == "false"


_PROBE = """
import json, sys
import jax, jax.numpy as jnp
from gdsd_jax.compile_cache import enable_compilation_cache
enable_compilation_cache()
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
x = jnp.arange(24.0).reshape(4, 6)
y = jax.jit(lambda a: jnp.tanh(a @ a.T) * 3.0 + a.sum())(x)
print(json.dumps({"hits": events.count("/jax/compilation_cache/cache_hits"),
                  "misses": events.count("/jax/compilation_cache/cache_misses"),
                  "y": [float(v) for v in y.ravel()]}))
"""


def _probe(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=REPO, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_second_process_loads_the_first_ones_programs(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k == "JAX_PLATFORMS"}
    env[CACHE_ENV] = str(tmp_path / "cache")
    first = _probe(env)
    assert first["misses"] >= 1 and first["hits"] == 0
    assert any((tmp_path / "cache").iterdir())
    second = _probe(env)
    assert second["hits"] >= 1 and second["misses"] == 0
    assert second["y"] == first["y"]                 # the cached executable computes bitwise the same
    env[CACHE_ENV] = "off"
    off = _probe(env)
    assert off["hits"] == 0 and off["misses"] == 0 and off["y"] == first["y"]
