"""Meta-World -> RLDS generator (2 MT10 tasks x 2 episodes, built here) and reading it back: counts, shapes,
upright non-black images, instructions, idempotence, per-host sharding, corrupted files, missing keys."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from vlax.envs.metaworld import instructions, task_sets
from vlax.envs.metaworld.dataset import generate_metaworld_dataset, metaworld_source
from vlax.data.pipeline import DataConfig, build_pipeline
from vlax.data.rlds_reader import CorruptedDataError, RLDSSource

TASKS = ("reach", "door-open")
ARGS = dict(tasks=",".join(TASKS), episodes_per_task=2, image_size=64, num_shards=2, num_workers=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("metaworld"))
    return out, generate_metaworld_dataset(out, **ARGS)


def _episodes(path):
    builder = tfds.builder_from_directory(path)
    ds = builder.as_dataset(split="train").map(lambda e: {**e, "steps": e["steps"].batch(10_000).get_single_element()})
    return list(ds.as_numpy_iterator()), builder


def test_task_tables():
    assert set(task_sets.MT10_TASKS) <= set(task_sets.MT50_TASKS)
    assert len(task_sets.MT50_TASKS) == 50
    assert [len(b) for b in task_sets.MT50_BUCKETS.values()] == [28, 11, 6, 5]
    assert set(instructions.INSTRUCTIONS) == set(task_sets.MT50_TASKS)
    assert all(len(set(v)) >= 3 for v in instructions.INSTRUCTIONS.values())
    assert task_sets.resolve_tasks("mt10") == task_sets.MT10_TASKS
    assert task_sets.resolve_tasks("reach-v3, push") == ("reach", "push")
    with pytest.raises(ValueError, match=r"Unknown Meta-World task\(s\) \['reech'\].*names from: assembly"):
        task_sets.resolve_tasks("reech")
    from vlax.envs.metaworld.sim import RolloutSettings, record_episode

    with pytest.raises(ValueError, match="layout seed 1000000 is in the evaluation range"):
        record_episode("reach", task_sets.EVAL_LAYOUT_SEED_START, RolloutSettings())


def test_generated_dataset_reads_back(dataset):
    _, path = dataset
    episodes, builder = _episodes(path)
    assert builder.info.splits["train"].num_examples == 4 and builder.info.splits["train"].num_shards == 2
    by_task = {}
    for ep in episodes:
        meta = ep["episode_metadata"]
        by_task.setdefault(meta["task"].decode(), []).append(int(meta["layout_seed"]))
        steps = ep["steps"]
        length = len(steps["action"])
        assert meta["num_steps"] == length and meta["expert_success"]
        assert steps["observation"]["image_corner2"].shape == (length, 64, 64, 3)
        assert steps["observation"]["image_corner2"].dtype == np.uint8
        assert steps["observation"]["state"].shape == (length, 4)
        assert steps["observation"]["privileged_state"].shape == (length, 39)
        np.testing.assert_array_equal(steps["observation"]["state"], steps["observation"]["privileged_state"][:, :4])
        assert steps["action"].shape == (length, 4) and np.abs(steps["action"]).max() <= 1.0
        assert np.abs(steps["action"]).max() > 0.1
        # stops a few steps after the first success (5 by default), well before the 500-step limit
        first = int(meta["first_success_step"])
        assert steps["success"][first] and not steps["success"][:first].any() and length == first + 6
        assert steps["is_first"][0] and steps["is_last"][-1] and steps["is_terminal"][-1]
        assert steps["is_last"].sum() == 1
        instruction = steps["language_instruction"][0].decode()
        assert instruction in instructions.INSTRUCTIONS[meta["task"].decode()]
        assert (steps["language_instruction"] == steps["language_instruction"][0]).all()
        assert steps["observation"]["image_corner2"].max(axis=(1, 2, 3)).min() > 50  # no black frames
    assert {t: sorted(s) for t, s in by_task.items()} == {t: [0, 1] for t in TASKS}
    report = json.load(open(os.path.join(path, "generation_report.json")))
    assert {t: (r["kept"], r["failed"]) for t, r in report.items()} == {t: (2, 0) for t in TASKS}


_REFERENCE_RENDER = """
import sys, numpy as np, metaworld, mujoco
seed, out = int(sys.argv[1]), sys.argv[2]
bench = metaworld.MT1("door-open-v3", seed=0)
env = bench.train_classes["door-open-v3"](render_mode="rgb_array", camera_name="corner2", width=64, height=64)
env.model.vis.quality.offsamples = 0
env.model.cam_pos[mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_CAMERA, "corner2")] = [0.75, 0.075, 0.7]
env.set_task(bench.train_tasks[0])
env._freeze_rand_vec = False
env.seeded_rand_vec = True
env.seed(seed)
obs, _ = env.reset()
env.render()
env.mujoco_renderer.viewer.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
env.mujoco_renderer.viewer.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
np.savez(out, raw=env.render(), obs=obs)
env.close()
"""


def test_images_are_upright_renders_of_the_recorded_layout(dataset, tmp_path):
    """Re-renders the first frame of an episode from its recorded layout seed with Meta-World directly (in a fresh
    process): the stored image is the raw render rotated by 180 degrees (upright), not the raw or a mirrored one."""
    _, path = dataset
    episode = next(e for e in _episodes(path)[0] if e["episode_metadata"]["task"] == b"door-open")
    out = str(tmp_path / "reference.npz")
    env = dict(os.environ, MUJOCO_GL="egl", PYOPENGL_PLATFORM="egl")
    seed = str(int(episode["episode_metadata"]["layout_seed"]))
    subprocess.run([sys.executable, "-c", _REFERENCE_RENDER, seed, out], env=env, check=True, timeout=120)
    reference = np.load(out)
    raw = reference["raw"].astype(int)
    np.testing.assert_allclose(episode["steps"]["observation"]["privileged_state"][0], reference["obs"], atol=1e-5)
    stored = episode["steps"]["observation"]["image_corner2"][0].astype(int)
    upright_error = np.abs(stored - raw[::-1, ::-1]).mean()
    assert upright_error < 4.0  # JPEG at quality 95
    assert np.abs(stored - raw).mean() > 4 * upright_error
    assert np.abs(stored - raw[::-1]).mean() > 4 * upright_error  # a one-axis flip is a mirror image


def test_rerun_is_idempotent_and_other_args_are_refused(dataset):
    out, path = dataset
    before = {f: os.path.getmtime(os.path.join(path, f)) for f in os.listdir(path)}
    start = time.perf_counter()
    assert generate_metaworld_dataset(out, **ARGS) == path
    assert time.perf_counter() - start < 5
    assert {f: os.path.getmtime(os.path.join(path, f)) for f in os.listdir(path)} == before
    with pytest.raises(ValueError, match="episodes_per_task: 2 there vs 3 now.*overwrite"):
        generate_metaworld_dataset(out, **{**ARGS, "episodes_per_task": 3})


def _episode_ids(source, index, count):
    ds = source.trajectories(index, count, shuffle=False)
    return [hashlib.sha1(t["action"].tobytes()).hexdigest() for t in ds.as_numpy_iterator()]


def test_per_host_shards_are_disjoint_and_complete(dataset):
    _, path = dataset
    source = metaworld_source(path)
    everything = _episode_ids(source, 0, 1)
    assert len(set(everything)) == 4
    for count in (2, 3, 5):  # 2 files: file-level shards for 2 hosts, episode-level for more hosts than files
        shards = [_episode_ids(source, i, count) for i in range(count)]
        assert sorted(sum(shards, [])) == sorted(everything)
        if count == 2:
            assert [len(s) for s in shards] == [2, 2]


def test_pipeline_batches_from_metaworld(dataset, tmp_path):
    _, path = dataset
    config = DataConfig(batch_size=6, window=2, action_horizon=3, image_size=32, shuffle_buffer=50,
                        goal_relabeling=True, drop_language_prob=0.5, stats_cache_dir=str(tmp_path))
    pipeline = build_pipeline([metaworld_source(path)], config, process_index=0, process_count=1)
    batch = next(iter(pipeline))
    obs = batch["observation"]
    assert obs["image_corner2"].shape == (6, 2, 32, 32, 3) and obs["image_corner2"].dtype == np.uint8
    assert obs["state"].shape == (6, 2, 4) and batch["action"].shape == (6, 2, 3, 4)
    assert batch["action_mask"].shape == (6, 2, 3, 4)
    assert batch["task"]["image_corner2"].shape == (6, 32, 32, 3)
    assert "privileged" not in batch  # the simulator state is never delivered unless asked for
    artifact = pipeline.artifacts["metaworld_experts"]
    assert artifact.masks["action"] == (True, True, True, False)
    assert np.abs(batch["action"][..., :3]).max() <= 1.0 + 1e-5  # bounds normalization
    with_privileged = build_pipeline([metaworld_source(path, include_privileged_state=True)], config,
                                     process_index=0, process_count=1)
    assert next(iter(with_privileged))["privileged"]["sim_state"].shape == (6, 2, 39)


def test_missing_key_names_key_and_available_keys(dataset):
    _, path = dataset
    with pytest.raises(KeyError, match="'image_wrist' not in RLDS dataset.*image_corner2.*privileged_state"):
        RLDSSource(path, image_keys={"primary": "image_wrist"})
    with pytest.raises(KeyError, match="'joint_pos' not in RLDS dataset"):
        RLDSSource(path, state_key="joint_pos")
    with pytest.raises(KeyError, match="Language key 'prompt'.*language_instruction"):
        RLDSSource(path, language_key="prompt")


def test_corrupted_tfrecord_names_file_or_is_skipped_and_counted(dataset, tmp_path):
    _, path = dataset
    copy = str(tmp_path / "copy")
    shutil.copytree(path, copy)
    shard = sorted(f for f in os.listdir(copy) if ".tfrecord-" in f)[0]
    data = bytearray(open(os.path.join(copy, shard), "rb").read())
    data[len(data) // 3] ^= 0xFF
    open(os.path.join(copy, shard), "wb").write(bytes(data))

    config = DataConfig(batch_size=4, image_size=32, shuffle_buffer=10, stats_cache_dir=str(tmp_path / "stats"))
    with pytest.raises(CorruptedDataError, match=f"Corrupted TFRecord file.*{shard}.*ignore_errors=True"):
        next(iter(build_pipeline([metaworld_source(copy)], config, process_index=0, process_count=1)))

    source = metaworld_source(copy, ignore_errors=True)
    ids = _episode_ids(source, 0, 1)
    assert source.num_corrupted_files == 1
    good, error = source.read_report[os.path.join(copy, shard)]
    assert error is not None and len(ids) == 2 + good  # the intact shard plus the records before the damage
    batch = next(iter(build_pipeline([source], config, process_index=0, process_count=1)))
    assert batch["action"].shape == (4, 1, 1, 4)


_GL_TRAP = """
import gc, metaworld
from vlax.envs.metaworld import sim as r
bench = metaworld.MT1("reach-v3", seed=0)
other = bench.train_classes["reach-v3"](render_mode="rgb_array", camera_name="corner2", width=64, height=64)
other.set_task(bench.train_tasks[0])
other.reset()
other.render()
settings = r.RolloutSettings(image_size=64)
r._make_env("reach", settings)
r._current["env"].reset()
r._render(0)  # the recorder's environment now has its own GL context ...
other.close()
del other
gc.collect()  # ... and collecting the older environment afterwards blanks every later frame
try:
    r.record_episode("reach", 0, settings)
    print("recorded")
