"""A small convolutional tokenizer for policies trained from scratch on a CPU budget.

A few stride-2 ``3 x 3`` convolutions, each followed by GroupNorm and ReLU, halve the image per stage; a
``1 x 1`` projection maps the last feature map to ``width`` and a learned position embedding marks each cell.
With the defaults a 128 px image becomes an ``8 x 8`` grid: 64 tokens of width 128. Another input resolution
resizes the position grid bicubically (as the ViTs do).

``keypoints=K`` appends ``K`` spatial soft-argmax tokens (Levine et al.), taken from the feature map after stage
``keypoint_stage`` (default 2: a quarter of the image size): each is the softmax-weighted mean ``(x, y)`` of one
learned keypoint map, embedded by ``Dense(2 -> width)`` plus a learned embedding of its index. A small object's
position (a goal marker of a few pixels) then reaches the policy as coordinates, which the coarse grid tokens
average away.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.encoders.interpolate import resize_grid
from vlax.encoders.preprocess import to_unit_float
from vlax.nn import Dense, param
from vlax.nn.spatial_softmax import SpatialSoftmax


def _axes(*names):
    return {"logical_axes": tuple(names)}


class ConvStem(nnx.Module):
    """Images ``[B, H, W, C]`` (``uint8`` or float in ``[0, 1]``) -> tokens ``[B, N, width]``.

    ``channels`` gives one stride-2 stage per entry; ``N = (H / 2^len(channels)) * (W / 2^len(channels))``, plus
    ``keypoints`` tokens (see the module docstring).
    """

    def __init__(
        self,
        width: int = 128,
        *,
        image_size: int = 128,
        channels: Sequence[int] = (32, 64, 128, 128),
        num_channels: int = 3,
        num_groups: int = 8,
        keypoints: int = 0,
        keypoint_stage: int = 2,
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
        if keypoints < 0 or (keypoints and not 1 <= keypoint_stage <= len(channels)):
            raise ValueError(f"keypoints={keypoints}, keypoint_stage={keypoint_stage}: use keypoints >= 0 and a stage "
                             f"in 1..{len(channels)}")
        self.keypoint_stage = int(keypoint_stage) if keypoints else 0
        if keypoints:
            size = image_size // 2 ** keypoint_stage
            self.keypoint_pool = SpatialSoftmax(size, size, channels[keypoint_stage - 1], num_keypoints=keypoints,
                                                rngs=rngs)
            self.keypoint_proj = Dense(2, width, axes=(None, "embed"), rngs=rngs)
            self.keypoint_embedding = param(rngs, nnx.initializers.normal(stddev=0.02), (keypoints, width),
                                            (None, "embed"), param_dtype)
        else:
            self.keypoint_pool = self.keypoint_proj = self.keypoint_embedding = None
        self.position_embedding = param(rngs, nnx.initializers.normal(stddev=0.02),
                                        (self.grid_size ** 2, width), (None, "embed"), param_dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, N, width]``."""
        x = to_unit_float(images) * 2.0 - 1.0
        if self.dtype is not None:
            x = x.astype(self.dtype)
        keypoints = None
        for stage, (conv, norm) in enumerate(zip(self.convs, self.norms), start=1):
            x = jax.nn.relu(norm(conv(x)))
            if stage == self.keypoint_stage:
                keypoints = self.keypoint_pool(x)  # [B, K, 2]
        x = self.proj(x)
        b, gh, gw, d = x.shape
        g = self.grid_size
        pos = resize_grid(self.position_embedding[...].reshape(g, g, d), (gh, gw))
        tokens = x.reshape(b, gh * gw, d) + pos.reshape(1, gh * gw, d).astype(x.dtype)
        if keypoints is None:
            return tokens
        points = self.keypoint_proj(keypoints.astype(tokens.dtype)) + self.keypoint_embedding[...].astype(tokens.dtype)
        return jnp.concatenate([tokens, points], axis=1)
