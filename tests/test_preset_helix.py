"""The Helix-style dual system: sizes at published size (abstract build), the latent as S1's only view of S2 and
the path of the gradient into S2, dual-rate execution (a deliberately slow S2 never stops S1 from acting), and the
tiny preset trained through experiments/train.py on the LeRobot fixture and on Meta-World, then run closed-loop
(S1 / S2 rate ratio measured by the evaluator) and served over the websocket server with a per-connection plan."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs.helix import get_config
from vlax.dual_rate import DualRateExecutor
from vlax.nn import count_params
from vlax.policy import PolicySpec
from vlax.presets.helix import build_helix

S2_PUBLISHED = 2_924_386_544  # PaliGemma-3B's shapes (2,923,335,408) + the latent query and its projection
S1_PUBLISHED = 79_267_939     # ResNet-18 + encoder + latent / state / image projections + the chunk decoder
TEXT_VOCAB = 259


def spec(image_size: int = 32, state_dim: int = 4, action_dim: int = 4, horizon: int = 4) -> PolicySpec:
    return PolicySpec(cameras=("image",), image_size=image_size, state_dim=state_dim, action_dim=action_dim,
                      horizon=horizon, max_text_len=8, state_input="head")


@pytest.fixture(scope="module")
def tiny():
    return build_helix(get_config("tiny").model.to_dict(), spec(), TEXT_VOCAB, nnx.Rngs(0))


def random_obs(rng, batch: int = 2) -> dict:
    return {"images": {"image": rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)},
            "state": rng.normal(size=(batch, 4)).astype(np.float32),
            "text_ids": rng.integers(3, TEXT_VOCAB, (batch, 6)).astype(np.int32), "text_mask": np.ones((batch, 6), bool)}


def test_published_sizes():
    """S2 at PaliGemma-3B's shapes, S1 (with its decoder head) at Helix's ~80M; 35-DoF state and actions."""
    c = get_config("published")
    s = spec(image_size=224, state_dim=35, action_dim=35, horizon=8)
    model = nnx.eval_shape(lambda: build_helix(c.model.to_dict(), s, 257_152, nnx.Rngs(0)))
    s2 = count_params(nnx.state(model.s2, nnx.Param))
    s1 = count_params(nnx.state(model.s1, nnx.Param)) + count_params(nnx.state(model.head, nnx.Param))
    print(f"helix published: S2 {s2:,} S1 {s1:,} parameters")
    assert (s2, s1) == (S2_PUBLISHED, S1_PUBLISHED) and model.plan_every == 25


def test_the_latent_is_s1s_only_view_of_s2_and_gradients_reach_s2(tiny):
    rng = np.random.default_rng(0)
    obs = random_obs(rng)
    other_text = dict(obs, text_ids=rng.integers(3, TEXT_VOCAB, (2, 6)).astype(np.int32))
    moved = dict(obs, state=obs["state"] + 1.0)

    @nnx.jit
    def run(p, obs, other_text, moved):
        latent, other_latent = p.plan(obs), p.plan(other_text)
        act = lambda o, plan=None: p.sample(o, rngs=jax.random.key(0), plan=plan)  # noqa: E731
        grads = nnx.grad(lambda m: m.loss(obs, jnp.zeros((2, 4, 4)), rngs=jax.random.key(0))[0])(p)
        s2_norm = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(nnx.state(grads.s2.vlm.backbone)))
        return (latent, other_latent, act(obs, latent), act(other_text, latent), act(obs), act(moved, latent),
                s2_norm)

    latent, other_latent, chunk, other_text_chunk, unplanned, moved_chunk, s2_norm = run(tiny, obs, other_text, moved)
    assert latent.shape == (2, 32) and float(jnp.max(jnp.abs(other_latent - latent))) > 1e-6
    # the instruction reaches S1 only through the latent: same latent, other text -> the same actions
    np.testing.assert_array_equal(np.asarray(chunk), np.asarray(other_text_chunk))
    # without a plan, sample runs S2 on the same observation
    np.testing.assert_allclose(np.asarray(unplanned), np.asarray(chunk), atol=1e-6)
    # S1 reads the newest state itself
    assert float(jnp.max(jnp.abs(moved_chunk - chunk))) > 1e-6
    assert float(s2_norm) > 0  # trained end to end: the loss's gradient reaches S2's LM through the latent


def test_sync_dual_rate_plans_every_k_steps_and_acts_every_step():
    seen = []

    def plan(inputs):
        seen.append(inputs)
        return np.float32(inputs)

    executor = DualRateExecutor(plan, lambda inputs, latent, key: (inputs, latent), plan_every=3)
    outs = [executor.act(t, None, step=t) for t in range(8)]
    assert seen == [0, 3, 6] and [latent for _, latent in outs] == [0, 0, 0, 3, 3, 3, 6, 6]
    assert executor.stats.act_calls == 8 and executor.stats.plan_calls == 3 and executor.stats.max_plan_age == 2
    executor.reset()  # a new episode plans at its first step
    assert executor.act(10, None, step=0)[1] == 10


def test_s1_keeps_acting_while_a_slow_s2_plans():
    """S2 takes 0.4 s, S1 ~1 ms. Asynchronous: after the first plan no act step waits for S2, so S1 runs many
    steps per plan with the older latent; synchronous: every due plan stalls the act step."""
    s2_seconds = 0.4

    def slow_plan(inputs):
        time.sleep(s2_seconds)
        return inputs

    def act(inputs, latent, key):
        time.sleep(0.001)
        return latent

    executor = DualRateExecutor(slow_plan, act, plan_every=2, asynchronous=True)
    executor.act(0, None)  # the first act step waits for the first plan
    step_times, latents = [], []
    started = time.perf_counter()
    while time.perf_counter() - started < 2.5 * s2_seconds:
        t0 = time.perf_counter()
        latents.append(executor.act(len(latents) + 1, None))
        step_times.append(time.perf_counter() - t0)
    stats = dataclasses.replace(executor.stats)
    executor.close()
    assert max(step_times) < s2_seconds / 4, max(step_times)  # no act step waited for the plan
    assert len(step_times) >= 20 and stats.plans_late > 0     # S1 far outpaced S2 ...
    assert len(set(latents)) >= 2 and latents[0] == 0         # ... and picked up the newer latents as they came
    assert stats.acts_per_plan > 5 and stats.max_plan_age > 2

    sync = DualRateExecutor(slow_plan, act, plan_every=2)
    t0 = time.perf_counter()
    for t in range(3):
        sync.act(t, None)
    assert time.perf_counter() - t0 >= 2 * s2_seconds  # steps 0 and 2 planned inline


# ---------------------------------------------------------------------------------------------- through the loop


def test_trains_on_the_lerobot_fixture(tmp_path):
    from experiments.train import train
    from train_helpers import tiny_finetune_config

    dataset = Path(__file__).parent / "fixtures" / "lerobot_ds"
    c = tiny_finetune_config(tmp_path / "run", {"path": str(dataset),
                                                "cameras": (("observation.images.wrist", "wrist"),)}, steps=2)
    c.data.image_size = 32
    for key in ("preset", "head", "head_kwargs", "state_input", "helix", "tokenizer"):
        c.model[key] = get_config("tiny").model[key]
    summary = train(c)
    assert summary["final_step"] == 2 and all(np.isfinite(summary["losses"]))


@pytest.fixture(scope="module")
def metaworld_run(tiny_metaworld, tmp_path_factory):
    from experiments.train import train
    from train_helpers import preset_row_config

    c = preset_row_config("helix", tmp_path_factory.mktemp("helix_mw"), tiny_metaworld)
    c.data.action_horizon = 4
    summary = train(c)
    assert summary["final_step"] == 2 and all(np.isfinite(summary["losses"]))
    return c


def test_closed_loop_in_metaworld_measures_the_s1_s2_rate_ratio(metaworld_run):
    from vlax.eval import evaluate, format_table

    results = evaluate(metaworld_run.workdir, "reach", episodes_per_task=1, max_steps=12, replan_every=1,
                       plan_every=3, num_workers=1, progress=False)
    episode, dual = results["episodes"][0], results["timing"]["dual_rate"]
    assert episode["steps"] == episode["policy_calls"] == 12  # S1 every control step
    assert episode["dual_rate"]["plan_calls"] == 4 and dual["acts_per_plan"] == 3.0  # S2 every 3rd step
    assert results["config"]["plan_every"] == 3 and dual["max_plan_age"] == 2
    assert dual["ms_per_act_call"] > 0 and dual["ms_per_plan_call"] > 0
    assert "dual rate: 12 act steps / 4 plan steps = 3.0" in format_table(results)
    with pytest.raises(ValueError, match="plan_mode='later'"):
        evaluate(metaworld_run.workdir, "reach", plan_mode="later")


def test_server_plans_per_connection(metaworld_run):
    from test_serve_support import observation
    from vlax.inference import PolicyRunner
    from vlax.serve import Client, PolicyServer, ServedPolicy, ServerThread

    runner = PolicyRunner.from_checkpoint(metaworld_run.workdir)
    assert runner.plans and runner.plan_every == 4  # the tiny config's period
    policy = ServedPolicy(runner, plan_every=2)
    with ServerThread(PolicyServer(policy, port=0)) as running:  # warm-up compiled both steps
        fast_plan, s2_seconds = runner._plan, 0.5

        def slow_plan(state, inputs):
            time.sleep(s2_seconds)
            return fast_plan(state, inputs)

        runner._plan = slow_plan
        client = Client(port=running.port)
        assert client.metadata["plan_every"] == 2
        replies = [client.infer(observation(i)) for i in range(5)]
        client.close()
    assert all(r["actions"].shape == (4, 4) and np.all(np.isfinite(r["actions"])) for r in replies)
    waits = [r["server_timing"]["infer_ms"] / 1000 for r in replies]
    # the connection's first reply waits for its first plan; later ones never wait for the slow S2 (plans are
    # started at requests 2 and 4 and run on a background thread)
    assert waits[0] >= s2_seconds and max(waits[1:]) < s2_seconds / 2, waits
