"""Open-loop action error on held-out data: a quick training signal that needs no simulator.

The policy predicts a chunk from each batch's observation; the error against the recorded chunk is measured in the
un-normalized action space (what a robot executes) over the entries the batch's ``action_mask`` marks real, so
padding past an episode's end and padded action dims never count.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable, Iterable

import jax
import numpy as np
from flax import nnx

from vlax.observation import ObservationPipeline

SampleFn = Callable[[dict, jax.Array], Any]


@functools.partial(jax.jit, static_argnums=0)
def _sample(graphdef: nnx.GraphDef, state: Any, obs: dict, key: jax.Array) -> jax.Array:
    # graphdef is static (hashable), so repeated calls from a training loop reuse one compilation.
    return nnx.merge(graphdef, state).sample(obs, rngs=key)


def _sampler(policy: Any) -> SampleFn:
    if isinstance(policy, nnx.Module):
        graphdef, state = nnx.split(policy)
        return lambda obs, key: _sample(graphdef, state, obs, key)
    if hasattr(policy, "sample_normalized"):  # a PolicyRunner
        return policy.sample_normalized
    if callable(policy):
        return policy
    raise TypeError(f"policy is a {type(policy).__name__}; pass a PolicyRunner, a VLA (nnx.Module) or a function "
                    "(obs, key) -> normalized actions [B, H, A]")


def open_loop_metrics(
    policy: Any,
    batches: Iterable[dict],
    num_batches: int,
    *,
    pipeline: ObservationPipeline | None = None,
    rng: jax.Array | None = None,
) -> dict[str, float]:
    """Masked action MSE and L1 of ``policy``'s predicted chunks on up to ``num_batches`` pipeline batches.

    Args:
      policy: a :class:`vlax.inference.PolicyRunner` (its observation pipeline is used), a
        :class:`vlax.policy.VLA`, or a function ``(obs, key) -> normalized actions [B, H, A]``.
      batches: pipeline batches (``vlax.data`` schema: normalized ``action [B, W, H, A]`` or ``[B, H, A]``,
        ``action_mask`` alike, ``observation``, ``task/language_instruction``); use held-out episodes without
        augmentation (``DataConfig(train=False, split="val")``).
      num_batches: how many batches to read (fewer if the iterator ends first).
      pipeline: the :class:`~vlax.observation.ObservationPipeline` that turns batches into model inputs and
        predictions into actions (required unless ``policy`` is a PolicyRunner); its ``dataset`` picks the
        normalization of the batches' source.
      rng: key for stochastic heads (default ``key(0)``); batch ``i`` uses ``fold_in(rng, i)``.

    Returns:
      ``{"action_mse", "action_l1", "num_batches", "num_values"}``: means over every real action entry
      (``sum(mask * err) / sum(mask)`` pooled over the batches), in un-normalized units.
    """
    pipeline = pipeline or getattr(policy, "pipeline", None)
    if pipeline is None:
        raise ValueError(f"open_loop_metrics needs pipeline= (an ObservationPipeline) for a "
                         f"{type(policy).__name__}; or pass a PolicyRunner, which carries one")
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches}; use 1 or more")
    sample = _sampler(policy)
    rng = jax.random.key(0) if rng is None else rng
    squared = absolute = count = 0.0
    used = 0
    for i, batch in enumerate(itertools.islice(batches, num_batches)):
        inputs = pipeline.from_batch(batch)
        predicted = np.asarray(sample(inputs["obs"], jax.random.fold_in(rng, i)), np.float32)
        if predicted.shape != inputs["actions"].shape:
            raise ValueError(f"policy predicted actions of shape {predicted.shape}; the batch holds "
                             f"{inputs['actions'].shape} [B, H, A]")
        predicted = pipeline.actions(predicted).astype(np.float64)
        target = pipeline.actions(inputs["actions"]).astype(np.float64)
        mask = inputs["action_mask"][..., :target.shape[-1]].astype(np.float64)
        error = predicted - target
        squared += float(np.sum(mask * error**2))
        absolute += float(np.sum(mask * np.abs(error)))
        count += float(np.sum(mask))
        used += 1
    if used == 0:
        raise ValueError("the batch iterator yielded no batches")
    if count == 0:
        raise ValueError(f"all {used} batches have an all-False action_mask: nothing to compare")
    return {"action_mse": squared / count, "action_l1": absolute / count, "num_batches": used,
            "num_values": int(count)}
