"""The data pipeline: sources -> normalization -> trajectory transforms -> mixture -> frame transforms -> batches.

``build_pipeline`` wires the pieces for one or many sources and returns a :class:`DataPipeline` whose iterator yields
numpy batches in the standard schema (documented in :mod:`vlax.data`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import tensorflow as tf

from vlax.data import frame_transforms, mixture, normalization, sources, traj_transforms
from vlax.data.resize import check_resize_mode
from vlax.data.rlds_reader import raise_for_corrupted

# Salts that keep the random streams of the different stages apart.
_SALT_GOAL, _SALT_LANGUAGE, _SALT_SUBSAMPLE, _SALT_AUGMENT = 11, 12, 13, 14


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Options of the pipeline (one value per field; a config file can set any of them)."""

    batch_size: int = 64
    window: int = 1  # observation window W
    action_horizon: int = 1  # action chunk H
    image_size: int | Mapping[str, tuple[int, int]] = 128  # square size for every camera, or camera -> (H, W)
    image_resize: str = "stretch"  # frames of another shape: stretch | pad (vlax.data.resize)
    normalization: str = "bounds"  # normal | bounds | min_max | none
    normalization_masks: Mapping[str, tuple[bool, ...]] | None = None  # default: all dims but the gripper
    max_action_dim: int | None = None  # pad actions to this (default: the largest over the sources)
    max_state_dim: int | None = None
    goal_relabeling: bool = False  # uniform future-frame goal images/state under ``task``
    drop_language_prob: float = 0.0
    subsample_length: int | None = None
    augment: bool = True  # only when train
    augment_config: frame_transforms.AugmentConfig = frame_transforms.AugmentConfig()
    shuffle_buffer: int = 10_000  # frames
    train: bool = True  # repeat + shuffle + augment; False gives one ordered pass without augmentation
    seed: int = 0
    balance_by_size: bool = False
    num_parallel_calls: int = 16  # trajectory-transform threads, shared across sources by weight
    prefetch: int = 2
    stats_cache_dir: str | None = None  # default: normalization.default_cache_dir()
    drop_remainder: bool = True
    val_fraction: float = 0.0  # episodes held out for validation, chosen by a hash of each episode's content
    split: str = "all"  # all | train (without the held-out episodes) | val (only them)


@dataclasses.dataclass
class DataPipeline:
    """A built pipeline: ``iter(pipeline)`` yields numpy batches."""

    dataset: tf.data.Dataset
    artifacts: dict[str, normalization.NormalizationArtifact]
    probabilities: np.ndarray
    sources: list[Any]

    @property
    def files(self) -> list[str]:
        return [f for s in self.sources for f in s.files]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iterator = self.dataset.as_numpy_iterator()
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except tf.errors.DataLossError as e:
                raise_for_corrupted(self.files, e)
            yield batch


def _image_sizes(config: DataConfig, cameras: Sequence[str]) -> dict[str, tuple[int, int]]:
    if isinstance(config.image_size, int):
        return {c: (config.image_size, config.image_size) for c in cameras}
    return {c: tuple(s) for c, s in config.image_size.items()}


