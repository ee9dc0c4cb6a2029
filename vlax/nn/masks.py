"""One attention-mask primitive for every layout (prefix-LM, causal, block-causal).

Each token carries ``ar`` (autoregressive) flag: a token with ``ar = 1`` starts a new block that earlier tokens
cannot see; tokens with ``ar = 0`` join the current block and see it bidirectionally. Token ``i`` attends to
token ``j`` iff ``cumsum(ar)[j] <= cumsum(ar)[i]`` and both are valid (``input_mask``). So:

* ``ar = [0, 0, 0, 0]``            -> full bidirectional attention;
* ``ar = [1, 1, 1, 1]``            -> causal;
* ``ar = [0, 0, 1, 1]``            -> prefix-LM (bidirectional prefix, causal suffix);
* ``ar = [0, 0, 1, 0, 1, 0]``      -> block-causal (blocks ``{0,1}``, ``{2,3}``, ``{4,5}``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def make_attn_mask(input_mask: jax.Array, ar_mask: jax.Array) -> jax.Array:
    """Boolean mask ``[B, N, N]`` (query, key) from ``input_mask [B, N]`` and ``ar_mask [B, N]`` or ``[N]``."""
    input_mask = jnp.asarray(input_mask, bool)
    ar_mask = jnp.broadcast_to(jnp.asarray(ar_mask, jnp.int32), input_mask.shape)
    blocks = jnp.cumsum(ar_mask, axis=1)
    visible = blocks[:, None, :] <= blocks[:, :, None]
    valid = input_mask[:, None, :] & input_mask[:, :, None]
    return visible & valid


def prefix_suffix_mask(prefix_mask: jax.Array, suffix_mask: jax.Array, suffix_ar: jax.Array) -> jax.Array:
    """Mask ``[B, S, P + S]`` for suffix queries attending to a cached prefix (all of it) plus themselves.

    ``prefix_mask [B, P]`` marks valid prefix slots; ``suffix_mask [B, S]`` and ``suffix_ar [S]`` describe the
    suffix with the same cumulative-sum rule as :func:`make_attn_mask` (the prefix counts as block 0).
    """
    to_prefix = jnp.broadcast_to(prefix_mask[:, None, :].astype(bool), (suffix_mask.shape[0], suffix_mask.shape[1], prefix_mask.shape[1]))
    to_prefix = to_prefix & suffix_mask[:, :, None].astype(bool)
    to_suffix = make_attn_mask(suffix_mask, suffix_ar)
    return jnp.concatenate([to_prefix, to_suffix], axis=-1)


def positions_from_mask(input_mask: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """Position ids ``[B, N]`` that skip padding: ``cumsum(mask) - 1 + offset`` (``offset`` scalar or ``[B]``)."""
    offset = jnp.asarray(offset, jnp.int32)
    if offset.ndim == 1:
        offset = offset[:, None]
    return jnp.cumsum(jnp.asarray(input_mask, jnp.int32), axis=1) - 1 + offset
