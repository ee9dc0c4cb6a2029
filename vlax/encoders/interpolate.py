"""Bicubic resizing of position-embedding grids, numerically equal to ``torch.nn.functional.interpolate``.

Pretrained ViTs (DINOv2, SigLIP) run at resolutions other than their training one by resizing their learned
position-embedding grid. To reproduce a checkpoint's behaviour the resize must match PyTorch's, which differs from
``jax.image.resize``'s cubic kernel:

* ``antialias=False`` (HF ``Dinov2Model``, ``SiglipVisionModel``): Keys' cubic convolution with ``a = -0.75``,
  source coordinate ``(i + 0.5) * in / out - 0.5``, the four taps clamped to the border.
* ``antialias=True`` (HF ``Dinov2WithRegistersModel``): the separable anti-aliased filter of Pillow, cubic with
  ``a = -0.5``; its support widens by ``in / out`` when shrinking, taps outside the image are dropped and the
  remaining weights renormalised.

Both are linear maps along each axis, so they are built once as ``[out, in]`` matrices in float64 numpy (sizes
are static under ``jit``) and applied with two small matmuls.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((x - 5) * x + 8) * x * a - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(in_size: int, out_size: int, antialias: bool = False) -> np.ndarray:
    """``[out_size, in_size]`` float64 weights of PyTorch's 1-D bicubic resize (``align_corners=False``).

    ``y = W @ x`` resizes ``x`` along one axis exactly like ``F.interpolate(..., size=out_size,
    mode="bicubic", align_corners=False, antialias=antialias)`` does.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got in_size={in_size}, out_size={out_size}")
    scale = in_size / out_size
    weights = np.zeros((out_size, in_size), np.float64)
    if not antialias:
        for i in range(out_size):
            src = (i + 0.5) * scale - 0.5
            base = math.floor(src)
            t = src - base
            taps = _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)
            for k, w in enumerate(taps):
                weights[i, min(max(base - 1 + k, 0), in_size - 1)] += w
        return weights
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as the C++ cast does
        hi = min(int(center + support + 0.5), in_size)
        taps = _cubic((np.arange(lo, hi) - center + 0.5) * inv, -0.5)
        total = taps.sum()
        weights[i, lo:hi] = taps / total if total != 0 else taps
    return weights


def resize_grid(grid: jax.Array, out_hw: tuple[int, int], *, antialias: bool = False) -> jax.Array:
    """Resize ``grid [H, W, D]`` to ``[out_h, out_w, D]`` with PyTorch-equal bicubic weights (float32 math)."""
    h, w = grid.shape[0], grid.shape[1]
    if (h, w) == tuple(out_hw):
        return grid
    rows = jnp.asarray(bicubic_matrix(h, out_hw[0], antialias), jnp.float32)
    cols = jnp.asarray(bicubic_matrix(w, out_hw[1], antialias), jnp.float32)
    x = grid.astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    # Height first, then width: the order PyTorch uses, which keeps float32 rounding close to it.
    x = jnp.einsum("oh,hwd->owd", rows, x, precision=hp)
    x = jnp.einsum("pw,owd->opd", cols, x, precision=hp)
    return x.astype(grid.dtype)
