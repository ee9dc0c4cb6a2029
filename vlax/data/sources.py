"""Trajectory sources: where standard trajectories come from (RLDS, LeRobot, in-memory lists).

A source yields *standard trajectories* (see :mod:`vlax.data.traj_transforms`) for one host's shard and can list
the numeric data of the whole dataset for statistics. Every source implements:

    name: str                                    dataset name (goes into ``dataset_name``)
    action_dim, state_dim: int                   real dims (state_dim 0 when the dataset has no state)
    gripper_last: bool                           last action dim is a gripper (left unnormalized by default)
    files: list[str]                             files this host reads (for error messages)
    fingerprint() -> str                         hash of the data and of the standardization
    trajectories(process_index, process_count, seed, shuffle, repeat) -> tf.data.Dataset
    numeric_trajectories() -> Iterator[dict]     {"action": [T, A], "state": [T, S]} over the whole dataset
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow as tf


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """Fills unset process index/count from ``jax.process_index()`` / ``jax.process_count()``."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must lie in [0, process_count={process_count})")
    return process_index, process_count


class InMemorySource:
    """A source over a list of trajectories held in memory (hand-made data, tests, small custom datasets).

    Each trajectory is a dict: ``action`` [T, A], optional ``state`` [T, S], optional ``images`` {camera: uint8
    [T, H, W, 3] or a list of T encoded PNG/JPEG byte strings}, optional ``language_instruction`` (str). All trajectories must share dims and cameras.
    Sharding is by trajectory: host i gets trajectories i, i + count, ...
    """

    gripper_last = False

    def __init__(self, name: str, trajectories: Sequence[dict[str, Any]], gripper_last: bool = False):
        if not trajectories:
            raise ValueError(f"InMemorySource {name!r} got no trajectories")
        self.name = name
        self.gripper_last = gripper_last
        self._trajs = list(trajectories)
        first = self._trajs[0]
        self.action_dim = int(np.shape(first["action"])[-1])
        self.state_dim = int(np.shape(first["state"])[-1]) if "state" in first else 0
        self._cameras = sorted(first.get("images", {}))
        self.files: list[str] = []

    def fingerprint(self) -> str:
        digest = hashlib.sha256(self.name.encode())
        for traj in self._trajs:
            digest.update(np.asarray(traj["action"], np.float32).tobytes())
            if "state" in traj:
                digest.update(np.asarray(traj["state"], np.float32).tobytes())
        return digest.hexdigest()[:16]

    def _standard(self, traj: dict[str, Any]) -> dict[str, Any]:
        length = len(traj["action"])
        observation = {f"image_{c}": _images(traj["images"][c]) for c in self._cameras}
        if self.state_dim:
            observation["state"] = np.asarray(traj["state"], np.float32)
        return {
            "observation": observation,
            "task": {"language_instruction": np.array([traj.get("language_instruction", "")] * length, object)},
            "action": np.asarray(traj["action"], np.float32),
            "dataset_name": np.array([self.name] * length, object),
        }

    def trajectories(
        self,
        process_index: int | None = None,
        process_count: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = False,
    ) -> tf.data.Dataset:
        index, count = resolve_process(process_index, process_count)
        mine = [self._standard(t) for t in self._trajs[index::count]]
        signature = tf.nest.map_structure(
            lambda x: tf.TensorSpec([None, *np.shape(x)[1:]], tf.string if x.dtype == object else tf.as_dtype(x.dtype)),
            mine[0],
        )
        ds = tf.data.Dataset.from_generator(lambda: iter(mine), output_signature=signature)
        if shuffle:
            ds = ds.shuffle(len(mine), seed=seed, reshuffle_each_iteration=True)
        return ds.repeat() if repeat else ds

    def numeric_trajectories(self) -> Iterator[dict[str, np.ndarray]]:
        for traj in self._trajs:
            out = {"action": np.asarray(traj["action"], np.float32)}
            if self.state_dim:
                out["state"] = np.asarray(traj["state"], np.float32)
            yield out


def _images(images: Any) -> np.ndarray:
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], bytes):
        return np.array(images, object)
    return np.asarray(images, np.uint8)


def key_list(keys: str | Sequence[str] | None) -> tuple[str, ...]:
    """``None`` -> ``()``, one key -> ``(key,)``, a list -> a tuple."""
    if not keys:
        return ()
    return (keys,) if isinstance(keys, str) else tuple(keys)


def hash_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
