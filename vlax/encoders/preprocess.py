"""Image normalisation the pretrained encoders expect (applied to ``[B, H, W, C]`` images)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)  # SigLIP / PaliGemma: pixels mapped to [-1, 1]
SIGLIP_STD = (0.5, 0.5, 0.5)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP (OpenFlamingo's ViT-L/14)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_unit_float(images: jax.Array) -> jax.Array:
    """``uint8`` images -> float32 in ``[0, 1]``; floating images are taken to be in ``[0, 1]`` already."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """``(image - mean) / std`` per channel, from ``uint8`` or ``[0, 1]`` float images ``[..., C]``."""
    x = to_unit_float(images)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
