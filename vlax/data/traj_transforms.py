"""Trajectory-level transforms on tf.data (applied to whole episodes, in this order).

pad masks -> pad action/state dims -> goal relabelling -> task augmentation -> chunking -> subsampling.

A *standard trajectory* (what a source's standardization produces) is a dict of tensors with leading length T::

    observation: {"image_<camera>": string [T] (encoded; "" = missing) or uint8 [T, H, W, 3], "state": f32 [T, S]}
    task:        {"language_instruction": string [T]}
    action:      f32 [T, A]
    dataset_name: string [T]
    privileged:  {"sim_state": f32 [T, P]}    (only when a source is asked for it)

Random transforms take a ``seed`` int64 [2] (stateless ops), so a pipeline is reproducible under one seed.
"""

from __future__ import annotations

import tensorflow as tf


def _length(traj: dict) -> tf.Tensor:
    return tf.shape(traj["action"])[0]


def _image_keys(observation: dict) -> list[str]:
    return sorted(k for k in observation if k.startswith("image_"))


def _present(x: tf.Tensor, length: tf.Tensor) -> tf.Tensor:
    if x.dtype == tf.string:
        return tf.strings.length(x) > 0
    return tf.ones([length], tf.bool)


def add_pad_masks(traj: dict) -> dict:
    """Adds ``observation/pad_mask_dict`` and ``task/pad_mask_dict``: bool [T] per key, False where a key is absent
    (empty image string, empty instruction)."""
    length = _length(traj)
    observation = dict(traj["observation"])
    observation["pad_mask_dict"] = {
        k: _present(v, length) for k, v in traj["observation"].items() if k.startswith("image_") or k == "state"
    }
    task = dict(traj["task"])
    task["pad_mask_dict"] = {k: _present(v, length) for k, v in traj["task"].items()}
    return {**traj, "observation": observation, "task": task}


def _pad_last_dim(x: tf.Tensor, size: int, name: str) -> tuple[tf.Tensor, tf.Tensor]:
    dim = x.shape[-1]
    if dim is None:
        raise ValueError(f"{name} needs a static last dimension to be padded, got shape {x.shape}")
    if dim > size:
        raise ValueError(f"{name} has {dim} dims, more than the maximum {size}; raise the maximum to at least {dim}")
    length = tf.shape(x)[0]
    mask = tf.concat([tf.ones([length, dim], tf.bool), tf.zeros([length, size - dim], tf.bool)], axis=-1)
    return tf.pad(x, [[0, 0], [0, size - dim]]), mask


def pad_action_and_state_dims(traj: dict, max_action_dim: int | None, max_state_dim: int | None) -> dict:
    """Zero-pads ``action`` to [T, max_action_dim] and ``observation/state`` to [T, max_state_dim].

    Adds ``action_dim_mask`` bool [T, A] and ``observation/state_mask`` bool [T, S] (True on real dims). ``None``
    keeps a key's own size (its mask is all True).
    """
    traj = dict(traj)
    observation = dict(traj["observation"])
    action = traj["action"]
    traj["action"], traj["action_dim_mask"] = _pad_last_dim(action, max_action_dim or action.shape[-1], "action")
    if "state" in observation:
        state = observation["state"]
        observation["state"], observation["state_mask"] = _pad_last_dim(
            state, max_state_dim or state.shape[-1], "state"
        )
    traj["observation"] = observation
    return traj


