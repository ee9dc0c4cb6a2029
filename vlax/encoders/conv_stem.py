"""A small convolutional tokenizer for policies trained from scratch on a CPU budget.

A few stride-2 ``3 x 3`` convolutions, each followed by GroupNorm and ReLU, halve the image per stage; a
``1 x 1`` projection maps the last feature map to ``width`` and a learned position embedding marks each cell.
With the defaults a 128 px image becomes an ``8 x 8`` grid: 64 tokens of width 128. Another input resolution
resizes the position grid bicubically (as the ViTs do).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.encoders.interpolate import resize_grid
from vlax.encoders.preprocess import to_unit_float
from vlax.nn import param


def _axes(*names):
    return {"logical_axes": tuple(names)}


class ConvStem(nnx.Module):
    """Images ``[B, H, W, C]`` (``uint8`` or float in ``[0, 1]``) -> tokens ``[B, N, width]``.

    ``channels`` gives one stride-2 stage per entry; ``N = (H / 2^len(channels)) * (W / 2^len(channels))``.
    """

    def __init__(
        self,
        width: int = 128,
        *,
        image_size: int = 128,
        channels: Sequence[int] = (32, 64, 128, 128),
        num_channels: int = 3,
        num_groups: int = 8,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        bad = [c for c in channels if c % num_groups]
        if bad:
            raise ValueError(f"channels {list(channels)} must be multiples of num_groups={num_groups}")
        self.width, self.image_size, self.dtype = width, image_size, dtype
        self.grid_size = image_size // 2 ** len(channels)
        if self.grid_size < 1:
            raise ValueError(f"image_size={image_size} is too small for {len(channels)} stride-2 stages")
        convs, norms = [], []
        previous = num_channels
        for c in channels:
            convs.append(nnx.Conv(previous, c, (3, 3), strides=2, padding="SAME", dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs,
                                  kernel_metadata=_axes(None, None, None, "embed"), bias_metadata=_axes("embed")))
            norms.append(nnx.GroupNorm(c, num_groups=num_groups, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype,
                                       rngs=rngs, scale_metadata=_axes("embed"), bias_metadata=_axes("embed")))
            previous = c
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        self.proj = nnx.Conv(previous, width, (1, 1), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                             kernel_metadata=_axes(None, None, None, "embed"), bias_metadata=_axes("embed"))
        self.position_embedding = param(rngs, nnx.initializers.normal(stddev=0.02),
                                        (self.grid_size ** 2, width), (None, "embed"), param_dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, N, width]``."""
        x = to_unit_float(images) * 2.0 - 1.0
        if self.dtype is not None:
            x = x.astype(self.dtype)
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.relu(norm(conv(x)))
        x = self.proj(x)
        b, gh, gw, d = x.shape
        g = self.grid_size
        pos = resize_grid(self.position_embedding[...].reshape(g, g, d), (gh, gw))
        return x.reshape(b, gh * gw, d) + pos.reshape(1, gh * gw, d).astype(x.dtype)
