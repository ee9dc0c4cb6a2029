"""Optimizer: frozen parameters stay bit-identical, groups get their learning rates, accumulation is exact."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vlax.train.optimizer import OptimizerConfig, ema_update, frozen_paths, make_optimizer, schedule


def _params():
    k = jax.random.split(jax.random.key(0), 3)
    return {"encoder": {"kernel": jax.random.normal(k[0], (4, 4)), "bias": jnp.zeros(4)},
            "backbone": {"kernel": jax.random.normal(k[1], (4, 4))},
            "head": {"kernel": jax.random.normal(k[2], (4, 2))}}


def _loss(p, x):
    h = jnp.tanh(x @ p["encoder"]["kernel"] + p["encoder"]["bias"])
    return jnp.mean((jnp.tanh(h @ p["backbone"]["kernel"]) @ p["head"]["kernel"] - 1.0) ** 2)


def _train(cfg, steps=4, params=None):
    params = _params() if params is None else params
    tx = make_optimizer(cfg, params)
    state = tx.init(params)
    x = jax.random.normal(jax.random.key(1), (8, 4))
    for _ in range(steps):
        grads = jax.grad(_loss)(params, x)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_frozen_parameters_are_bit_identical():
    cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10, freeze=r"^encoder/")
    before = _params()
    after = _train(cfg)
    assert frozen_paths(before, cfg) == ["encoder/bias", "encoder/kernel"]
    np.testing.assert_array_equal(after["encoder"]["kernel"], before["encoder"]["kernel"])
    np.testing.assert_array_equal(after["encoder"]["bias"], before["encoder"]["bias"])
    assert np.abs(after["head"]["kernel"] - before["head"]["kernel"]).max() > 0


def test_group_learning_rate_zero_matches_freezing_and_multiplier_scales():
    before = _params()
    after = _train(OptimizerConfig(learning_rate=1e-2, warmup_steps=1, weight_decay=0.0,
                                   groups=[(r"^backbone/", 0.0)]))
    np.testing.assert_array_equal(after["backbone"]["kernel"], before["backbone"]["kernel"])
    assert np.abs(after["head"]["kernel"] - before["head"]["kernel"]).max() > 0


def test_gradient_accumulation_equals_large_batch_step():
    # Two micro-batches of the same data accumulated == one step on that data (mean of equal gradients).
    cfg1 = OptimizerConfig(learning_rate=1e-2, warmup_steps=1, weight_decay=0.0, grad_clip_norm=None)
    cfg2 = OptimizerConfig(learning_rate=1e-2, warmup_steps=1, weight_decay=0.0, grad_clip_norm=None,
                           accumulate_steps=2)
    one = _train(cfg1, steps=1)
    two = _train(cfg2, steps=2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), one, two)


def test_schedule_warmup_and_cosine():
    s = schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=10, total_steps=110))
    assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6 and abs(float(s(60)) - 0.5) < 1e-6
    assert abs(float(s(110))) < 1e-6


def test_ema():
    ema = ema_update({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, 0.9)
    np.testing.assert_allclose(ema["w"], [0.1, 0.1], rtol=1e-6)


def test_bad_accumulation_is_refused():
    with pytest.raises(ValueError, match="accumulate_steps must be >= 1, got 0"):
        make_optimizer(OptimizerConfig(accumulate_steps=0), _params())
