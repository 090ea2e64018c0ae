"""The one place that knows mesh axes and how logical array axes map onto them.

Mesh axes: ``data`` (pure data parallel, across slices/DCN), ``fsdp`` (data parallel with parameters
sharded on the embedding dimension), ``tensor`` (heads / MLP / vocabulary split). All three axes are
``AxisType.Auto``: sharding is propagated by GSPMD and :func:`constrain` is a real resharding
constraint (under ``Explicit`` axes ``with_sharding_constraint`` would be an assertion instead).

Logical axis names (tunix / MaxText style) used by parameters and activations:

=========  ==================  =========================================
logical    mesh axes           used by
=========  ==================  =========================================
batch      (data, fsdp)        activations, data batches
length     -                   sequence positions
embed      fsdp                parameters' model dimension (FSDP)
act_embed  -                   activations' model dimension
heads      tensor              query heads
kv_heads   tensor              key/value heads
head_dim   -                   per-head features
mlp        tensor              SwiGLU intermediate
vocab      tensor              embedding rows, LM-head columns
layers     -                   stacked layer axis of scanned parameters
lora       fsdp                LoRA rank (takes fsdp where no embed dim did)
=========  ==================  =========================================

A mesh axis is dropped from a spec when it does not divide the array dimension (e.g. Dream's 4 KV heads
on a tensor axis of 8): the array is then replicated along that mesh axis. This is decided per array,
recorded in the returned spec (so tests can assert it), and never depends on the platform.

Device order (:func:`device_grid`). Inside a slice the devices are placed by
``jax.experimental.mesh_utils.create_device_mesh``, which on a TPU follows the physical torus (the last
mesh axis, ``tensor``, on the closest chips; on CPU and GPU it is the device order). With
``num_slices > 1`` (``distributed.num_slices``; multi-slice TPU, slices joined by the data-centre network)
``create_hybrid_device_mesh`` builds one such mesh per slice and lays the slices along the ``data`` axis:
``data = num_slices x (data per slice)``, each slice holding a contiguous block of ``data``. Only ``data``
crosses slices because it is the axis with the least traffic: one gradient all-reduce per update step,
where ``fsdp`` all-gathers every layer's weights in the forward and backward pass and ``tensor``
exchanges activations inside every layer, both far too often for DCN bandwidth (MaxText's default too).
Each slice then holds a full copy of the sharded state (fsdp and tensor stay inside a slice).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "length": (),
    "embed": ("fsdp",),
    "act_embed": (),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "mlp": ("tensor",),
    "vocab": ("tensor",),
    "layers": (),
    # Mesh axes are assigned left to right and each at most once per array, so the rank axis gets fsdp
    # only in the LoRA factor whose other dims leave it unused (B of q/k/v/gate/up, A of o/down, B of o/down
    # whose rank dim comes before the embed dim): every factor is then split over fsdp (models/lora.py).
    "lora": ("fsdp",),
}


def mesh_shape(num_devices: int, data: int = 1, fsdp: int = -1, tensor: int = 1) -> dict[str, int]:
    """Axis sizes of a ``(data, fsdp, tensor)`` mesh over ``num_devices``, with the one ``-1`` axis resolved."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices are not divisible by the fixed axes (product {known})")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} but {num_devices} devices are available "
                         f"(data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]})")
    return dict(zip(MESH_AXES, sizes))


#: The mesh axis that crosses slices (DCN) when ``num_slices > 1``; see the module docstring.
DCN_AXIS = "data"


