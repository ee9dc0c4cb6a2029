"""Device mesh and parameter sharding from logical axis names.

Parameters record a logical name per axis (:mod:`vlax.nn.params`). One rules table maps logical names to mesh
axes (tensor parallelism); on top of that, FSDP shards every array of at least ``fsdp_min_bytes`` over the
``fsdp`` mesh axis on its largest axis that divides evenly and is not already sharded.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlax.nn.params import logical_axes_of

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or None: replicated). Kept as data so a config can override single entries.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("embed", None),
    ("layers", None),
)

FSDP_MIN_BYTES = 4 * 2**20


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; ``-1`` takes the devices left over. Axes are Auto (GSPMD propagation)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into data={data} fsdp={fsdp} tensor={tensor}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {int(np.prod(sizes))} "
                         f"does not match the {len(devices)} devices available")
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def logical_to_spec(axes: Sequence[str | None], rules=DEFAULT_RULES) -> list:
    """Mesh axis per array axis from the rules table (unknown logical names stay replicated)."""
    table = dict(rules)
    return [table.get(a) if a is not None else None for a in axes]


def spec_for(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, *, rules=DEFAULT_RULES,
             itemsize: int = 4, fsdp_min_bytes: int = FSDP_MIN_BYTES) -> PartitionSpec:
    """PartitionSpec of one parameter: rules first, then FSDP on the largest free, evenly divisible axis."""
    spec = logical_to_spec(axes, rules)
    for i, mesh_axis in enumerate(spec):  # drop a rule whose mesh axis does not divide this array axis
        names = (mesh_axis,) if isinstance(mesh_axis, str) else (mesh_axis or ())
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        if size > 1 and shape[i] % size:
            spec[i] = None
        elif size == 1:
            spec[i] = None
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1 and int(np.prod(shape)) * itemsize >= fsdp_min_bytes:
        free = [i for i in np.argsort(shape)[::-1] if spec[i] is None and shape[i] % fsdp == 0]
        if free:
            spec[free[0]] = "fsdp"
    return PartitionSpec(*spec)


def state_shardings(state: Any, mesh: Mesh, *, rules=DEFAULT_RULES, fsdp_min_bytes: int = FSDP_MIN_BYTES) -> Any:
    """``NamedSharding`` for every variable of an ``nnx.State`` (abstract or concrete), same tree structure."""

    def one(variable):
        if not isinstance(variable, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        value = variable.get_value()
        spec = spec_for(value.shape, logical_axes_of(variable), mesh, rules=rules,
                        itemsize=np.dtype(value.dtype).itemsize, fsdp_min_bytes=fsdp_min_bytes)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch arrays split on their leading axis over ``data`` x ``fsdp``."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))
