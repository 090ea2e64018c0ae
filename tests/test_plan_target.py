"""``gdsd-jax plan --target <TPU generation>`` without libtpu fails at once, naming the extra to install."""

from __future__ import annotations

import importlib.util

import pytest


def test_tpu_target_without_libtpu_names_the_tpu_extra(monkeypatch):
    from gdsd_jax.cli import main

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else find_spec(name, *a))
    with pytest.raises(SystemExit) as e:
        main(["plan", "--devices", "8", "--target", "v5p"])
    assert 'pip install "gdsd-jax[tpu]"' in str(e.value) and "--target v5p" in str(e.value)
