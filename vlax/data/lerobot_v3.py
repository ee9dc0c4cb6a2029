"""Reading a local LeRobot v3 dataset into standard trajectories.

Layout read (LeRobot ``codebase_version`` v3.x)::

    meta/info.json                 fps, features (dtype "video" / "image" / numeric, shape), path templates
    meta/stats.json                per-feature statistics (used when it has everything the artifact needs)
    meta/tasks.parquet             task string (column or pandas index "task") -> task_index
    meta/episodes/chunk-*/file-*.parquet   one row per episode: length, data/{chunk,file}_index,
                                   dataset_{from,to}_index, videos/<key>/{chunk_index,file_index,from_timestamp,...}
    data/chunk-*/file-*.parquet    one row per frame: numeric features, episode_index, frame_index, task_index, ...
    videos/<key>/chunk-*/file-*.mp4  several episodes per file; an episode starts at its from_timestamp

Video frames are decoded with PyAV. Decoding is the known bottleneck of LeRobot training; ``predecode_dir`` decodes
every video file once into uint8 ``.npy`` arrays [N, H, W, 3] that later epochs (and runs) memory-map instead.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

from vlax.data import normalization, sources
from vlax.data.file_digest import file_digest
from vlax.data.sources import key_list

DEFAULT_DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DEFAULT_VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"


def _column_to_numpy(table, name: str) -> np.ndarray:
    column = table.column(name).combine_chunks()
    if hasattr(column, "flatten") and hasattr(column.type, "value_type"):
        values = column.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(len(column), -1)
    return column.to_numpy(zero_copy_only=False)


_REFETCH = "re-download the dataset (or re-run its LeRobot conversion) so that the file is complete"


def _read_parquet(path: str, what: str):
    """``pq.read_table(path)``, with a missing or unreadable file named together with ``what`` needed it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: {path} is missing; {_REFETCH}")
    try:
        return pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
        raise ValueError(f"{what}: {path} is not a readable parquet file ({e}); {_REFETCH}") from None


def _read_info(root: str) -> dict[str, Any]:
    path = os.path.join(root, "meta", "info.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No LeRobot dataset in {root!r}: meta/info.json is missing")
    try:
        with open(path) as f:
            info = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {_REFETCH}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold a JSON object (fps, features, ...), got {type(info).__name__}; "
                         f"{_REFETCH}")
    return info


def _check_info(info: dict[str, Any], path: str) -> None:
    """The fields this reader relies on, checked once so that a malformed file is named rather than a KeyError."""
    problems = [f"'{k}' is missing" for k in ("fps", "features") if k not in info]
    if "fps" in info and not (isinstance(info["fps"], (int, float)) and info["fps"] > 0):
        problems.append(f"'fps' must be a positive number, got {info['fps']!r}")
    features = info.get("features", {})
    if not isinstance(features, dict) or not all(isinstance(v, dict) for v in features.values()):
        problems.append("'features' must map each feature key to an object with 'dtype' and 'shape'")
    else:
        bad = sorted(k for k, v in features.items() if "dtype" not in v or "shape" not in v)
        if bad:
            problems.append(f"features {bad} lack 'dtype' or 'shape'")
    if problems:
        raise ValueError(f"{path} is malformed: {'; '.join(problems)}; {_REFETCH}")


def _read_tasks(root: str) -> dict[int, str]:
    path = os.path.join(root, "meta", "tasks.parquet")
    table = _read_parquet(path, f"LeRobot dataset {root} (task_index -> instruction of every episode)")
    names = table.column_names
    text_column = next((c for c in ("task", "__index_level_0__") if c in names), None)
    if text_column is None or "task_index" not in names:
        raise KeyError(f"{path} needs 'task_index' and a 'task' column or index; it has {names}")
    return dict(zip(table.column("task_index").to_pylist(), table.column(text_column).to_pylist()))


