"""OpenVLA's action tokenizer (RT-2 binning), usable inside ``jit``.

Semantics (``prismatic/vla/action_tokenizer.py``): ``n_bins`` edges ``linspace(low, high, n_bins)``;
``digitize(clip(a, low, high), edges)`` gives ``d`` in ``[1, n_bins]``; the token id is ``vocab_size - d`` (the
last ``n_bins`` ids of the vocabulary); decoding maps token ``t`` to ``centers[clip(vocab_size - t - 1, 0,
n_bins - 2)]`` with ``centers`` the ``n_bins - 1`` midpoints of consecutive edges. Class ``d - 1`` in
``[0, n_bins)`` is what the parallel (classifier) head predicts.

OpenVLA computes in float64 numpy. Here each float64 edge is stored as the smallest float32 not below it, so that
for float32 inputs ``x >= edge32`` holds exactly when ``x >= edge64``: encoding float32 actions reproduces the
float64 reference bit for bit, bin boundaries included.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


def _round_up_float32(x: np.ndarray) -> np.ndarray:
    """Smallest float32 >= each float64 value."""
    x32 = x.astype(np.float32)
    below = x32.astype(np.float64) < x
    return np.where(below, np.nextafter(x32, np.float32(np.inf)), x32).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class BinTokenizer:
    """Uniform (default) or quantile bins per action dimension, mapped onto the end of an LM vocabulary.

    Attributes:
      n_bins: number of bin edges (OpenVLA: 256), which is also the number of token ids / classes used.
      low, high: clipping range of the uniform bins.
      vocab_size: size of the LM vocabulary whose last ``n_bins`` ids carry actions; ``None`` for the parallel head
        (classes only).
      quantile_edges: optional data-derived edges, ``n_bins`` floats shared by all dimensions or one tuple of
        ``n_bins`` floats per action dimension (see :meth:`from_quantiles`); replaces ``low``/``high``.
    """

    n_bins: int = 256
    low: float = -1.0
    high: float = 1.0
    vocab_size: int | None = None
    quantile_edges: tuple | None = None

    def __post_init__(self):
        if self.n_bins < 2:
            raise ValueError(f"n_bins must be >= 2 (edges of at least one bin), got {self.n_bins}")
        if self.vocab_size is not None and self.n_bins > self.vocab_size:
            raise ValueError(f"n_bins={self.n_bins} action tokens do not fit a vocabulary of {self.vocab_size} ids; "
                             f"use n_bins <= vocab_size")
        if self.quantile_edges is None and not self.low < self.high:
            raise ValueError(f"need low < high, got low={self.low}, high={self.high}")
        if self.quantile_edges is not None and self.edges.shape[-1] != self.n_bins:
            raise ValueError(f"quantile_edges have {self.edges.shape[-1]} edges per dimension, n_bins={self.n_bins}")

    @classmethod
    def from_quantiles(cls, samples: np.ndarray, n_bins: int = 256, *, vocab_size: int | None = None,
                       quantile_range: tuple[float, float] = (0.0, 1.0), per_dimension: bool = True
                       ) -> "BinTokenizer":
        """Edges at evenly spaced quantiles of ``samples [M, A]`` (equal-mass bins), per dimension by default."""
        samples = np.asarray(samples, np.float64)
        q = np.linspace(quantile_range[0], quantile_range[1], n_bins)
        if per_dimension:
            edges = np.quantile(samples.reshape(-1, samples.shape[-1]), q, axis=0).T  # [A, n_bins]
            packed = tuple(tuple(float(e) for e in row) for row in edges)
        else:
            packed = tuple(float(e) for e in np.quantile(samples.reshape(-1), q))
        return cls(n_bins=n_bins, vocab_size=vocab_size, quantile_edges=packed)

    @functools.cached_property
    def edges(self) -> np.ndarray:
        """Bin edges, float64 ``[n_bins]`` or ``[A, n_bins]``."""
        if self.quantile_edges is not None:
            return np.asarray(self.quantile_edges, np.float64)
        return np.linspace(self.low, self.high, self.n_bins)

    @functools.cached_property
    def centers(self) -> np.ndarray:
        """Bin centres, float64 ``[n_bins - 1]`` or ``[A, n_bins - 1]``."""
        e = self.edges
        return (e[..., :-1] + e[..., 1:]) / 2.0

    @property
    def token_range(self) -> tuple[int, int]:
        """Inclusive range of the vocabulary ids that carry actions."""
        vocab = self._vocab()
        return vocab - self.n_bins, vocab - 1

    def _vocab(self) -> int:
        if self.vocab_size is None:
            raise ValueError("this tokenizer has no vocab_size: token ids need BinTokenizer(vocab_size=...)")
        return self.vocab_size

    def encode_classes(self, actions: jax.Array) -> jax.Array:
        """Bin class ``digitize - 1`` in ``[0, n_bins)``: ``[..., A]`` float -> int32 (clipped like OpenVLA)."""
        edges = jnp.asarray(_round_up_float32(self.edges))
        x = jnp.asarray(actions, jnp.float32)[..., None]
        count = jnp.sum((x >= edges).astype(jnp.int32), axis=-1)  # == np.digitize for sorted edges
        return jnp.clip(count, 1, self.n_bins) - 1

    def decode_classes(self, classes: jax.Array) -> jax.Array:
        """Bin centre of each class ``[..., A]`` (the top class folds onto the last centre, as in OpenVLA)."""
        idx = jnp.clip(jnp.asarray(classes, jnp.int32), 0, self.n_bins - 2)
        centers = jnp.asarray(self.centers.astype(np.float32))
        if centers.ndim == 1:
            return centers[idx]
        return jnp.take_along_axis(jnp.broadcast_to(centers, (*idx.shape, centers.shape[-1])), idx[..., None],
                                   axis=-1)[..., 0]

    def encode(self, actions: jax.Array) -> jax.Array:
        """Token ids ``vocab_size - digitize(clip(actions))``: ``[..., A]`` -> int32 ``[..., A]``."""
        return self._vocab() - 1 - self.encode_classes(actions)

    def decode(self, tokens: jax.Array) -> jax.Array:
        """Actions (bin centres) of token ids ``[..., A]``; ids outside the action range are clipped onto it."""
        return self.decode_classes(self._vocab() - 1 - jnp.asarray(tokens, jnp.int32))

    def classes_to_tokens(self, classes: jax.Array) -> jax.Array:
        return self._vocab() - 1 - jnp.asarray(classes, jnp.int32)

    def tokens_to_classes(self, tokens: jax.Array) -> jax.Array:
        return self._vocab() - 1 - jnp.asarray(tokens, jnp.int32)
