"""The GPT variant of RoboFlamingo's policy head (``temporal="gpt"``, its GPTDecoder) against transformers'
``GPT2Model`` run on ``inputs_embeds``: RoboFlamingo's trajectory GPT-2 is transformers' GPT-2 without the token
embedding, so that model with the head's weights is the reference (fp32, <= 1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from vlax.heads import get_head
from vlax.nn import HeadContext

D, T, LAYERS, HEADS = 16, 5, 2, 4


def _head(width=D, **kw):
    return get_head("lstm", action_dim=3, horizon=2, context=width, temporal="gpt", hidden_dim=D, num_layers=LAYERS,
                    gpt_heads=HEADS, max_frames=6, tower_dims=(8,), rngs=nnx.Rngs(0), **kw)


def _reference(head) -> transformers.GPT2Model:
    """transformers' GPT-2 holding the head's weights (Conv1D weights are [in, out], as vlax's kernels)."""
    cfg = transformers.GPT2Config(n_layer=LAYERS, n_head=HEADS, n_embd=D, n_positions=6, vocab_size=1,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2Model(cfg).eval()
    t = lambda a: torch.tensor(np.asarray(a[...]))  # noqa: E731
    sd = {"wpe.weight": t(head.gpt_positions), "ln_f.weight": t(head.gpt.final_norm.scale),
          "ln_f.bias": t(head.gpt.final_norm.bias)}
    for i, blk in enumerate(head.gpt.layers):
        a = blk.attn
        p = f"h.{i}."
        sd |= {p + "ln_1.weight": t(blk.norm1.scale), p + "ln_1.bias": t(blk.norm1.bias),
               p + "ln_2.weight": t(blk.norm2.scale), p + "ln_2.bias": t(blk.norm2.bias),
               p + "attn.c_attn.weight": torch.cat([t(a.q_proj.kernel), t(a.k_proj.kernel), t(a.v_proj.kernel)], 1),
               p + "attn.c_attn.bias": torch.cat([t(a.q_proj.bias), t(a.k_proj.bias), t(a.v_proj.bias)]),
               p + "attn.c_proj.weight": t(a.o_proj.kernel), p + "attn.c_proj.bias": t(a.o_proj.bias),
               p + "mlp.c_fc.weight": t(blk.mlp.fc1.kernel), p + "mlp.c_fc.bias": t(blk.mlp.fc1.bias),
               p + "mlp.c_proj.weight": t(blk.mlp.fc2.kernel), p + "mlp.c_proj.bias": t(blk.mlp.fc2.bias)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert set(missing) <= {"wte.weight"} and not unexpected, (missing, unexpected)
    return model


def _features(head, ctx):
    graphdef, state = nnx.split(head)
    return np.asarray(jax.jit(lambda s, c: nnx.merge(graphdef, s).features(c))(state, ctx))


def test_gpt_features_equal_transformers_gpt2():
    head = _head()
    x = np.random.default_rng(0).normal(size=(2, T, D)).astype(np.float32)
    with torch.no_grad():
        want = _reference(head)(inputs_embeds=torch.tensor(x)).last_hidden_state.numpy()
    got = _features(head, HeadContext(tokens=jnp.asarray(x), mask=jnp.ones((2, T), bool)))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_an_episode_start_padded_on_the_left_equals_the_short_history():
    """Left padding (vlax's history at an episode's start) sees what RoboFlamingo's growing memory sees: the real
    frames alone, numbered from 0; transformers with that attention mask and position ids agrees."""
    head = _head()
    x = np.random.default_rng(1).normal(size=(2, T, D)).astype(np.float32)
    mask = np.ones((2, T), bool)
    mask[0, :2] = False
    x[0, :2] = 7.0
    got = _features(head, HeadContext(tokens=jnp.asarray(x), mask=jnp.asarray(mask)))
    short = _features(head, HeadContext(tokens=jnp.asarray(x[:1, 2:]), mask=jnp.ones((1, T - 2), bool)))
    np.testing.assert_allclose(got[0, 2:], short[0], atol=1e-5, rtol=0)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        want = _reference(head)(inputs_embeds=torch.tensor(x), attention_mask=torch.tensor(mask.astype(np.int64)),
                                position_ids=torch.tensor(positions)).last_hidden_state.numpy()
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-5, rtol=0)
    assert np.isfinite(got).all()


def test_projection_trains_and_samples_and_bad_sizes():
    head = _head(width=12)  # 12-wide frames: RoboFlamingo's fc to the GPT width
    ctx = HeadContext(tokens=jnp.ones((2, T, 12)), mask=jnp.ones((2, T), bool))
    loss, _ = head.loss(ctx, jnp.zeros((2, 2, 3)), rngs=jax.random.key(0))
    assert np.isfinite(float(loss))
    assert head.sample(ctx).shape == (2, 2, 3)
    with pytest.raises(ValueError, match="max_frames=6"):
        head.features(HeadContext(tokens=jnp.ones((1, 7, 12)), mask=jnp.ones((1, 7), bool)))
    with pytest.raises(ValueError, match="not a multiple of gpt_heads"):
        get_head("lstm", action_dim=3, horizon=2, context=12, temporal="gpt", hidden_dim=10, gpt_heads=4,
                 rngs=nnx.Rngs(0))
