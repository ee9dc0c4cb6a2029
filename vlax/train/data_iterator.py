"""A data iterator whose position is saved with each checkpoint, so a resumed run sees the same batches.

tf.data checkpoints the iterator itself (shuffle buffers included); each host saves its own under
``<dir>/host_<process_index>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax


class DataIterator:
    def __init__(self, dataset):
        import tensorflow as tf

        self._tf = tf
        options = tf.data.Options()
        # Trajectory readers run a whole-dataset reduction inside a map (stateful to tf.data, but a pure function
        # of its input): re-running it on restore is exact, so its "state" need not be saved.
        options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
        self._iterator = iter(dataset.with_options(options))
        self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)

    def __iter__(self):
        return self

    def __next__(self) -> Any:
        return self._tf.nest.map_structure(lambda t: t.numpy(), next(self._iterator))

    def save(self, directory: str | Path) -> str:
        path = Path(directory) / f"host_{jax.process_index()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return self._checkpoint.write(str(path / "iterator"))

    def restore(self, directory: str | Path) -> None:
        path = Path(directory) / f"host_{jax.process_index()}" / "iterator"
        if not Path(str(path) + ".index").exists():
            raise FileNotFoundError(f"no data-iterator state at {path}; cannot resume the data order exactly")
        self._checkpoint.read(str(path)).assert_consumed()
