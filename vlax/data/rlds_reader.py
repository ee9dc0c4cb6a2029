"""Reading RLDS datasets in tfds format into standard trajectories, one shard of files per host."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vlax.data import sources
from vlax.data.file_digest import file_digest
from vlax.data.sources import key_list


class CorruptedDataError(RuntimeError):
    """A TFRecord file could not be read."""


def scan_tfrecord_files(files: list[str]) -> dict[str, tuple[int, str | None]]:
    """Reads every record of each file (checksums only, no parsing).

    Returns:
      file -> (number of readable records, error message or None).
    """
    report = {}
    for path in files:
        count, error = 0, None
        try:
            for _ in tf.data.TFRecordDataset(path):
                count += 1
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as e:
            error = e.message.strip().splitlines()[0] if e.message else type(e).__name__
        report[path] = (count, error)
    return report


def raise_for_corrupted(files: list[str], cause: Exception | None = None) -> None:
    """Finds the corrupted file(s) among ``files`` and raises :class:`CorruptedDataError` naming them."""
    bad = {f: r for f, r in scan_tfrecord_files(files).items() if r[1] is not None}
    if bad:
        names = "; ".join(f"{f} (after {n} good records: {err})" for f, (n, err) in bad.items())
        raise CorruptedDataError(
            f"Corrupted TFRecord file(s): {names}. Re-create them, or pass ignore_errors=True to skip the unreadable "
            "records (they are counted and logged)."
        ) from cause
    if cause is not None:
        raise cause


def _feature_keys(features: Any) -> list[str]:
    return sorted(features.keys()) if hasattr(features, "keys") else []


def default_image_keys(observation_features: Any) -> dict[str, str]:
    """Camera name -> observation key: the ``image_*`` keys under their own names (``image_corner2`` ->
    ``corner2``); a dataset without such keys (Open-X's ``image``, ``wrist_image``, ...) gives every image
    feature under its key."""
    keys = _feature_keys(observation_features)
    prefixed = {k[len("image_"):]: k for k in keys if k.startswith("image_")}
    if prefixed:
        return prefixed
    return {k: k for k in keys if isinstance(observation_features[k], tfds.features.Image)}


def _last_dim(feature: Any) -> int:
    shape = tuple(feature.shape)
    return int(shape[-1]) if shape else 1


def _concat(parts: list, length: tf.Tensor) -> tf.Tensor:
    """Step arrays ``[T, d_i]`` (or scalars ``[T]``) -> ``float32 [T, sum d_i]``."""
    parts = [tf.reshape(tf.cast(p, tf.float32), [length, -1]) for p in parts]
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=-1)


class RLDSSource:
    """An RLDS dataset (tfds format on disk) as a trajectory source (see :mod:`vlax.data.sources`).

    Args:
      data_dir: the dataset directory (holding ``dataset_info.json``), e.g. ``out/metaworld_experts/1.0.0``.
      name: dataset name in batches (default: the tfds name).
      image_keys: vlax camera name -> observation key (None = the camera is missing here, filled with padding).
        Default: every ``image_*`` observation key under its own name (``image_corner2`` -> camera ``corner2``),
        or, when there is none, every image feature under its key.
      state_key / action_key / language_key: step keys (``observation/<state_key>``); language may also be an
        ``episode_metadata`` key. ``state_key=None`` reads no state. State and action may each be a list of
        keys, concatenated in the order given (e.g. ``["joint_pos", "gripper"]``).
      privileged_state_key: an observation key delivered as ``privileged/sim_state`` (never fed to a policy by
        default; None leaves it out).
      ignore_errors: skip unreadable records of corrupted files (the files are scanned, counted and logged)
        instead of raising an error that names the file.
      standardize_fn: optional replacement of the key mapping: RLDS episode (``steps`` as tensors [T, ...],
        ``episode_metadata``) -> standard trajectory.
    """

    def __init__(
        self,
        data_dir: str,
        *,
        name: str | None = None,
        split: str = "train",
        image_keys: Mapping[str, str | None] | None = None,
        state_key: str | Sequence[str] | None = "state",
        action_key: str | Sequence[str] = "action",
        language_key: str | None = "language_instruction",
        privileged_state_key: str | None = None,
        gripper_last: bool = True,
        ignore_errors: bool = False,
        standardize_fn: Callable[[dict], dict] | None = None,
    ):
        if not os.path.exists(os.path.join(data_dir, "dataset_info.json")):
            raise FileNotFoundError(
                f"No tfds dataset in {data_dir!r} (dataset_info.json missing); pass the version directory, e.g. "
                "<out_dir>/metaworld_experts/1.0.0"
            )
        self.data_dir = data_dir
        self.builder = tfds.builder_from_directory(data_dir)
        self.name = name or self.builder.name
        if split not in self.builder.info.splits:
            raise ValueError(f"Split {split!r} not in {data_dir}; splits: {sorted(self.builder.info.splits)}")
        self.split = split
        self.gripper_last = gripper_last
        self.ignore_errors = ignore_errors
        self.standardize_fn = standardize_fn
        self.all_files = sorted(os.fspath(p) for p in self.builder.info.splits[split].filepaths)
        self.files: list[str] = list(self.all_files)
        self.read_report: dict[str, tuple[int, str | None]] = {}

        features = self.builder.info.features
        step_features = features["steps"]
        observation_features = step_features["observation"]
        observation_keys = _feature_keys(observation_features)
        if image_keys is None:
            image_keys = default_image_keys(observation_features)
        self.image_keys = dict(image_keys)
        self.state_keys, self.action_keys = key_list(state_key), key_list(action_key)
        if not self.action_keys:
            raise ValueError(f"RLDS dataset {data_dir}: action_key names no key")
        self.state_key, self.action_key = state_key, action_key
        self.language_key, self.privileged_state_key = language_key, privileged_state_key
        for key in [k for k in self.image_keys.values() if k] + list(self.state_keys) + (
                [privileged_state_key] if privileged_state_key else []):
            if key not in observation_keys:
                raise KeyError(
                    f"Observation key {key!r} not in RLDS dataset {self.name!r}; available observation keys: "
                    f"{observation_keys}"
                )
        step_keys = _feature_keys(step_features)
        for key in self.action_keys:
            if key not in step_keys:
                raise KeyError(f"Step key {key!r} not in RLDS dataset {self.name!r}; available step keys: {step_keys}")
        metadata_keys = _feature_keys(features["episode_metadata"]) if "episode_metadata" in features else []
        if language_key and language_key not in step_keys and language_key not in metadata_keys:
            raise KeyError(
                f"Language key {language_key!r} not in RLDS dataset {self.name!r}; step keys: {step_keys}, "
                f"episode_metadata keys: {metadata_keys}"
            )
        self._language_in_steps = bool(language_key) and language_key in step_keys
        self.action_dim = sum(_last_dim(step_features[k]) for k in self.action_keys)
        self.state_dim = sum(_last_dim(observation_features[k]) for k in self.state_keys)
        # Images stay encoded through the trajectory transforms and are decoded per frame (only sampled frames).
        self._decoders = {
            "steps": {
                "observation": {
                    k: tfds.decode.SkipDecoding()
                    for k in observation_keys
                    if isinstance(observation_features[k], tfds.features.Image)
                }
            }
        }

    def fingerprint(self) -> str:
        """Hash of the dataset description, its files (names and content digests) and the key mapping.

        Content, not sizes: a same-size overwrite of a file must not reuse statistics cached for the old bytes.
        Digests are remembered per file state (:mod:`vlax.data.file_digest`), so only new or changed files are
        read.
        """
        with open(os.path.join(self.data_dir, "dataset_info.json")) as f:
            info = f.read()
        files = [(os.path.basename(p), file_digest(p)) for p in self.all_files]
        keys = [self.image_keys, self.state_key, self.action_key, self.language_key, self.split]
        return sources.hash_json([info, files, keys, getattr(self.standardize_fn, "__qualname__", None)])

    def _parse(self, serialized: tf.Tensor) -> dict:
        episode = self.builder.info.features.deserialize_example(serialized, decoders=self._decoders)
        episode = dict(episode)
        episode["steps"] = episode["steps"].batch(1 << 30).get_single_element()
        return episode

    def _standardize(self, episode: dict) -> dict:
        if self.standardize_fn is not None:
            return self.standardize_fn(episode)
        steps = episode["steps"]
        length = tf.shape(steps[self.action_keys[0]])[0]
        observation = {}
        for camera, key in self.image_keys.items():
            observation[f"image_{camera}"] = steps["observation"][key] if key else tf.fill([length], "")
        if self.state_keys:
            observation["state"] = _concat([steps["observation"][k] for k in self.state_keys], length)
        if not self.language_key:
            language = tf.fill([length], "")
        elif self._language_in_steps:
            language = steps[self.language_key]
        else:
            language = tf.fill([length], episode["episode_metadata"][self.language_key])
        traj = {
            "observation": observation,
            "task": {"language_instruction": language},
            "action": _concat([steps[k] for k in self.action_keys], length),
            "dataset_name": tf.fill([length], self.name),
        }
        if self.privileged_state_key:
            traj["privileged"] = {"sim_state": tf.cast(steps["observation"][self.privileged_state_key], tf.float32)}
        return traj

    def _records(self, files: list[str], shuffle: bool, seed: int, repeat: bool) -> tf.data.Dataset:
        ds = tf.data.Dataset.from_tensor_slices(files)
        if shuffle:
            ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()

        def read(path):
            records = tf.data.TFRecordDataset(path)
            return records.ignore_errors() if self.ignore_errors else records

        return ds.interleave(
            read, cycle_length=min(len(files), 8), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )

    def trajectories(
        self,
        process_index: int | None = None,
        process_count: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = False,
    ) -> tf.data.Dataset:
        """Standard trajectories of this host's shard.

        With at least as many files as hosts, host i reads files i, i + count, ...; otherwise every host reads all
        files in the same seeded order and keeps every count-th episode. Either way the shards are disjoint and
        together complete.
        """
        index, count = sources.resolve_process(process_index, process_count)
        by_file = len(self.all_files) >= count
        self.files = self.all_files[index::count] if by_file else list(self.all_files)
        if self.ignore_errors:
            self.read_report = scan_tfrecord_files(self.files)
            bad = {p: r for p, r in self.read_report.items() if r[1]}
            if bad:  # one warning per read, not one per file: a damaged dataset can have thousands
                logging.warning(
                    "ignore_errors: %s: skipping unreadable records in %d of %d files: %s", self.name, len(bad),
                    len(self.files), "; ".join(f"{p} (after {n} good records: {e})" for p, (n, e) in bad.items()))
        ds = self._records(self.files, shuffle, seed, repeat)
        if not by_file:
            ds = ds.shard(count, index)
        ds = ds.map(self._parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        return ds.map(self._standardize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    @property
    def num_corrupted_files(self) -> int:
        """Files found corrupted when reading with ``ignore_errors`` (0 before reading)."""
        return sum(1 for _, error in self.read_report.values() if error)

    def instructions(self) -> list[str]:
        """Every distinct instruction of the split (one pass that decodes no image)."""
        if not self.language_key:
            return []
        ds = self._records(self.all_files, shuffle=False, seed=0, repeat=False).map(self._parse)
        ds = ds.map(lambda e: self._standardize(e)["task"]["language_instruction"])
        texts: set[str] = set()
        for batch in ds.as_numpy_iterator():
            texts.update(t.decode("utf-8") for t in batch)
        return sorted(texts)

    def numeric_trajectories(self) -> Iterator[dict[str, np.ndarray]]:
        """Actions and states of every episode in the split (all hosts see the same data)."""
        ds = self._records(self.all_files, shuffle=False, seed=0, repeat=False).map(self._parse)
        ds = ds.map(self._standardize)

        def numeric(traj):
            out = {"action": traj["action"]}
            if self.state_keys:
                out["state"] = traj["observation"]["state"]
            return out

        try:
            yield from ds.map(numeric).as_numpy_iterator()
        except tf.errors.DataLossError as e:
            raise_for_corrupted(self.all_files, e)