def decode_video_frames(path: str, first_frame: int, count: int, fps: float) -> np.ndarray:
    """Decodes frames ``first_frame .. first_frame + count - 1`` (by timestamp) of a video -> uint8 [count, H, W, 3]."""
    frames: list[np.ndarray | None] = [None] * count
    start_time = first_frame / fps
    with _open_video(path) as container:
        stream = container.streams.video[0]
        if first_frame > 0:
            container.seek(int(start_time / stream.time_base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            index = int(round(frame.time * fps)) - first_frame
            if index < 0:
                continue
            if index >= count:
                break
            frames[index] = frame.to_ndarray(format="rgb24")
    missing = [first_frame + i for i, f in enumerate(frames) if f is None]
    if missing:
        raise ValueError(f"Video {path} has no frames at indices {missing[:5]}{'...' if len(missing) > 5 else ''}")
    return np.stack(frames)


def _open_video(path: str):
    import av

    try:
        return av.open(path)
    except av.error.FileNotFoundError:
        raise FileNotFoundError(f"Video {path} is missing") from None
    except av.error.FFmpegError as e:
        raise ValueError(f"Video {path} cannot be opened ({e})") from None


def _decode_all(path: str) -> np.ndarray:
    with _open_video(path) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


class LeRobotSource:
    """A local LeRobot v3 dataset as a trajectory source (see :mod:`vlax.data.sources`).

    Args:
      root: the dataset directory (holding ``meta/info.json``).
      image_keys: vlax camera name -> LeRobot feature key (None = missing camera). Default: every video/image
        feature, named by its last dotted part (``observation.images.top`` -> ``top``).
      state_key / action_key: numeric feature keys (``state_key=None`` reads no state); each may be a list of
        keys, concatenated in the order given.
      predecode_dir: decode each video file once into ``.npy`` arrays here and read those afterwards.
      gripper_last: the last action dim is a gripper (left unnormalized by default).
    """

    def __init__(
        self,
        root: str,
        *,
        name: str | None = None,
        image_keys: Mapping[str, str | None] | None = None,
        state_key: str | Sequence[str] | None = "observation.state",
        action_key: str | Sequence[str] = "action",
        predecode_dir: str | None = None,
        gripper_last: bool = False,
    ):
        self.info = _read_info(root)
        version = str(self.info.get("codebase_version", ""))
        if not version.startswith("v3"):
            raise ValueError(
                f"{root} is a LeRobot {version or 'unknown-version'} dataset; this reader reads v3.x (convert older "
                "datasets with LeRobot's v2.1 -> v3.0 converter)"
            )
        _check_info(self.info, os.path.join(root, "meta", "info.json"))
        self.root = root
        self.name = name or os.path.basename(os.path.normpath(root))
        self.fps = float(self.info["fps"])
        self.gripper_last = gripper_last
        self.predecode_dir = predecode_dir
        features = self.info["features"]
        visual = [k for k, v in features.items() if v.get("dtype") in ("video", "image")]
        if image_keys is None:
            image_keys = {k.split(".")[-1]: k for k in visual}
        self.state_keys, self.action_keys = key_list(state_key), key_list(action_key)
        if not self.action_keys:
            raise ValueError(f"LeRobot dataset {root}: action_key names no key")
        for key in [k for k in image_keys.values() if k] + list(self.state_keys) + list(self.action_keys):
            if key not in features:
                raise KeyError(f"Feature {key!r} not in LeRobot dataset {root}; available features: {sorted(features)}")
        self.image_keys = dict(image_keys)
        self.state_key, self.action_key = state_key, action_key
        self.action_dim = sum(int(np.prod(features[k]["shape"])) for k in self.action_keys)
        self.state_dim = sum(int(np.prod(features[k]["shape"])) for k in self.state_keys)
        self.tasks = _read_tasks(root)
        episode_files = sorted(glob.glob(os.path.join(root, "meta", "episodes", "chunk-*", "file-*.parquet")))
        if not episode_files:
            raise FileNotFoundError(f"No episode metadata under {root}/meta/episodes/chunk-*/file-*.parquet")
        self.episodes: list[dict[str, Any]] = []
        for path in episode_files:
            table = _read_parquet(path, f"LeRobot dataset {root} (episode metadata)")
            columns = [c for c in table.column_names if not c.startswith("stats/")]
            self.episodes.extend(table.select(columns).to_pylist())
        for row in self.episodes:
            if "episode_index" not in row:
                raise KeyError(f"episode metadata under {root}/meta/episodes has no 'episode_index' column; "
                               f"{_REFETCH}")
        self.episodes.sort(key=lambda e: e["episode_index"])
        self.files: list[str] = []
        self._tables: dict[str, Any] = {}

    # --- files -------------------------------------------------------------------------------------------------
    def _where(self, episode: dict) -> str:
        return f"LeRobot dataset {self.root}, episode {episode.get('episode_index')}"

    def _field(self, episode: dict, name: str) -> Any:
        if episode.get(name) is None:
            raise KeyError(f"{self._where(episode)}: the episode metadata (meta/episodes) has no {name!r}; "
                           f"{_REFETCH}")
        return episode[name]

    def _data_path(self, episode: dict) -> str:
        template = self.info.get("data_path", DEFAULT_DATA_PATH)
        return os.path.join(
            self.root,
            template.format(chunk_index=self._field(episode, "data/chunk_index"),
                            file_index=self._field(episode, "data/file_index")),
        )

    def _video_path(self, episode: dict, key: str) -> str:
        template = self.info.get("video_path", DEFAULT_VIDEO_PATH)
        return os.path.join(
            self.root,
            template.format(
                video_key=key,
                chunk_index=self._field(episode, f"videos/{key}/chunk_index"),
                file_index=self._field(episode, f"videos/{key}/file_index"),
            ),
        )

    def _table(self, path: str, episode: dict):
        if path not in self._tables:
            if len(self._tables) > 4:
                self._tables.pop(next(iter(self._tables)))
            self._tables[path] = _read_parquet(path, f"{self._where(episode)} (its frames)")
        return self._tables[path]

    def fingerprint(self) -> str:
        """Hash of ``info.json``, the data files (names and content digests) and the key mapping.

        Content rather than sizes, so that a same-size overwrite does not reuse cached statistics (digests are
        remembered per file state, see :mod:`vlax.data.file_digest`). Videos are left out: statistics never
        read them.
        """
        files = sorted(glob.glob(os.path.join(self.root, "data", "*", "*.parquet")))
        digests = [(os.path.relpath(p, self.root), file_digest(p)) for p in files]
        return sources.hash_json([self.info, digests, self.image_keys, self.state_key, self.action_key])

    # --- reading -----------------------------------------------------------------------------------------------
    def _episode_rows(self, episode: dict) -> dict[str, np.ndarray]:
        path = self._data_path(episode)
        table = self._table(path, episode)
        if "episode_index" not in table.column_names:
            raise KeyError(f"{self._where(episode)}: {path} has no 'episode_index' column; {_REFETCH}")
        episode_column = _column_to_numpy(table, "episode_index")
        rows = np.flatnonzero(episode_column == episode["episode_index"])
        if len(rows) == 0:  # an empty trajectory would be silently dropped by the pipeline
            raise ValueError(f"{self._where(episode)}: {path} holds no frames of this episode; {_REFETCH}")
        if "frame_index" in table.column_names:
            rows = rows[np.argsort(_column_to_numpy(table, "frame_index")[rows], kind="stable")]
        subset = table.take(rows)
        out = {"action": self._concat(subset, self.action_keys)}
        if self.state_keys:
            out["state"] = self._concat(subset, self.state_keys)
        if "task_index" in subset.column_names:
            out["task_index"] = _column_to_numpy(subset, "task_index").astype(np.int64)
        for camera, key in self.image_keys.items():
            if key and self.info["features"][key]["dtype"] == "image":
                out[f"image_{camera}"] = np.array([c["bytes"] for c in subset.column(key).to_pylist()], object)
        return out

    @staticmethod
    def _concat(table, keys: tuple[str, ...]) -> np.ndarray:
        parts = [_column_to_numpy(table, k).astype(np.float32).reshape(table.num_rows, -1) for k in keys]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)

    def _video_frames(self, episode: dict, key: str, length: int) -> np.ndarray:
        path = self._video_path(episode, key)
        first = int(round(float(self._field(episode, f"videos/{key}/from_timestamp")) * self.fps))
        import av

        try:
            return self._read_video(path, first, length)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self._where(episode)} (camera {key!r}): {e}; {_REFETCH}") from None
        except (ValueError, av.error.FFmpegError) as e:  # a damaged stream fails while decoding, not opening
            raise ValueError(f"{self._where(episode)} (camera {key!r}): {e}; {_REFETCH}") from None

    def _read_video(self, path: str, first: int, length: int) -> np.ndarray:
        if self.predecode_dir is None:
            return decode_video_frames(path, first, length, self.fps)
        if not os.path.exists(path):
            raise FileNotFoundError(f"Video {path} is missing")
        stat = os.stat(path)
        tag = hashlib.sha256(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        cached = os.path.join(self.predecode_dir, f"{tag}.npy")
        if not os.path.exists(cached):
            os.makedirs(self.predecode_dir, exist_ok=True)
            tmp = f"{cached}.tmp{os.getpid()}.npy"
            np.save(tmp, _decode_all(path), allow_pickle=False)
            os.replace(tmp, cached)
        frames = np.load(cached, mmap_mode="r", allow_pickle=False)
        if first + length > len(frames):
            raise ValueError(f"Video {path} has {len(frames)} frames; episode needs frames {first}..{first + length - 1}")
        return np.asarray(frames[first : first + length])

    def load_episode(self, position: int) -> dict[str, Any]:
        """The standard trajectory (numpy) of the ``position``-th episode (sorted by episode index)."""
        episode = self.episodes[position]
        rows = self._episode_rows(episode)
        length = len(rows["action"])
        observation = {}
        for camera, key in self.image_keys.items():
            if not key:
                observation[f"image_{camera}"] = np.array([b""] * length, object)
            elif self.info["features"][key]["dtype"] == "image":
                observation[f"image_{camera}"] = rows[f"image_{camera}"]
            else:
                observation[f"image_{camera}"] = self._video_frames(episode, key, length)
        if self.state_keys:
            observation["state"] = rows["state"]
        if "task_index" in rows:
            unknown = sorted({int(i) for i in rows["task_index"]} - set(self.tasks))
            if unknown:  # an empty instruction would train silently on the wrong prompt
                raise KeyError(f"{self._where(episode)} uses task_index {unknown}, which "
                               f"{os.path.join(self.root, 'meta', 'tasks.parquet')} does not list "
                               f"(it lists {sorted(self.tasks)}); {_REFETCH}")
            language = [self.tasks[int(i)] for i in rows["task_index"]]
        else:
            language = [(episode.get("tasks") or [""])[0]] * length
        return {
            "observation": observation,
            "task": {"language_instruction": np.array(language, object)},
            "action": rows["action"],
            "dataset_name": np.array([self.name] * length, object),
        }

    def _signature(self) -> dict:
        observation = {}
        for camera, key in self.image_keys.items():
            if key and self.info["features"][key]["dtype"] == "video":
                observation[f"image_{camera}"] = tf.TensorSpec([None, None, None, 3], tf.uint8)
            else:
                observation[f"image_{camera}"] = tf.TensorSpec([None], tf.string)
        if self.state_keys:
            observation["state"] = tf.TensorSpec([None, self.state_dim], tf.float32)
        return {
            "observation": observation,
            "task": {"language_instruction": tf.TensorSpec([None], tf.string)},
            "action": tf.TensorSpec([None, self.action_dim], tf.float32),
            "dataset_name": tf.TensorSpec([None], tf.string),
        }

    def trajectories(
        self,
        process_index: int | None = None,
        process_count: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = False,
    ) -> tf.data.Dataset:
        """Standard trajectories of this host's episodes (host i reads episodes i, i + count, ... in index order)."""
        index, count = sources.resolve_process(process_index, process_count)
        mine = list(range(index, len(self.episodes), count))
        self.files = sorted({self._data_path(self.episodes[p]) for p in mine})

        signature = self._signature()
        specs = tf.nest.flatten(signature)

        def order(epoch):
            rng = np.random.default_rng([seed, int(epoch)])
            return np.asarray(rng.permutation(mine) if shuffle else mine, np.int64)

        def load(position):
            return [np.asarray(x) for x in tf.nest.flatten(self.load_episode(int(position)))]

        def episode(position):
            flat = tf.numpy_function(load, [position], [spec.dtype for spec in specs], stateful=False)
            for tensor, spec in zip(flat, specs):
                tensor.set_shape(spec.shape)
            return tf.nest.pack_sequence_as(signature, flat)

        # Not from_generator: the trainer checkpoints its data iterator with every model checkpoint, and a
        # generator-backed dataset cannot be checkpointed. Epoch e visits the episodes in a permutation seeded by
        # (seed, e), as before.
        epochs = tf.data.Dataset.range(1 << 62 if repeat else 1)
        positions = epochs.flat_map(lambda e: tf.data.Dataset.from_tensor_slices(
            tf.ensure_shape(tf.numpy_function(order, [e], tf.int64, stateful=False), [len(mine)])))
        return positions.map(episode)

    def instructions(self) -> list[str]:
        """Every task string of the dataset (for building a word vocabulary)."""
        return sorted(set(self.tasks.values()))

    def numeric_trajectories(self) -> Iterator[dict[str, np.ndarray]]:
        for episode in self.episodes:
            rows = self._episode_rows(episode)
            yield {k: rows[k] for k in ("action", "state") if k in rows}

    def precomputed_stats(self) -> dict[str, dict[str, Any]] | None:
        """``meta/stats.json`` in the artifact's form, if it has every statistic the artifact needs."""
        path = os.path.join(self.root, "meta", "stats.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            raw = json.load(f)
        stats = {}
        for name, keys in (("action", self.action_keys), ("state", self.state_keys)):
            if not keys:
                continue
            if len(keys) > 1:  # per-key statistics cannot give the quantiles of a concatenation's dims exactly
                return None
            entry = raw.get(keys[0], {})
            if not all(s in entry for s in normalization.STAT_NAMES):
                return None
            stats[name] = {s: np.asarray(entry[s], np.float64).reshape(-1).tolist() for s in normalization.STAT_NAMES}
            count = entry.get("count", [self.info.get("total_frames", 0)])
            stats[name]["count"] = int(np.asarray(count).reshape(-1)[0])
            stats[name]["num_trajectories"] = len(self.episodes)
        return stats
