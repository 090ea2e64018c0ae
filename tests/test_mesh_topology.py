"""Topology-aware mesh (gdsd_jax/distributed/mesh.py): ``mesh_utils`` device order inside a slice, and
several slices laid along the ``data`` axis.

Fake CPU devices carry no ``slice_index``, so the multi-slice grouping is exercised with the real CPU
devices wrapped in a stand-in that adds one (assigned out of list order, so the grouping cannot come from
the order of the list); the grid is then unwrapped to the real devices and a collective over each axis
shows which axis crosses slices. A deviceless 2-slice TPU compile runs where libtpu is installed."""

from __future__ import annotations

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from gdsd_jax.distributed.mesh import DCN_AXIS, MESH_AXES, device_grid, make_mesh, mesh_shape


@dataclasses.dataclass(frozen=True)
class SliceDevice:
    """A CPU device with the ``slice_index`` a multi-slice TPU device carries."""
    device: object
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


def _slice_grid(data: int, fsdp: int, tensor: int, num_slices: int) -> tuple[np.ndarray, np.ndarray]:
    """(grid of real devices, grid of their slice indices); slice of device i = i % num_slices."""
    devs = jax.devices()[: data * fsdp * tensor]
    wrapped = [SliceDevice(d, i % num_slices) for i, d in enumerate(devs)]
    grid = device_grid(mesh_shape(len(devs), data, fsdp, tensor), wrapped, num_slices)
    return np.vectorize(lambda w: w.device, otypes=[object])(grid), np.vectorize(lambda w: w.slice_index)(grid)


def test_single_slice_mesh_shape_axis_order_and_device_order():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert mesh.axis_names == MESH_AXES == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    # CPU devices have no torus: mesh_utils keeps the device order, tensor fastest.
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()[:8]]
    assert dict(make_mesh(data=1, fsdp=-1, tensor=2).shape) == {"data": 1, "fsdp": 4, "tensor": 2}


def test_slices_are_contiguous_blocks_of_the_data_axis():
    devices, slices = _slice_grid(data=4, fsdp=2, tensor=1, num_slices=2)
    assert DCN_AXIS == "data" and slices.shape == (4, 2, 1)
    assert (slices[:2] == 0).all() and (slices[2:] == 1).all()
    # Each slice's block holds exactly that slice's devices (even device ids: slice 0).
    ids = np.vectorize(lambda d: d.id)(devices)
    assert sorted(ids[:2].ravel()) == [0, 2, 4, 6] and sorted(ids[2:].ravel()) == [1, 3, 5, 7]


def test_only_the_data_axis_crosses_slices():
    """A psum of each device's slice index over one axis: over data it mixes both slices (0 + 1 per pair),
    over fsdp or tensor it stays inside one slice (2 x s)."""
    devices, slices = _slice_grid(data=2, fsdp=2, tensor=2, num_slices=2)
    mesh = Mesh(devices, MESH_AXES)
    x = jax.device_put(jnp.asarray(slices, jnp.float32), jax.sharding.NamedSharding(mesh, P(*MESH_AXES)))

    def total(axis):
        f = jax.shard_map(lambda a: jax.lax.psum(a, axis), mesh=mesh, in_specs=P(*MESH_AXES), out_specs=P(*MESH_AXES))
        return np.asarray(jax.jit(f)(x))

    assert (total("data") == 1).all()                              # 0 + 1: the two slices meet
    assert (total("fsdp") == 2 * slices).all() and (total("tensor") == 2 * slices).all()


def test_multi_slice_errors_are_clear():
    devs = jax.devices()[:8]
    with pytest.raises(ValueError, match="slice_index.*cpu devices have none"):
        make_mesh(data=2, fsdp=4, tensor=1, devices=devs, num_slices=2)
    wrapped = [SliceDevice(d, i % 2) for i, d in enumerate(devs)]
    with pytest.raises(ValueError, match="data axis, which must be a multiple of num_slices; got data=1"):
        device_grid(mesh_shape(8, 1, 8, 1), wrapped, 2)
    with pytest.raises(ValueError, match="num_slices=4 but the devices belong to 2 slice"):
        device_grid(mesh_shape(8, 4, 2, 1), wrapped, 4)


def test_config_num_slices_needs_a_data_axis_multiple():
    from gdsd_jax.config_io import ConfigError, load_config, resolve_config_path
    from gdsd_jax.training.config import TrainConfig

    path = resolve_config_path(None)
    with pytest.raises(ConfigError, match="distributed.num_slices=2.*data a multiple of 2"):
        load_config(TrainConfig, path, ["distributed.num_slices=2"]).validate()
    with pytest.raises(ConfigError, match="num_slices"):
        load_config(TrainConfig, path, ["distributed.num_slices=0"]).validate()
    ok = load_config(TrainConfig, path, ["distributed.num_slices=2", "distributed.mesh=data=2,fsdp=-1"]).validate()
    assert ok.distributed.num_slices == 2


def test_plan_auto_mesh_puts_one_data_row_per_slice():
    from gdsd_jax.config_io import load_config, resolve_config_path
    from gdsd_jax.experiments.plan import auto_mesh, resolve_model_config
    from gdsd_jax.training.config import TrainConfig

    cfg = load_config(TrainConfig, resolve_config_path("configs/llada_8b_math.yaml"),
                      ["distributed.num_slices=2", "distributed.mesh=data=2,fsdp=-1"]).validate()
    mcfg, _ = resolve_model_config(cfg)
    assert auto_mesh(32, cfg, mcfg) == {"data": 2, "fsdp": 16, "tensor": 1}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (the TPU compiler, pip install \"gdsd-jax[tpu]\") for a deviceless compile")
def test_two_slice_tpu_topology_compiles_with_slices_on_data():
    from gdsd_jax.experiments.plan import tpu_devices

    devs = tpu_devices("v5p", 16, num_slices=2)                    # 2 x v5p 2x2x2 (8 chips each)
    mesh = make_mesh(data=2, fsdp=8, tensor=1, devices=devs, num_slices=2)
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert (slices[0] == 0).all() and (slices[1] == 1).all()
    x = jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, P(("data", "fsdp"))))
    w = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, P("fsdp")))
    grad = jax.jit(jax.grad(lambda w, x: jnp.sum((x @ w) ** 2)))
    hlo = grad.lower(w, x).compile().as_text()
    assert "all-reduce" in hlo or "reduce-scatter" in hlo             # the gradient is summed across slices
