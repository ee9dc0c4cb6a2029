"""What an evaluation needs to know about a checkpoint, read from its JSON items without loading any weights.

A checkpoint is self-describing (config, normalization artifact, tokenizer), so the evaluator takes the camera,
render size, policy image size, state/action dims and trained tasks from it instead of asking for them again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from vlax.envs.metaworld import sim, task_sets

REQUIRED_ITEMS = ("config", "normalization", "tokenizer")


class CheckpointError(ValueError):
    """A checkpoint lacks something the evaluator needs, or does not fit the requested evaluation."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """Facts about one checkpoint step that shape the evaluation.

    Attributes:
      directory: the checkpoints directory (``<workdir>/checkpoints`` or the path given).
      step: the checkpoint step evaluated (the newest one unless asked otherwise).
      config: the fully resolved training config (a plain dict).
      settings: how the environment renders, as the training data was recorded (every camera, size, encoding,
        pose).
      camera_names: the policy's name of each of ``settings.cameras`` (the source's camera mapping).
      policy_image_size: the size the policy sees (frames are resized to it like the training pipeline did).
      state_dim / action_dim: real (unpadded) dims from the normalization artifact.
      horizon: actions per predicted chunk ``H``.
      obs_history: observation steps the policy sees per call (its window; 1 without a history).
      trained_tasks: the Meta-World tasks of the training data.
    """

    directory: str
    step: int
    config: dict
    settings: sim.RolloutSettings
    policy_image_size: int
    state_dim: int
    action_dim: int
    horizon: int
    trained_tasks: tuple[str, ...]
    obs_history: int = 1
    camera_names: tuple[str, ...] = ()


def checkpoints_directory(path: str | os.PathLike) -> Path:
    """``<workdir>/checkpoints`` when ``path`` is a training workdir, else ``path`` itself (as PolicyRunner does)."""
    path = Path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def _steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def _read_item(step_dir: Path, name: str) -> Any:
    """One JSON item of an orbax step directory (orbax's JsonSave writes ``<item>/metadata``)."""
    item = step_dir / name
    files = [item / "metadata"] if (item / "metadata").is_file() else sorted(item.glob("*.json"))
    if not item.is_dir() or not files:
        raise CheckpointError(
            f"checkpoint {step_dir} has no {name!r} item (it has {sorted(p.name for p in step_dir.iterdir())}); "
            f"an evaluable checkpoint carries {list(REQUIRED_ITEMS)}: save it with the training loop of "
            "experiments/train.py, which writes them next to the weights"
        )
    with open(files[0]) as f:
        return json.load(f)


def read_checkpoint_info(path: str | os.PathLike, *, step: int | None = None) -> CheckpointInfo:
    """Reads and checks the JSON items of a checkpoint (no weights are loaded).

    Raises:
      CheckpointError: the path holds no checkpoint, a required item (config / normalization / tokenizer) is
        missing, or the config does not describe a Meta-World policy.
    """
    if not Path(path).exists():
        raise CheckpointError(f"checkpoint path {str(path)!r} does not exist; pass a training workdir (holding "
                              "checkpoints/<step>/) or its checkpoints directory, or 'expert'")
    directory = checkpoints_directory(path)
    steps = _steps(directory)
    if not steps:
        raise CheckpointError(f"no checkpoint steps under {str(directory)!r}; expected <step>/ directories written "
                              "by the training loop (experiments/train.py)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"checkpoint step {step} is not in {str(directory)!r}; steps there: {steps}")
    step_dir = directory / str(step)
    if not (step_dir / "state").is_dir():
        raise CheckpointError(f"checkpoint {step_dir} has no 'state' item (the weights)")
    config, normalization, _ = (_read_item(step_dir, name) for name in REQUIRED_ITEMS)
    data = config.get("data", {})
    source = next((s for s in data.get("sources", []) if s.get("kind") == "metaworld"), None)
    if source is None or "image_size" not in data or "action_horizon" not in data:
        raise CheckpointError(f"the config of {step_dir} has no Meta-World data source (data.sources[i].kind = "
                              "'metaworld'); it was not trained on a Meta-World dataset by experiments/train.py")
    if len(data["sources"]) == 1 and "type" not in normalization:  # {dataset name: artifact}
        normalization = next(iter(normalization.values()))
    elif "type" not in normalization:
        normalization = normalization.get(source.get("name") or "metaworld_experts", {})
    # experiments/train.py records its dataset with the generator's defaults apart from the size and camera.
    camera_map = source.get("cameras") or {"corner2": "corner2"}
    cameras = tuple(c[len("image_"):] if c.startswith("image_") else c for c in camera_map)
    settings = sim.RolloutSettings(image_size=int(source.get("image_size", 128)), cameras=cameras)
    stats = normalization.get("stats", {})
    dims = {k: len(stats[k]["mean"]) for k in ("state", "action") if k in stats}
    if dims.get("action") != sim.ACTION_DIM:
        raise CheckpointError(f"the normalization artifact of {step_dir} has action dim {dims.get('action')}; "
                              f"Meta-World takes {sim.ACTION_DIM}")
    state_dim = dims.get("state", 0)
    if state_dim not in (0, sim.STATE_DIM):
        raise CheckpointError(f"the normalization artifact of {step_dir} has state dim {state_dim}; the Meta-World "
                              f"dataset's state has {sim.STATE_DIM} (hand xyz + gripper)")
    return CheckpointInfo(
        directory=str(directory), step=step, config=config, settings=settings,
        policy_image_size=int(data["image_size"]), state_dim=state_dim, action_dim=dims["action"],
        horizon=int(data["action_horizon"]), trained_tasks=task_sets.resolve_tasks(source["tasks"]),
        obs_history=int(data.get("obs_history", 1)), camera_names=tuple(str(v) for v in camera_map.values()),
    )
