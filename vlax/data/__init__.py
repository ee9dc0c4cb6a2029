"""vlax data: RLDS / LeRobot v3 reading, sources from config, trajectory + frame transforms, normalization
artifacts, mixtures.

Typical use::

    from vlax import data
    source = data.open_source({"kind": "lerobot", "path": "/data/my_arm"})   # or rlds / metaworld
    pipeline = data.build_pipeline([source], data.DataConfig(batch_size=64, action_horizon=4))
    for batch in pipeline: ...                       # numpy batches, this host's shard
    pipeline.artifacts[source.name].save(ckpt_dir + "/normalization.json")

Meta-World (the scripted-expert generator, task lists, rollouts) lives in :mod:`vlax.envs.metaworld`.

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
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
