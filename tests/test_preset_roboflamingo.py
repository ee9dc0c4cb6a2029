"""RoboFlamingo preset: a fresh policy's LM equals its plain LM (zero gates), 12-frame histories from the data
pipeline, the LSTM head and a swapped-in head, published parameter counts, training through experiments/train.py."""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import roboflamingo as config
from vlax.build import build_policy
from vlax.policy import PolicySpec

FIXTURE = Path(__file__).parent / "fixtures" / "lerobot_ds"
CAMERAS = (("observation.images.top", "top"), ("observation.images.wrist", "wrist"))
T = 12


def _spec(**kw):
    return PolicySpec(**{**dict(cameras=("top", "wrist"), image_size=32, state_dim=4, action_dim=4, horizon=T,
                                max_text_len=8, state_input="none", obs_history=T), **kw})


def _obs(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    images = {c: jnp.asarray(rng.integers(0, 256, (batch, T, 32, 32, 3)), jnp.uint8) for c in ("top", "wrist")}
    mask = jnp.ones((batch, 8), bool).at[1, 5:].set(False)
    return {"images": images, "state": jnp.zeros((batch, T, 4)), "text_mask": mask,
            "text_ids": jnp.asarray(rng.integers(0, 256, (batch, 8)), jnp.int32)}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _call(graphdef, fn, state, *args):
    return fn(nnx.merge(graphdef, state), *args)


def _jit(module, fn, *args):
    """``fn(module, *args)`` compiled once per (module structure, fn)."""
    return _call(*nnx.split(module)[:1], fn, nnx.split(module)[1], *args)


def _features(p, obs):
    return p.frame_features(obs)


def _sample(p, obs):
    return p.sample(obs, rngs=jax.random.key(0))


def _loss(p, obs, actions):
    return p.loss(obs, actions, rngs=jax.random.key(0))


def _plain_lm(lm, ids, mask):
    return lm(ids, input_mask=mask).hidden


@pytest.fixture(scope="module")
def policy():
    return build_policy(config.get_config("tiny").model.to_dict(), _spec(), 256, nnx.Rngs(0))


def test_a_fresh_roboflamingo_reads_its_plain_lm_exactly(policy):
    """Zero gates: each frame's feature is the max-pool of the plain LM's hidden states over the instruction."""
    obs = _obs()
    feats = np.asarray(_jit(policy, _features, obs))
    ids, mask = jnp.repeat(obs["text_ids"], T, axis=0), jnp.repeat(obs["text_mask"], T, axis=0)  # one per frame
    plain = np.asarray(_jit(policy.lm.lm, _plain_lm, ids, mask))
    pooled = np.where(np.asarray(mask)[..., None], plain, -np.inf).max(axis=1).reshape(2, T, -1)
    assert feats.shape == (2, T, 32)
    np.testing.assert_array_equal(feats, pooled)
    # ... while open gates make every frame's pixels matter
    opened = nnx.merge(*nnx.split(policy))  # a copy
    gates = opened.lm.gated_cross_attn_layers.attn_gate
    gates.set_value(jnp.ones_like(gates[...]))
    feats_open = np.asarray(_jit(opened, _features, obs))
    assert np.abs(feats_open[:, 0] - feats_open[:, 1]).max() > 1e-4


def test_lstm_head_samples_and_trains_on_every_frame(policy):
    obs = _obs()
    chunk = np.asarray(_jit(policy, _sample, obs))
    assert chunk.shape == (2, T, 4) and set(np.unique(chunk[..., -1])) <= {-1.0, 1.0}
    assert np.all(np.abs(chunk[..., :3]) <= 1.0)  # tanh pose
    assert policy.executed(jnp.asarray(chunk)).shape == (2, 1, 4)  # the current frame's action
    actions = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, T, 4)), jnp.float32)
    loss, metrics = _jit(policy, _loss, obs, actions)
    assert np.isfinite(float(loss)) and set(metrics) == {"pose", "gripper"}
    np.testing.assert_allclose(float(loss), float(metrics["pose"]) + 0.01 * float(metrics["gripper"]), rtol=1e-6)


def test_the_head_swaps_to_chunk():
    model = config.get_config("tiny").model.to_dict()
    model["head"] = "chunk"
    model["head_kwargs"] = dict(width=16, depth=1, num_heads=2, mlp_dim=32)
    swapped = build_policy(model, _spec(), 256, nnx.Rngs(0))
    assert type(swapped.head).__name__ == "ChunkHead"
    assert _jit(swapped, _sample, _obs()).shape == (2, T, 4)


def test_published_parameter_counts():
    """Abstract builds (experiments/configs/roboflamingo.py states these against OpenFlamingo's paper)."""
    three = config.param_counts("3b")
    assert three == dict(vision=303_179_776, resampler=63_019_008, cross_attn=881_000_496,
                         lm_layers=1_208_010_752, embeddings=102_973_440, head=41_194_759, total=2_599_378_231,
                         trainable=1_088_187_703)
    # OpenFlamingo-3B trains 1.05B: resampler + 24 cross-attention blocks + the resized embeddings
    assert round((three["resampler"] + three["cross_attn"] + three["embeddings"]) / 1e9, 2) == 1.05
    nine = config.param_counts("9b")
    assert nine["cross_attn"] == 1_115_815_952 and nine["lm_layers"] == 6_476_271_616
    assert nine["total"] == 8_138_954_007


def test_freeze_regex_keeps_clip_and_the_decoder_fixed(policy):
    import re

    names = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(policy, nnx.Param))]
    frozen = {n.split("/")[0] + "/" + n.split("/")[1] for n in names if re.search(config.FREEZE, n)}
    trained = {n for n in names if not re.search(config.FREEZE, n)}
    assert any(n.startswith("vision/") for n in names) and all(not n.startswith("vision/") for n in trained)
    assert {n.split("/")[0] for n in trained} == {"resampler", "lm", "head"}
    assert all(n.startswith(("lm/gated_cross_attn_layers/", "lm/lm/embed_tokens/")) for n in trained
               if n.startswith("lm/"))
    assert frozen == {"vision/embeddings", "vision/pre_layernorm", "vision/encoder", "vision/post_layernorm", "lm/lm"}


def test_bad_inputs_are_refused_with_the_fix(policy):
    obs = _obs()
    obs["images"]["top"] = obs["images"]["top"][:, :4]
    with pytest.raises(ValueError, match=r"camera 'top' has shape \(2, 4, 32, 32, 3\); the policy sees 12 frames"):
        policy.context(obs)
    with pytest.raises(ValueError, match="RoboFlamingo reads no state tokens"):
        build_policy(config.get_config("tiny").model.to_dict(), _spec(state_input="prefix"), 256, nnx.Rngs(0))


def test_tiny_roboflamingo_trains_on_the_lerobot_fixture_with_a_12_frame_history(tmp_path):
    from experiments.train import train
    from train_helpers import tiny_finetune_config

    c = tiny_finetune_config(tmp_path / "run", {"path": str(FIXTURE), "cameras": CAMERAS}, steps=4)
    tiny = config.get_config("tiny")
    for key in ("preset", "head", "head_kwargs", "head_defaults", "state_input", "roboflamingo", "tokenizer",
                "max_text_len"):
        c.model[key] = tiny.model[key]
    c.data.obs_history, c.data.action_horizon, c.data.normalization = T, T, "bounds"
    c.optim.freeze = config.FREEZE
    c.optim.learning_rate = 3e-3
    summary = train(c)
    losses = summary["losses"]
    assert summary["final_step"] == 4 and all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
