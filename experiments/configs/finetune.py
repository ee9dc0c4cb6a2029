"""Train a policy on your own robot data: a local LeRobot v3 or RLDS dataset given by one flag.

    python -m experiments.train --config=experiments/configs/finetune.py:tiny \\
        --config.data.sources[0].path=/data/my_lerobot_ds --config.workdir=runs/my_arm

The format is detected from the files (``kind: auto``); cameras, state and action keys default to the dataset's
own (every image feature under its short name, ``observation.state`` / ``action`` for LeRobot, ``state`` /
``action`` for RLDS) and can be set per source (see :mod:`vlax.data.source_config`); the camera map is a tuple of
(dataset key, camera) pairs, because LeRobot keys have dots::

    --config.data.sources[0].cameras="(('observation.images.top', 'top'), ('observation.images.wrist', 'wrist'))"

``model.action_dim`` and ``model.state_dim`` must match the data (checked before training starts). Variants: ``tiny`` (CPU) and ``small``
(one GPU). Start from another run's weights with ``--config.finetune.checkpoint=<workdir>``.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import metaworld


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    c = metaworld.get_config(variant)
    c.workdir = "runs/finetune"
    c.data.sources = [ml_collections.ConfigDict({
        "kind": "auto", "path": "", "weight": 1.0, "cameras": (), "state_keys": (), "action_keys": (),
        "gripper_dims": None, "normalization": "", "ignore_errors": False})]
    c.data.normalization = "normal"
    c.data.action_horizon = 8
    c.data.val_fraction = 0.1
    c.data.val_every = 500
    c.data.shuffle_buffer = 1000
    c.model.max_text_len = 24
    c.model.state_dim = 0                          # 0: the data's state dim
    c.model.action_dim = 0                         # 0: the data's action dim
    c.train.steps = 2000
    return c
