"""Robot state into the prefix: a projected token (default) or π0.5's discretized vocabulary tokens."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlax.build import backbone_vocab_size, build_policy, policy_spec
from vlax.heads import BinTokenizer

MODEL = {"head": "chunk", "head_kwargs": {"width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32},
         "encoder": "conv_stem", "encoder_kwargs": {"width": 16, "channels": (8, 16)}, "backbone": "tiny",
         "backbone_overrides": {"width": 16, "depth": 1, "mlp_dim": 32, "num_heads": 2, "num_kv_heads": 1,
                                "head_dim": 8},
         "state_dim": 3, "action_dim": 2, "max_text_len": 4, "num_readouts": 0}
DATA = {"camera": "corner2", "image_size": 16, "action_horizon": 2}


def _policy(state_input: str, text_vocab: int = 10):
    model = {**MODEL, "state_input": state_input}
    spec = policy_spec({"data": DATA, "model": model})
    return build_policy(model, spec, text_vocab, nnx.Rngs(0)), model


def _obs(state):
    b = state.shape[0]
    return {"images": {"corner2": jnp.full((b, 16, 16, 3), 100, jnp.uint8)}, "state": jnp.asarray(state),
            "text_ids": jnp.ones((b, 4), jnp.int32), "text_mask": jnp.ones((b, 4), bool)}


def test_discrete_state_reads_one_vocabulary_token_per_dimension():
    policy, model = _policy("discrete")
    assert backbone_vocab_size(model, 10) == 10 + 256  # the bins are the last 256 ids
    assert policy.backbone.config.vocab_size == 266
    state = np.array([[-0.999, 0.0, 0.5]], np.float32)
    embeds, mask, ar = policy.embed_prefix(_obs(state))
    prefix = policy.spec.image_size ** 2 // 16 + 4  # 4 x 4 patches with two stride-2 stages, 4 text tokens
    assert embeds.shape[1] == prefix + 3 and mask.shape == (1, prefix + 3) and not ar.any()
    ids = BinTokenizer(n_bins=256, vocab_size=266).encode(jnp.asarray(state))
    np.testing.assert_array_equal(embeds[0, prefix:], policy.backbone.embed_tokens(ids)[0])
    assert int(ids.min()) >= 10  # never a text id


def test_discrete_state_is_invariant_within_a_bin_and_changes_across_bins():
    policy, _ = _policy("discrete")
    width = 2.0 / 255  # OpenVLA's bins: 256 linspace edges over [-1, 1]
    base = np.array([[0.1, -0.3, 0.7]], np.float32)
    base = ((np.floor((base + 1) / width) + 0.5) * width - 1).astype(np.float32)  # bin centres
    same = base + 0.2 * width
    other = base + np.array([[width, 0, 0]], np.float32)
    ctx = [policy.context(_obs(s)).tokens for s in (base, same, other)]
    np.testing.assert_array_equal(ctx[0], ctx[1])
    assert float(jnp.abs(ctx[0] - ctx[2]).max()) > 1e-4


def test_unknown_state_input_lists_the_known_ones():
    with pytest.raises(ValueError, match="'prefix', 'discrete', 'head', 'none'"):
        _policy("tokens")
