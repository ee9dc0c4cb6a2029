"""The mask primitive on hand-written layouts."""

import jax.numpy as jnp
import numpy as np

from vlax.nn import make_attn_mask, positions_from_mask, prefix_suffix_mask


def _mask(input_mask, ar):
    return np.asarray(make_attn_mask(jnp.asarray([input_mask], bool), jnp.asarray(ar)))[0].astype(int)


def test_bidirectional():
    np.testing.assert_array_equal(_mask([1, 1, 1], [0, 0, 0]), np.ones((3, 3), int))


def test_causal():
    np.testing.assert_array_equal(_mask([1, 1, 1, 1], [1, 1, 1, 1]), np.tril(np.ones((4, 4), int)))


def test_prefix_lm():
    expected = np.array([
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 0],
        [1, 1, 1, 1],
    ])
    np.testing.assert_array_equal(_mask([1, 1, 1, 1], [0, 0, 1, 1]), expected)


def test_block_causal():
    # Blocks {0,1} (image+text), {2} (state), {3,4} (actions): pi0's layout.
    expected = np.array([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1],
    ])
    np.testing.assert_array_equal(_mask([1] * 5, [0, 0, 1, 1, 0]), expected)


def test_padding_is_invisible_and_blind():
    # Second token is padding: nobody sees it, it sees nothing.
    expected = np.array([
        [1, 0, 0],
        [0, 0, 0],
        [1, 0, 1],
    ])
    np.testing.assert_array_equal(_mask([1, 0, 1], [0, 0, 1]), expected)


def test_per_example_ar_mask():
    m = make_attn_mask(jnp.ones((2, 3), bool), jnp.asarray([[0, 0, 0], [1, 1, 1]]))
    np.testing.assert_array_equal(np.asarray(m[0]), np.ones((3, 3), bool))
    np.testing.assert_array_equal(np.asarray(m[1]), np.tril(np.ones((3, 3), bool)))


def test_prefix_suffix_mask():
    m = prefix_suffix_mask(jnp.asarray([[1, 1, 0]], bool), jnp.asarray([[1, 1]], bool), jnp.asarray([1, 0]))
    expected = np.array([
        [1, 1, 0, 1, 1],
        [1, 1, 0, 1, 1],
    ])
    np.testing.assert_array_equal(np.asarray(m[0]).astype(int), expected)


def test_positions_skip_padding():
    pos = positions_from_mask(jnp.asarray([[1, 1, 0, 1], [0, 1, 1, 1]]), offset=jnp.asarray([0, 5]))
    np.testing.assert_array_equal(np.asarray(pos), [[0, 1, 1, 2], [4, 5, 6, 7]])
