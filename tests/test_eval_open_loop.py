"""Open-loop metric against a hand computation; the evaluator's pieces that need no simulator: the frame resize
matches the training pipeline's, the results schema check, MP4 videos."""

import copy

import av
import jax
import numpy as np
import pytest
import tensorflow as tf

from vlax.data.frame_transforms import decode_and_resize_image
from vlax.data.normalization import NormalizationArtifact
from vlax.eval import open_loop_metrics, validate_results, write_video
from vlax.eval.results import summarize, timing
from vlax.observation import ObservationPipeline, resize_frames
from vlax.policy import PolicySpec
from vlax.tokenizers import WordTokenizer

SPEC = PolicySpec(cameras=("corner2",), image_size=8, state_dim=4, action_dim=4, horizon=2, max_text_len=6)


def _artifact() -> NormalizationArtifact:
    """Bounds normalization: dims 0-2 have q01 = -2, q99 = 2 (scale 2, shift 0) ... except dim 1 with q01 = 0,
    q99 = 4 (scale 2, shift 2); the gripper (dim 3) is left as is."""
    stats = {"mean": [0.0] * 4, "std": [1.0] * 4, "min": [-3.0] * 4, "max": [3.0] * 4,
             "q01": [-2.0, 0.0, -2.0, -1.0], "q99": [2.0, 4.0, 2.0, 1.0]}
    return NormalizationArtifact(type="bounds", keys=("action", "state"),
                                 masks={"action": (True, True, True, False), "state": (True,) * 4},
                                 padded_dims={"action": 4, "state": 4}, stats={"action": stats, "state": stats},
                                 dataset_hash="hand")


def _pipeline() -> ObservationPipeline:
    return ObservationPipeline(SPEC, WordTokenizer.build(["reach the goal"]), {"hand": _artifact()})


def _batch(actions: np.ndarray, mask: np.ndarray) -> dict:
    b = actions.shape[0]
    return {
        "observation": {"image_corner2": np.zeros((b, 1, 8, 8, 3), np.uint8), "state": np.zeros((b, 1, 4), np.float32)},
        "task": {"language_instruction": np.array([b"reach the goal"] * b)},
        "action": actions[:, None].astype(np.float32),
        "action_mask": mask[:, None],
    }


def test_open_loop_metric_equals_a_hand_computation():
    # The policy always predicts normalized 0.5 everywhere: un-normalized [1, 3, 1, 0.5] on every step.
    predict = lambda obs, key: np.full((obs["state"].shape[0], 2, 4), 0.5, np.float32)  # noqa: E731
    # Batch 1 (one example): normalized targets 0 -> raw [0, 2, 0, 0]; step 2 entirely masked (past the end).
    a1 = np.zeros((1, 2, 4))
    m1 = np.array([[[True] * 4, [False] * 4]])
    # Batch 2 (two examples): targets normalized 1 -> raw [2, 4, 2, 1]; only the gripper of example 2 step 1.
    a2 = np.ones((2, 2, 4))
    m2 = np.zeros((2, 2, 4), bool)
    m2[1, 0, 3] = True
    # Errors (prediction - target): batch 1: [1, 1, 1, 0.5]; batch 2: gripper 0.5 - 1 = -0.5.
    # 5 real entries: MSE = (1 + 1 + 1 + 0.25 + 0.25) / 5 = 0.7, L1 = (1 + 1 + 1 + 0.5 + 0.5) / 5 = 0.8.
    metrics = open_loop_metrics(predict, iter([_batch(a1, m1), _batch(a2, m2), _batch(a2, m2)]), num_batches=2,
                                pipeline=_pipeline())
    assert metrics["num_batches"] == 2 and metrics["num_values"] == 5
    assert metrics["action_mse"] == pytest.approx(0.7, abs=1e-6)  # scale carries EPSILON = 1e-8
    assert metrics["action_l1"] == pytest.approx(0.8, abs=1e-6)


def test_open_loop_metric_errors():
    predict = lambda obs, key: np.zeros((1, 2, 4), np.float32)  # noqa: E731
    batch = _batch(np.zeros((1, 2, 4)), np.ones((1, 2, 4), bool))
    with pytest.raises(ValueError, match=r"needs pipeline="):
        open_loop_metrics(predict, iter([batch]), 1)
    with pytest.raises(ValueError, match="no batches"):
        open_loop_metrics(predict, iter([]), 1, pipeline=_pipeline())
    wrong = lambda obs, key: np.zeros((1, 3, 4), np.float32)  # noqa: E731
    with pytest.raises(ValueError, match=r"predicted actions of shape \(1, 3, 4\); the batch holds \(1, 2, 4\)"):
        open_loop_metrics(wrong, iter([batch]), 1, pipeline=_pipeline())


