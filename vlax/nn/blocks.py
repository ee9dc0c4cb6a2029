"""Pre-norm transformer blocks shared by the language backbones, the action experts and the heads.

``DecoderBlock``: RMSNorm, RoPE attention, gated MLP (Llama / Gemma). ``EncoderBlock`` / ``MaskedEncoder``:
``x += attn(LN(x)); x += mlp(LN(x))`` with biases on every projection, over an explicit ``[B, N, N]`` boolean
mask (ViT / Octo / GPT-2 blocks; the MLP activation defaults to the tanh GELU, Flax's ``nn.gelu`` and GPT-2's
``gelu_new``), then a final LayerNorm; the caller owns the layout (see :mod:`vlax.nn.group_mask`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.nn.attention import Attention, Implementation
from vlax.nn.mlp import GatedMlp, Mlp
from vlax.nn.norms import LayerNorm, RMSNorm
from vlax.nn.rope import RopeConfig


class DecoderBlock(nnx.Module):
    """``x += attn(norm(x)); x += mlp(norm(x))`` with RMSNorm, RoPE attention and a gated MLP (Llama / Gemma).

    Submodule names follow HF Llama: ``input_layernorm``, ``self_attn``, ``post_attention_layernorm``, ``mlp``.
    The ``kv`` / ``cache_index`` arguments are those of :class:`vlax.nn.Attention`.
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        mlp_dim: int,
        *,
        act: str = "silu",
        norm_eps: float = 1e-6,
        norm_unit_offset: bool = False,
        rope: RopeConfig | None = RopeConfig(),
        attn_softcap: float | None = None,
        attn_bias: bool = False,
        implementation: Implementation = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(width, eps=norm_eps, unit_offset=norm_unit_offset, rngs=rngs,
                                       param_dtype=param_dtype)
        self.self_attn = Attention(width, num_heads, num_kv_heads, head_dim, use_bias=attn_bias, out_bias=False,
                                   rope=rope, softcap=attn_softcap, implementation=implementation, rngs=rngs, **kw)
        self.post_attention_layernorm = RMSNorm(width, eps=norm_eps, unit_offset=norm_unit_offset, rngs=rngs,
                                                param_dtype=param_dtype)
        self.mlp = GatedMlp(width, mlp_dim, act=act, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, *, mask: jax.Array, positions: jax.Array | None,
                 kv: tuple[jax.Array, jax.Array] | None = None, cache_index: jax.Array | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """``x [B, T, D]`` -> ``(x [B, T, D], (k, v))``."""
        h, new_kv = self.self_attn(self.input_layernorm(x), mask=mask, positions=positions, kv=kv,
                                   cache_index=cache_index)
        x = x + h.astype(x.dtype)
        x = x + self.mlp(self.post_attention_layernorm(x)).astype(x.dtype)
        return x, new_kv



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
