"""Spatial soft-argmax keypoints (Levine et al.; Diffusion Policy's image pooling)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlax.nn.linear import Dense


def keypoint_grid(height: int, width: int) -> np.ndarray:
    """``[H * W, 2]`` float32 ``(x, y)`` coordinates in [-1, 1], rows in row-major (h, w) order of the map."""
    xs, ys = np.meshgrid(np.linspace(-1.0, 1.0, width), np.linspace(-1.0, 1.0, height))
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1).astype(np.float32)


class SpatialSoftmax(nnx.Module):
    """Feature map ``[B, H, W, C]`` -> keypoints ``[B, K, 2]``: the softmax-weighted mean ``(x, y)`` per channel.

    With ``num_keypoints`` a 1x1 convolution first maps the ``C`` channels to ``K`` keypoint maps (otherwise
    ``K = C``). The coordinate grid is a constant of the map size, not a parameter.
    """

    def __init__(self, height: int, width: int, channels: int, *, num_keypoints: int | None = None,
                 rngs: nnx.Rngs):
        self.height, self.width = height, width
        self.keypoints = Dense(channels, num_keypoints, axes=("embed", None), rngs=rngs) if num_keypoints else None
        self.num_keypoints = num_keypoints or channels

    def __call__(self, features: jax.Array) -> jax.Array:
        b, h, w, _ = features.shape
        if (h, w) != (self.height, self.width):
            raise ValueError(f"SpatialSoftmax was built for a {self.height}x{self.width} map, got {h}x{w}")
        x = self.keypoints(features) if self.keypoints is not None else features
        logits = jnp.swapaxes(x.reshape(b, h * w, self.num_keypoints), 1, 2)  # [B, K, H*W]
        attention = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        # The grid is rebuilt from the map size (a numpy attribute would become abstract under nnx.eval_shape).
        return (attention @ jnp.asarray(keypoint_grid(h, w))).astype(features.dtype)
