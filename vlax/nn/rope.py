"""Rotary position embeddings (the split-halves layout of HF Llama / Gemma), with Llama-3 frequency scaling."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """RoPE settings. ``scaling`` is ``None``, ``"linear"`` or ``"llama3"`` (HF ``rope_scaling`` / ``rope_type``)."""

    theta: float = 10_000.0
    scaling: str | None = None
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def inverse_frequencies(head_dim: int, cfg: RopeConfig) -> np.ndarray:
    """``[head_dim // 2]`` angular frequencies, computed in float64 then rounded to float32 like HF."""
    inv = 1.0 / (cfg.theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    inv = inv.astype(np.float32)
    if cfg.scaling is None or cfg.scaling == "default":
        return inv
    if cfg.scaling == "linear":
        return (inv / cfg.factor).astype(np.float32)
    if cfg.scaling == "llama3":
        old_len = cfg.original_max_position_embeddings
        low_wavelen = old_len / cfg.low_freq_factor
        high_wavelen = old_len / cfg.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / cfg.factor, inv)
        smooth = (old_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unknown RoPE scaling {cfg.scaling!r}; known: None, 'linear', 'llama3'")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray | jax.Array) -> jax.Array:
    """Rotate ``x [B, T, H, Dh]`` by ``positions [B, T]``; the two halves of ``Dh`` form the complex pairs."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated * sin).astype(x.dtype)
