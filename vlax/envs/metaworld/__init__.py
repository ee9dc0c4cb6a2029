"""Meta-World: the scripted-expert RLDS generator, task lists and instruction templates, rollouts and the
closed-loop evaluator.

    from vlax.envs import metaworld
    path = metaworld.generate_metaworld_dataset("/data/mw", tasks="mt10", episodes_per_task=50)
    results = metaworld.evaluate("runs/flow", "mt10", episodes_per_task=10, num_workers=2)

Layout seeds: training from :data:`TRAIN_LAYOUT_SEED_START`, evaluation from :data:`EVAL_LAYOUT_SEED_START`.
"""

from __future__ import annotations

import importlib

# Loaded on first use: rollout worker processes import this package and must set their environment first.
_EXPORTS = {
    "generate_metaworld_dataset": "vlax.envs.metaworld.dataset",
    "metaworld_source": "vlax.envs.metaworld.dataset",
    "MT10_TASKS": "vlax.envs.metaworld.task_sets",
    "MT50_TASKS": "vlax.envs.metaworld.task_sets",
    "MT50_BUCKETS": "vlax.envs.metaworld.task_sets",
    "TRAIN_LAYOUT_SEED_START": "vlax.envs.metaworld.task_sets",
    "EVAL_LAYOUT_SEED_START": "vlax.envs.metaworld.task_sets",
    "resolve_tasks": "vlax.envs.metaworld.task_sets",
    "INSTRUCTIONS": "vlax.envs.metaworld.instructions",
    "instruction": "vlax.envs.metaworld.instructions",
    "evaluate": "vlax.envs.metaworld.evaluate",
    "layout_seed": "vlax.envs.metaworld.evaluate",
    "CheckpointError": "vlax.envs.metaworld.checkpoint_info",
    "read_checkpoint_info": "vlax.envs.metaworld.checkpoint_info",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlax.envs.metaworld' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
