"""Decoding action tokens through the backbone's own LM head and KV cache (heads that emit vocabulary ids).

The prefix (images, text, state) is already in ``ctx.cache``; the first action token's logits come from the last
real prefix position's hidden state, every later one from :meth:`LanguageModel.decode_step` appending the
previous token to the cache. Training feeds the targets (teacher forcing) in one ``decode_step`` call; sampling
scans one token at a time.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vlax.nn.context import HeadContext, LanguageModel, unpack_decode
from vlax.nn.head_base import last_valid_index


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-position cross-entropy ``[...]`` of ``logits [..., V]`` (computed in float32) at int ``labels [...]``."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def check_decode_room(ctx: HeadContext, lm: LanguageModel | None, new_tokens: int, who: str) -> None:
    """One error naming the fix when ``lm`` or the cache is missing, or the cache cannot take ``new_tokens``."""
    if lm is None:
        raise ValueError(f"{who} decodes through the backbone: pass lm=<LanguageModel>")
    if ctx.cache is None:
        raise ValueError(f"{who} needs ctx.cache (the backbone's prefix KV cache)")
    free = ctx.cache.max_len - ctx.tokens.shape[1]
    if new_tokens > free:
        raise ValueError(f"the KV cache has {ctx.cache.max_len} slots for a {ctx.tokens.shape[1]}-token prefix "
                         f"but decoding needs {new_tokens} more; build the cache with cache_size >= "
                         f"{ctx.tokens.shape[1] + new_tokens}")


def prefix_next_logits(ctx: HeadContext, lm: LanguageModel) -> jax.Array:
    """Next-token logits ``[B, V]`` after the last real prefix token."""
    last = last_valid_index(ctx.mask)
    hidden = jnp.take_along_axis(ctx.tokens, last[:, None, None], axis=1)  # [B, 1, D]
    return lm.logits(hidden)[:, 0]


def teacher_forced_logits(ctx: HeadContext, lm: LanguageModel, targets: jax.Array) -> jax.Array:
    """Logits ``[B, T, V]`` predicting each of ``targets [B, T]`` from the prefix and the targets before it."""
    first = prefix_next_logits(ctx, lm)[:, None]
    if targets.shape[1] == 1:
        return first
    rest, _ = unpack_decode(lm.decode_step(targets[:, :-1], ctx.cache))
    return jnp.concatenate([first, rest.astype(first.dtype)], axis=1)


def autoregressive_decode(ctx: HeadContext, lm: LanguageModel, num_tokens: int,
                          choose: Callable[[jax.Array, jax.Array], jax.Array], key: jax.Array) -> jax.Array:
    """``num_tokens`` ids ``[B, num_tokens]``, each ``choose(logits [B, V], key) -> [B]`` of the previous ones."""
    keys = jax.random.split(key, num_tokens)
    first = choose(prefix_next_logits(ctx, lm), keys[0])
    if num_tokens == 1:
        return first[:, None]

    def step(carry, k):
        token, cache = carry
        logits, cache = unpack_decode(lm.decode_step(token[:, None], cache))
        nxt = choose(logits[:, -1], k)
        return (nxt, cache), nxt

    _, rest = jax.lax.scan(step, (first, ctx.cache), keys[1:])
    return jnp.concatenate([first[:, None], rest.T], axis=1)
