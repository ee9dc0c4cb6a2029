"""Start a run from another run's parameters when the model differs (new head, other action dimension).

Parameters whose path matches the ``reinit`` regex keep their fresh initialisation and are listed; every other
parameter must exist in the checkpoint with the same shape, or the transplant fails naming it (silent shape
mismatches broke fine-tuning in other VLA code bases).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np


def _flat(tree: Any) -> dict[str, Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): v for path, v in leaves}


def transplant(new_params: Any, old_params: Any, reinit: str = "") -> tuple[Any, list[str], list[str]]:
    """``(params, reinitialised paths, unused checkpoint paths)``; ``new_params`` gives the structure."""
    pattern = re.compile(reinit) if reinit else None
    old = _flat(old_params)
    reinitialised, problems = [], []
    taken = set()

    def pick(path, new_value):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        if pattern is not None and pattern.search(name):
            reinitialised.append(name)
            return new_value
        if name not in old:
            problems.append(f"{name} {tuple(np.shape(new_value))} is not in the checkpoint")
            return new_value
        if tuple(np.shape(old[name])) != tuple(np.shape(new_value)):
            problems.append(f"{name}: checkpoint {tuple(np.shape(old[name]))} vs model {tuple(np.shape(new_value))}")
            return new_value
        taken.add(name)
        return np.asarray(old[name]).astype(np.asarray(new_value).dtype) if hasattr(new_value, "dtype") else old[name]

    params = jax.tree_util.tree_map_with_path(pick, new_params)
    if problems:
        raise ValueError("cannot load the checkpoint into this model; re-initialise these with --config.finetune."
                         f"reinit=<regex> or fix the config:\n  " + "\n  ".join(problems))
    unused = sorted(set(old) - taken)
    return params, sorted(reinitialised), unused
