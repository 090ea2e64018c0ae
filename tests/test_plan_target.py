"""``gdsd-jax plan --target <TPU generation>`` without libtpu fails at once, naming the extra to install."""

from __future__ import annotations

import importlib.util


def test_tpu_target_without_libtpu_names_the_tpu_extra(monkeypatch, capsys):
    from gdsd_jax.cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
    assert main(["plan", "--devices", "8", "--target", "v5p"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("gdsd-jax plan: error: ") and "\n" not in err
    assert 'pip install "gdsd-jax[tpu]"' in err and "--target v5p" in err
