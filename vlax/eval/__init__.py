"""vlax evaluation: closed-loop Meta-World rollouts and open-loop action metrics.

    from vlax.eval import evaluate, open_loop_metrics
    results = evaluate("runs/flow", "mt10", episodes_per_task=10, num_workers=2, results_path="results.json")

See :mod:`vlax.envs.metaworld.evaluate` for the protocol and the results-file schema.
"""

from __future__ import annotations

import importlib

# Loaded on first use: worker processes import this package and must set their environment before JAX loads.
_EXPORTS = {
    "evaluate": "vlax.envs.metaworld.evaluate",
    "layout_seed": "vlax.envs.metaworld.evaluate",
    "CheckpointError": "vlax.envs.metaworld.checkpoint_info",
    "CheckpointInfo": "vlax.envs.metaworld.checkpoint_info",
    "read_checkpoint_info": "vlax.envs.metaworld.checkpoint_info",
    "format_table": "vlax.eval.results",
    "load_results": "vlax.eval.results",
    "validate_results": "vlax.eval.results",
    "write_results": "vlax.eval.results",
    "open_loop_metrics": "vlax.eval.open_loop",
    "write_video": "vlax.eval.video",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vlax.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
