"""vlax data: RLDS / LeRobot v3 reading, trajectory + frame transforms, normalization artifacts, mixtures, and a
Meta-World scripted-expert dataset generator.

Typical use::

    from vlax import data
    path = data.generate_metaworld_dataset("/data/mw", tasks="mt10", episodes_per_task=50)
    pipeline = data.build_pipeline([data.metaworld_source(path)], data.DataConfig(batch_size=64, action_horizon=4))
    for batch in pipeline: ...                       # numpy batches, this host's shard
    pipeline.artifacts["metaworld_experts"].save(ckpt_dir + "/normalization.json")

Batch schema (numpy; B = per-host batch, W = ``window``, H = ``action_horizon``, A/S = padded action/state dims)::

    observation/
      image_<camera>        uint8 [B, W, h, w, 3]  upright RGB, resized (and augmented when training)
      state                 float32 [B, W, S]      normalized proprioception, zero-padded to S
      state_mask            bool [B, W, S]         True on the dataset's real state dims
      timestep_pad_mask     bool [B, W]            False for window steps before the episode start
      pad_mask_dict/<key>   bool [B, W]            False where a camera / the state is absent in this dataset
    task/
      language_instruction  bytes [B]              b"" when dropped by task augmentation or absent
      pad_mask_dict/language_instruction  bool [B]
      image_<camera>, state, state_mask, pad_mask_dict/<key>   only with goal relabelling: the goal frame
                            ([B, h, w, 3], [B, S], [B, S], [B])
    action                  float32 [B, W, H, A]   normalized; for window step w, actions w .. w+H-1
    action_mask             bool [B, W, H, A]      True where the action is real: inside the episode (the last
                                                   action is repeated past the end, masked False), at a real window
                                                   step, on a real action dim. Losses average over it.
    dataset_name            bytes [B]
    privileged/sim_state    float32 [B, W, P]      only if a source is asked for it (Meta-World's 39-value
                                                   simulator state: never fed to a policy by default)

Policies with ``window=1`` use ``action[:, -1]`` ([B, H, A]) and ``observation[...][:, -1]``.
Normalization: see :mod:`vlax.data.normalization` (un-normalize predictions with ``artifact.unnormalize``).
Meta-World layout seeds: training from :data:`TRAIN_LAYOUT_SEED_START`, evaluation from
:data:`EVAL_LAYOUT_SEED_START`.
"""

from __future__ import annotations

import importlib

# Attributes are loaded on first use: rollout worker processes import this package and must not pay for
# TensorFlow.
_EXPORTS = {
    "DataConfig": "vlax.data.pipeline",
    "DataPipeline": "vlax.data.pipeline",
    "build_pipeline": "vlax.data.pipeline",
    "trajectory_transforms": "vlax.data.pipeline",
    "AugmentConfig": "vlax.data.frame_transforms",
    "NormalizationArtifact": "vlax.data.normalization",
    "NormalizationMismatchError": "vlax.data.normalization",
    "check_compatible": "vlax.data.normalization",
    "compute_statistics": "vlax.data.normalization",
    "RLDSSource": "vlax.data.rlds_reader",
    "CorruptedDataError": "vlax.data.rlds_reader",
    "InMemorySource": "vlax.data.sources",
    "LeRobotSource": "vlax.data.lerobot_v3",
    "mixture_weights": "vlax.data.mixture",
    "generate_metaworld_dataset": "vlax.data.metaworld_rlds",
    "metaworld_source": "vlax.data.metaworld_rlds",
    "MT10_TASKS": "vlax.data.metaworld_tasks",
    "MT50_TASKS": "vlax.data.metaworld_tasks",
    "MT50_BUCKETS": "vlax.data.metaworld_tasks",
    "TRAIN_LAYOUT_SEED_START": "vlax.data.metaworld_tasks",
    "EVAL_LAYOUT_SEED_START": "vlax.data.metaworld_tasks",
    "resolve_tasks": "vlax.data.metaworld_tasks",
    "INSTRUCTIONS": "vlax.data.metaworld_instructions",
    "instruction": "vlax.data.metaworld_instructions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
