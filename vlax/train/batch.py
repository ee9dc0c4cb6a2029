"""From the data pipeline's batch schema (``vlax.data``) to the policy's inputs, on the host, in numpy."""

from __future__ import annotations

from typing import Any

import numpy as np

from vlax.policy import PolicySpec
from vlax.tokenizers import Tokenizer, encode_batch


def _fit(x: np.ndarray, dim: int, name: str) -> np.ndarray:
    """Zero-pad the last axis to ``dim``; refuse to silently drop real dimensions."""
    if x.shape[-1] > dim:
        raise ValueError(f"{name} has {x.shape[-1]} dims but the policy takes {dim}; raise the policy's {name} dim "
                         f"or pad the data to match")
    if x.shape[-1] == dim:
        return x
    return np.concatenate([x, np.zeros((*x.shape[:-1], dim - x.shape[-1]), x.dtype)], axis=-1)


def observation_inputs(observation: dict, instructions: Any, spec: PolicySpec, tokenizer: Tokenizer) -> dict:
    """Policy observation from the last window step of ``observation`` and the instruction strings/bytes."""
    images = {}
    for camera in spec.cameras:
        key = f"image_{camera}"
        if key not in observation:
            raise KeyError(f"batch has no {key!r}; it has {sorted(k for k in observation if k.startswith('image_'))}")
        img = np.asarray(observation[key])
        images[camera] = img[:, -1] if img.ndim == 5 else img
    state = np.asarray(observation["state"], np.float32)
    state = state[:, -1] if state.ndim == 3 else state
    ids, mask = encode_batch(tokenizer, list(instructions), spec.max_text_len)
    return {"images": images, "state": _fit(state, spec.state_dim, "state"), "text_ids": ids, "text_mask": mask}


def model_batch(batch: dict, spec: PolicySpec, tokenizer: Tokenizer) -> dict:
    """``{"obs": ..., "actions": [B, H, A], "action_mask": [B, H, A]}`` from a pipeline batch."""
    obs = observation_inputs(batch["observation"], batch["task"]["language_instruction"], spec, tokenizer)
    actions = np.asarray(batch["action"], np.float32)
    mask = np.asarray(batch["action_mask"], bool)
    if actions.ndim == 4:  # [B, W, H, A]: the actions that follow the last window step
        actions, mask = actions[:, -1], mask[:, -1]
    if actions.shape[1] < spec.horizon:
        raise ValueError(f"batch has an action horizon of {actions.shape[1]}, the policy predicts {spec.horizon}")
    actions = _fit(actions[:, :spec.horizon], spec.action_dim, "action")
    mask = _fit(mask[:, :spec.horizon], spec.action_dim, "action")
    return {"obs": obs, "actions": actions, "action_mask": mask}
