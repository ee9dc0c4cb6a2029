"""A trained policy runs from its checkpoint alone; another head fine-tunes from it only with an explicit reinit."""

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.train import train
from train_helpers import tiny_config
from vlax.inference import PolicyRunner


@pytest.fixture(scope="module")
def trained(tiny_metaworld, tmp_path_factory):
    c = tiny_config(tmp_path_factory.mktemp("chunk_run"), tiny_metaworld, steps=6, save_every=6)
    train(c)
    return c


def test_runner_reproduces_the_model_and_unnormalizes(trained):
    runner = PolicyRunner.from_checkpoint(trained.workdir)
    rs = np.random.RandomState(0)
    frames = rs.randint(0, 255, (2, 64, 64, 3), np.uint8)  # camera size; the runner resizes to the policy's 32 px
    state = rs.uniform(-0.5, 0.5, (2, 4)).astype(np.float32)
    obs = {"images": {"corner2": frames}, "state": state, "prompt": ["reach the goal", "push the puck to the goal"]}
    key = jax.random.key(3)
    actions = runner.infer(obs, rng=key)
    horizon = runner.spec.horizon
    assert actions.shape == (2, horizon, 4)
    model = runner.model()
    # jitted apart from the runner (op-by-op dispatch of the whole model costs ~20 s of the suite)
    normalized = np.asarray(nnx.jit(lambda m, o, k: m.sample(o, rngs=k))(model, runner.pipeline.model_inputs(obs), key))
    np.testing.assert_allclose(actions, runner.artifact.unnormalize("action", normalized), atol=1e-5)
    one = runner.infer({"images": {"corner2": frames[0]}, "state": state[0], "prompt": "reach the goal"}, rng=key)
    assert one.shape == (horizon, 4)
    jitted = runner.sample_normalized(runner.pipeline.model_inputs(obs), key)
    np.testing.assert_allclose(jitted, normalized, atol=1e-5)


def test_finetune_to_another_head_needs_reinit(trained, tiny_metaworld, tmp_path):
    c = tiny_config(tmp_path / "flow", tiny_metaworld, steps=2, save_every=100)
    c.model.head = "diffusion"
    c.finetune.checkpoint = trained.workdir
    with pytest.raises(ValueError, match="head/.* is not in the checkpoint"):
        train(c)
    c.workdir = str(tmp_path / "flow2")
    c.finetune.reinit = "^head/"
    summary = train(c)
    assert summary["final_step"] == 2
