"""The conv stem: token grid shapes, input dtypes, gradients reach every parameter, resolution changes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlax.encoders import ConvStem, get_encoder
from vlax.nn import logical_axes_of


@pytest.fixture(scope="module")
def stem():
    return ConvStem(64, image_size=64, channels=(16, 32, 32), num_groups=8, rngs=nnx.Rngs(0))


def test_default_stem_gives_64_tokens_for_128px():
    stem = nnx.eval_shape(lambda: get_encoder("conv_stem", rngs=nnx.Rngs(0)))  # shapes only
    graphdef, state = nnx.split(stem)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                         jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.uint8))
    assert out.shape == (2, 64, 128)


def test_uint8_and_unit_float_inputs_agree(stem):
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    run = nnx.jit(lambda m, x: m(x))
    from_uint8 = run(stem, jnp.asarray(images))
    from_float = run(stem, jnp.asarray(images, jnp.float32) / 255.0)
    assert from_uint8.shape == (2, 64, 64)  # 64 px / 2^3 = 8 x 8 tokens of width 64
    np.testing.assert_allclose(from_uint8, from_float, atol=1e-5)
    assert np.isfinite(np.asarray(from_uint8)).all()


def test_gradients_reach_every_parameter(stem):
    graphdef, params = nnx.split(stem, nnx.Param)
    x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p)(x) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    for path, g in nnx.to_flat_state(grads):
        assert float(jnp.abs(g.get_value()).sum()) > 0, path


def test_other_resolution_resizes_positions(stem):
    out = nnx.jit(lambda m, x: m(x))(stem, jnp.zeros((1, 48, 80, 3)))
    assert out.shape == (1, 6 * 10, 64)


def test_parameters_carry_logical_axes(stem):
    for path, var in nnx.to_flat_state(nnx.state(stem, nnx.Param)):
        axes = logical_axes_of(var)
        assert len(axes) == var.get_value().ndim and axes[-1] == "embed", path


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"channels \[12, 32\] must be multiples of num_groups=8"):
        ConvStem(32, channels=(12, 32), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="image_size=8 is too small for 4 stride-2 stages"):
        ConvStem(32, image_size=8, rngs=nnx.Rngs(0))


def test_keypoint_tokens_follow_a_small_marker_and_train():
    """keypoints=K appends K soft-argmax tokens from the quarter-size map; moving a 2-pixel marker moves them, and
    every parameter (keypoint maps and embeddings included) gets a gradient."""
    stem = ConvStem(32, image_size=32, channels=(16, 16, 16), keypoints=4, rngs=nnx.Rngs(0))
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[0, 4:6, 4:6] = 255
    images[1, 26:28, 20:22] = 255
    out = nnx.jit(lambda m, x: m(x))(stem, jnp.asarray(images))
    assert out.shape == (2, 4 * 4 + 4, 32)
    assert float(jnp.abs(out[0, 16:] - out[1, 16:]).max()) > 1e-3
    graphdef, params = nnx.split(stem, nnx.Param)
    grads = jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(jnp.asarray(images)) ** 2)))(params)
    for path, g in nnx.to_flat_state(grads):
        assert float(jnp.abs(g.get_value()).sum()) > 0, path
    with pytest.raises(ValueError, match="keypoint_stage=4"):
        ConvStem(32, image_size=32, channels=(16, 16, 16), keypoints=4, keypoint_stage=4, rngs=nnx.Rngs(0))
