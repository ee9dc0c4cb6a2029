"""A data iterator whose position is saved with each checkpoint, so a resumed run sees the same batches.

tf.data checkpoints the iterator itself (shuffle buffers included); each host saves its own under
``<dir>/host_<process_index>``.

A corrupted TFRecord surfaces as :class:`vlax.data.rlds_reader.CorruptedDataError` naming the damaged file(s)
(TF's own ``DataLossError`` says only "corrupted record at <offset>").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import jax


class DataIterator:
    """Iterates ``dataset`` as numpy batches.

    Args:
      dataset: a ``tf.data.Dataset``, or a :class:`vlax.data.pipeline.DataPipeline` (its ``dataset`` and
        ``files`` are used).
      files: the files the dataset reads (or a callable returning them, read when an error happens), scanned to
        name the corrupted one when reading fails; default: the pipeline's ``files``, else none (the error then
        carries TF's message only).
    """

    def __init__(self, dataset, files: Sequence[str] | Callable[[], Sequence[str]] | None = None):
        import tensorflow as tf

        if hasattr(dataset, "files") and hasattr(dataset, "dataset"):  # a DataPipeline
            pipeline, dataset = dataset, dataset.dataset
            if files is None:
                files = lambda: pipeline.files  # noqa: E731 (sources fill their files in as they are read)
        self._files = files

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
        try:
            batch = next(self._iterator)
        except self._tf.errors.DataLossError as e:
            from vlax.data.rlds_reader import CorruptedDataError, raise_for_corrupted

            files = list(self._files() if callable(self._files) else self._files or [])
            try:
                raise_for_corrupted(files, e)  # CorruptedDataError naming the file(s) the scan finds damaged
            except self._tf.errors.DataLossError:  # none found: it re-raised e
                pass
            raise CorruptedDataError(  # not found among the known files (or none given): still vlax's error
                f"Corrupted data while reading the training dataset: {e.message.strip().splitlines()[0]}. "
                f"Scanned files: {files or 'none known (pass files= to DataIterator)'}. Re-create the damaged "
                "file, or read with ignore_errors=True to skip unreadable records."
            ) from e
        return self._tf.nest.map_structure(lambda t: t.numpy(), batch)

    def save(self, directory: str | Path) -> str:
        path = Path(directory) / f"host_{jax.process_index()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return self._checkpoint.write(str(path / "iterator"))

    def restore(self, directory: str | Path) -> None:
        path = Path(directory) / f"host_{jax.process_index()}" / "iterator"
        if not Path(str(path) + ".index").exists():
            raise FileNotFoundError(f"no data-iterator state at {path}; cannot resume the data order exactly")
        self._checkpoint.read(str(path)).assert_consumed()
