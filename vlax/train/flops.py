"""FLOPs of a JAX function counted on its jaxpr: matrix products and convolutions (the terms that matter for
utilisation), with loop bodies multiplied by their trip count.

XLA's cost analysis counts the body of a ``lax.scan`` once, whatever its length, so it undercounts scanned layer
stacks by about their depth; it also differs between backends. This count does neither.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.extend import core as jex_core


def _dot_flops(eqn) -> float:
    (lhs_contract, _), (lhs_batch, _) = eqn.params["dimension_numbers"]
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    out = eqn.outvars[0].aval.shape
    contract = int(np.prod([lhs[d] for d in lhs_contract])) if lhs_contract else 1
    return 2.0 * float(np.prod(out)) * contract


def _conv_flops(eqn) -> float:
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    dn = eqn.params["dimension_numbers"]
    rhs_spec = dn.rhs_spec  # (out_features, in_features per group, *spatial)
    window = int(np.prod([rhs[d] for d in rhs_spec[2:]]))
    return 2.0 * float(np.prod(out)) * rhs[rhs_spec[1]] * window


def _subjaxprs(eqn):
    for value in eqn.params.values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "while":
            # Trip count unknown in general: count the body once (sampling loops are counted by their callers).
            total += jaxpr_flops(eqn.params["body_jaxpr"].jaxpr)
        elif name == "cond":
            total += max((jaxpr_flops(b.jaxpr) for b in eqn.params["branches"]), default=0.0)
        else:
            total += sum(jaxpr_flops(sub) for sub in _subjaxprs(eqn))
    return total


def count_flops(fn: Callable, *args: Any, **kwargs: Any) -> float:
    """Matmul + convolution FLOPs of one call of ``fn(*args, **kwargs)`` (arguments may be abstract)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