except r.BlackFrameError as e:
    print("BlackFrameError:", e)
"""


def test_black_frames_from_the_gl_trap_fail_loudly():
    env = dict(os.environ, MUJOCO_GL="egl", PYOPENGL_PLATFORM="egl")
    proc = subprocess.run([sys.executable, "-c", _GL_TRAP], env=env, capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert "BlackFrameError: All-black frame from camera 'corner2' (task reach, layout seed 0, step 0)" in proc.stdout, (
        proc.stdout + proc.stderr[-2000:])


def test_hand_start_noise_moves_each_training_start_by_its_seed():
    from vlax.envs.metaworld import sim

    noise = 0.08
    env, _ = sim.ensure_env("reach", sim.RolloutSettings(image_size=64, hand_start_noise=noise))
    try:
        def start(seed: int, noise: float) -> np.ndarray:
            env.seed(seed)
            sim.place_hand_start(env, seed, noise)
            return env.reset()[0][:3].copy()

        first, second, again, default = start(0, noise), start(1, noise), start(0, noise), start(0, 0.0)
    finally:
        sim.close_env()
    np.testing.assert_allclose(first, again, atol=1e-6)  # the offset is drawn from the layout seed
    assert np.abs(first - second).max() > 0.01
    # the hand settles within a few mm of where it was sent: moved, and by no more than the noise
    assert 0.01 < np.abs(first - default).max() < noise + 0.01
    np.testing.assert_allclose(default, [0.0, 0.6, 0.2], atol=0.02)  # reach's own start
    with pytest.raises(ValueError, match="hand_start_noise=-0.1"):
        generate_metaworld_dataset("/nonexistent", tasks="reach", episodes_per_task=1, hand_start_noise=-0.1)
