"""A pre-norm transformer encoder over an explicit attention mask (ViT / Octo blocks).

``x += attn(LN(x)); x += mlp(LN(x))`` per block, then a final LayerNorm. Attention has biases on every
projection; the MLP activation defaults to the tanh GELU (Flax's ``nn.gelu``, which Octo uses). The caller owns
the layout: it passes the ``[B, N, N]`` boolean mask (see :mod:`vlax.nn.group_mask`).
"""

from __future__ import annotations

import jax
from flax import nnx

from vlax.nn import Attention, LayerNorm, Mlp


class EncoderBlock(nnx.Module):
    def __init__(self, width: int, num_heads: int, mlp_dim: int, *, act: str = "gelu_tanh", norm_eps: float = 1e-6,
                 rngs: nnx.Rngs):
        self.norm1 = LayerNorm(width, eps=norm_eps, rngs=rngs)
        self.attn = Attention(width, num_heads, use_bias=True, rngs=rngs)
        self.norm2 = LayerNorm(width, eps=norm_eps, rngs=rngs)
        self.mlp = Mlp(width, mlp_dim, act=act, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        h, _ = self.attn(self.norm1(x), mask=mask)
        x = x + h
        return x + self.mlp(self.norm2(x))


class MaskedEncoder(nnx.Module):
    """``x [B, N, D]``, ``mask [B, N, N]`` (query, key) -> ``[B, N, D]``."""

    def __init__(self, width: int, depth: int, num_heads: int, mlp_dim: int, *, act: str = "gelu_tanh",
                 norm_eps: float = 1e-6, rngs: nnx.Rngs):
        if width % num_heads:
            raise ValueError(f"width={width} is not a multiple of num_heads={num_heads}")
        self.layers = nnx.List([EncoderBlock(width, num_heads, mlp_dim, act=act, norm_eps=norm_eps, rngs=rngs)
                                for _ in range(depth)])
        self.final_norm = LayerNorm(width, eps=norm_eps, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x, mask)
        return self.final_norm(x)


__all__ = ["EncoderBlock", "MaskedEncoder"]
