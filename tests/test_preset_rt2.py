"""The RT-2-style preset: PaliGemma-3B's shapes at published size (parameter count from an abstract build),
actions written as tokens of the LM's own vocabulary (teacher-forced logits through the KV cache equal one causal
pass of the LM over prompt + action tokens; sampling emits only action ids), the head swaps, and the tiny preset
trains through experiments/train.py on the LeRobot fixture and on Meta-World and runs closed-loop there."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs.rt2 import get_config
from vlax.nn import count_params
from vlax.policy import PolicySpec
from vlax.presets.rt2 import PALIGEMMA_LOC0, build_rt2

# SigLIP So400m/14 at 224 px without its MAP head 412,442,352 + projector 2,361,344 + Gemma-2B (257,152 ids,
# tied embeddings) 2,508,531,712
PALIGEMMA_3B_PARAMS = 2_923_335_408
TEXT_VOCAB = 259  # the byte tokenizer's


def spec(horizon: int = 2, action_dim: int = 3, image_size: int = 16) -> PolicySpec:
    return PolicySpec(cameras=("image",), image_size=image_size, state_dim=0, action_dim=action_dim,
                      horizon=horizon, max_text_len=8, state_input="none")


@pytest.fixture(scope="module")
def tiny():
    model = get_config("tiny").model.to_dict()
    return build_rt2(model, spec(), TEXT_VOCAB, nnx.Rngs(0))


def random_obs(rng, batch: int = 2, image_size: int = 16) -> dict:
    ids = rng.integers(3, TEXT_VOCAB, (batch, 6)).astype(np.int32)
    mask = np.ones((batch, 6), bool)
    mask[0, 4:] = False  # one right-padded prompt
    return {"images": {"image": rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)},
            "text_ids": ids, "text_mask": mask}


def test_published_size_is_paligemma_3b_with_bins_on_its_location_tokens():
    c = get_config("paligemma_3b")
    s = PolicySpec(cameras=("image",), image_size=224, state_dim=0, action_dim=7, horizon=1, max_text_len=32,
                   state_input="none")
    model = nnx.eval_shape(lambda: build_rt2(c.model.to_dict(), s, 257_152, nnx.Rngs(0)))
    assert count_params(nnx.state(model, nnx.Param)) == PALIGEMMA_3B_PARAMS
    assert count_params(nnx.state(model.vlm.vision, nnx.Param)) == 412_442_352
    assert count_params(nnx.state(model.backbone, nnx.Param)) == 2_508_531_712
    assert model.backbone.config.vocab_size == 257_152 and model.head.cache_slots == 7
    # bin k of a value is <loc(255 - k)>: ids 256000 .. 256255
    assert model.head.tokenizer.token_range == (PALIGEMMA_LOC0, PALIGEMMA_LOC0 + 255)  # inclusive


def test_tiny_vocabulary_is_the_tokenizers_plus_the_bins(tiny):
    assert tiny.backbone.config.vocab_size == TEXT_VOCAB + 256
    assert tiny.head.tokenizer.token_range == (TEXT_VOCAB, TEXT_VOCAB + 255)  # no text id is an action id
    with pytest.raises(ValueError, match="the tokenizer has 900 ids but model.rt2.text.vocab_size is 515"):
        model = get_config("tiny").model.to_dict()
        model["rt2"]["text"]["vocab_size"] = 515
        build_rt2(model, spec(), 900, nnx.Rngs(0))


def test_action_tokens_are_decoded_through_the_lm_head(tiny):
    """Teacher-forced logits (the first from the prefix's last real token, the rest through the KV cache) equal one
    pass of the LM over [images | prompt | action tokens] with the prompt's padding cut off: the actions really are
    text tokens of the LM. Greedy sampling emits action ids only, decoded to bin centres."""
    from vlax.nn.lm_decoding import teacher_forced_logits, token_cross_entropy

    rng = np.random.default_rng(0)
    obs = random_obs(rng)
    actions = jnp.asarray(rng.uniform(-1, 1, (2, 2, 3)), jnp.float32)
    lm, tokenizer = tiny.backbone, tiny.head.tokenizer
    targets = tokenizer.encode(actions).reshape(2, 6)
    cached = np.asarray(token_cross_entropy(teacher_forced_logits(tiny.context(obs), lm, targets), targets))
    for row in range(2):
        n_text = int(obs["text_mask"][row].sum())
        one = {"images": {"image": obs["images"]["image"][row:row + 1]},
               "text_ids": obs["text_ids"][row:row + 1, :n_text], "text_mask": obs["text_mask"][row:row + 1, :n_text]}
        embeds, _ = tiny.vlm.embed_prefix(one)
        n = embeds.shape[1]
        full = jnp.concatenate([embeds, lm.embed_tokens(targets[row:row + 1])], axis=1)
        ar = jnp.concatenate([jnp.zeros(n, jnp.int32), jnp.ones(6, jnp.int32)])  # prefix-LM, then causal
        hidden = lm(embeds=full, input_mask=jnp.ones(full.shape[:2], bool), ar_mask=ar).hidden
        logits = lm.logits(hidden[:, n - 1:-1])  # the positions that predict each action token
        np.testing.assert_allclose(cached[row], np.asarray(token_cross_entropy(logits, targets[row:row + 1]))[0],
                                   atol=1e-5)
    loss, _ = tiny.loss(obs, actions, rngs=jax.random.key(0))
    np.testing.assert_allclose(float(loss), cached.mean(), rtol=1e-5)

    sampled = np.asarray(jax.jit(lambda o: tiny.sample(o, rngs=jax.random.key(1)))(obs))
    assert sampled.shape == (2, 2, 3)
    assert np.all(np.isclose(sampled[..., None], np.asarray(tokenizer.centers)).any(-1))  # every value a bin centre


def test_head_swaps_on_the_paligemma_prefix():
    model = get_config("tiny").model.to_dict()
    model["head"], model["head_kwargs"] = "chunk", {"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}
    policy = build_rt2(model, spec(horizon=4), TEXT_VOCAB, nnx.Rngs(0))
    out = jax.jit(lambda o: policy.sample(o, rngs=jax.random.key(0)))(random_obs(np.random.default_rng(1)))
    assert out.shape == (2, 4, 3) and bool(jnp.all(jnp.isfinite(out)))


def test_trains_on_the_lerobot_fixture(tmp_path):
    from experiments.train import train

    c = get_config("tiny")
    c.workdir = str(tmp_path / "run")
    c.data.sources[0].path = str(Path(__file__).parent / "fixtures" / "lerobot_ds")
    c.data.sources[0].cameras = (("observation.images.wrist", "wrist"),)
    c.data.image_size = 16  # a 2 x 2 patch grid: compiling the train step dominates
    c.data.action_horizon = 2
    c.data.batch_size, c.data.shuffle_buffer, c.data.val_fraction = 8, 16, 0.0
    c.model.max_text_len = 16
    c.train.steps = c.train.save_every = 2
    c.train.log_every, c.train.progress, c.train.tensorboard = 1, False, False
    summary = train(c)
    assert summary["final_step"] == 2 and all(np.isfinite(summary["losses"]))


def test_trains_on_metaworld_and_runs_closed_loop(tiny_metaworld, tmp_path):
    from experiments.train import train
    from train_helpers import preset_row_config
    from vlax.eval import evaluate

    c = preset_row_config("rt2", tmp_path / "mw", tiny_metaworld)
    c.data.action_horizon = 2  # 8 decoded tokens per call
    summary = train(c)
    assert summary["final_step"] == 2 and all(np.isfinite(summary["losses"]))
    results = evaluate(c.workdir, "reach", episodes_per_task=1, max_steps=4, num_workers=1, progress=False)
    episode = results["episodes"][0]
    assert episode["steps"] == 4 and episode["policy_calls"] == 2  # a 2-step chunk per call
    assert results["timing"]["ms_per_policy_call"] > 0 and results["timing"]["dual_rate"] is None
