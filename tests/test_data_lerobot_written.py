"""The LeRobot v3 reader on datasets LeRobot itself wrote (0.4.4: one data and one video file; 0.6.1: an episode
per file across two chunks, a task switching mid-episode, a reused task string), against the values that were
written: state, action and the lossless PNG camera exactly, the AV1 camera within its codec's error (PSNR >= 30 dB,
the fixture measured >= 31), and the instruction of every frame."""

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlax.data.lerobot_v3 import LeRobotSource

FIXTURES = Path(__file__).parent / "fixtures"


def _decoded(frames: np.ndarray) -> np.ndarray:
    if frames.dtype == object:  # encoded PNG bytes, decoded in the pipeline's frame transforms
        return np.stack([np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in frames])
    return frames


@pytest.mark.parametrize("name", ["lerobot_ds", "lerobot_ds_061_multifile"])
def test_reader_returns_what_lerobot_wrote(name):
    with np.load(FIXTURES / f"{name}_truth.npz") as data:
        truth = {k: data[k] for k in data.files}
    source = LeRobotSource(str(FIXTURES / name))
    assert source.image_keys == {"top": "observation.images.top", "wrist": "observation.images.wrist"}
    trajs = list(source.trajectories(0, 1, shuffle=False).as_numpy_iterator())
    assert [len(t["action"]) for t in trajs] == np.bincount(truth["episode_index"]).tolist()

    def cat(fn):
        return np.concatenate([fn(t) for t in trajs])

    np.testing.assert_array_equal(cat(lambda t: t["observation"]["state"]), truth["state"])
    np.testing.assert_array_equal(cat(lambda t: t["action"]), truth["action"])
    tasks = cat(lambda t: np.broadcast_to(t["task"]["language_instruction"], (len(t["action"]),))).astype(str)
    np.testing.assert_array_equal(tasks, truth["task_per_frame"])
    wrist = _decoded(cat(lambda t: t["observation"]["image_wrist"]))
    assert [hashlib.sha256(f.tobytes()).hexdigest() for f in wrist] == truth["wrist_sha256"].tolist()
    top = _decoded(cat(lambda t: t["observation"]["image_top"])).astype(np.float64)
    mse = np.mean((top - truth["top"]) ** 2, axis=(1, 2, 3))
    assert np.all(10 * np.log10(255.0 ** 2 / mse) >= 30.0)
