"""Parameter creation with logical axis names.

Every parameter records the logical name of each of its axes (``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``,
...) in its ``logical_axes`` metadata. The trainer maps logical names to mesh axes with one rules table, so no
module knows anything about the mesh. Parameters of stacked (scanned) layers carry one more leading axis than
their ``logical_axes``; :func:`logical_axes_of` reports it as ``"layers"``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]

default_kernel_init = nnx.initializers.lecun_normal()


def param(
    rngs: nnx.Rngs | None,
    init: Initializer,
    shape: Sequence[int],
    axes: Sequence[str | None],
    dtype=jnp.float32,
) -> nnx.Param:
    """A parameter of ``shape`` initialised by ``init``, annotated with one logical name per axis."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match parameter shape {tuple(shape)}")
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, tuple(shape), dtype), logical_axes=tuple(axes))


def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
    """Logical axis names of a parameter, with ``"layers"`` prepended for each stacking axis."""
    axes = tuple(getattr(variable, "logical_axes", None) or ())
    ndim = jnp.ndim(variable.get_value())
    if not axes:
        return (None,) * ndim
    return ("layers",) * (ndim - len(axes)) + axes


def count_params(tree) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs (works on ``jax.eval_shape`` output)."""
    leaves = jax.tree.leaves(tree)
    return int(sum(int(jnp.size(x)) if not hasattr(x, "shape") else int(_prod(x.shape)) for x in leaves))


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