def make_artifact(
    source: Any, config: DataConfig, max_action_dim: int, max_state_dim: int
) -> normalization.NormalizationArtifact:
    """Statistics of ``source`` (cached by its fingerprint) packaged with the config's normalization choices."""
    keys = ("action", "state") if source.state_dim else ("action",)
    dataset_hash = source.fingerprint()

    def compute():
        precomputed = source.precomputed_stats() if hasattr(source, "precomputed_stats") else None
        if precomputed is not None and all(k in precomputed for k in keys):
            return {k: precomputed[k] for k in keys}
        trajs = list(source.numeric_trajectories())
        return normalization.compute_statistics({k: [t[k] for t in trajs] for k in keys})

    cache_dir = config.stats_cache_dir or normalization.default_cache_dir()
    stats = normalization.load_or_compute_stats(cache_dir, dataset_hash, keys, compute)
    masks = normalization.default_masks(stats, keys, source.gripper_last)
    gripper_dims = getattr(source, "gripper_dims", None)
    if gripper_dims is not None:  # the source's own list of unnormalized action dims
        masks["action"] = tuple(i not in gripper_dims for i in range(len(masks["action"])))
    if config.normalization_masks:
        masks.update({k: tuple(v) for k, v in config.normalization_masks.items() if k in keys})
    padded = {"action": max_action_dim, "state": max_state_dim}
    return normalization.NormalizationArtifact(
        type=getattr(source, "normalization", None) or config.normalization,
        keys=keys,
        masks=masks,
        padded_dims={k: padded[k] for k in keys},
        stats=stats,
        dataset_hash=dataset_hash,
        dataset_name=source.name,
    )


def _normalize(traj: dict, artifact: normalization.NormalizationArtifact) -> dict:
    traj = dict(traj)
    traj["action"] = artifact.tf_normalize("action", traj["action"])
    if "state" in artifact.keys:
        traj["observation"] = {**traj["observation"], "state": artifact.tf_normalize("state", traj["observation"]["state"])}
    return traj


def _ensure_state(traj: dict, has_state: bool, max_state_dim: int) -> dict:
    """Datasets without state get a zero state of dim 0 (padded later) whose pad mask is False."""
    if has_state or not max_state_dim:
        return traj
    length = tf.shape(traj["action"])[0]
    observation = {**traj["observation"], "state": tf.zeros([length, 0], tf.float32)}
    return {**traj, "observation": observation}


def _seed(base: int, salt: int, index: tf.Tensor) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(tf.constant([base, salt], tf.int64), index)


SPLITS = ("all", "train", "val")


def episode_bucket(traj: dict) -> tf.Tensor:
    """A number in [0, 1) fixed by the episode's content (dataset name, length, first and last actions): the same
    episode lands in the same split however files are sharded, shuffled or ordered."""
    action = traj["action"]
    parts = [traj["dataset_name"][0], tf.strings.as_string(tf.shape(action)[0]),
             tf.strings.reduce_join(tf.strings.as_string(action[:2], precision=7), separator=","),
             tf.strings.reduce_join(tf.strings.as_string(action[-1:], precision=7), separator=",")]
    bucket = tf.strings.to_hash_bucket_fast(tf.strings.join(parts, separator="|"), 1 << 30)
    return tf.cast(bucket, tf.float64) / float(1 << 30)