def device_grid(sizes: dict[str, int], devices: Sequence, num_slices: int = 1) -> np.ndarray:
    """Arrange ``devices`` into the ``(data, fsdp, tensor)`` grid by topology (``mesh_utils``).

    Args:
      sizes: resolved axis sizes (:func:`mesh_shape`), product = ``len(devices)``.
      devices: the devices; with ``num_slices > 1`` each must carry a ``slice_index`` (multi-slice TPU
        devices do; CPU devices do not, and the call fails rather than pretend).
      num_slices: slices joined over DCN; they are laid along ``data`` (which must be a multiple).

    Returns:
      object array [data, fsdp, tensor] of devices; with slices, ``grid[i * data // num_slices:(i + 1) *
      data // num_slices]`` are the devices of the i-th slice (by ``slice_index``).
    """
    shape = tuple(sizes[a] for a in MESH_AXES)
    if num_slices < 1:
        raise ValueError(f"mesh: num_slices must be >= 1, got {num_slices}")
    if num_slices == 1:
        return mesh_utils.create_device_mesh(shape, list(devices), allow_split_physical_axes=True)
    if sizes[DCN_AXIS] % num_slices:
        raise ValueError(f"mesh: {num_slices} slices are laid along the {DCN_AXIS} axis, which must be a multiple "
                         f"of num_slices; got {DCN_AXIS}={sizes[DCN_AXIS]} (e.g. distributed.mesh="
                         f"data={num_slices},fsdp=-1,tensor=1)")
    if any(getattr(d, "slice_index", None) is None for d in devices):
        kind = getattr(devices[0], "platform", type(devices[0]).__name__)
        raise ValueError(f"mesh: num_slices={num_slices} needs devices that know their slice (slice_index, set on "
                         f"multi-slice TPU); these {kind} devices have none: use num_slices=1 here")
    found = len({d.slice_index for d in devices})
    if found != num_slices:
        raise ValueError(f"mesh: num_slices={num_slices} but the devices belong to {found} slice(s)")
    ici = tuple(n // num_slices if a == DCN_AXIS else n for a, n in zip(MESH_AXES, shape))
    dcn = tuple(num_slices if a == DCN_AXIS else 1 for a in MESH_AXES)
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, list(devices), allow_split_physical_axes=True)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, *, devices: Sequence | None = None,
              num_slices: int = 1) -> Mesh:
    """Build the ``(data, fsdp, tensor)`` mesh. One axis may be ``-1``: it takes the remaining devices.

    Args:
      data, fsdp, tensor: axis sizes; their product must equal the number of devices.
      devices: devices to use (default: all of ``jax.devices()``).
      num_slices: slices (DCN) the devices span; laid along ``data`` (:func:`device_grid`).
    """
    devs = list(devices) if devices is not None else jax.devices()
    sizes = mesh_shape(len(devs), data, fsdp, tensor)
    return Mesh(device_grid(sizes, devs, num_slices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def parse_mesh_spec(spec: str | None) -> dict[str, int]:
    """Parse ``"data=2,fsdp=4,tensor=1"`` into keyword arguments of :func:`make_mesh`."""
    out = {"data": 1, "fsdp": -1, "tensor": 1}
    if not spec:
        return out
    for part in spec.split(","):
        key, _, val = part.partition("=")
        key = key.strip()
        if key not in MESH_AXES or not val.strip().lstrip("-").isdigit() or int(val) == 0 or int(val) < -1:
            raise ValueError(f"bad mesh entry {part!r}; expected name=size with name in {MESH_AXES} and size "
                             f"a positive integer or -1 (the remaining devices)")
        out[key] = int(val)
    return out


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
    """Translate logical axis names to a ``PartitionSpec``.

    With ``shape`` and ``mesh`` given, mesh axes that do not divide the dimension (or have size 1) are
    dropped, so the spec is always valid for that array.
    """
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical axes {tuple(names)} do not match an array of rank {len(shape)}")
    used: set[str] = set()
    entries = []
    for i, name in enumerate(names):
        if name is None:
            entries.append(None)
            continue
        if name not in LOGICAL_RULES:
            raise ValueError(f"unknown logical axis {name!r}; expected one of {sorted(LOGICAL_RULES)}")
        axes = []
        size = shape[i] if shape is not None else None
        for ax in LOGICAL_RULES[name]:
            if ax in used:
                continue
            if mesh is not None:
                n = mesh.shape[ax]
                if n == 1:
                    continue
                if size is not None:
                    if size % (n * math.prod(mesh.shape[a] for a in axes)):
                        continue
            axes.append(ax)
        used.update(axes)
        entries.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
    return P(*entries)


def named_sharding(mesh: Mesh, names: Sequence[str | None], shape: Sequence[int] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def constrain(x: jax.Array, mesh: Mesh | None, names: Sequence[str | None]) -> jax.Array:
    """Constrain an activation's sharding inside ``jit``. ``mesh=None`` means single-device code."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, x.shape))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` data array: batch over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), None, mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
