"""A data iterator whose position is saved with each checkpoint, so a resumed run sees the same batches.

tf.data checkpoints the iterator itself (shuffle buffers included); each host saves its own under
``<dir>/host_<process_index>``. Directories are strings handed to ``tf.io`` (never ``pathlib``, which would turn
``gs://b/r`` into a local ``gs:/b/r``), so the state lands beside the checkpoints on any URL tf.io writes.

A corrupted TFRecord surfaces as :class:`vlax.data.rlds_reader.CorruptedDataError` naming the damaged file(s)
(TF's own ``DataLossError`` says only "corrupted record at <offset>").
"""

from __future__ import annotations

import os
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

    def save(self, directory: str | os.PathLike) -> str:
        """Write this host's position under ``directory`` (a local path or a URL); returns the checkpoint prefix."""
        path = _join(directory, f"host_{jax.process_index()}")
        self._tf.io.gfile.makedirs(path)
        return self._checkpoint.write(_join(path, "iterator"))

    def restore(self, directory: str | os.PathLike) -> None:
        path = _join(directory, f"host_{jax.process_index()}", "iterator")
        if not self._tf.io.gfile.exists(path + ".index"):
            raise FileNotFoundError(f"no data-iterator state at {path}; cannot resume the data order exactly")
        self._checkpoint.read(path).assert_consumed()


def _join(directory: str | os.PathLike, *names: str) -> str:
    """``directory/name/...`` as a string, keeping ``scheme://`` intact (``epath.Path`` and ``str`` alike)."""
    return "/".join([os.fspath(directory).rstrip("/"), *names])
