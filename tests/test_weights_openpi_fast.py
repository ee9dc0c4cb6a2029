"""π0-FAST from openpi's params layout, and the openpi key map checked by a round trip.

There is no openpi π0-FAST reference, so the proof is structural: (1) openpi -> vlax -> openpi gives back every
array of the tiny π0 / π0.5 fixtures and of a π0-FAST tree bit for bit; (2) the π0-FAST tree, built here in openpi's
layout as the PaliGemma part of the π0 fixture and written as an orbax ``params/`` checkpoint, loads into a
``fast``-head policy whose prefix and LM logits equal the π0 policy's PaliGemma path on the same weights (1e-5), and
whose head decodes a chunk through Gemma's tied LM head.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from vlax.action_tokens import FastTokenizer
from vlax.nn.lm_decoding import prefix_next_logits
from vlax.policy import PolicySpec
from vlax.weights.common import CheckpointError
from vlax.weights.openpi import convert_params, detect_variant, load_openpi, read_params
from vlax.weights.openpi_export import openpi_params

FIXTURES = Path(__file__).parent / "fixtures" / "openpi"
CAMERA = "base_0_rgb"  # one camera of the fixture keeps the compiled prefix small
SPEC = PolicySpec(cameras=(CAMERA,), image_size=224, state_dim=8, action_dim=8, horizon=10, max_text_len=16,
                  state_input="head")


def _paligemma_only(flat: dict) -> dict:
    """openpi's π0-FAST tree: the PaliGemma weights without the expert ('_1') or the flow projections."""
    return {k: v for k, v in flat.items() if k.startswith("PaliGemma/img/") or (
        k.startswith("PaliGemma/llm/") and not any(part.endswith("_1") for part in k.split("/")))}


def _nested(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


@pytest.fixture(scope="module")
def trees():
    return {name: read_params(FIXTURES / name / "params") for name in ("pi0_tiny", "pi05_tiny")}


@pytest.mark.parametrize("name", ["pi0_tiny", "pi05_tiny", "pi0_fast"])
def test_openpi_key_map_round_trips_bit_for_bit(trees, name):
    flat = _paligemma_only(trees["pi0_tiny"]) if name == "pi0_fast" else trees[name]
    assert detect_variant(flat) == name.removesuffix("_tiny")
    ours, _ = convert_params(flat)
    if name == "pi0_fast":
        assert not any(k.startswith("head.") for k in ours)
    q = flat["PaliGemma/llm/layers/attn/q_einsum/w"]
    vision_heads = flat["PaliGemma/img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"]
    back = openpi_params(ours, vision_heads=vision_heads.shape[2], heads=q.shape[1],
                         kv_heads=flat["PaliGemma/llm/layers/attn/kv_einsum/w"].shape[2])
    assert back.keys() == flat.keys(), sorted(set(back) ^ set(flat))
    for key in flat:
        assert back[key].shape == flat[key].shape, key
        if key.endswith("_1/scale"):
            # the expert's Gemma norms are held as the plain scale 1 + w: (1 + w) - 1 is w (~0 here) rounded to
            # float32's spacing at 1, half an ulp at most; every other array is a pure relayout
            np.testing.assert_allclose(back[key], flat[key], rtol=0, atol=2.0 ** -24, err_msg=key)
        else:
            np.testing.assert_array_equal(back[key], flat[key], err_msg=key)


@pytest.fixture(scope="module")
def policies(trees, tmp_path_factory):
    import orbax.checkpoint as ocp

    path = tmp_path_factory.mktemp("pi0_fast") / "params"
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path, {"params": _nested(_paligemma_only(trees["pi0_tiny"]))})
    rs = np.random.RandomState(0)
    chunks = np.cumsum(rs.normal(0, 0.1, (64, 10, 8)), axis=1).astype(np.float32)  # smooth, like trajectories
    tokenizer = FastTokenizer.fit(chunks, vocab_size=64)
    fast, sizes = load_openpi(path, {"head_kwargs": {"tokenizer": tokenizer, "max_tokens": 12}}, SPEC)
    pi0, _ = load_openpi(FIXTURES / "pi0_tiny" / "params", {}, SPEC)
    ref = dict(np.load(FIXTURES / "pi0_tiny" / "reference.npz"))
    obs = {"images": {CAMERA: ref[f"obs/image/{CAMERA}"]}, "state": ref["obs/state"],
           "text_ids": ref["obs/tokenized_prompt"], "text_mask": ref["obs/tokenized_prompt_mask"]}
    return fast, pi0, obs, path, tokenizer


def _prefix(policy, obs):
    ctx = policy.context(obs)
    return ctx, (ctx.tokens, policy.backbone.logits(ctx.tokens), prefix_next_logits(ctx, policy.backbone))


@nnx.jit
def _pi0_prefix(policy, obs):
    return _prefix(policy, obs)[1]


@nnx.jit
def _fast_prefix_and_chunk(policy, obs):  # one compiled call for both tests of the FAST policy
    ctx, outputs = _prefix(policy, obs)
    return outputs, policy.head.sample_with_validity(ctx, rngs=jax.random.key(0), lm=policy.backbone)


@pytest.fixture(scope="module")
def fast_outputs(policies):
    fast, _, obs, _, _ = policies
    return jax.tree.map(np.asarray, _fast_prefix_and_chunk(fast, obs))


def test_pi0_fast_logits_equal_the_pi0_paligemma_path(policies, fast_outputs):
    fast, pi0, obs, _, _ = policies
    assert type(fast.head).__name__ == "FastHead" and not hasattr(fast.head, "expert")
    # the same weights through the same modules: equal up to XLA fusing the FAST policy's prefix together with
    # its decoding loop (measured 1.5e-6; compiled alone, the two prefixes are bit-identical)
    for a, b, what in zip(fast_outputs[0], _pi0_prefix(pi0, obs), ("prefix output", "LM logits",
                                                                    "first decoding logits")):
        np.testing.assert_allclose(a, np.asarray(b), rtol=0, atol=1e-5, err_msg=what)


def test_pi0_fast_decodes_a_chunk_through_the_tied_lm_head(fast_outputs):
    actions, valid = fast_outputs[1]
    assert actions.shape == (2, 10, 8) and np.isfinite(actions).all()
    # random weights emit arbitrary FAST ids: a sequence the tokenizer cannot decode is zeros, flagged invalid
    assert not actions[~valid].any()


def test_a_pi0_fast_checkpoint_needs_the_fast_head_and_its_tokenizer(policies):
    _, _, _, path, _ = policies
    with pytest.raises(CheckpointError, match="π0-FAST.*model.head='fast'"):
        load_openpi(path, {"head": "flow"}, SPEC)
    with pytest.raises(ValueError, match="head_kwargs.tokenizer"):
        load_openpi(path, {}, SPEC)
