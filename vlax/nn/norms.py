"""LayerNorm, RMSNorm (incl. Gemma's ``1 + w`` form) and LayerScale, computed in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.nn.params import param


class LayerNorm(nnx.Module):
    def __init__(self, features: int, *, eps: float = 1e-6, use_bias: bool = True, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.scale = param(rngs, nnx.initializers.ones, (features,), ("embed",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (features,), ("embed",), param_dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., D] -> [..., D]`` (same dtype as ``x``; statistics in float32)."""
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm. ``unit_offset=True`` is Gemma's form: the scale is ``1 + w`` with ``w`` initialised to zero."""

    def __init__(self, features: int, *, eps: float = 1e-6, unit_offset: bool = False, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.eps, self.unit_offset = eps, unit_offset
        init = nnx.initializers.zeros if unit_offset else nnx.initializers.ones
        self.scale = param(rngs, init, (features,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., D] -> [..., D]``."""
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        if self.unit_offset:
            scale = 1.0 + scale
        # Llama multiplies after casting back to the input dtype, Gemma before; in float32 both agree.
        return (y * scale).astype(x.dtype)


class LayerScale(nnx.Module):
    """Per-channel residual-branch scale (CaiT / DINOv2), initialised to ``init_value``."""

    def __init__(self, features: int, *, init_value: float = 1e-5, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        self.lambda1 = param(rngs, nnx.initializers.constant(init_value), (features,), ("embed",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.lambda1[...].astype(x.dtype)
