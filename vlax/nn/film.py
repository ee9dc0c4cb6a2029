"""Feature-wise linear modulation (FiLM, Perez et al. 2018) of token features by one conditioning vector.

    gamma = scale(c), beta = shift(c)                  c [B, C] -> [B, D] each (two linear layers)
    y = x * (1 + gamma[:, None]) + beta[:, None]       x [B, T, D]: the same per-channel affine map on every token

The ``1 + gamma`` form (the FiLM paper's section 7.2, and OpenVLA-OFT's ViT blocks) makes zero projections the
identity. Modulating channels rather than tokens keeps the map spatially global, as FiLM on a conv net's channels.

``init``: ``"uniform"`` is torch ``nn.Linear``'s default, U(-1/sqrt(C), 1/sqrt(C)) for kernel and bias, which
is how OpenVLA-OFT's FiLM layers start (near, not exactly, the identity: |gamma|, |beta| ~ 1/sqrt(C) per unit of
|c|); ``"zeros"`` starts as the exact identity.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.nn.linear import Dense
from vlax.nn.params import param

FiLMInit = Literal["uniform", "zeros"]


def _symmetric_uniform(bound: float):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class FiLM(nnx.Module):
    """``x * (1 + scale(c)) + shift(c)`` per channel; ``scale``/``shift`` are :class:`vlax.nn.Dense` ``[C, D]``."""

    def __init__(self, cond_dim: int, width: int, *, init: FiLMInit = "uniform", dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        if init == "uniform":
            bound = 1.0 / math.sqrt(cond_dim)
            kernel_init, bias_init = _symmetric_uniform(bound), _symmetric_uniform(bound)
        elif init == "zeros":
            kernel_init = bias_init = nnx.initializers.zeros
        else:
            raise ValueError(f"unknown FiLM init {init!r}; known: ['uniform', 'zeros']")
        self.cond_dim, self.width = cond_dim, width
        axes = ("embed", "embed")
        self.scale = Dense(cond_dim, width, axes=axes, kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
        self.shift = Dense(cond_dim, width, axes=axes, kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
        # Dense starts its bias at zero; torch's nn.Linear draws it like the weight
        self.scale.bias = param(rngs, bias_init, (width,), ("embed",), param_dtype)
        self.shift.bias = param(rngs, bias_init, (width,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        """``x [B, T, D]``, ``cond [B, C]`` -> ``[B, T, D]`` (in ``x``'s dtype)."""
        if cond.ndim != 2 or cond.shape[-1] != self.cond_dim or cond.shape[0] != x.shape[0]:
            raise ValueError(f"FiLM conditioning must be [B={x.shape[0]}, {self.cond_dim}], got {tuple(cond.shape)}")
        gamma = self.scale(cond).astype(x.dtype)[:, None, :]
        beta = self.shift(cond).astype(x.dtype)[:, None, :]
        return x * (1 + gamma) + beta


__all__ = ["FiLM", "FiLMInit"]
