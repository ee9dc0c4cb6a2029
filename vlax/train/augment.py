"""Image augmentation inside the jitted train step, on the accelerator.

Behaviour cloning from a fixed camera needs small translations (DrQ's random shift), not the random resized crops
and colour jitter of image classification: those move and rescale the goal marker the policy must locate. Done
here, the augmentation costs a gather per batch instead of per-frame work in the host's input pipeline.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp


def random_shift(images: jax.Array, key: jax.Array, pad: int) -> jax.Array:
    """Each example translated by an integer offset in ``[-pad, pad]`` pixels per axis, borders edge-replicated.

    Args:
      images: ``uint8 [B, ..., h, w, 3]``; the entries between the batch and the pixel axes (an observation
        window ``T``) share their example's offset, so motion within a window is kept.
      key: PRNG key; one offset pair per example.
      pad: the largest shift in pixels (0 returns ``images``).

    Returns:
      ``[B, ..., h, w, 3]``, the dtype of ``images``.
    """
    if pad < 0:
        raise ValueError(f"random shift pad={pad}; use a non-negative number of pixels")
    if pad == 0:
        return images
    batch, (h, w, c) = images.shape[0], images.shape[-3:]
    x = images.reshape(batch, -1, h, w, c)
    x = jnp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    offsets = jax.random.randint(key, (batch, 2), 0, 2 * pad + 1)

    def crop(example: jax.Array, offset: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(example, (0, offset[0], offset[1], 0), (example.shape[0], h, w, c))

    return jax.vmap(crop)(x, offsets).reshape(images.shape)


def shift_cameras(images: Mapping[str, jax.Array], key: jax.Array, pad: int) -> dict[str, jax.Array]:
    """:func:`random_shift` of every camera, each with its own offsets."""
    keys = jax.random.split(key, len(images))
    return {name: random_shift(image, k, pad) for (name, image), k in zip(sorted(images.items()), keys)}