def split_episodes(traj_ds: tf.data.Dataset, split: str, val_fraction: float) -> tf.data.Dataset:
    """Keep the ``train`` or ``val`` episodes (``val``: a ``val_fraction`` share of them by content hash)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; known: {list(SPLITS)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie in [0, 1)")
    if split == "all" or (split == "train" and val_fraction == 0):
        return traj_ds
    if split == "val" and val_fraction == 0:
        raise ValueError("split='val' needs val_fraction > 0 (e.g. --config.data.val_fraction=0.1)")
    if split == "val":
        return traj_ds.filter(lambda traj: episode_bucket(traj) < val_fraction)
    return traj_ds.filter(lambda traj: episode_bucket(traj) >= val_fraction)


def trajectory_transforms(
    traj_ds: tf.data.Dataset,
    config: DataConfig,
    artifact: normalization.NormalizationArtifact | None,
    *,
    max_action_dim: int | None,
    max_state_dim: int | None,
    has_state: bool = True,
    num_parallel_calls: int = tf.data.AUTOTUNE,
    seed_offset: int = 0,
) -> tf.data.Dataset:
    """Applies normalization and the trajectory transforms in order (pad masks -> pad dims -> goal relabelling ->
    language dropping -> chunking -> subsampling) to a dataset of standard trajectories."""

    def transform(index, traj):
        if artifact is not None:
            traj = _normalize(traj, artifact)
        traj = _ensure_state(traj, has_state, max_state_dim or 0)
        traj = traj_transforms.add_pad_masks(traj)
        if not has_state and "state" in traj["observation"]:
            masks = dict(traj["observation"]["pad_mask_dict"])
            masks["state"] = tf.zeros_like(masks["state"])
            traj["observation"]["pad_mask_dict"] = masks
        traj = traj_transforms.pad_action_and_state_dims(traj, max_action_dim, max_state_dim)
        seed_index = index + seed_offset
        if config.goal_relabeling:
            traj = traj_transforms.relabel_goals_uniform(traj, _seed(config.seed, _SALT_GOAL, seed_index))
        traj = traj_transforms.drop_language(
            traj, _seed(config.seed, _SALT_LANGUAGE, seed_index), config.drop_language_prob
        )
        traj = traj_transforms.chunk(traj, config.window, config.action_horizon)
        return traj_transforms.subsample(traj, _seed(config.seed, _SALT_SUBSAMPLE, seed_index), config.subsample_length)

    return traj_ds.enumerate().map(transform, num_parallel_calls=num_parallel_calls, deterministic=True)


def frame_transforms_fn(config: DataConfig, cameras: Sequence[str]):
    """The per-frame function (decode + resize, then augmentation when training) taking (index, frame)."""
    sizes = _image_sizes(config, cameras)

    def transform(index, frame):
        frame = frame_transforms.decode_and_resize(frame, sizes, config.image_resize)
        if config.train and config.augment:
            frame = frame_transforms.augment(frame, _seed(config.seed, _SALT_AUGMENT, index), config.augment_config)
        return frame

    return transform


def _tokenizing(tokenize):
    """Batch -> batch with ``task/text_ids`` and ``task/text_mask`` (the tokenizer runs in tf.data's threads)."""

    def run(texts, states, state_dims):
        ids, mask = tokenize(list(texts), states, state_dims)
        return np.asarray(ids, np.int32), np.asarray(mask, bool)

    def add(batch):
        state = batch["observation"]["state"]
        state_mask = batch["observation"].get("state_mask", tf.ones_like(state, tf.bool))
        state = state[:, -1] if state.shape.rank == 3 else state  # the last window step, as the policy sees it
        state_mask = state_mask[:, -1] if state_mask.shape.rank == 3 else state_mask
        state_dims = tf.reduce_sum(tf.cast(state_mask, tf.int32), axis=-1)  # real dims: padding stays out
        ids, mask = tf.numpy_function(run, [batch["task"]["language_instruction"], state, state_dims],
                                      [tf.int32, tf.bool], stateful=False)
        ids.set_shape([None, None])
        mask.set_shape([None, None])
        return {**batch, "task": {**batch["task"], "text_ids": ids, "text_mask": mask}}

    return add


def _cameras(traj_ds: tf.data.Dataset) -> list[str]:
    return sorted(k[len("image_") :] for k in traj_ds.element_spec["observation"] if k.startswith("image_"))


def build_pipeline(
    data_sources: Sequence[Any],
    config: DataConfig,
    *,
    weights: Sequence[float] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    expected_artifacts: Mapping[str, normalization.NormalizationArtifact] | None = None,
    tokenize: Any = None,
) -> DataPipeline:
    """Builds the batched pipeline over one or more sources.

    Args:
      data_sources: sources (:class:`~vlax.data.rlds_reader.RLDSSource`, :class:`~vlax.data.lerobot_v3.LeRobotSource`,
        :class:`~vlax.data.sources.InMemorySource`) with distinct names.
      weights: mixture weights (None: equal), optionally multiplied by dataset sizes (``config.balance_by_size``).
      process_index / process_count: this host's shard (default from JAX).
      expected_artifacts: normalization recorded with a checkpoint, by dataset name; a mismatch raises
        :class:`~vlax.data.normalization.NormalizationMismatchError` naming the field.
      tokenize: optional ``(instructions [B] bytes, states [B, S], state_dims [B]) -> (ids [B, L] int32, mask
        [B, L] bool)`` (``state_dims``: each example's real state dims, the rest is padding) run
        inside the
        pipeline on each batch (e.g. :meth:`vlax.observation.ObservationPipeline.tokenize`); adds
        ``task/text_ids`` and ``task/text_mask``.

    Returns:
      A :class:`DataPipeline` yielding batches with leading dim ``config.batch_size`` (the per-host batch).
    """
    if not data_sources:
        raise ValueError("build_pipeline needs at least one source")
    check_resize_mode(config.image_resize)
    names = [s.name for s in data_sources]
    if len(set(names)) != len(names):
        raise ValueError(f"Source names must be distinct, got {names}")
    index, count = sources.resolve_process(process_index, process_count)
    max_action_dim = config.max_action_dim or max(s.action_dim for s in data_sources)
    max_state_dim = config.max_state_dim if config.max_state_dim is not None else max(s.state_dim for s in data_sources)

    artifacts = {s.name: make_artifact(s, config, max_action_dim, max_state_dim) for s in data_sources}
    if expected_artifacts is not None:
        for name, expected in expected_artifacts.items():
            if name not in artifacts:
                raise ValueError(f"Recorded normalization for dataset {name!r}, but the sources are {names}")
            normalization.check_compatible(expected, artifacts[name])
    sizes = [artifacts[s.name].stats["action"]["count"] for s in data_sources]
    probabilities = mixture.mixture_weights(weights, sizes, config.balance_by_size)
    threads = mixture.allocate_threads(config.num_parallel_calls, probabilities)

    frame_datasets = []
    for i, (source, num_threads) in enumerate(zip(data_sources, threads)):
        traj_ds = source.trajectories(
            index, count, seed=config.seed + i, shuffle=config.train, repeat=config.train
        )
        traj_ds = split_episodes(traj_ds, config.split, config.val_fraction)
        traj_ds = trajectory_transforms(
            traj_ds,
            config,
            artifacts[source.name] if config.normalization != "none" else None,
            max_action_dim=max_action_dim,
            max_state_dim=max_state_dim or None,
            has_state=bool(source.state_dim),
            num_parallel_calls=num_threads,
            seed_offset=i << 32,
        )
        frame_datasets.append(traj_ds.flat_map(tf.data.Dataset.from_tensor_slices))
    cameras = _cameras(frame_datasets[0])
    image_dtypes = {
        ds.element_spec["observation"][f"image_{c}"].dtype for ds in frame_datasets for c in _cameras(ds)
    }
    if len(image_dtypes) > 1:
        # Encoded (RLDS) and decoded (video) images cannot share one stream: decode the encoded ones first. The
        # shuffle buffer then holds decoded frames, so it costs more memory than in an all-RLDS mixture.
        sizes = _image_sizes(config, cameras)
        frame_datasets = [
            ds.map(lambda f: frame_transforms.decode_and_resize(f, sizes, config.image_resize),
                   num_parallel_calls=tf.data.AUTOTUNE)
            for ds in frame_datasets
        ]
    ds = mixture.sample_mixture(frame_datasets, probabilities, seed=config.seed)
    if config.train:
        ds = ds.shuffle(config.shuffle_buffer, seed=config.seed, reshuffle_each_iteration=True)
    ds = ds.enumerate().map(
        frame_transforms_fn(config, cameras), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    ds = ds.batch(config.batch_size, drop_remainder=config.drop_remainder, num_parallel_calls=tf.data.AUTOTUNE)
    if tokenize is not None:
        ds = ds.map(_tokenizing(tokenize), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options).prefetch(config.prefetch)
    return DataPipeline(ds, artifacts, probabilities, list(data_sources))
