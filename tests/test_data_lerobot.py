"""LeRobot v3 reader: a tiny v3 dataset written here (parquet via pyarrow, AV1 mp4 via PyAV) reads back with
matching values, through direct decoding and through pre-decoded arrays, and feeds the standard pipeline."""

import json
import os
import shutil

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vlax.data.lerobot_v3 import LeRobotSource
from vlax.data.pipeline import DataConfig, build_pipeline

FPS = 10
LENGTHS = [5, 7, 4]
FILE_OF_EPISODE = [0, 0, 1]  # episodes 0 and 1 share data file and video file 0
TASKS = ["stack the red block", "open the drawer"]
SIZE = 64


def _frame(global_index):
    """A frame whose colour and stripe position identify its global index."""
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[..., 0] = 12 * global_index
    image[..., 1] = 255 - 12 * global_index
    image[:, (4 * global_index) % SIZE : (4 * global_index) % SIZE + 8, 2] = 255
    return image


def _write_video(path, frames):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("libsvtav1", rate=FPS)  # LeRobot's default codec
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        stream.options = {"crf": "20"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_dataset(root, complete_stats=False):
    rng = np.random.default_rng(0)
    key = "observation.images.top"
    episodes, rows_by_file, frames_by_file, expected = [], {0: [], 1: []}, {0: [], 1: []}, []
    index = 0
    for ep, (length, file_index) in enumerate(zip(LENGTHS, FILE_OF_EPISODE)):
        state = rng.normal(size=(length, 3)).astype(np.float32)
        action = rng.uniform(-1, 1, size=(length, 2)).astype(np.float32)
        task_index = ep % 2
        video_start = len(frames_by_file[file_index])
        frames = [_frame(index + t) for t in range(length)]
        frames_by_file[file_index].extend(frames)
        for t in range(length):
            rows_by_file[file_index].append({
                "observation.state": state[t].tolist(), "action": action[t].tolist(), "timestamp": t / FPS,
                "frame_index": t, "episode_index": ep, "index": index + t, "task_index": task_index,
            })
        episodes.append({
            "episode_index": ep, "tasks": [TASKS[task_index]], "length": length,
            "data/chunk_index": 0, "data/file_index": file_index,
            "dataset_from_index": index, "dataset_to_index": index + length,
            f"videos/{key}/chunk_index": 0, f"videos/{key}/file_index": file_index,
            f"videos/{key}/from_timestamp": video_start / FPS, f"videos/{key}/to_timestamp": (video_start + length) / FPS,
            "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
            "stats/action/mean": action.mean(0).tolist(),
        })
        expected.append({"state": state, "action": action, "frames": np.stack(frames), "task": TASKS[task_index]})
        index += length
    for file_index, rows in rows_by_file.items():
        path = os.path.join(root, "data", "chunk-000", f"file-{file_index:03d}.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
        _write_video(os.path.join(root, "videos", key, "chunk-000", f"file-{file_index:03d}.mp4"), frames_by_file[file_index])
    os.makedirs(os.path.join(root, "meta", "episodes", "chunk-000"))
    pq.write_table(pa.Table.from_pylist(episodes), os.path.join(root, "meta", "episodes", "chunk-000", "file-000.parquet"))
    pq.write_table(pa.table({"task_index": [0, 1], "task": TASKS}), os.path.join(root, "meta", "tasks.parquet"))
    features = {
        key: {"dtype": "video", "shape": [SIZE, SIZE, 3], "names": ["height", "width", "channels"],
              "info": {"video.codec": "av1", "video.fps": FPS}},
        "observation.state": {"dtype": "float32", "shape": [3], "names": None},
        "action": {"dtype": "float32", "shape": [2], "names": None},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }
    info = {
        "codebase_version": "v3.0", "robot_type": "test", "fps": FPS, "total_episodes": 3, "total_frames": index,
        "total_tasks": 2, "chunks_size": 1000, "splits": {"train": "0:3"}, "features": features,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
    }
    json.dump(info, open(os.path.join(root, "meta", "info.json"), "w"))
    all_actions = np.concatenate([e["action"] for e in expected])
    stats = {"action": {"mean": all_actions.mean(0).tolist(), "std": all_actions.std(0).tolist(),
                        "min": all_actions.min(0).tolist(), "max": all_actions.max(0).tolist(), "count": [index]}}
    if complete_stats:
        all_states = np.concatenate([e["state"] for e in expected])
        for name, values in (("action", all_actions), ("state", all_states)):
            lerobot_key = "action" if name == "action" else "observation.state"
            stats[lerobot_key] = {"mean": (values.mean(0) + 0.5).tolist(), "std": values.std(0).tolist(),
                                  "min": values.min(0).tolist(), "max": values.max(0).tolist(),
                                  "q01": (values.min(0) - 1).tolist(), "q99": (values.max(0) + 1).tolist(),
                                  "count": [index]}
    json.dump(stats, open(os.path.join(root, "meta", "stats.json"), "w"))
    return expected


@pytest.fixture(scope="module")
def lerobot_dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lerobot") / "tiny_v3")
    return root, _write_dataset(root)


def _check_episode(traj, expected):
    np.testing.assert_array_equal(traj["observation"]["state"], expected["state"])
    np.testing.assert_array_equal(traj["action"], expected["action"])
    assert [t.decode() if isinstance(t, bytes) else t for t in traj["task"]["language_instruction"]] == [
        expected["task"]] * len(expected["action"])
    frames = np.asarray(traj["observation"]["image_top"]).astype(int)
    assert frames.shape == expected["frames"].shape
    errors = np.abs(frames[:, None] - expected["frames"][None].astype(int)).mean(axis=(2, 3, 4))  # [decoded, source]
    assert errors.diagonal().max() < 6.0  # lossy AV1 at crf 20
    np.testing.assert_array_equal(errors.argmin(axis=1), np.arange(len(frames)))  # each frame is the right one


def test_reads_back_matching_values(lerobot_dataset, tmp_path):
    root, expected = lerobot_dataset
    source = LeRobotSource(root)
    assert source.action_dim == 2 and source.state_dim == 3 and source.image_keys == {"top": "observation.images.top"}
    for i in range(3):
        _check_episode(source.load_episode(i), expected[i])
    through_tf = list(source.trajectories(0, 1, shuffle=False).as_numpy_iterator())
    assert [len(t["action"]) for t in through_tf] == LENGTHS
    for traj, exp in zip(through_tf, expected):
        _check_episode(traj, exp)

    cache = str(tmp_path / "decoded")
    predecoded = LeRobotSource(root, predecode_dir=cache)
    for i in range(3):
        np.testing.assert_array_equal(predecoded.load_episode(i)["observation"]["image_top"],
                                      source.load_episode(i)["observation"]["image_top"])
    assert len(os.listdir(cache)) == 2  # one array per video file, decoded once


def test_sharding_by_episode(lerobot_dataset):
    root, _ = lerobot_dataset
    source = LeRobotSource(root)
    shards = [[len(t["action"]) for t in source.trajectories(i, 2, shuffle=False).as_numpy_iterator()] for i in range(2)]
    assert shards == [[5, 4], [7]]


def test_pipeline_batches_and_stats(lerobot_dataset, tmp_path):
    root, expected = lerobot_dataset
    config = DataConfig(batch_size=4, window=1, action_horizon=3, image_size=32, shuffle_buffer=16,
                        normalization="normal", stats_cache_dir=str(tmp_path))
    pipeline = build_pipeline([LeRobotSource(root)], config, process_index=0, process_count=1)
    batch = next(iter(pipeline))
    assert batch["observation"]["image_top"].shape == (4, 1, 32, 32, 3)
    assert batch["action"].shape == (4, 1, 3, 2) and batch["observation"]["state"].shape == (4, 1, 3)
    artifact = pipeline.artifacts["tiny_v3"]
    all_actions = np.concatenate([e["action"] for e in expected])
    np.testing.assert_allclose(artifact.stats["action"]["mean"], all_actions.mean(0), rtol=1e-5)  # computed
    assert artifact.stats["action"]["count"] == sum(LENGTHS)
    raw = artifact.unnormalize("action", batch["action"][:, 0, 0])
    assert all(np.abs(all_actions - a).sum(1).min() < 1e-5 for a in raw)  # every action is a real one


def test_complete_stats_json_is_used(tmp_path):
    root = str(tmp_path / "with_stats")
    expected = _write_dataset(root, complete_stats=True)
    config = DataConfig(batch_size=2, image_size=32, stats_cache_dir=str(tmp_path / "cache"))
    artifact = build_pipeline([LeRobotSource(root)], config, process_index=0, process_count=1).artifacts["with_stats"]
    all_actions = np.concatenate([e["action"] for e in expected])
    np.testing.assert_allclose(artifact.stats["action"]["mean"], all_actions.mean(0) + 0.5, rtol=1e-6)
    np.testing.assert_allclose(artifact.stats["action"]["q01"], all_actions.min(0) - 1, rtol=1e-6)


def test_bad_inputs(lerobot_dataset, tmp_path):
    root, _ = lerobot_dataset
    with pytest.raises(KeyError, match="'observation.images.wrist' not in LeRobot dataset.*observation.images.top"):
        LeRobotSource(root, image_keys={"wrist": "observation.images.wrist"})
    with pytest.raises(FileNotFoundError, match="meta/info.json is missing"):
        LeRobotSource(str(tmp_path))
    old = tmp_path / "old"
    (old / "meta").mkdir(parents=True)
    (old / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v2.1"}))
    with pytest.raises(ValueError, match="LeRobot v2.1 dataset; this reader reads v3"):
        LeRobotSource(str(old))


@pytest.fixture
def damaged(lerobot_dataset, tmp_path):
    """A private copy of the tiny dataset, to delete or corrupt files in."""
    root = str(tmp_path / "copy")
    shutil.copytree(lerobot_dataset[0], root)
    return root


VIDEO_1 = os.path.join("videos", "observation.images.top", "chunk-000", "file-001.mp4")
DATA_1 = os.path.join("data", "chunk-000", "file-001.parquet")


@pytest.mark.parametrize("predecode", [False, True])
def test_missing_video_names_file_and_episode(damaged, tmp_path, predecode):
    os.remove(os.path.join(damaged, VIDEO_1))
    source = LeRobotSource(damaged, predecode_dir=str(tmp_path / "decoded") if predecode else None)
    source.load_episode(0)  # episodes of the other video file still load
    with pytest.raises(FileNotFoundError, match=r"episode 2 \(camera 'observation.images.top'\): Video .*"
                                                r"file-001.mp4 is missing; re-download"):
        source.load_episode(2)


def test_damaged_video_names_file_and_episode(damaged):
    path = os.path.join(damaged, VIDEO_1)
    with open(path, "r+b") as f:  # same size, garbage bytes
        f.write(np.random.default_rng(0).bytes(os.path.getsize(path)))
    with pytest.raises(ValueError, match=r"episode 2 \(camera 'observation.images.top'\): Video .*file-001.mp4"):
        LeRobotSource(damaged).load_episode(2)


def test_missing_or_damaged_parquet_names_file_and_episode(damaged):
    os.remove(os.path.join(damaged, DATA_1))
    source = LeRobotSource(damaged)
    with pytest.raises(FileNotFoundError, match=r"episode 2 \(its frames\): .*file-001.parquet is missing"):
        source.load_episode(2)
    # Through tf.data (what the pipeline iterates) the message survives TF's wrapping of the generator error.
    with pytest.raises(Exception, match=r"episode 2 \(its frames\): .*file-001.parquet is missing"):
        list(source.trajectories(0, 1, shuffle=False).as_numpy_iterator())
    with open(os.path.join(damaged, DATA_1), "wb") as f:
        f.write(b"not parquet at all")
    with pytest.raises(ValueError, match=r"episode 2 \(its frames\): .*file-001.parquet is not a readable parquet"):
        LeRobotSource(damaged).load_episode(2)


def test_missing_or_incomplete_tasks_file(damaged):
    tasks = os.path.join(damaged, "meta", "tasks.parquet")
    pq.write_table(pa.table({"task_index": [0], "task": TASKS[:1]}), tasks)
    source = LeRobotSource(damaged)
    source.load_episode(0)
    with pytest.raises(KeyError, match=r"episode 1 uses task_index \[1\], which .*tasks.parquet does not list"):
        source.load_episode(1)  # was: an empty instruction, silently
    os.remove(tasks)
    with pytest.raises(FileNotFoundError, match=r"task_index -> instruction.*meta/tasks.parquet is missing"):
        LeRobotSource(damaged)


@pytest.mark.parametrize("content, message", [
    ("{not json", r"info.json is not valid JSON"),
    ("[1, 2]", r"info.json must hold a JSON object"),
    (json.dumps({"codebase_version": "v3.0", "features": {}}), r"info.json is malformed: 'fps' is missing"),
    (json.dumps({"codebase_version": "v3.0", "fps": 10, "features": {"action": {"shape": [2]}}}),
     r"info.json is malformed: features \['action'\] lack 'dtype' or 'shape'"),
])
def test_malformed_info_json_names_the_file(damaged, content, message):
    with open(os.path.join(damaged, "meta", "info.json"), "w") as f:
        f.write(content)
    with pytest.raises(ValueError, match=message):
        LeRobotSource(damaged)


def test_fingerprint_notices_same_size_overwrite(damaged):
    path = os.path.join(damaged, DATA_1)
    table = pq.read_table(path)
    plain = dict(compression="NONE", use_dictionary=False, write_statistics=False)  # size independent of values
    pq.write_table(table, path, **plain)
    before = LeRobotSource(damaged).fingerprint()
    stat = os.stat(path)
    action = np.asarray(table.column("action").to_pylist(), np.float32)
    column = pa.array((-action).tolist(), table.schema.field("action").type)
    pq.write_table(table.set_column(table.column_names.index("action"), "action", column), path, **plain)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.path.getsize(path) == stat.st_size  # negated floats: the same bytes count, the case sizes missed
    assert LeRobotSource(damaged).fingerprint() != before
