"""Multi-host set-up: ``jax.distributed`` from arguments or the environment, and global batches from local shards."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec

ENV_COORDINATOR = "VLAX_COORDINATOR"      # host:port of process 0
ENV_NUM_PROCESSES = "VLAX_NUM_PROCESSES"
ENV_PROCESS_ID = "VLAX_PROCESS_ID"


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join the other processes; returns whether a multi-process run was started.

    Arguments win over ``VLAX_COORDINATOR`` / ``VLAX_NUM_PROCESSES`` / ``VLAX_PROCESS_ID``. With none of them on a
    TPU VM, ``jax.distributed.initialize()`` discovers the slice itself; on a single machine nothing happens.
    """
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    num_processes = num_processes or _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError(f"coordinator {coordinator!r} given without num_processes/process_id "
                             f"(set {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}, or pass them)")
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
        return True
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
        jax.distributed.initialize()
        return True
    return False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Assemble each host's ``[B_local, ...]`` numpy batch into global arrays split over ``data`` x ``fsdp``."""
    spec = PartitionSpec(("data", "fsdp"))
    if jax.process_count() == 1:
        return jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.sharding.NamedSharding(
            mesh, PartitionSpec(("data", "fsdp"), *([None] * (np.ndim(x) - 1))))), local_batch)
    return multihost_utils.host_local_array_to_global_array(local_batch, mesh, spec)
