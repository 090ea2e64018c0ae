"""LoRA adapters on the stacked projections of the denoiser.

For a projection ``W`` with input dims ``I`` and output dims ``O`` (e.g. q: I = (D,), O = (H, Dh);
o: I = (H, Dh), O = (D,)), the adapter is ``A [N, *I, r]`` and ``B [N, r, *O]`` and the layer computes
``x W + (alpha / r) (x A) B``. ``A`` starts random, ``B`` at zero, so the adapted model equals the
base model at step 0. The reference model of RL is the base weights with the adapters off
(``lora=None``): no second copy of the model is held.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from gdsd_jax.distributed.mesh import named_sharding
from gdsd_jax.models.config import DenoiserConfig
from gdsd_jax.models.denoiser import Params, param_logical_axes, param_shapes

TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
# Number of leading (after the layer axis) input dims of each target's kernel.
_IN_NDIM = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}


def _check_targets(targets: Sequence[str]) -> None:
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"lora.targets={list(targets)}: expected a non-empty subset of {list(TARGETS)}")


def lora_shapes(cfg: DenoiserConfig, rank: int, targets: Sequence[str]) -> dict:
    """``{target: {"a": shape, "b": shape}}`` for the given targets."""
    _check_targets(targets)
    shapes = param_shapes(cfg)["layers"]
    out = {}
    for t in targets:
        w = shapes[t]
        n, k = w[0], _IN_NDIM[t]
        out[t] = {"a": (n, *w[1:1 + k], rank), "b": (n, rank, *w[1 + k:])}
    return out


def _uses(sharding, axis: str) -> bool:
    return any(e == axis or (isinstance(e, tuple) and axis in e) for e in sharding.spec)


def lora_shardings(cfg: DenoiserConfig, rank: int, targets: Sequence[str], mesh: Mesh) -> dict:
    """``{target: {"a": NamedSharding, "b": NamedSharding}}`` of the adapters on ``mesh``.

    The kernel's dims keep their logical axes (``embed`` -> fsdp, heads / mlp -> tensor) and the rank axis
    maps to ``fsdp`` (``distributed/mesh.py``); since a mesh axis is used once per array, the rank takes
    fsdp exactly in the factors that have no embed dim before it. With ``rank % fsdp == 0`` every ``A``
    and ``B`` is thus split over fsdp: per device the adapters and their AdamW moments shrink ~fsdp
    times, instead of half of each pair being replicated. When fsdp does not divide the rank those
    factors stay replicated over fsdp, with a warning saying so.
    """
    axes = param_logical_axes(cfg)["layers"]
    out = {}
    replicated = []
    for t, s in lora_shapes(cfg, rank, targets).items():
        k = _IN_NDIM[t]
        a_axes = (axes[t][0], *axes[t][1:1 + k], "lora")
        b_axes = (axes[t][0], "lora", *axes[t][1 + k:])
        out[t] = {"a": named_sharding(mesh, a_axes, s["a"]), "b": named_sharding(mesh, b_axes, s["b"])}
        replicated += [f"{f.upper()} of {t}" for f in ("a", "b") if not _uses(out[t][f], "fsdp")]
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and replicated:
        reason = (f"lora.rank={rank} is not divisible by fsdp={fsdp}" if rank % fsdp else
                  "no dim of theirs is divisible by fsdp")
        warnings.warn(f"LoRA: {', '.join(replicated)} replicated over the fsdp axis ({reason}); choose a rank "
                      f"divisible by {fsdp} to split them", stacklevel=2)
    return out


def init_lora(cfg: DenoiserConfig, key: jax.Array, rank: int, targets: Sequence[str],
              mesh: Mesh | None = None) -> Params:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (fp32), B = 0."""
    shapes = lora_shapes(cfg, rank, targets)

    def make(key):
        out = {}
        for i, (t, s) in enumerate(sorted(shapes.items())):
            fan_in = math.prod(s["a"][1:-1])
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(jax.random.fold_in(key, i), s["a"], jnp.float32, -bound, bound)
            out[t] = {"a": a, "b": jnp.zeros(s["b"], jnp.float32)}
        return out

    if mesh is None:
        return jax.jit(make)(key)
    return jax.jit(make, out_shardings=lora_shardings(cfg, rank, targets, mesh))(key)


def lora_scale(rank: int, alpha: float) -> float:
    return float(alpha) / float(rank)


def merge_lora(params: Params, lora: Params, scale: float) -> Params:
    """Base params with ``scale * A B`` folded into each adapted kernel (same dtypes as the base)."""
    layers = dict(params["layers"])
    for t, ab in lora.items():
        a, b = ab["a"], ab["b"]
        a2 = a.reshape(a.shape[0], -1, a.shape[-1])                  # [N, prod(I), r]
        b2 = b.reshape(b.shape[0], b.shape[1], -1)                   # [N, r, prod(O)]
        delta = jnp.einsum("nir,nro->nio", a2.astype(jnp.float32), b2.astype(jnp.float32))
        w = layers[t]
        layers[t] = (w.astype(jnp.float32) + scale * delta.reshape(w.shape)).astype(w.dtype)
    return {**params, "layers": layers}
