"""Trajectory transforms (chunking, padding, masks, goal relabelling, task augmentation, subsampling) on hand-made
trajectories, and frame transforms (decode, resize, seeded augmentation)."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vlax.data import frame_transforms, traj_transforms
from vlax.data.pipeline import DataConfig, build_pipeline
from vlax.data.sources import InMemorySource


def _traj(length=5, action_dim=2, state_dim=3):
    """Actions a[t] = [10 t, 10 t + 1, ...] so every gathered index can be read back from the value."""
    t = np.arange(length, dtype=np.float32)[:, None]
    return {
        "observation": {
            "image_primary": tf.constant([f"img{i}".encode() for i in range(length)]),
            "image_wrist": tf.constant([b""] * length),
            "state": tf.constant(100 * t + np.arange(state_dim, dtype=np.float32)),
        },
        "task": {"language_instruction": tf.constant([b"open the door"] * length)},
        "action": tf.constant(10 * t + np.arange(action_dim, dtype=np.float32)),
        "dataset_name": tf.constant([b"hand"] * length),
    }


def test_pad_masks_mark_missing_keys():
    traj = traj_transforms.add_pad_masks(_traj())
    masks = traj["observation"]["pad_mask_dict"]
    assert masks["image_primary"].numpy().all()
    assert not masks["image_wrist"].numpy().any()
    assert masks["state"].numpy().all()
    assert traj["task"]["pad_mask_dict"]["language_instruction"].numpy().all()


def test_pad_dims_zero_pads_and_masks():
    traj = traj_transforms.pad_action_and_state_dims(_traj(action_dim=2, state_dim=3), 4, 5)
    np.testing.assert_array_equal(traj["action"].numpy()[3], [30, 31, 0, 0])
    np.testing.assert_array_equal(traj["action_dim_mask"].numpy()[0], [True, True, False, False])
    np.testing.assert_array_equal(traj["observation"]["state"].numpy()[1], [100, 101, 102, 0, 0])
    np.testing.assert_array_equal(traj["observation"]["state_mask"].numpy()[0], [1, 1, 1, 0, 0])
    with pytest.raises(ValueError, match="action has 2 dims, more than the maximum 1"):
        traj_transforms.pad_action_and_state_dims(_traj(action_dim=2), 1, None)


def test_chunk_window_horizon_end_repeat_and_masks():
    length, window, horizon = 5, 2, 3
    traj = traj_transforms.pad_action_and_state_dims(_traj(length, action_dim=2), 3, None)
    out = traj_transforms.chunk(traj, window, horizon)
    action = out["action"].numpy()  # [T, W, H, A]
    mask = out["action_mask"].numpy()
    assert action.shape == (length, window, horizon, 3)
    # step 0: window step 0 lies before the start (padded, repeats step 0), window step 1 is t=0.
    np.testing.assert_array_equal(out["observation"]["timestep_pad_mask"].numpy()[0], [False, True])
    np.testing.assert_array_equal(out["observation"]["timestep_pad_mask"].numpy()[3], [True, True])
    assert out["observation"]["image_primary"].numpy()[0].tolist() == [b"img0", b"img0"]
    assert out["observation"]["image_primary"].numpy()[3].tolist() == [b"img2", b"img3"]
    np.testing.assert_array_equal(action[0, 1, :, 0], [0, 10, 20])
    assert not mask[0, 0].any()  # padded window step: every action masked
    # last step: actions 4, then the last action repeated past the end, masked False.
    np.testing.assert_array_equal(action[4, 1, :, 0], [40, 40, 40])
    np.testing.assert_array_equal(mask[4, 1, :, 0], [True, False, False])
    np.testing.assert_array_equal(mask[3, 1, :, 0], [True, True, False])
    # padded action dim is masked everywhere.
    assert not mask[..., 2].any()
    np.testing.assert_array_equal(mask[2, 1, :, :2], np.ones((3, 2), bool))
    np.testing.assert_array_equal(out["observation"]["state"].numpy()[4, :, 0], [300, 400])


def test_goal_relabel_picks_a_future_frame_and_drop_language():
    traj = traj_transforms.add_pad_masks(_traj(length=8))
    out = traj_transforms.relabel_goals_uniform(traj, tf.constant([1, 2], tf.int64))
    goal_index = out["task"]["state"].numpy()[:, 0] / 100
    assert np.all(goal_index >= np.arange(8)) and np.all(goal_index <= 7)
    assert goal_index[-1] == 7
    names = out["task"]["image_primary"].numpy()
    assert [n.decode() for n in names] == [f"img{int(g)}" for g in goal_index]
    dropped = traj_transforms.drop_language(traj, tf.constant([3, 4], tf.int64), probability=0.5)
    language = dropped["task"]["language_instruction"].numpy()
    mask = dropped["task"]["pad_mask_dict"]["language_instruction"].numpy()
    np.testing.assert_array_equal(mask, language != b"")
    all_dropped = traj_transforms.drop_language(traj, tf.constant([3, 4], tf.int64), probability=1.0)
    assert (all_dropped["task"]["language_instruction"].numpy() == b"").all()


def test_subsample_keeps_ordered_subset():
    traj = traj_transforms.chunk(_traj(length=9), 1, 1)
    out = traj_transforms.subsample(traj, tf.constant([5, 6], tf.int64), 4)
    first = out["action"].numpy()[:, 0, 0, 0] / 10
    assert len(first) == 4 and np.all(np.diff(first) > 0)
    states = out["observation"]["state"].numpy()[:, 0, 0] / 100
    np.testing.assert_array_equal(first, states)  # all keys gathered with the same indices


def _png(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decode_resize_and_seeded_augmentation():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (16, 16, 3), np.uint8)
    frame = {
        "observation": {"image_primary": tf.constant([_png(image), b""])},
        "task": {"image_primary": tf.constant(_png(image))},
    }
    decoded = frame_transforms.decode_and_resize(frame, {"primary": (16, 16)})
    np.testing.assert_array_equal(decoded["observation"]["image_primary"].numpy()[0], image)  # PNG is lossless
    assert not decoded["observation"]["image_primary"].numpy()[1].any()  # missing image -> zeros
    np.testing.assert_array_equal(decoded["task"]["image_primary"].numpy(), image)
    resized = frame_transforms.decode_and_resize(frame, {"primary": (8, 12)})
    assert resized["observation"]["image_primary"].shape == (2, 8, 12, 3)
    with pytest.raises(ValueError, match="No image size for camera 'primary'"):
        frame_transforms.decode_and_resize(frame, {"wrist": (8, 8)})

    window = tf.constant(np.stack([image, image]))
    config = frame_transforms.AugmentConfig()
    a = frame_transforms.augment_image(window, tf.constant([7, 1], tf.int64), config).numpy()
    b = frame_transforms.augment_image(window, tf.constant([7, 1], tf.int64), config).numpy()
    c = frame_transforms.augment_image(window, tf.constant([8, 1], tf.int64), config).numpy()
    np.testing.assert_array_equal(a, b)  # same seed, same result
    np.testing.assert_array_equal(a[0], a[1])  # one set of parameters for the whole window
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1.0
    assert np.abs(a.astype(int) - image.astype(int)).mean() > 1.0
    identity = frame_transforms.AugmentConfig(
        crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), brightness=0.0, contrast=(1.0, 1.0),
        saturation=(1.0, 1.0), hue=0.0,
    )
    same = frame_transforms.augment_image(window, tf.constant([7, 1], tf.int64), identity).numpy()
    assert np.abs(same.astype(int) - image.astype(int)).max() <= 1  # only HSV round-off


def _mem_trajs(count, length=6, action_dim=2, image=True):
    trajs = []
    for i in range(count):
        t = np.arange(length, dtype=np.float32)[:, None]
        traj = {"action": 1000 * i + 10 * t + np.arange(action_dim, dtype=np.float32), "language_instruction": f"task {i}"}
        if image:
            traj["images"] = {"primary": np.full((length, 8, 8, 3), i, np.uint8)}
        trajs.append(traj)
    return trajs


def test_pipeline_is_reproducible_under_a_seed(tmp_path):
    source = InMemorySource("mem", _mem_trajs(4))
    config = DataConfig(batch_size=5, window=1, action_horizon=2, image_size=8, shuffle_buffer=16, seed=3,
                        normalization="none", stats_cache_dir=str(tmp_path))
    runs = []
    for _ in range(2):
        it = iter(build_pipeline([source], config, process_index=0, process_count=1))
        runs.append([next(it) for _ in range(3)])
    for x, y in zip(runs[0], runs[1]):
        np.testing.assert_array_equal(x["action"], y["action"])
        np.testing.assert_array_equal(x["observation"]["image_primary"], y["observation"]["image_primary"])
    other = DataConfig(**{**config.__dict__, "seed": 4})
    z = next(iter(build_pipeline([source], other, process_index=0, process_count=1)))
    assert not np.array_equal(z["action"], runs[0][0]["action"])


def test_in_memory_sharding_is_disjoint_and_complete():
    source = InMemorySource("mem", _mem_trajs(7, image=False))
    for count in (1, 2, 3):
        seen = []
        for index in range(count):
            ds = source.trajectories(index, count, shuffle=False)
            seen.append({int(t["action"][0, 0]) for t in ds.as_numpy_iterator()})
        assert set().union(*seen) == {1000 * i for i in range(7)}
        assert sum(len(s) for s in seen) == 7
