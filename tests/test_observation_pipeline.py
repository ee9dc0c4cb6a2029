"""One path from a raw observation to model inputs: the training batch (tf.data: resize, normalization, prompt
formatting and tokenization inside the pipeline) and the inference / serving path (ObservationPipeline.model_inputs
on the raw frames, state and instruction) give bit-identical inputs for the same dataset steps."""

import numpy as np
import pytest

from vlax.data import DataConfig, InMemorySource, build_pipeline
from vlax.observation import ObservationPipeline
from vlax.policy import PolicySpec
from vlax.prompts import tokenize_prompts
from vlax.tokenizers import ByteTokenizer

INSTRUCTIONS = ("pick up the red cube", "open_the top drawer\n")


def trajectories(rng) -> list[dict]:
    trajs = []
    for i, instruction in enumerate(INSTRUCTIONS):
        steps = 6 + i
        # a distinct state per step (its first value) so each batch row names its dataset step
        state = np.concatenate([np.arange(steps)[:, None] + 10 * i, rng.normal(size=(steps, 2))], 1)
        trajs.append({"action": rng.normal(size=(steps, 3)).astype(np.float32),
                      "state": state.astype(np.float32),
                      "images": {"top": rng.integers(0, 256, (steps, 48, 80, 3), np.uint8),   # resized to 32
                                 "wrist": rng.integers(0, 256, (steps, 32, 32, 3), np.uint8)},
                      "language_instruction": instruction})
    return trajs


@pytest.mark.parametrize("prompt,normalization,resize", [("plain", "bounds", "stretch"), ("pi05", "normal", "stretch"),
                                                        ("plain", "bounds", "pad")])
