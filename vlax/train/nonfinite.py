"""A train step that notices a non-finite loss on the device, without a host sync per step.

The guarded step carries ``bad_step`` (int32, -1 while every step was finite) beside the state. The first step
whose loss or gradient norm is NaN/inf records its number there, and from then on the state is left as it was
before that step, so the state in hand is always the last finite one. The loop reads ``bad_step`` when it reads
metrics anyway (and before every save), stops naming that step, and never saves a non-finite state.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def guard_nonfinite(step_fn: Callable[[Any, dict], tuple[Any, dict]]):
    """``step(state, batch) -> (state, metrics)`` -> ``guarded(state, bad_step, batch) -> (state, bad_step,
    metrics)``."""

    def guarded(state: Any, bad_step: jax.Array, batch: dict) -> tuple[Any, jax.Array, dict]:
        new_state, metrics = step_fn(state, batch)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        keep_old = jnp.logical_or(~finite, bad_step >= 0)
        new_state = jax.tree.map(lambda new, old: jnp.where(keep_old, old, new), new_state, state)
        bad_step = jnp.where((bad_step < 0) & ~finite, (state.step + 1).astype(jnp.int32), bad_step)
        return new_state, bad_step, metrics

    return guarded


def no_bad_step() -> jax.Array:
    return jnp.asarray(-1, jnp.int32)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the message names the step and its batch."""
