"""Policies that see an observation history (obs_history = T > 1) acting one control step at a time: the history
buffer's padding and rolling order, the runner's session against hand-stacked windows, the Meta-World control loop
observing every step, and the server keeping one window per connection (micro-batching included).

The policy is a tiny Diffusion Policy (two observation steps, a chunk of 8 of which its ``executed`` hook keeps 4
from index 1), built in-process; frames are already at its 32 px so no resize runs."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from test_serve_support import PROMPTS, STATE_DIM, artifact, observation
from vlax.build import build_policy, policy_spec
from vlax.envs.metaworld.episode import EpisodeJob, _CheckpointActor, run_rollout
from vlax.envs.metaworld.sim import RolloutSettings
from vlax.inference import PolicyRunner
from vlax.observation import ObservationPipeline
from vlax.observation_history import ObservationHistory
from vlax.serve import Client, PolicyServer, ServedPolicy, ServerError, ServerThread
from vlax.tokenizers import WordTokenizer

CAMERA, SIDE = "corner2", 32


def tiny_runner(obs_history: int) -> PolicyRunner:
    from experiments.configs import diffusion_policy

    c = diffusion_policy.get_config("tiny")
    c.data.image_size, c.data.obs_history = SIDE, obs_history
    c.model.diffusion_policy.encoder.resnet = {"depths": (1, 1, 1, 1), "widths": (16, 16, 16, 16)}
    c.model.head_defaults.diffusion_unet.update(num_steps=2)
    c.model.head_defaults.diffusion_unet.denoiser_kwargs.update(down_dims=(16,), step_embed_dim=8)
    spec = policy_spec(c, cameras=(CAMERA,), state_dim=STATE_DIM, action_dim=4)
    tokenizer = WordTokenizer.build(PROMPTS)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_policy(c.model, spec, tokenizer.vocab_size,
                                                                    nnx.Rngs(0))))
    model = nnx.merge(graphdef, numpy_params(state))
    art = artifact()
    # Action bounds of [-1, 1] (Meta-World's range), so the evaluator's clip to [-1, 1] saturates nothing more than
    # the sampler's own clip does and every compared action carries the window's information.
    unit = {**art.stats["action"], **{k: [-1.0] * 4 for k in ("min", "q01")}, **{k: [1.0] * 4 for k in ("max", "q99")}}
    art = dataclasses.replace(art, stats={**art.stats, "action": unit})
    return PolicyRunner(model, ObservationPipeline(spec, tokenizer, {art.dataset_name: art}), seed=0)


def numpy_params(state):
    """Deterministic weights without compiling an initialiser (each parameter shape would cost an XLA compile):
    kernels ``N(0, 1 / fan_in)``, biases 0, norm scales 1."""
    rng = np.random.default_rng(0)

    def value(path, variable):
        shape = variable.shape
        if path[-1] == "scale":
            return np.ones(shape, np.float32)
        if path[-1] == "bias":
            return np.zeros(shape, np.float32)
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)

    pure = nnx.to_pure_dict(state)
    flat = {path: value(path, v) for path, v in nnx.to_flat_state(state)}
    nnx.replace_by_pure_dict(state, _nest(pure, flat))
    return state


def _nest(pure, flat, prefix=()):
    return {k: _nest(v, flat, (*prefix, k)) if isinstance(v, dict) else flat[(*prefix, k)] for k, v in pure.items()}


@pytest.fixture(scope="module")
def runner():
    return tiny_runner(2)


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)


def window(frames, states, prompt="open the drawer") -> dict:
    """The raw window PolicyRunner.infer takes for one example: images [T, h, w, 3], state [T, S], oldest first."""
    return {"images": {CAMERA: np.stack(frames)}, "state": np.stack(states).astype(np.float32), "prompt": prompt}


# ---- the buffer -------------------------------------------------------------------------------------------------

def test_history_pads_with_the_first_step_then_rolls_oldest_first():
    def step(i, batch=None):
        shape = (SIDE // 8, SIDE // 8, 3) if batch is None else (batch, SIDE // 8, SIDE // 8, 3)
        state = np.full((STATE_DIM,) if batch is None else (batch, STATE_DIM), float(i), np.float32)
        return {"images": {"a": np.full(shape, i, np.uint8), "b": np.full(shape, 100 + i, np.uint8)},
                "state": state, "prompt": f"p{i}"}

    history = ObservationHistory(3)
    expected = [[0, 0, 0], [0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4]]
    masks = [[False, False, True], [False, True, True], [True, True, True], [True, True, True], [True, True, True]]
    for i, (want, mask) in enumerate(zip(expected, masks)):
        pushed = step(i)
        out = history.push(pushed)
        pushed["images"]["a"][...] = 255  # the caller reusing its buffer does not change the window
        hand = {"a": np.stack([np.full((4, 4, 3), j, np.uint8) for j in want]),
                "b": np.stack([np.full((4, 4, 3), 100 + j, np.uint8) for j in want])}
        np.testing.assert_array_equal(out["images"]["a"], hand["a"])
        np.testing.assert_array_equal(out["images"]["b"], hand["b"])
        np.testing.assert_array_equal(out["state"], np.stack([np.full(STATE_DIM, j, np.float32) for j in want]))
        assert out["prompt"] == f"p{i}"  # the latest step's prompt
        np.testing.assert_array_equal(history.pad_mask(), mask)
    # A new episode pads with its own first step; batched steps gain the step axis after the batch axis.
    history.reset()
    out = history.push(step(7, batch=2))
    assert out["images"]["a"].shape == (2, 3, 4, 4, 3) and out["state"].shape == (2, 3, STATE_DIM)
    assert np.all(out["images"]["a"] == 7) and history.pad_mask().shape == (2, 3)
    out = history.push(step(8, batch=2))
    np.testing.assert_array_equal(out["state"][:, :, 0], [[7, 7, 8], [7, 7, 8]])
    with pytest.raises(ValueError, match=r"differs from the history's.*call reset\(\) at an episode start"):
        history.push(step(9))  # unbatched in the middle of a batched episode
    # A history of one is a pass-through: the very observation it was given.
    single = step(3)
    assert ObservationHistory(1).push(single) is single


# ---- the runner ---------------------------------------------------------------------------------------------------

def test_session_equals_the_policy_on_hand_stacked_windows(runner):
    """Step by step through runner.session(): each call acts on [previous step, this step] (the first step
    repeated at an episode start), and returns the executed slice (4 actions from index 1) of the chunk."""
    assert runner.spec.obs_history == 2 and runner.executed_steps == (1, 2, 3, 4)
    session = runner.session()
    frames = [frame(i) for i in range(4)]
    states = [np.linspace(-0.5, 0.5, STATE_DIM).astype(np.float32) * (i + 1) for i in range(4)]
    starts = {0: 0, 1: 0, 2: 1, 3: 3}  # step 3 starts a new episode (reset)
    for t in range(4):
        if t == 3:
            session.reset()
        key = jax.random.key(10 + t)
        got = session.infer({"images": {CAMERA: frames[t]}, "state": states[t], "prompt": "open the drawer"},
                            rng=key)
        prev = starts[t] if t in (0, 3) else t - 1
        raw = window([frames[prev], frames[t]], [states[prev], states[t]])
        np.testing.assert_array_equal(got, runner.infer(raw, rng=key))
        batched = {"images": {CAMERA: raw["images"][CAMERA][None]}, "state": raw["state"][None],
                   "prompt": [raw["prompt"]]}
        chunk = runner.sample_normalized(runner.pipeline.model_inputs(batched), key)
        np.testing.assert_array_equal(got, runner.pipeline.actions(np.asarray(chunk)[0, 1:5]))  # [4, A]
    # Octo's timestep pad mask, on request: False for the repeated first step.
    masked = runner.session(pad_mask=True)
    step = {"images": {CAMERA: frames[0][None]}, "state": states[0][None], "prompt": ["open the drawer"]}
    np.testing.assert_array_equal(masked.model_inputs(step)["timestep_pad_mask"], [[False, True]])
    np.testing.assert_array_equal(masked.model_inputs(step)["timestep_pad_mask"], [[True, True]])
    assert "timestep_pad_mask" not in session.model_inputs(step)  # this policy was trained without it


def test_one_step_to_a_history_policy_is_one_clear_error(runner):
    one = {"images": {CAMERA: frame(0)}, "state": np.zeros(STATE_DIM, np.float32), "prompt": "open the drawer"}
    with pytest.raises(ValueError, match=r"obs_history=2 .*one step.*runner\.session\(\).*\[B, 2, h, w, 3\]"):
        runner.infer(one)
    batch = {"images": {CAMERA: frame(0)[None]}, "state": np.zeros((1, STATE_DIM), np.float32),
             "prompt": ["open the drawer"]}
    with pytest.raises(ValueError, match=r"obs_history=2 .*runner\.session\(\)"):
        runner.infer(batch)
    with pytest.raises(ValueError, match=r"a session takes one observation step"):
        runner.session().infer(window([frame(0)] * 2, [np.zeros(STATE_DIM)] * 2))


# ---- the Meta-World control loop ----------------------------------------------------------------------------------

class StepCounterEnv:
    """The environment protocol run_rollout drives (Meta-World's: seed, reset, step, max_path_length), with a
    state that is a known function of the step, so the test can rebuild every window the policy must have seen."""

    max_path_length = 50

    @staticmethod
    def state(t: int) -> np.ndarray:
        obs = np.zeros(39)
        obs[:STATE_DIM] = [0.05 * t, -0.04 * t, 0.5 - 0.03 * t, 0.2]
        return obs

    def seed(self, seed: int) -> None:
        del seed

    def reset(self):
        self.t = 0
        return self.state(0), {}

    def step(self, action):
        self.t += 1
        return self.state(self.t), 0.0, False, False, {"success": False}


def _job(**changes) -> EpisodeJob:
    settings = RolloutSettings(image_size=SIDE, image_encoding="png")
    fields = dict(policy="in-process", checkpoint_step=None, task="reach", task_index=0, episode=0, layout_seed=0,
                  seed=0, instruction="open the drawer", settings=settings, execution="receding", replan_every=8,
                  ensemble_k=0.01, max_steps=9)
    return EpisodeJob(**{**fields, **changes})


def test_control_loop_observes_every_step_of_a_history_policy(runner):
    job = _job()
    renders = []
    render = lambda t: renders.append(t) or frame(100 + t)  # noqa: E731
    actor = _CheckpointActor(None, None, job.settings, runner=runner)
    assert actor.horizon == 4 and actor.chunk_horizon == 8 and actor.observes_every_step
    out = run_rollout(StepCounterEnv(), actor, job, render)
    # replan_every = H (the evaluator's "whole chunk") executes the 4 actions the policy keeps: calls at 0, 4, 8.
    assert out["calls"] == 3 and renders == list(range(9))  # rendered at every step, not only at the 3 calls
    episode_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0), 0)
    expected = []
    for call, t in enumerate((0, 4, 8)):
        prev = max(t - 1, 0)
        raw = window([frame(100 + prev), frame(100 + t)],
                     [StepCounterEnv.state(prev)[:STATE_DIM], StepCounterEnv.state(t)[:STATE_DIM]])
        expected.append(np.clip(runner.infer(raw, rng=jax.random.fold_in(episode_key, call)), -1.0, 1.0))
    np.testing.assert_array_equal(out["actions"], np.concatenate(expected)[:9])
    with pytest.raises(ValueError, match=r"replan_every=6 exceeds the 4 actions the policy executes"):
        run_rollout(StepCounterEnv(), actor, _job(replan_every=6), render)

    # One observation step: rendered only when the policy acts, as before histories existed.
    single = _CheckpointActor(None, None, job.settings, runner=tiny_runner(1))
    assert not single.observes_every_step and single.horizon == 4  # executed: 4 actions from index 0
    renders.clear()
    assert run_rollout(StepCounterEnv(), single, job, render)["calls"] == 3 and renders == [0, 4, 8]


# ---- the server ---------------------------------------------------------------------------------------------------

def _expected(runner, steps, index):
    """In-process actions for the window of ``steps`` (openpi-style requests, oldest first)."""
    raw = window([s["observation/image"] for s in steps], [s["observation/state"] for s in steps],
                 steps[-1]["prompt"])
    return runner.infer(raw, rng=jax.random.fold_in(jax.random.key(0), index))


def test_server_keeps_one_history_per_connection(runner):
    policy = ServedPolicy(runner, max_batch=2)
    a, b = [observation(i) for i in range(4)], [observation(10 + i, "close the window") for i in range(3)]
    with ServerThread(PolicyServer(policy, port=0)) as running:
        start = runner._calls  # the server draws request keys from the runner's stream, one per request
        with Client("127.0.0.1", running.port) as ca, Client("127.0.0.1", running.port) as cb:
            meta = ca.metadata
            assert (meta["obs_history"], meta["action_horizon"], meta["chunk_horizon"], meta["executed_from"]) \
                == (2, 4, 8, 1)
            replies = [ca.infer(a[0]), cb.infer(b[0]), ca.infer(a[1]), cb.infer(b[1])]
            assert ca.infer({"__ctrl__": "episode_start"}) == {"__ack__": "episode_start"}
            replies += [ca.infer(a[2]), cb.infer(b[2])]
            with pytest.raises(ServerError, match=r"unknown control 'pause'"):
                ca.infer({"__ctrl__": "pause"})
        with Client("127.0.0.1", running.port) as again:  # a new connection starts a new window
            replies.append(again.infer(a[3]))
    windows = [[a[0], a[0]], [b[0], b[0]], [a[0], a[1]], [b[0], b[1]], [a[2], a[2]], [b[1], b[2]], [a[3], a[3]]]
    for i, (reply, steps) in enumerate(zip(replies, windows)):
        assert reply["actions"].shape == (4, 4)
        np.testing.assert_array_equal(reply["actions"], _expected(runner, steps, start + i))

    # Micro-batching: requests of two connections sampled in one vmapped call, each with its own window.
    first, second = policy.connection(), policy.connection()
    keys = [jax.random.fold_in(jax.random.key(0), 900 + i) for i in range(3)]
    policy.prepare(a[0], key=keys[0], history=first.history)
    batch = [policy.prepare(a[1], key=keys[1], history=first.history),
             policy.prepare(b[0], key=keys[2], history=second.history)]
    got = policy.infer_many(batch)
    np.testing.assert_allclose(got[0], _expected(runner, [a[0], a[1]], 901), atol=1e-5)
    np.testing.assert_allclose(got[1], _expected(runner, [b[0], b[0]], 902), atol=1e-5)
    with pytest.raises(ValueError, match=r"obs_history=2.*prepare\(request, history=connection\.history\)"):
        policy.prepare(a[0])
