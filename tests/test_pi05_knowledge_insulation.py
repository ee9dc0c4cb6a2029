"""π0.5 knowledge insulation: with it on, the flow loss sends no gradient into the VLM (SigLIP, projector, Gemma);
with it off (the policy's plain flow loss), the flow loss reaches the VLM through the keys / values the expert
attends to. The FAST cross-entropy that trains the VLM instead is the fast head's, tested in tests/test_heads_fast.py
and tests/test_pi0_fast_openpi.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlax.action_tokens import FastTokenizer
from vlax.build import build_policy
from vlax.policy import PolicySpec

H, A, B, CAMERA = 4, 3, 2, "base_0_rgb"
SPEC = PolicySpec(cameras=(CAMERA,), image_size=28, state_dim=A, action_dim=A, horizon=H, max_text_len=8,
                  state_input="none")
VLM = ("vision", "img_proj", "backbone")
GEMMA = dict(width=32, depth=1, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16)


def _model(ki: dict | None) -> dict:
    return {"preset": "pi05", "head": "flow_pi05", "state_input": "none", "knowledge_insulation": ki,
            "pi0": {"llm": GEMMA, "expert": {**GEMMA, "width": 16, "mlp_dim": 32}, "vocab_size": 256, "pi05": True,
                    "vision": {"variant": "So400m/14", "width": 16, "depth": 1, "mlp_dim": 32, "num_heads": 2,
                               "image_size": 28}}}


def _build(ki: dict | None):
    """A tiny π0.5 whose adaptive-norm gates are not yet zero: at openpi's initialisation (zero modulation) every
    expert block is gated off, so nothing, insulated or not, would reach the VLM through the expert."""
    policy = build_policy(_model(ki), SPEC, 256, nnx.Rngs(0))
    state = nnx.state(policy.head, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
    nnx.update(policy.head, jax.tree_util.tree_map_with_path(
        lambda path, x: 0.05 * jax.random.normal(next(keys), x.shape) if "modulation" in jax.tree_util.keystr(path)
        else x, state))
    return policy


@nnx.jit
def _grads(policy, obs, actions):
    """Largest |gradient| over each part of the policy of the insulated flow term and of the flow loss without
    insulation (what ``loss`` is when ``model.knowledge_insulation`` is off); and the loss values."""
    key = jax.random.key(0)
    terms = {"flow_loss": lambda m: m.loss(obs, actions, rngs=key)[1]["flow_loss"],
             "plain": lambda m: m.head.loss(m.context(obs), actions, rngs=key)[0]}
    out = {}
    for name, term in terms.items():
        grads = nnx.grad(term)(policy)
        out[name] = {part: jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(
            nnx.to_pure_dict(grads[part]))])) for part in (*VLM, "head")}
    return out, policy.loss(obs, actions, rngs=key)[1], terms["plain"](policy)


def test_the_flow_loss_does_not_reach_the_vlm_under_knowledge_insulation():
    rs = np.random.RandomState(0)
    chunks = np.clip(np.cumsum(rs.normal(0, 0.25, (32, H, A)), axis=1), -1, 1).astype(np.float32)
    obs = {"images": {CAMERA: rs.randint(0, 256, (B, 28, 28, 3)).astype(np.uint8)},
           "text_ids": rs.randint(4, 150, (B, 8)).astype(np.int32), "text_mask": np.ones((B, 8), bool)}
    tokenizer = FastTokenizer.fit(chunks, vocab_size=64, scale=10.0)
    policy = _build({"tokenizer": tokenizer, "fast_weight": 0.5})
    assert policy.fast_head is not None and _build(None).fast_head is None
    grads, metrics, plain = jax.tree.map(float, _grads(policy, obs, jnp.asarray(chunks[:B])))
    on, off = grads["flow_loss"], grads["plain"]
    assert all(on[part] == 0.0 for part in VLM) and on["head"] > 0, on  # the expert alone learns from the flow
    assert all(off[part] > 0 for part in VLM), off  # without insulation the flow loss reaches the VLM
    # the insulation changes gradients only: the same flow loss value, added to the weighted FAST loss
    np.testing.assert_allclose(metrics["flow_loss"], plain, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], metrics["flow_loss"] + 0.5 * metrics["fast_loss"], rtol=1e-6)
