"""Octo's ``SmallStem`` image tokenizer: a few weight-standardized stride-2 convolutions, then a patch projection.

Each stage is ``StdConv (3 x 3, stride 2, padding 1) -> GroupNorm (32 groups) -> ReLU``; a ``p/16 x p/16``
convolution (``embedding``) then maps every cell to ``num_features``. With four stages and ``patch_size=16``
(``SmallStem16``) a 256 px image becomes a 16 x 16 grid: 256 tokens. Pixels enter as ``uint8`` and are mapped to
[-1, 1] by ``x / 127.5 - 1`` (Octo's ``normalize_images``); several images stacked on the channel axis (Octo's
observation + goal early fusion: 6 channels) are one input.

The convolution kernels are stored raw and standardized at every call (zero mean, unit std over ``h, w, c_in``,
eps 1e-5 added to the std), so imported Octo kernels are used as stored.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.nn import param

STD_EPS = 1e-5


def weight_standardize(kernel: jax.Array, eps: float = STD_EPS) -> jax.Array:
    """``[kh, kw, c_in, c_out]`` -> the same kernel with zero mean and unit (population) std per output channel."""
    k = kernel - jnp.mean(kernel, axis=(0, 1, 2))
    return k / (jnp.std(k, axis=(0, 1, 2)) + eps)


class StdConv(nnx.Module):
    """Convolution with a weight-standardized kernel ``[k, k, c_in, c_out]`` and a bias; channels last."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1, padding: int = 0,
                 standardize: bool = True, rngs: nnx.Rngs):
        self.stride, self.padding, self.standardize = stride, padding, standardize
        init = nnx.initializers.lecun_normal()
        self.kernel = param(rngs, init, (kernel_size, kernel_size, in_channels, out_channels),
                            (None, None, None, "embed"))
        self.bias = param(rngs, nnx.initializers.zeros, (out_channels,), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C_in] -> [B, H', W', C_out]``."""
        k = self.kernel[...]
        if self.standardize:
            k = weight_standardize(k)
        p = self.padding
        y = jax.lax.conv_general_dilated(x, k.astype(x.dtype), (self.stride, self.stride), [(p, p), (p, p)],
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(x.dtype)


def normalize_pixels(images: jax.Array) -> jax.Array:
    """``uint8`` images -> float32 in [-1, 1] as Octo computes it (``x / 127.5 - 1``); floats pass unchanged."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 127.5 - 1.0
    return images.astype(jnp.float32)


class SmallStem(nnx.Module):
    """Images ``[B, H, W, C]`` -> tokens ``[B, (H / p) * (W / p), num_features]`` (``p = patch_size``).

    Defaults are Octo's ``SmallStem16``: features (32, 96, 192, 384), 512 output features, 6 input channels
    (observation and goal image stacked).
    """

    def __init__(self, *, num_channels: int = 6, features: Sequence[int] = (32, 96, 192, 384), num_features: int = 512,
                 patch_size: int = 16, kernel_size: int = 3, num_groups: int = 32, rngs: nnx.Rngs):
        features = tuple(int(f) for f in features)
        bad = [f for f in features if f % num_groups]
        if bad:
            raise ValueError(f"SmallStem features {list(features)} must be multiples of num_groups={num_groups}")
        if patch_size % 16 or patch_size < 16:
            raise ValueError(f"patch_size={patch_size}: the stem's four stride-2 stages reach 1/16, so the patch "
                             "size must be a multiple of 16 (SmallStem16: 16, SmallStem32: 32)")
        self.num_channels, self.num_features, self.patch_size = num_channels, num_features, patch_size
        convs, norms, previous = [], [], num_channels
        for f in features:
            convs.append(StdConv(previous, f, kernel_size, stride=2, padding=1, rngs=rngs))
            norms.append(nnx.GroupNorm(f, num_groups=num_groups, epsilon=1e-6, rngs=rngs))
            previous = f
        self.convs, self.norms = nnx.List(convs), nnx.List(norms)
        # plain (not standardized) patch projection, as Octo's nn.Conv named "embedding"
        self.embedding = StdConv(previous, num_features, patch_size // 16, stride=patch_size // 16,
                                 standardize=False, rngs=rngs)

    def num_tokens(self, height: int, width: int) -> int:
        return (height // self.patch_size) * (width // self.patch_size)

    def __call__(self, images: jax.Array) -> jax.Array:
        """``[B, H, W, num_channels]`` (uint8 or [-1, 1] floats) -> ``[B, N, num_features]``."""
        if images.shape[-1] != self.num_channels:
            raise ValueError(f"images have {images.shape[-1]} channels; this stem takes {self.num_channels} "
                             "(3 per stacked image: observation, then goal)")
        x = normalize_pixels(images)
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.relu(norm(conv(x)))
        x = self.embedding(x)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


__all__ = ["SmallStem", "StdConv", "weight_standardize", "normalize_pixels"]