def test_training_batch_and_raw_observation_give_identical_model_inputs(prompt, normalization, resize):
    trajs = trajectories(np.random.default_rng(0))
    source = InMemorySource("arm", trajs, gripper_last=True)
    spec = PolicySpec(cameras=("top", "wrist"), image_size=32, state_dim=5, action_dim=3, horizon=2,
                      max_text_len=48, image_resize=resize)
    tokenizer = ByteTokenizer()

    def tokenize(instructions, states, state_dims=None):  # the function experiments/train.py hands the pipeline
        return tokenize_prompts(tokenizer, prompt, instructions, spec.max_text_len, states, state_dims)

    config = DataConfig(batch_size=4, action_horizon=2, image_size=32, normalization=normalization, train=False,
                        drop_remainder=False, stats_cache_dir=None, max_state_dim=5,  # 2 padded state dims
                        image_resize=resize)
    data = build_pipeline([source], config, tokenize=tokenize, process_index=0, process_count=1)
    pipeline = ObservationPipeline(spec, tokenizer, data.artifacts, prompt=prompt)
    artifact = pipeline.artifact
    seen = 0
    for batch in data:
        train_inputs = pipeline.from_batch(batch)["obs"]
        for b in range(len(batch["dataset_name"])):
            first = artifact.unnormalize("state", train_inputs["state"][b:b + 1])[0, 0]
            traj = trajs[int(round(first)) // 10]
            t = int(round(first)) % 10
            raw = {"images": {c: traj["images"][c][t:t + 1] for c in spec.cameras},
                   "state": traj["state"][t:t + 1], "prompt": [traj["language_instruction"]]}
            served = pipeline.model_inputs(raw)
            for camera in spec.cameras:
                np.testing.assert_array_equal(served["images"][camera][0], train_inputs["images"][camera][b])
            for key in ("state", "text_ids", "text_mask"):
                np.testing.assert_array_equal(served[key][0], train_inputs[key][b], err_msg=key)
                assert served[key].dtype == train_inputs[key].dtype, key
            # π0.5's prompt carries the dataset's 3 state values, not the 2 padded ones
            real = tokenize_prompts(tokenizer, prompt, raw["prompt"], spec.max_text_len, served["state"][:, :3])
            np.testing.assert_array_equal(served["text_ids"], real[0])
            seen += 1
    assert seen == sum(len(t["action"]) for t in trajs)  # every step of both episodes compared


def test_pad_resize_keeps_the_aspect_ratio_as_lerobots_smolvla_does():
    """A 48x80 frame to 32x32 in "pad" mode: resized to 19x32 (bilinear, no antialiasing), 13 zero rows on top;
    the tf op (training and inference), its JAX twin and SmolVLA's in-model float resize agree."""
    from vlax.observation import resize_frames
    from vlax.presets.smolvla import resize_with_pad

    frames = np.random.default_rng(1).integers(0, 256, (2, 48, 80, 3), np.uint8)
    tf_out = resize_frames(frames, (32, 32), "tf", "pad")
    jax_out = resize_frames(frames, (32, 32), "jax", "pad")
    assert tf_out.shape == (2, 32, 32, 3) and not tf_out[:, :13].any() and tf_out[:, 13:].any()
    assert np.abs(tf_out.astype(int) - jax_out.astype(int)).max() <= 1
    reference = np.asarray(resize_with_pad(frames.astype(np.float32) / 255, 32, 32)) * 255
    assert np.abs(tf_out - reference).max() <= 0.5 + 1e-3  # the uint8 rounding, nothing more
    stretched = resize_frames(frames, (32, 32), "tf", "stretch")
    assert stretched[:, :13].any()


def test_unknown_resize_mode_names_the_known_ones():
    with pytest.raises(ValueError, match="'letterbox'.*'stretch', 'pad'"):
        PolicySpec(cameras=("top",), image_size=32, state_dim=1, action_dim=1, horizon=1, max_text_len=4,
                   image_resize="letterbox")
    with pytest.raises(ValueError, match="data.image_resize"):
        build_pipeline([InMemorySource("arm", trajectories(np.random.default_rng(0)))],
                       DataConfig(image_resize="letterbox"), process_index=0, process_count=1)


@pytest.mark.parametrize("action_chunks", ["oldest", "every_step"])
def test_a_history_window_trains_on_the_chunks_its_policy_asks_for(action_chunks):
    """obs_history=2: "oldest" gives the chunk from the window's older step (Diffusion Policy), "every_step" a chunk
    from each window step (Octo's readouts); the window's pad mask reaches the model inputs."""
    trajs = trajectories(np.random.default_rng(1))
    source = InMemorySource("arm", trajs, gripper_last=True)
    spec = PolicySpec(cameras=("top",), image_size=32, state_dim=5, action_dim=3, horizon=2, max_text_len=48,
                      obs_history=2, action_chunks=action_chunks)
    config = DataConfig(batch_size=4, action_horizon=2, image_size=32, window=2, train=False, drop_remainder=False,
                        stats_cache_dir=None, max_state_dim=5)
    tokenizer = ByteTokenizer()
    data = build_pipeline([source], config, process_index=0, process_count=1,
                          tokenize=lambda i, s, d=None: tokenize_prompts(tokenizer, "plain", i, 48, s, d))
    pipeline = ObservationPipeline(spec, tokenizer, data.artifacts)
    seen = 0
    for batch in data:
        out = pipeline.from_batch(batch)
        state = pipeline.artifact.unnormalize("state", out["obs"]["state"])  # [B, 2, S]
        pad = out["obs"]["timestep_pad_mask"]
        actions = pipeline.artifact.unnormalize("action", out["actions"])
        want_shape = (len(state), 2, 2, 3) if action_chunks == "every_step" else (len(state), 2, 3)
        assert actions.shape == want_shape and out["action_mask"].shape == want_shape
        for b in range(len(state)):
            current = int(round(state[b, -1, 0]))
            traj, t = trajs[current // 10], current % 10
            assert list(pad[b]) == [t >= 1, True]  # the older step of an episode's first window is padding
            starts = [t - 1, t] if action_chunks == "every_step" else [t - 1]
            for k, start in enumerate(starts):
                if start < 0:
                    continue
                got = actions[b, k] if action_chunks == "every_step" else actions[b]
                mask = out["action_mask"][b, k] if action_chunks == "every_step" else out["action_mask"][b]
                want = traj["action"][start:start + 2]
                np.testing.assert_allclose(got[:len(want)][mask[:len(want)]], want[mask[:len(want)]], atol=1e-5)
            seen += 1
    assert seen == sum(len(t["action"]) for t in trajs)
