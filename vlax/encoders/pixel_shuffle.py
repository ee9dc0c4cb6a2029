"""Pixel-shuffle connector (Idefics3 / SmolVLM): fold ``s x s`` neighbouring patch tokens into one, then project.

A ``g x g`` grid of ViT tokens ``[B, g*g, D]`` becomes ``[B, (g/s)^2, D*s*s]``: each output token concatenates the
features of an ``s x s`` block of patches, so a 512-pixel SmolVLM2 image (32 x 32 patches of 16) reaches the
language model as 64 tokens. The feature order inside a block follows the reshapes of the reference
implementation (row of the block outermost, then column), which the projection's weights depend on.
"""

from __future__ import annotations

import jax
from einops import rearrange
from flax import nnx

from vlax.nn import Dense


def pixel_shuffle(tokens: jax.Array, scale: int) -> jax.Array:
    """``[B, N, D]`` tokens of a square grid -> ``[B, N / scale^2, D * scale^2]``.

    Output token ``(i, j)`` holds, in order, the features of patches ``(i*s + a, j*s + b)`` for ``a`` (outer)
    and ``b`` (inner) in ``range(s)``.
    """
    b, n, d = tokens.shape
    side = int(round(n ** 0.5))
    if side * side != n or side % scale:
        raise ValueError(f"pixel shuffle needs a square grid whose side divides by scale={scale}; got {n} tokens")
    return rearrange(tokens, "b (i a j c) d -> b (i j) (a c d)", i=side // scale, a=scale, j=side // scale, c=scale)


class PixelShuffleConnector(nnx.Module):
    """Pixel shuffle then a bias-free linear map to the language model's width (``modality_projection.proj``)."""

    def __init__(self, vision_width: int, text_width: int, scale: int, *, rngs: nnx.Rngs):
        self.scale = int(scale)
        self.proj = Dense(vision_width * self.scale ** 2, text_width, use_bias=False, axes=("embed", "embed"),
                          rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """``[B, N, D_vision]`` -> ``[B, N / scale^2, D_text]``."""
        return self.proj(pixel_shuffle(tokens, self.scale))


def num_tokens(image_size: int, patch_size: int, scale: int) -> int:
    """Tokens per image after the connector."""
    return (image_size // patch_size // scale) ** 2


__all__ = ["pixel_shuffle", "PixelShuffleConnector", "num_tokens"]
