"""The LSTM policy head's options: padding leaves the recurrence alone, the per-frame MLP variant, which frame
predicts what, and the horizon check of every-frame supervision. (Its numbers equal torch.nn.LSTM and RoboFlamingo's
towers: tests/test_weights_roboflamingo.py.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlax.heads import get_head
from vlax.nn import HeadContext

SMALL = dict(hidden_dim=8, num_layers=2, tower_dims=(8,), dropout=0.0)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _call(graphdef, method, state, ctx):
    return getattr(nnx.merge(graphdef, state), method)(ctx)


def _run(head, method, ctx):
    graphdef, state = nnx.split(head)
    return np.asarray(_call(graphdef, method, state, ctx))


def _ctx(n=5, seed=0):
    tokens = jnp.asarray(np.random.default_rng(seed).normal(size=(2, n, 6)), jnp.float32)
    return HeadContext(tokens=tokens, mask=jnp.ones((2, n), bool))


def test_padded_steps_leave_the_state_unchanged_and_last_frame_reads_the_last_real_token():
    head = get_head("lstm", action_dim=3, horizon=4, context=6, rngs=nnx.Rngs(0), **SMALL)
    ctx = _ctx()
    padded = ctx.replace(tokens=ctx.tokens.at[:, 3:].set(9.0), mask=ctx.mask.at[:, 3:].set(False))
    short = HeadContext(tokens=ctx.tokens[:, :3], mask=ctx.mask[:, :3])
    np.testing.assert_allclose(_run(head, "features", padded)[:, 2], _run(head, "features", short)[:, 2], atol=1e-6)
    np.testing.assert_allclose(_run(head, "sample", padded), _run(head, "sample", short), atol=1e-6)
    assert _run(head, "sample", ctx).shape == (2, 4, 3)


def test_mlp_variant_reads_each_frame_alone_and_every_frame_supervision_checks_the_horizon():
    head = get_head("lstm", action_dim=3, horizon=6, context=6, temporal="mlp", supervise="every_frame",
                    steps_per_frame=2, rngs=nnx.Rngs(0), **SMALL)
    assert head.rnn is None
    ctx = _ctx()
    chunk = _run(head, "sample", ctx)
    changed = _run(head, "sample", ctx.replace(tokens=ctx.tokens.at[:, 0].set(0.0)))
    assert chunk.shape == (2, 6, 3)
    np.testing.assert_array_equal(chunk[:, 1:], changed[:, 1:])  # frame 0 predicts only chunk index 0
    loss, metrics = head.loss(ctx, jnp.zeros((2, 6, 3)), rngs=jax.random.key(0))
    assert np.isfinite(float(loss)) and float(metrics["gripper"]) > 0
    with pytest.raises(ValueError, match=r"reads 4 frames predicting steps_per_frame=2 actions each, so the chunk "
                                         r"must have 5 steps; the head's horizon is 6"):
        head.sample(_ctx(n=4))
    with pytest.raises(ValueError, match=r"unknown temporal model 'gru'; known: \['lstm', 'mlp', 'gpt'\]"):
        get_head("lstm", action_dim=3, horizon=6, context=6, temporal="gru")
