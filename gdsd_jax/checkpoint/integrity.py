"""What a training-state checkpoint must satisfy to be saved and restored: finite values and save-time digests.

* :func:`all_finite` is the one finiteness test of a pytree (traceable): the trainer applies an update only
  if the updated parameters and optimizer state pass it, and :class:`~gdsd_jax.checkpoint.train_state.
  RunCheckpointer` refuses to save a state that fails it.
* :func:`state_digests` gives every array leaf a 64-bit digest computed on the devices where the leaf lives.
  Each element contributes ``fmix32(bits ^ fmix32(index * φ + seed))`` (MurmurHash3's finaliser mixing the
  element's bit pattern with its global flat index) to a wrap-around ``uint32`` sum, once for each of two
  seeds. Integer addition modulo 2**32 does not depend on the order of the terms, so the digest is exact
  and the same on every mesh, process count and backend: a checkpoint written on one topology verifies on
  another. It detects accidental corruption (any change to one element changes each sum by a
  pseudo-random amount; two sums miss it with probability about 2**-64), not deliberate tampering.
* :func:`check_digests` is the one comparison of a tree read back with its save-time digests, used by every
  read of a checkpoint (resume, export, eval, sampling, ``load_denoiser``, the SFT warm-start cache): a
  mismatch raises :class:`CheckpointIntegrityError` naming the first array that differs.
* :func:`meta_digest` is the SHA-256 of the JSON metadata saved with the state (canonical form, so it
  survives the JSON round trip).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gdsd_jax.distributed.multihost import to_host
from gdsd_jax.errors import UserError

_GOLDEN = 0x9E3779B9                    # 2**32 / golden ratio: spreads consecutive indices before mixing
_SEEDS = (0x243F6A88, 0x85A308D3)       # two independent sums (digits of pi), 32 bits each


class CheckpointIntegrityError(UserError, RuntimeError):
    """A checkpoint (a training step or a params checkpoint) that cannot be read, or whose contents differ
    from what was saved. The message names it: damaged data is refused, never used."""

    def __init__(self, reason: str, step: int | None = None, where: str | None = None):
        prefix = f"checkpoint step {step}" if step is not None else f"checkpoint {where}" if where else ""
        super().__init__(f"{prefix}: {reason}" if prefix else reason)
        self.step = step
        self.reason = reason


def _floating(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


def all_finite(tree: Any) -> jax.Array:
    """Scalar bool: every floating-point element of ``tree`` is finite (integer leaves are ignored)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _floating(x)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser (full avalanche: every input bit flips about half the output bits)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _bits(x: jax.Array) -> jax.Array:
    """The elements' bit patterns as ``uint32`` (narrower types zero-extended)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = jnp.dtype(f"uint{x.dtype.itemsize * 8}")
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major global flat index of every element, modulo 2**32 (built per shard under ``jit``)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * jnp.uint32(stride % 2**32)
        stride *= shape[dim]
    return index


def _leaf_digest(x: jax.Array) -> jax.Array:
    """``uint32[2]`` digest of one array (see the module docstring)."""
    bits, index = _bits(x), _flat_index(x.shape)
    sums = [jnp.sum(_fmix32(bits ^ _fmix32(index * jnp.uint32(_GOLDEN) + jnp.uint32(seed))), dtype=jnp.uint32)
            for seed in _SEEDS]
    return jnp.stack(sums)


@jax.jit
def _digests_and_finite(leaves: list[jax.Array]) -> tuple[jax.Array, jax.Array]:
    digests = jnp.stack([_leaf_digest(x) for x in leaves])
    finite = jnp.stack([all_finite(x) for x in leaves])
    return digests, finite


def _leaf_names(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path, simple=True, separator="/")
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def state_digests(tree: Any) -> tuple[dict[str, str], list[str]]:
    """Digests of every array of ``tree`` and the names of the arrays holding non-finite values.

    Returns ``({leaf path: 16 hex digits}, [leaf paths with NaN/inf])``; leaf paths are ``/``-joined pytree
    keys (``trainable/layers/q``). One jitted pass over the state on its devices; only ``2 x uint32`` and
    one bool per leaf come back to the host.
    """
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return {}, []
    digests, finite = _digests_and_finite(leaves)
    digests, finite = np.asarray(to_host(digests)), np.asarray(to_host(finite))
    names = _leaf_names(tree)
    return ({n: f"{int(d[0]):08x}{int(d[1]):08x}" for n, d in zip(names, digests)},
            [n for n, ok in zip(names, finite) if not ok])


def meta_digest(meta: dict) -> str:
    """SHA-256 of a JSON-serialisable mapping in canonical form (sorted keys)."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def check_digests(tree: Any, saved: dict[str, str] | None, *, step: int | None = None, where: str | None = None,
                  prefix: str = "") -> None:
    """Compare ``tree`` (as read back) with its save-time digests ``saved`` (``{leaf path: hex}``).

    ``prefix`` is prepended to the leaf paths of ``tree`` (``"trainable/"`` when only that part of a state was
    read); saved entries outside ``prefix`` are not compared. Without saved digests (written before they were
    recorded) the tree must at least be finite. Raises :class:`CheckpointIntegrityError` naming the first leaf
    that differs (or is non-finite) and ``step`` / ``where``.
    """
    digests, nonfinite = state_digests(tree)
    digests = {prefix + k: v for k, v in digests.items()}
    if saved is None:
        if nonfinite:
            raise CheckpointIntegrityError(f"non-finite values in {', '.join(prefix + n for n in nonfinite)}",
                                           step, where)
        return
    wanted = {k: v for k, v in saved.items() if k.startswith(prefix)}
    differ = sorted(k for k in set(wanted) | set(digests) if wanted.get(k) != digests.get(k))
    if differ:
        more = f" (and {len(differ) - 1} more)" if len(differ) > 1 else ""
        raise CheckpointIntegrityError(f"{differ[0]}{more} differs from its save-time digest", step, where)