def relabel_goals_uniform(traj: dict, seed: tf.Tensor) -> dict:
    """Goal relabelling: for each step t, a uniformly drawn future step g in [t, T-1] gives the goal.

    Copies the observation's images and state at g into ``task`` (with their pad masks).
    """
    length = _length(traj)
    u = tf.random.stateless_uniform([length], seed=seed)
    steps = tf.range(length)
    goal = steps + tf.cast(tf.floor(u * tf.cast(length - steps, tf.float32)), tf.int32)
    goal = tf.minimum(goal, length - 1)
    observation = traj["observation"]
    task = dict(traj["task"])
    task_masks = dict(task.get("pad_mask_dict", {}))
    for key in _image_keys(observation) + (["state"] if "state" in observation else []):
        task[key] = tf.gather(observation[key], goal)
        if "pad_mask_dict" in observation:
            task_masks[key] = tf.gather(observation["pad_mask_dict"][key], goal)
    if "state_mask" in observation:
        task["state_mask"] = tf.gather(observation["state_mask"], goal)
    task["pad_mask_dict"] = task_masks
    return {**traj, "task": task}


def drop_language(traj: dict, seed: tf.Tensor, probability: float) -> dict:
    """Task augmentation: each step's instruction is replaced by "" (and its pad mask cleared) with ``probability``."""
    if probability <= 0:
        return traj
    task = dict(traj["task"])
    keep = tf.random.stateless_uniform([_length(traj)], seed=seed) >= probability
    task["language_instruction"] = tf.where(keep, task["language_instruction"], tf.constant(""))
    masks = dict(task.get("pad_mask_dict", {}))
    if "language_instruction" in masks:
        masks["language_instruction"] = masks["language_instruction"] & keep
    task["pad_mask_dict"] = masks
    return {**traj, "task": task}


def chunk(traj: dict, window: int, action_horizon: int) -> dict:
    """Chunks a trajectory into an observation window and an action horizon per step.

    For step t the window holds observations t-window+1 .. t (steps before the start repeat step 0 and are marked
    False in ``observation/timestep_pad_mask`` [T, W]). For each window step w the horizon holds actions
    w .. w+horizon-1; past the last step the last action is repeated.

    Result: ``observation/*`` and ``privileged/*`` [T, W, ...], ``action`` [T, W, H, A] and ``action_mask`` bool [T, W, H, A], True
    where the action is real: inside the episode, at a real window step and on a real dimension.
    """
    if window < 1 or action_horizon < 1:
        raise ValueError(f"window and action_horizon must be >= 1, got {window} and {action_horizon}")
    length = _length(traj)
    steps = tf.range(length)
    obs_index = steps[:, None] + tf.range(-window + 1, 1)[None, :]  # [T, W]
    timestep_valid = obs_index >= 0
    obs_gather = tf.maximum(obs_index, 0)
    observation = tf.nest.map_structure(lambda x: tf.gather(x, obs_gather), traj["observation"])
    observation["timestep_pad_mask"] = timestep_valid
    windowed = {"observation": observation}
    if "privileged" in traj:
        windowed["privileged"] = tf.nest.map_structure(lambda x: tf.gather(x, obs_gather), traj["privileged"])

    action_index = obs_index[:, :, None] + tf.range(action_horizon)[None, None, :]  # [T, W, H]
    inside = (action_index <= length - 1) & timestep_valid[:, :, None]
    action_gather = tf.clip_by_value(action_index, 0, length - 1)
    action = tf.gather(traj["action"], action_gather)
    if "action_dim_mask" in traj:
        dim_mask = tf.gather(traj["action_dim_mask"], action_gather)
    else:
        dim_mask = tf.ones_like(action, tf.bool)
    result = {k: v for k, v in traj.items() if k not in ("observation", "privileged", "action", "action_dim_mask")}
    result.update(windowed, action=action, action_mask=inside[..., None] & dim_mask)
    return result


def subsample(traj: dict, seed: tf.Tensor, max_length: int | None) -> dict:
    """Keeps a random ordered subset of at most ``max_length`` steps of a (chunked) trajectory."""
    if not max_length:
        return traj
    length = _length(traj)
    order = tf.argsort(tf.random.stateless_uniform([length], seed=seed))
    keep = tf.sort(order[: tf.minimum(length, max_length)])
    return tf.nest.map_structure(lambda x: tf.gather(x, keep), traj)
