"""Perceiver resampler (Flamingo, Alayrac et al. 2022, section 2.1 / figure 5): any number of visual tokens ->
a fixed set of ``num_latents`` tokens.

Each layer lets the learned latents attend to the visual features *and* to themselves (the keys and values are
the concatenation ``[norm(media); norm(latents)]``), then applies a feed-forward block, both residual::

    latents = latents + Attn(q=norm_l(latents), kv=[norm_m(media); norm_l(latents)])
    latents = latents + FFW(latents)          FFW = Dense(4D, no bias) . GELU . Dense(D, no bias) . LayerNorm
    out = LayerNorm(latents)                  [B, num_latents, D]

Sizes of OpenFlamingo (RoboFlamingo's base): width 1024 (CLIP ViT-L), depth 6, 8 heads of 64, 64 latents,
feed-forward x4, bias-free projections, LayerNorm eps 1e-5. One image per call (RoboFlamingo resamples every
frame separately); Flamingo's learned per-frame time embeddings for video inputs are not modelled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.nn import Attention, LayerNorm, Mlp, param, scan_layers, stack_layers


class PerceiverLayer(nnx.Module):
    """One resampler layer: latents cross-attend to ``[media; latents]``, then a feed-forward block."""

    def __init__(self, width: int, *, num_heads: int, head_dim: int, ff_mult: int, norm_eps: float,
                 rngs: nnx.Rngs):
        self.norm_media = LayerNorm(width, eps=norm_eps, rngs=rngs)
        self.norm_latents = LayerNorm(width, eps=norm_eps, rngs=rngs)
        self.attn = Attention(width, num_heads, head_dim=head_dim, use_bias=False, rngs=rngs)
        self.ff_norm = LayerNorm(width, eps=norm_eps, rngs=rngs)
        self.ff = Mlp(width, width * ff_mult, act="gelu", use_bias=False, rngs=rngs)

    def __call__(self, latents: jax.Array, media: jax.Array) -> jax.Array:
        """``latents [B, K, D]``, ``media [B, N, D]`` -> ``[B, K, D]``."""
        q = self.norm_latents(latents)
        kv = jnp.concatenate([self.norm_media(media), q], axis=1)
        h, _ = self.attn(q, kv_input=kv)
        latents = latents + h
        return latents + self.ff(self.ff_norm(latents))


class PerceiverResampler(nnx.Module):
    """``media [B, N, D]`` -> ``[B, num_latents, D]``; see the module docstring (defaults: OpenFlamingo's sizes)."""

    def __init__(self, width: int = 1024, *, depth: int = 6, num_latents: int = 64, num_heads: int = 8,
                 head_dim: int = 64, ff_mult: int = 4, norm_eps: float = 1e-5, remat: str = "none",
                 rngs: nnx.Rngs):
        self.width, self.remat = int(width), remat
        self.latents = param(rngs, nnx.initializers.normal(1.0), (num_latents, width), (None, "embed"))
        self.layers = stack_layers(lambda r: PerceiverLayer(width, num_heads=num_heads, head_dim=head_dim,
                                                            ff_mult=ff_mult, norm_eps=norm_eps, rngs=r), depth, rngs)
        self.norm = LayerNorm(width, eps=norm_eps, rngs=rngs)

    @property
    def num_latents(self) -> int:
        return self.latents.shape[0]

    def __call__(self, media: jax.Array) -> jax.Array:
        """``[B, N, D] -> [B, num_latents, D]``."""
        if media.ndim != 3 or media.shape[-1] != self.width:
            raise ValueError(f"media must be [B, N, {self.width}] (the resampler width), got {tuple(media.shape)}")
        latents = jnp.broadcast_to(self.latents[...].astype(media.dtype), (media.shape[0], *self.latents.shape))

        def body(layer: PerceiverLayer, x, _):
            return layer(x, media), None

        latents, _ = scan_layers(self.layers, body, latents, remat=self.remat)
        return self.norm(latents)


__all__ = ["PerceiverLayer", "PerceiverResampler"]
