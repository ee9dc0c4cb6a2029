"""Resuming a workdir: the saved config must describe the same run as the current one.

Only settings that do not change what is trained may differ (the step budget, logging, saving, the mesh, where
the data lives); anything else (another head, other data, another learning rate) belongs in a new workdir, or in a
fine-tune that starts from this one.
"""

from __future__ import annotations

import fnmatch
from typing import Any, Mapping

# Keys (dotted, list indices as numbers) that may differ between the saved and the current config.
MAY_DIFFER = (
    "workdir", "mesh.*", "train.steps", "train.max_minutes", "train.log_every", "train.save_every", "train.keep",
    "train.tensorboard", "train.progress", "train.stop_check_every", "train.resume_without_data_state",
    "data.val_every", "data.val_batches", "data.sources.*.path", "data.sources.*.num_workers",
    "data.sources.*.ignore_errors",
)


class ResumeConfigError(ValueError):
    """The workdir holds a run with another config."""


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.0.c": value}`` of nested dicts and lists."""
    if isinstance(config, Mapping):
        items = config.items()
    elif isinstance(config, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in config):
        items = enumerate(config)
    else:
        return {prefix: list(config) if isinstance(config, tuple) else config}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ, except those in :data:`MAY_DIFFER`: ``{key: (saved, current)}``."""
    a, b = flatten(saved), flatten(current)
    missing = object()
    out = {}
    for key in sorted(set(a) | set(b)):
        if any(fnmatch.fnmatchcase(key, pattern) or key.startswith(pattern + ".") for pattern in MAY_DIFFER):
            continue
        x, y = a.get(key, missing), b.get(key, missing)
        if _normal(x) != _normal(y):
            out[key] = ("<absent>" if x is missing else x, "<absent>" if y is missing else y)
    return out


def _normal(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any], *, workdir: str, step: int) -> None:
    """Raise :class:`ResumeConfigError` listing the differing keys, with what to do instead."""
    diff = config_differences(saved, current)
    if not diff:
        return
    lines = "\n".join(f"  {k}: saved {v[0]!r}, now {v[1]!r}" for k, v in list(diff.items())[:20])
    more = f"\n  ... and {len(diff) - 20} more" if len(diff) > 20 else ""
    raise ResumeConfigError(
        f"{workdir} holds a run (checkpoint step {step}) whose config differs from this one:\n{lines}{more}\n"
        f"To start this config afresh use a new workdir (--config.workdir=...); to start from that run's weights "
        f"use --config.finetune.checkpoint={workdir} with a new workdir; to resume it, use its config again.")
