"""Multi-host set-up: ``jax.distributed`` from arguments, the environment or a detected cluster (SLURM, Open MPI,
TPU pods), and global batches from local shards.

The trainer calls :func:`initialize` once, before any device is touched, and can log
:func:`detect_layout` ``(...).describe()`` first (it initialises nothing)."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import socket
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, PartitionSpec

ENV_COORDINATOR = "VLAX_COORDINATOR"      # host:port of process 0
ENV_NUM_PROCESSES = "VLAX_NUM_PROCESSES"
ENV_PROCESS_ID = "VLAX_PROCESS_ID"
ENV_CLUSTER = "VLAX_CLUSTER"              # a jax cluster-detection method ("slurm", "ompi", "k8s", ...) or "none"
ENV_COORDINATOR_BIND = "VLAX_COORDINATOR_BIND"  # what process 0 binds: host[:port], or "all" (every interface)

# Clusters detected from their environment variables alone. Others (k8s: present in every pod, even single-process
# jobs; mpi4py: needs MPI; GCE TPU metadata) are used only when asked for by name.
_AUTO_CLUSTERS = ("slurm", "ompi")
_ALL_INTERFACES = ("all", "*", "0.0.0.0", "::", "[::]")


@dataclasses.dataclass(frozen=True)
class ProcessLayout:
    """How this process would join a multi-process run, found without initialising anything.

    Attributes:
      source: where it came from: ``"arguments"``, ``"VLAX_* environment"``, ``"tpu"`` or a jax cluster name
        (``"slurm"``, ``"ompi"``, ...).
      process_id, num_processes: this process's index and the process count (``None``: found by jax when it
        initialises, e.g. from TPU metadata).
      coordinator: ``host:port`` of process 0 (``None``: found by jax).
      bind_address: what process 0 binds (``None``: jax's default, every interface).
      local_device_ids: the devices jax restricts this process to (SLURM / Open MPI: one device per process, the
        local rank, unless ``JAX_LOCAL_DEVICE_IDS`` says otherwise); ``None``: every local device.
    """

    source: str
    process_id: int | None
    num_processes: int | None
    coordinator: str | None
    bind_address: str | None
    local_device_ids: tuple[int, ...] | None = None

    def describe(self) -> str:
        """One line for the run log, e.g. ``process 1 of 2 (slurm), coordinator node001:61234 (binds ...)``."""
        unknown = "(found by jax)"
        where = "?" if self.process_id is None else self.process_id
        count = unknown if self.num_processes is None else self.num_processes
        devices = "all local devices" if self.local_device_ids is None else f"devices {list(self.local_device_ids)}"
        return (f"process {where} of {count} ({self.source}), coordinator {self.coordinator or unknown} "
                f"(process 0 binds {self.bind_address or 'every interface'}), {devices}")


def detect_layout(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                  *, cluster: str | None = None, coordinator_bind_address: str | None = None
                  ) -> ProcessLayout | None:
    """The process layout :func:`initialize` would use, or ``None`` for a single-process run. Starts nothing.

    In order: the arguments; ``VLAX_COORDINATOR`` / ``VLAX_NUM_PROCESSES`` / ``VLAX_PROCESS_ID``; a cluster named
    by ``cluster`` or ``VLAX_CLUSTER`` (any of jax's detection methods; ``"none"`` turns detection off); SLURM
    (``SLURM_JOB_ID``, ``SLURM_NTASKS`` > 1, ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NODELIST``) or
    Open MPI (``mpirun``) found by jax's own cluster detection; a Cloud TPU pod (``TPU_WORKER_HOSTNAMES`` /
    ``CLOUD_TPU_TASK_ID``). ``JAX_COORDINATOR_ADDRESS`` and ``JAX_COORDINATOR_PORT`` override the detected
    coordinator as they do in jax.

    Process 0 binds the host of the coordinator address (not every interface) unless ``coordinator_bind_address``
    / ``VLAX_COORDINATOR_BIND`` (``host[:port]``, or ``"all"``) or jax's ``JAX_COORDINATOR_BIND_ADDRESS`` says
    otherwise.
    """
    source = "arguments" if coordinator else "VLAX_* environment"
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    num_processes = num_processes or _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    bind_override = coordinator_bind_address or os.environ.get(ENV_COORDINATOR_BIND)
    if coordinator:
        if num_processes is None or process_id is None:
            raise ValueError(f"coordinator {coordinator!r} given without num_processes/process_id "
                             f"(set {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}, or pass them)")
        return ProcessLayout(source, process_id, num_processes, coordinator, _bind_address(coordinator, bind_override))
    cluster = cluster or os.environ.get(ENV_CLUSTER) or None
    if cluster in ("none", "deactivate"):
        return None
    envs = _jax_clusters()
    if cluster is not None:
        if cluster not in envs:
            raise ValueError(f"unknown cluster {cluster!r} ({ENV_CLUSTER}); jax detects: {sorted(envs)}, or 'none'")
        if not envs[cluster].is_env_present():
            raise ValueError(f"cluster {cluster!r} was asked for but its environment is not present here")
        if cluster not in _AUTO_CLUSTERS:  # their layout needs network/MPI calls: leave them to jax
            return ProcessLayout(cluster, None, None, os.environ.get("JAX_COORDINATOR_ADDRESS"),
                                 _bind_address(os.environ.get("JAX_COORDINATOR_ADDRESS"), bind_override))
    for name in (cluster,) if cluster else _AUTO_CLUSTERS:
        env = envs.get(name)
        if env is None or not env.is_env_present():
            continue
        count = env.get_process_count()
        if count <= 1 and cluster is None:  # a single task: nothing to join (and no device restriction)
            continue
        address = os.environ.get("JAX_COORDINATOR_ADDRESS") or env.get_coordinator_address(
            timeout_secs=None, override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT"))
        local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
        local_ids = tuple(int(i) for i in local.split(",")) if local else (env.get_local_process_id(),)
        return ProcessLayout(name, env.get_process_id(), count, address, _bind_address(address, bind_override),
                             None if None in local_ids else local_ids)
    if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("CLOUD_TPU_TASK_ID"):
        hosts = os.environ.get("TPU_WORKER_HOSTNAMES")
        worker = _env_int("TPU_WORKER_ID")
        return ProcessLayout("tpu", worker if worker is not None else _env_int("CLOUD_TPU_TASK_ID"),
                             len(hosts.split(",")) if hosts else None, None, _bind_address(None, bind_override))
    return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cluster: str | None = None,
               coordinator_bind_address: str | None = None) -> bool:
    """Join the other processes; returns whether a multi-process run was started.

    The layout is :func:`detect_layout`'s (same arguments). With explicit arguments or ``VLAX_*`` variables they
    are passed to ``jax.distributed.initialize``; for a detected cluster (SLURM, Open MPI, a TPU pod, or the one
    named by ``cluster``) it is called without them, so jax's own detection decides, and only the bind address
    is passed. On a single machine nothing happens.
    """
    layout = detect_layout(coordinator, num_processes, process_id, cluster=cluster,
                           coordinator_bind_address=coordinator_bind_address)
    if layout is None:
        return False
    kwargs: dict[str, Any] = {}
    if layout.bind_address is not None:
        kwargs["coordinator_bind_address"] = layout.bind_address
        if layout.process_id == 0:
            _check_bindable(layout.bind_address, layout.num_processes)
    if layout.source in ("arguments", "VLAX_* environment"):
        jax.distributed.initialize(layout.coordinator, num_processes=layout.num_processes,
                                   process_id=layout.process_id, **kwargs)
    elif layout.source == "tpu":
        jax.distributed.initialize(**kwargs)
    else:  # jax detects the parameters itself; naming the method keeps it on the cluster reported above
        jax.distributed.initialize(cluster_detection_method=layout.source, **kwargs)
    return True


def _jax_clusters() -> dict[str, Any]:
    """jax's cluster environments by detection-method name (jax keeps the registry private)."""
    try:
        from jax._src import clusters
    except ImportError:  # a jax without it: only explicit layouts and TPU pods
        return {}
    return {env.name: env for env in getattr(clusters.ClusterEnv, "_cluster_types", []) if getattr(env, "name", "")}


def _split_host_port(address: str) -> tuple[str, str | None]:
    if address.startswith("["):  # [v6]:port
        host, _, rest = address[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if address.count(":") == 1:
        host, port = address.split(":")
        return host, port
    return address, None  # a bare host (or a bare v6 address)


def _join(host: str, port: str) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_address(coordinator: str | None, override: str | None) -> str | None:
    """What process 0 binds: the override (``"all"`` = every interface), else jax's own variable if set (``None``
    lets jax read it), else the coordinator's host on its port."""
    port = _split_host_port(coordinator)[1] if coordinator else None
    if override:
        host, override_port = _split_host_port(override)
        port = override_port or port
        if port is None:
            raise ValueError(f"{ENV_COORDINATOR_BIND}={override!r} needs a port (host:port) when the coordinator's "
                             "port is not known before jax initialises")
        return _join("::", port) if host in _ALL_INTERFACES or override in _ALL_INTERFACES else _join(host, port)
    if os.environ.get("JAX_COORDINATOR_BIND_ADDRESS") or coordinator is None or port is None:
        return None
    return _join(_split_host_port(coordinator)[0], port)


def _check_bindable(bind: str, num_processes: int | None) -> None:
    """On process 0: fail with a clear message when the bind host is not an address of this machine, and warn
    when it resolves to loopback only (other machines could not reach it)."""
    host, port = _split_host_port(bind)
    if host in ("::", "0.0.0.0"):
        return
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, ValueError) as e:
        raise ValueError(f"process 0 cannot resolve its coordinator bind address {bind!r} ({e}); set "
                         f"{ENV_COORDINATOR_BIND}=<local ip>:<port> or {ENV_COORDINATOR_BIND}=all") from None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(sockaddr)
        except OSError as e:
            raise ValueError(f"process 0 cannot bind the coordinator address {bind!r} ({e.strerror}): the host is "
                             f"not an address of this machine or the port is taken; set {ENV_COORDINATOR_BIND}="
                             f"<local ip>:<port>, or {ENV_COORDINATOR_BIND}=all to bind every interface") from None
    loopback = all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)
    if loopback and not _is_loopback_name(host) and (num_processes or 0) > 1:  # e.g. a 127.0.1.1 hosts entry
        logging.warning("coordinator host %r resolves to loopback %s on process 0: processes on other machines "
                        "cannot reach it; set %s to this machine's address (or 'all')", host, infos[0][4][0],
                        ENV_COORDINATOR_BIND)


def _is_loopback_name(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
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
