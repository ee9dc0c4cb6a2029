"""Feed-forward blocks: GELU MLP (ViT), SwiGLU (Llama), GeGLU (Gemma)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.nn.linear import Dense

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP's sigmoid approximation of GELU
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Activation function by name; HF spellings (``gelu_pytorch_tanh``, ``swish``) are accepted."""
    aliases = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "swish": "silu", "gelu_fast": "gelu_tanh"}
    key = aliases.get(name, name)
    if key not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS) + sorted(aliases)}")
    return ACTIVATIONS[key]


class Mlp(nnx.Module):
    """``fc2(act(fc1(x)))`` with biases, the ViT block."""

    def __init__(self, features: int, hidden: int, *, act: str = "gelu", use_bias: bool = True, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.act = activation(act)
        self.fc1 = Dense(features, hidden, use_bias=use_bias, axes=("embed", "mlp"), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Dense(hidden, features, use_bias=use_bias, axes=("mlp", "embed"), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., D] -> [..., D]``."""
        return self.fc2(self.act(self.fc1(x)))


class GatedMlp(nnx.Module):
    """``down(act(gate(x)) * up(x))``: SwiGLU with ``act="silu"``, GeGLU with ``act="gelu_tanh"``."""

    def __init__(self, features: int, hidden: int, *, act: str = "silu", use_bias: bool = False, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.act = activation(act)
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense(features, hidden, axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(features, hidden, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(hidden, features, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., D] -> [..., D]``."""
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
