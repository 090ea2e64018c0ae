"""Multi-host start-up and host-local <-> global array helpers.

On a TPU VM slice every host runs the same program; :func:`initialize` calls
``jax.distributed.initialize()`` (auto-detected on Cloud TPU) before any device is touched. Elsewhere the
coordinator address, process count and id come from flags or the environment variables
``GDSD_COORDINATOR_ADDRESS``, ``GDSD_NUM_PROCESSES``, ``GDSD_PROCESS_ID``.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


def _on_tpu_vm() -> bool:
    # Cloud TPU VMs set these; jax.distributed.initialize() then needs no arguments.
    return bool(os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_ACCELERATOR_TYPE")
                or os.environ.get("CLOUD_TPU_TASK_ID"))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, initialization_timeout: int = 300) -> bool:
    """Initialise multi-process JAX if this is a multi-host run. Returns True if it did."""
    coordinator_address = coordinator_address or os.environ.get("GDSD_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("GDSD_NUM_PROCESSES"):
        num_processes = int(os.environ["GDSD_NUM_PROCESSES"])
    if process_id is None and os.environ.get("GDSD_PROCESS_ID"):
        process_id = int(os.environ["GDSD_PROCESS_ID"])
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError("multi-host: --coordinator-address needs --num-processes and --process-id "
                             "(or GDSD_NUM_PROCESSES / GDSD_PROCESS_ID)")
        if "cpu" in os.environ.get("JAX_PLATFORMS", "cpu"):
            # CPU devices need a collectives backend to talk across processes (tests, CPU clusters).
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=initialization_timeout)
        return True
    if _on_tpu_vm():  # cluster auto-detection (works for one host too)
        jax.distributed.initialize()
        return True
    return False


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Assemble a global array from each process's slice along the leading (batch) axis."""
    return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def process_slice(n_global: int) -> slice:
    """This process's contiguous block of ``n_global`` rows (processes own consecutive blocks, in the
    order of their devices in the mesh, which :func:`gdsd_jax.distributed.mesh.make_mesh` keeps)."""
    pc, pi = jax.process_count(), jax.process_index()
    if n_global % pc:
        raise ValueError(f"{n_global} rows cannot be split evenly over {pc} processes")
    n = n_global // pc
    return slice(pi * n, (pi + 1) * n)


def shard_rows(full: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Global array from a host value that every process holds in full (each contributes its block)."""
    full = np.asarray(full)
    return global_batch(full[process_slice(full.shape[0])], sharding)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's block of rows of a batch-sharded global array, as numpy."""
    if jax.process_count() == 1:
        return np.asarray(x)
    blocks = {}
    for shard in x.addressable_shards:
        start = (shard.index[0].start or 0) if shard.index else 0
        blocks[start] = np.asarray(shard.data)
    rows = np.concatenate([blocks[k] for k in sorted(blocks)], axis=0)
    if rows.shape[0] == x.shape[0]:  # replicated over the batch: take this process's block
        return rows[process_slice(x.shape[0])]
    return rows


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-host) array on every host."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host_allgather(local: np.ndarray) -> np.ndarray:
    """Concatenate a host-local numpy array over processes (process order) on every host."""
    if jax.process_count() == 1:
        return np.asarray(local)
    return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op in a single process, where there is
    nothing to wait for)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
