"""Orbax checkpoints that describe themselves, on local disk or any URL orbax and tf.io read (``gs://...``).

Each step directory holds the train state (arrays, restored with the target's shardings) and JSON items:
``config`` (the fully resolved config), ``policy`` (the policy spec and observation pipeline settings),
``normalization`` (one normalization artifact per data source), ``tokenizer`` and ``data`` (the data position).
Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it on commit), old steps are
pruned to ``max_to_keep``, and :meth:`Checkpointer.restore_latest` resumes from the newest complete step.

Paths go through ``etils.epath``, which keeps URLs intact (``pathlib.Path("gs://b/r")`` would become a local
``gs:/b/r`` directory).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

JSON_ITEMS = ("config", "policy", "normalization", "tokenizer", "data")

PathLike = str | os.PathLike | epath.Path

# Orbax saves an array replicated over N devices as N slices written in parallel; each distinct shape compiles its
# own slice program (~0.1 s), about 40 per save of a small policy, which costs more than writing it. Arrays whose
# slice would be under 1 MiB are written whole by one replica; large ones (a pod's replicated weights) keep the
# parallel write.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


def _register_array_handler() -> None:
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns on every override, which is the point here
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(
                min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES), override=True)
    finally:
        logging.set_verbosity(verbosity)


_register_array_handler()


def as_path(path: PathLike) -> epath.Path:
    """A path object that keeps ``scheme://`` URLs intact; local paths become absolute."""
    text = os.fspath(path)
    return epath.Path(text) if "://" in text else epath.Path(os.path.abspath(text))


def checkpoints_dir(path: PathLike) -> epath.Path:
    """``<workdir>/checkpoints`` for a training workdir, else ``path`` itself."""
    path = as_path(path)
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


class Checkpointer:
    def __init__(self, directory: PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = as_path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", *JSON_ITEMS))

    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, *, force: bool = False, **json_items: Any) -> bool:
        """Start saving ``state`` (a pytree of arrays) and JSON-serialisable ``json_items`` at ``step``."""
        unknown = set(json_items) - set(JSON_ITEMS)
        if unknown:
            raise ValueError(f"unknown checkpoint items {sorted(unknown)}; known: {list(JSON_ITEMS)}")
        items = {"state": ocp.args.StandardSave(state)}
        items.update({k: ocp.args.JsonSave(v) for k, v in json_items.items() if v is not None})
        return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

    def items(self, step: int) -> set[str]:
        """Names of the items saved at ``step``."""
        return {p.name for p in (self.directory / str(step)).iterdir() if p.is_dir()}

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """State at ``step`` laid out like ``target`` (arrays or ``jax.ShapeDtypeStruct`` with shardings)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        present = self.items(step)
        items = {"state": ocp.args.StandardRestore(abstract)}
        items.update({k: ocp.args.JsonRestore() for k in JSON_ITEMS if k in present})
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        meta = {k: restored[k] for k in JSON_ITEMS if k in restored and restored[k] is not None}
        return restored["state"], meta

    def state_metadata(self, step: int) -> Any:
        """The saved state's tree of array metadata (shape, dtype) without reading any array."""
        saved = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
        return getattr(getattr(saved, "item_metadata", saved), "tree", saved)

    def array_shapes(self, step: int) -> Any:
        """The saved state's array metadata (``.shape``, ``.dtype``) as :meth:`restore_raw` nests it, reading no
        array: for checking a transplant before anything is built."""
        return _unwrap_values(self.state_metadata(step))

    def restore_raw(self, step: int) -> Any:
        """The saved state as plain nested dicts of arrays, without a target (for transplanting into a new model).

        Variables saved as ``{"value": array}`` come back as the array itself. Arrays land on this process's first
        device whatever topology saved them (a pod- or 8-device checkpoint loads on one CPU).
        """
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              self.state_metadata(step),
                              is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
        raw = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
        return _unwrap_values(raw)

    def restore_latest(self, target: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """``(step, state, json items)`` of the newest checkpoint, or ``None`` when there is none."""
        step = self.latest_step
        if step is None:
            return None
        state, meta = self.restore(step, target)
        return step, state, meta

    def read_json(self, step: int | None, name: str) -> Any:
        """One JSON item (e.g. the config) without touching the arrays; ``step=None`` is the latest.
        ``None`` when that step has no such item."""
        step = self.latest_step if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if name not in self.items(step):
            return None
        return self._manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))[name]

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _unwrap_values(tree: Any) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: _unwrap_values(v) for k, v in tree.items()}
    return tree
