"""Executing predicted chunks: ACT's temporal ensembling and a receding-horizon action queue.

Both are inference helpers around any head's ``sample`` (``[B, H, A]`` chunks); neither has parameters.
"""

from __future__ import annotations

import collections
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class EnsembleState:
    """Running weighted sums for the next ``H`` control steps.

    Attributes:
      sums: ``[B, H, A]`` weighted sum of the predictions made so far for steps ``t .. t + H - 1``.
      weights: ``[H]`` sum of their weights.
      counts: ``[H]`` int32, how many predictions each step has received (the age rank of the next one).
    """

    sums: jax.Array
    weights: jax.Array
    counts: jax.Array


class TemporalEnsembler:
    """ACT's temporal ensembling: query a chunk every step, execute a weighted average of all predictions.

    The prediction of step ``t`` made ``i``-th (``i = 0`` the oldest) gets weight ``exp(-coeff * i)``, so older
    predictions weigh more for ``coeff > 0`` (ACT uses ``coeff = 0.01``). ``init`` / ``update`` are pure and jit-able.
    """

    def __init__(self, horizon: int, coeff: float = 0.01):
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.horizon, self.coeff = int(horizon), float(coeff)

    def init(self, batch_size: int, action_dim: int, dtype=jnp.float32) -> EnsembleState:
        return EnsembleState(sums=jnp.zeros((batch_size, self.horizon, action_dim), dtype),
                             weights=jnp.zeros((self.horizon,), dtype), counts=jnp.zeros((self.horizon,), jnp.int32))

    def update(self, state: EnsembleState, chunk: jax.Array) -> tuple[jax.Array, EnsembleState]:
        """Add ``chunk [B, H, A]`` predicted at the current step; return the action ``[B, A]`` to execute now."""
        if chunk.shape[1] != self.horizon or chunk.shape != state.sums.shape:
            raise ValueError(f"chunk of shape {tuple(chunk.shape)} does not match the ensembler's "
                             f"{tuple(state.sums.shape)}")
        w = jnp.exp(-self.coeff * state.counts.astype(chunk.dtype))
        sums = state.sums + w[None, :, None] * chunk
        weights = state.weights + w
        action = sums[:, 0] / weights[0]
        shift = lambda x: jnp.concatenate([x[:, 1:], jnp.zeros_like(x[:, :1])], axis=1)  # noqa: E731
        new = EnsembleState(sums=shift(sums), weights=shift(weights[None])[0], counts=shift(state.counts[None] + 1)[0])
        return action, new


class ActionQueue:
    """Receding-horizon execution: sample a chunk, execute its first ``n_action_steps`` actions, then re-plan.

    Host-side helper (like LeRobot's ``select_action``): ``select(sample_fn)`` calls ``sample_fn()`` only when the
    queue is empty.
    """

    def __init__(self, n_action_steps: int):
        if n_action_steps < 1:
            raise ValueError(f"n_action_steps must be >= 1, got {n_action_steps}")
        self.n_action_steps = int(n_action_steps)
        self._queue: collections.deque = collections.deque()

    def __len__(self) -> int:
        return len(self._queue)

    def reset(self) -> None:
        self._queue.clear()

    def push(self, chunk: jax.Array) -> None:
        """Queue the first ``n_action_steps`` steps of ``chunk [B, H, A]``."""
        if chunk.ndim != 3 or chunk.shape[1] < self.n_action_steps:
            raise ValueError(f"chunk of shape {tuple(chunk.shape)} has fewer than n_action_steps="
                             f"{self.n_action_steps} steps (expected [B, H >= {self.n_action_steps}, A])")
        self._queue.extend(chunk[:, i] for i in range(self.n_action_steps))

    def pop(self) -> jax.Array:
        if not self._queue:
            raise IndexError("the action queue is empty: push a chunk or use select(sample_fn)")
        return self._queue.popleft()

    def select(self, sample_fn: Callable[[], jax.Array]) -> jax.Array:
        """Next action ``[B, A]``, sampling a new chunk with ``sample_fn()`` when the queue has run dry."""
        if not self._queue:
            self.push(sample_fn())
        return self.pop()
