"""Any supported LeRobot policy directory -> ``(policy, ObservationPipeline)``, dispatched on its ``type``.

    policy, pipeline = load_lerobot("/ckpt/my_act")          # act, diffusion, smolvla, pi0, pi05
    actions = pipeline.actions(policy.sample(pipeline.model_inputs(raw), rngs=jax.random.key(0)))

Each family's key mapping lives in its own ``vlax.weights.lerobot_<family>`` module, imported only when asked for.
Policies that read no text (ACT, Diffusion Policy) get a byte tokenizer, so one pipeline type serves them all.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from vlax.weights.common import CheckpointError, check_importer_kwargs, read_config
from vlax.weights.lerobot_policy import check_policy_type

# LeRobot policy type -> (module, loader)
LOADERS = {
    "act": ("vlax.weights.lerobot_act", "load_lerobot_act"),
    "diffusion": ("vlax.weights.lerobot_diffusion", "load_lerobot_diffusion"),
    "smolvla": ("vlax.weights.lerobot_smolvla", "load_smolvla"),
    "pi0": ("vlax.weights.lerobot_pi0", "load_lerobot_pi0"),
    "pi05": ("vlax.weights.lerobot_pi0", "load_lerobot_pi0"),
}


def load_lerobot(path: str | Path, **kwargs: Any) -> tuple[Any, Any]:
    """``(policy, pipeline)`` of the LeRobot policy directory ``path``; ``kwargs`` go to the family's loader.

    Raises:
      CheckpointError: the directory is not a LeRobot policy, or its ``type`` is not one of :data:`LOADERS`
        (the message lists them).
    """
    from vlax.observation import ObservationPipeline
    from vlax.tokenizers import ByteTokenizer

    path = Path(path)
    kind = check_policy_type(read_config(path), LOADERS, path)
    module, name = LOADERS[kind]
    loader = getattr(importlib.import_module(module), name)
    check_importer_kwargs(loader, kwargs, f"the LeRobot {kind} policy {path}")
    loaded = loader(path, **kwargs)
    if kind == "diffusion":
        loaded = (loaded.policy, loaded.normalization)
    policy, second = loaded
    if isinstance(second, ObservationPipeline):
        return policy, second
    return policy, ObservationPipeline(policy.spec, ByteTokenizer(), {path.name: second})


def supported_lerobot_types() -> list[str]:
    return sorted(LOADERS)


__all__ = ["load_lerobot", "supported_lerobot_types", "LOADERS", "CheckpointError"]
