"""Dataset mixtures: sampling weights (optionally balanced by size) and thread allocation by weight."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf


def mixture_weights(
    weights: Sequence[float] | None, sizes: Sequence[int], balance_by_size: bool = False
) -> np.ndarray:
    """Normalized sampling probabilities of each dataset.

    Args:
      weights: per-dataset weights (None: all 1).
      sizes: per-dataset sizes (number of frames).
      balance_by_size: multiply each weight by its dataset's size, so that every frame is equally likely when the
        weights are equal.
    """
    sizes = np.asarray(sizes, np.float64)
    weights = np.ones(len(sizes)) if weights is None else np.asarray(weights, np.float64)
    if weights.shape != sizes.shape:
        raise ValueError(f"Got {len(weights)} mixture weights for {len(sizes)} datasets")
    if np.any(weights < 0) or not np.any(weights > 0):
        raise ValueError(f"Mixture weights must be >= 0 with at least one > 0, got {weights.tolist()}")
    if balance_by_size:
        weights = weights * sizes
    return weights / weights.sum()


def allocate_threads(total: int, weights: Sequence[float]) -> list[int]:
    """Splits ``total`` parallel calls across datasets in proportion to ``weights``; every dataset gets at least 1
    (so the sum exceeds ``total`` only when there are more datasets than threads)."""
    weights = np.asarray(weights, np.float64)
    weights = weights / weights.sum()
    threads = np.zeros(len(weights), int)
    small = weights * total < 1
    threads[small] = 1
    rest = max(0, total - int(small.sum()))
    if (~small).any():
        share = weights[~small] / weights[~small].sum() * rest
        big = np.floor(share).astype(int)
        # Hand out what rounding left over to the largest remainders.
        for i in np.argsort(big - share)[: rest - int(big.sum())]:
            big[i] += 1
        threads[~small] = big
    return np.maximum(threads, 1).tolist()


def sample_mixture(datasets: Sequence[tf.data.Dataset], probabilities: Sequence[float], seed: int) -> tf.data.Dataset:
    """Draws each element from dataset i with probability ``probabilities[i]`` (all element specs must agree)."""
    if len(datasets) == 1:
        return datasets[0]
    specs = [ds.element_spec for ds in datasets]
    for i, spec in enumerate(specs[1:], start=1):
        if spec != specs[0]:
            a = {"/".join(map(str, p)): s for p, s in _flatten_with_paths(specs[0])}
            b = {"/".join(map(str, p)): s for p, s in _flatten_with_paths(spec)}
            differing = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            raise ValueError(
                f"Datasets 0 and {i} of the mixture produce different elements at {differing} "
                f"({[a.get(k) for k in differing]} vs {[b.get(k) for k in differing]}); map missing cameras to None "
                "in image_keys and pad dims with max_action_dim / max_state_dim."
            )
    return tf.data.Dataset.sample_from_datasets(
        list(datasets), weights=list(map(float, probabilities)), seed=seed, stop_on_empty_dataset=False
    )


def _flatten_with_paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _flatten_with_paths(tree[k], prefix + (k,))
    else:
        yield prefix, tree
