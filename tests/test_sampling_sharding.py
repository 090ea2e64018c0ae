"""Sharded (8 fake CPU devices) and single-device runs give the same tokens for the same key."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampling_reference import random_params

from gdsd_jax.distributed.mesh import make_mesh
from gdsd_jax.models.config import tiny_dream, tiny_llada
from gdsd_jax.models.denoiser import param_shardings
from gdsd_jax.sampling import SamplingConfig, generate_jit

SETTINGS = {
    "llada": SamplingConfig(gen_length=12, steps=6, block_length=4, temperature=1.0, return_unmask_step=True),
    "dream": SamplingConfig(gen_length=12, steps=6, alg="entropy", temperature=1.0, top_p=0.95,
                            return_unmask_step=True),
    # Fast decoding: the KV cache (sharded like the activations) and the per-row threshold / factor loop.
    "llada_fast": SamplingConfig(gen_length=12, steps=6, block_length=4, temperature=1.0, cache="prefix",
                                 threshold=0.3, return_unmask_step=True),
    "dream_fast": SamplingConfig(gen_length=12, steps=6, block_length=4, temperature=1.0, cache="dual",
                                 threshold=0.3, return_unmask_step=True),
    "dream_factor": SamplingConfig(gen_length=12, steps=6, block_length=4, temperature=1.0, cache="dual",
                                   factor=2.0, return_unmask_step=True),
}


@pytest.fixture(scope="module")
def cases():
    out = {}
    rng = np.random.default_rng(0)
    for name, mk in (("llada", tiny_llada), ("dream", tiny_dream), ("llada_fast", tiny_llada),
                     ("dream_fast", tiny_dream), ("dream_factor", tiny_dream)):
        cfg = mk()
        params = random_params(cfg, seed=8, std=1.0 if name.endswith(("fast", "factor")) else 0.3)
        ids = rng.integers(0, 240, size=(8, 6)).astype(np.int32)
        mask = np.ones_like(ids)
        ids[[1, 6], :3], mask[[1, 6], :3] = cfg.pad_token_id, 0
        ref = generate_jit(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(9), SETTINGS[name])
        out[name] = (cfg, params, ids, mask, jax.tree.map(np.asarray, ref))
    return out


@pytest.mark.parametrize("name,axes", [("llada", (8, 1, 1)), ("dream", (2, 2, 2)), ("llada_fast", (4, 1, 2)),
                                       ("dream_fast", (2, 2, 2)), ("dream_factor", (2, 2, 2))])
def test_sharded_equals_unsharded(cases, name, axes):
    assert len(jax.devices()) == 8
    cfg, params, ids, mask, ref = cases[name]
    mesh = make_mesh(*axes)
    sharded_params = jax.device_put(params, param_shardings(cfg, mesh))
    out = generate_jit(sharded_params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(9), SETTINGS[name],
                       mesh=mesh)
    # The batch really is split over the data axes.
    spec = out.sequences.sharding.spec
    assert spec and spec[0] is not None, spec
    np.testing.assert_array_equal(np.asarray(out.sequences), ref.sequences)
    np.testing.assert_array_equal(np.asarray(out.unmask_step), ref.unmask_step)
    np.testing.assert_array_equal(np.asarray(out.completion_mask), ref.completion_mask)
    np.testing.assert_array_equal(np.asarray(out.nfe), ref.nfe)


def test_key_determinism(cases):
    cfg, params, ids, mask, ref = cases["dream"]
    again = generate_jit(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(9), SETTINGS["dream"])
    np.testing.assert_array_equal(np.asarray(again.sequences), ref.sequences)
    other = generate_jit(params, cfg, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(10), SETTINGS["dream"])
    assert not np.array_equal(np.asarray(other.sequences), ref.sequences)
