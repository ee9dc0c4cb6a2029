"""T5 text encoder (the encoder half of T5 / T5 v1.1), equal to transformers' ``T5EncoderModel``.

* Token embedding (``shared``), then ``num_layers`` pre-norm blocks: self-attention, then a feed-forward layer;
  a final norm. Dropout is not modelled (inference and frozen use).
* Norms are T5's ``T5LayerNorm``: RMS scaling without mean subtraction and without bias (eps 1e-6).
* Attention is unscaled (T5 folds ``1/sqrt(d_kv)`` into its initialisation) and adds a learned relative position
  bias: bidirectional log-spaced buckets (32 buckets up to distance 128 by default), one table in the first
  block, shared by every block.
* Feed-forward: ``relu`` (original T5: ``wo(relu(wi(x)))``) or ``gated-gelu`` (T5 v1.1 / Flan:
  ``wo(gelu_tanh(wi_0(x)) * wi_1(x))``).

Weights: :mod:`vlax.weights.t5` (HF ``T5EncoderModel`` / ``T5ForConditionalGeneration`` safetensors, or the
HF-Flax tree Octo stores).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from vlax.nn import Dense, Embed, RMSNorm, activation

FEED_FORWARD = ("relu", "gated-gelu", "gated-relu")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Sizes of a T5 encoder (the names of transformers' ``T5Config``)."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "relu"
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        if self.feed_forward_proj not in FEED_FORWARD:
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}; known: {list(FEED_FORWARD)}")


# t5-base, the encoder Octo embeds its instructions with (109,628,544 parameters with the shared embedding)
T5_BASE = T5Config()


def relative_position_buckets(query_len: int, key_len: int, num_buckets: int = 32, max_distance: int = 128
                              ) -> np.ndarray:
    """Bidirectional bucket ids ``[query_len, key_len]`` of ``key - query`` (T5's ``_relative_position_bucket``).

    Half the buckets hold positive offsets; within each half, distances below a quarter of the buckets are exact
    and the rest are log-spaced up to ``max_distance`` (float32 arithmetic, as the reference computes it).
    """
    relative = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]
    half = num_buckets // 2
    buckets = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        scaled = (np.log(distance.astype(np.float32) / np.float32(max_exact))
                  / np.float32(math.log(max_distance / max_exact)) * np.float32(half - max_exact))
    large = max_exact + np.where(distance >= max_exact, scaled, 0).astype(np.int64)
    large = np.minimum(large, half - 1)
    return buckets + np.where(distance < max_exact, distance, large)


class T5Attention(nnx.Module):
    """Unscaled multi-head self-attention with an additive bias ``[1 or B, H, T, T]``; no projection biases."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        inner = config.num_heads * config.d_kv
        self.num_heads, self.d_kv = config.num_heads, config.d_kv
        self.q = Dense(config.d_model, inner, use_bias=False, axes=("embed", "heads"), rngs=rngs)
        self.k = Dense(config.d_model, inner, use_bias=False, axes=("embed", "kv"), rngs=rngs)
        self.v = Dense(config.d_model, inner, use_bias=False, axes=("embed", "kv"), rngs=rngs)
        self.o = Dense(inner, config.d_model, use_bias=False, axes=("heads", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
        """``x [B, T, D]``, ``bias [1, H, T, T]``, ``mask [B, T]`` (real keys) -> ``[B, T, D]``."""
        split = lambda y: rearrange(y, "b t (h d) -> b h t d", d=self.d_kv)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.o(rearrange(jnp.einsum("bhqk,bhkd->bhqd", probs, v), "b h t d -> b t (h d)"))


class T5FeedForward(nnx.Module):
    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_ff
        self.gated = config.feed_forward_proj.startswith("gated-")
        self.act = activation("gelu_tanh" if config.feed_forward_proj == "gated-gelu" else "relu")
        if self.gated:
            self.wi_0 = Dense(d, f, use_bias=False, axes=("embed", "mlp"), rngs=rngs)
            self.wi_1 = Dense(d, f, use_bias=False, axes=("embed", "mlp"), rngs=rngs)
        else:
            self.wi = Dense(d, f, use_bias=False, axes=("embed", "mlp"), rngs=rngs)
        self.wo = Dense(f, d, use_bias=False, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.gated:
            return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))
        return self.wo(self.act(self.wi(x)))


class T5Block(nnx.Module):
    """``x += attn(norm(x)); x += ff(norm(x))``."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        eps = config.layer_norm_epsilon
        self.attn_norm = RMSNorm(config.d_model, eps=eps, rngs=rngs)
        self.attn = T5Attention(config, rngs=rngs)
        self.ff_norm = RMSNorm(config.d_model, eps=eps, rngs=rngs)
        self.ff = T5FeedForward(config, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), bias, mask)
        return x + self.ff(self.ff_norm(x))


class T5Encoder(nnx.Module):
    """Token ids ``[B, T]`` (+ ``mask [B, T]``) -> ``last_hidden_state [B, T, d_model]``."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = Embed(config.vocab_size, config.d_model, rngs=rngs)
        self.relative_bias = Embed(config.relative_attention_num_buckets, config.num_heads, rngs=rngs)
        self.layers = nnx.List([T5Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.d_model, eps=config.layer_norm_epsilon, rngs=rngs)

    def position_bias(self, length: int) -> jax.Array:
        """``[1, H, T, T]`` learned bias of every (query, key) offset."""
        c = self.config
        buckets = relative_position_buckets(length, length, c.relative_attention_num_buckets,
                                            c.relative_attention_max_distance)
        return jnp.transpose(self.relative_bias(jnp.asarray(buckets)), (2, 0, 1))[None].astype(jnp.float32)

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """``ids [B, T]`` int, ``mask [B, T]`` (True: real token; padding is never attended to) -> ``[B, T, D]``."""
        mask = jnp.ones(ids.shape, bool) if mask is None else jnp.asarray(mask, bool)
        x = self.embed(ids)
        bias = self.position_bias(ids.shape[1])
        for layer in self.layers:
            x = layer(x, bias, mask)
        return self.final_norm(x)


__all__ = ["T5Config", "T5Encoder", "T5_BASE", "relative_position_buckets"]
