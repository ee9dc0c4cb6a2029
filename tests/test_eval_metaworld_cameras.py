"""A policy trained on two Meta-World cameras is evaluated on both: the evaluator renders every camera the data
was recorded with and hands each to the policy under its training name."""

import jax
import numpy as np
import pytest
from PIL import Image

from experiments.train import train
from train_helpers import tiny_config
from vlax.envs.metaworld import generate_metaworld_dataset
from vlax.eval import CheckpointError, evaluate, read_checkpoint_info


@pytest.fixture(scope="module")
def two_camera_policy(tmp_path_factory):
    data = tmp_path_factory.mktemp("metaworld_two_cameras")
    generate_metaworld_dataset(str(data), tasks="reach", episodes_per_task=1, image_size=64,
                               cameras=("corner", "corner2"), num_workers=1)  # a config orders them by name
    c = tiny_config(tmp_path_factory.mktemp("two_cameras"), data, steps=1, save_every=1)
    source = c.data.sources[0]
    source.tasks, source.episodes_per_task = "reach", 1
    source.cameras = {"corner2": "front", "corner": "side"}  # policy names differ from Meta-World's
    train(c)
    return c


def test_the_checkpoint_records_both_cameras_and_their_policy_names(two_camera_policy):
    info = read_checkpoint_info(two_camera_policy.workdir)
    assert dict(zip(info.settings.cameras, info.camera_names)) == {"corner2": "front", "corner": "side"}


def test_the_actor_feeds_each_render_under_its_policy_name(two_camera_policy):
    from vlax.envs.metaworld.episode import _CheckpointActor

    info = read_checkpoint_info(two_camera_policy.workdir)
    actor = _CheckpointActor(two_camera_policy.workdir, None, info.settings, camera_names=info.camera_names)
    rs = np.random.RandomState(0)
    frames = {c: rs.randint(0, 256, (64, 64, 3)).astype(np.uint8) for c in info.settings.cameras}
    sim_obs = rs.uniform(-0.5, 0.5, 39)
    got = actor.inputs(frames, sim_obs, "reach the goal")
    raw = {"images": {"front": actor._image(frames["corner2"]), "side": actor._image(frames["corner"])},
           "state": sim_obs[None, :4], "prompt": ["reach the goal"]}
    want = actor.runner.pipeline.model_inputs(raw)
    assert sorted(got["images"]) == ["front", "side"]
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, w)
    assert not np.array_equal(got["images"]["front"], got["images"]["side"])
    with pytest.raises(ValueError, match=r"the policy sees cameras"):
        _CheckpointActor(two_camera_policy.workdir, None, info.settings, camera_names=("side", "top"))


def test_closed_loop_renders_both_cameras(two_camera_policy, tmp_path):
    results = evaluate(two_camera_policy.workdir, "reach", episodes_per_task=1, num_workers=1, max_steps=6,
                       progress=False, video_dir=str(tmp_path), video_episodes=1)
    assert sorted(results["config"]["camera"].split(",")) == ["corner", "corner2"]
    assert results["episodes"][0]["steps"] == 6
    video = Image.open(results["episodes"][0]["video"])
    assert video.size == (128, 64)  # the two 64 px cameras side by side
    with pytest.raises(CheckpointError, match="leave camera unset"):
        evaluate(two_camera_policy.workdir, "reach", episodes_per_task=1, camera="corner2", progress=False)