@pytest.mark.parametrize("size", [32, 64, 224])
def test_frame_resize_matches_the_training_pipeline(size):
    # Workers cannot import TensorFlow (it crashes beside EGL rendering): JAX's antialiased bilinear resize stands
    # in for the pipeline's tf.image.resize. Same kernel; float32 sums in another order, so a value sitting on a
    # rounding boundary may round the other way (at most 1 level, on well under 1 % of the pixels).
    rs = np.random.RandomState(size)
    smooth = np.cumsum(rs.randint(0, 5, (128, 128, 3)), axis=1) % 256  # gradients, like rendered scenes
    for frame in (rs.randint(0, 256, (128, 128, 3)).astype(np.uint8), smooth.astype(np.uint8)):
        want = decode_and_resize_image(tf.constant(frame), (size, size)).numpy().astype(int)
        got = resize_frames(frame[None], (size, size), "jax")[0].astype(int)
        assert np.abs(want - got).max() <= 1 and (want != got).mean() < 0.005
        np.testing.assert_array_equal(resize_frames(frame[None], (size, size), "tf")[0], want)  # the same op
    np.testing.assert_array_equal(resize_frames(frame[None], (128, 128), "jax")[0], frame)  # already that size


def _results() -> dict:
    episodes = [{"task": "reach", "episode": j, "layout_seed": 1_000_000 + j, "instruction": "reach the goal",
                 "success": j == 0, "first_success_step": 9 if j == 0 else -1, "steps": 10 if j == 0 else 20,
                 "return": 1.0, "policy_calls": 3, "actions_sha1": "ab", "video": None, "wall_s": 1.0,
                 "policy_s": 0.02, "compile_s": 0.5 if j == 0 else None} for j in range(2)]
    config = {"tasks": ["reach"], "episodes_per_task": 2, "seed": 0, "execution": "receding", "replan_every": 4,
              "ensemble_k": 0.01, "max_steps": None, "num_workers": 1, "camera": "corner2", "render_size": 128,
              "policy_image_size": 64, "horizon": 4, "instruction_paraphrase": 0, "layout_seed_start": 1_000_000,
              "video_dir": None, "video_episodes": 1}
    return {"schema_version": 1, "kind": "metaworld_closed_loop", "policy": "/ckpt", "checkpoint_step": 3,
            "config": config, "versions": {}, "date": "2026-11-24T00:00:00+00:00",
            **summarize(episodes, ["reach"], ["reach"]), "timing": timing(episodes, 4.0), "episodes": episodes}


def test_results_summary_and_schema_check():
    results = _results()
    validate_results(results)
    assert results["per_task"]["reach"] == {"success_rate": 0.5, "successes": 1, "episodes": 2, "mean_steps": 15.0,
                                            "bucket": "easy", "trained_on": True}
    t = results["timing"]
    assert t["episodes_per_s"] == 0.5 and t["env_steps_per_s"] == 7.5 and t["policy_calls"] == 6
    # 6 calls, the first of them compiling: 0.04 s over 5 timed calls = 8 ms; amortized over 30 steps: 1.6 ms.
    assert t["ms_per_policy_call"] == pytest.approx(8.0) and t["ms_per_action"] == pytest.approx(1.6)
    for path, value, message in [
        (("episodes", 0, "success"), 1, r"\['episodes'\]\[0\]\['success'\] = 1 has type int"),
        (("config", "seed"), "0", r"\['config'\]\['seed'\] = '0' has type str"),
        (("per_task", "reach", "success_rate"), None, r"\['per_task'\]\['reach'\]\['success_rate'\]"),
    ]:
        broken = copy.deepcopy(results)
        target = broken
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(ValueError, match=message):
            validate_results(broken)
    broken = copy.deepcopy(results)
    del broken["timing"]["wall_s"]
    with pytest.raises(ValueError, match=r"\['timing'\] lacks 'wall_s'"):
        validate_results(broken)


def test_mp4_video_holds_every_frame(tmp_path):
    frames = [np.full((63, 64, 3), 10 * i, np.uint8) for i in range(12)]  # odd height: padded for yuv420p
    path = write_video(str(tmp_path / "episode.mp4"), frames, fps=20)
    with av.open(path) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 12
    assert all(abs(float(d[:63].mean()) - 10 * i) < 3 for i, d in enumerate(decoded))
    with pytest.raises(ValueError, match="extension 'avi'"):
        write_video(str(tmp_path / "episode.avi"), frames)
