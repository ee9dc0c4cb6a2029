"""Multi-head / multi-query / grouped-query attention with RoPE, soft-capping and a key/value cache."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from vlax.nn.linear import Dense
from vlax.nn.rope import RopeConfig, apply_rope, inverse_frequencies

Implementation = Literal["xla", "cudnn", "einsum"] | None


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    implementation: Implementation = None,
) -> jax.Array:
    """Softmax attention. ``q [B, T, N, Dh]``, ``k, v [B, S, K, Dh]`` (``N % K == 0``), ``mask [B, T, S]`` bool.

    ``implementation``: ``None``/``"xla"``/``"cudnn"`` go through ``jax.nn.dot_product_attention``; ``"einsum"``
    is the explicit reference path, also used whenever ``softcap`` is set (the fused kernels do not cap logits).
    Rows with no visible key return finite values (they are masked out downstream).
    """
    num_heads, num_kv = q.shape[2], k.shape[2]
    if num_heads % num_kv:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv})")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if softcap is None and implementation == "cudnn" and (q.shape[1] % CUDNN_BLOCK or k.shape[1] % CUDNN_BLOCK):
        return _cudnn_padded(q, k, v, mask, scale)
    if softcap is None and implementation != "einsum":
        m = None if mask is None else mask[:, None, :, :]
        return jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale, implementation=implementation)
    groups = num_heads // num_kv
    qg = rearrange(q, "b t (k g) d -> b t k g d", g=groups)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        logits = jnp.tanh(logits / softcap) * softcap
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return rearrange(out, "b t k g d -> b t (k g) d")


# cuDNN's fused backward kernel takes sequence lengths in multiples of this only (e.g. 213 prefix tokens fail).
CUDNN_BLOCK = 64


def _cudnn_padded(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, scale: float,
                  implementation: Implementation = "cudnn") -> jax.Array:
    """cuDNN attention on sequences padded to multiples of :data:`CUDNN_BLOCK`: padded keys are masked out,
    padded queries see every real key (finite rows) and are dropped, so the result equals the unpadded one."""
    t, s = q.shape[1], k.shape[1]
    pt, ps = -t % CUDNN_BLOCK, -s % CUDNN_BLOCK
    if mask is None:
        mask = jnp.ones((q.shape[0], t, s), bool)
    mask = jnp.pad(jnp.asarray(mask, bool), ((0, 0), (0, 0), (0, ps)))
    mask = jnp.concatenate([mask, jnp.broadcast_to(jnp.arange(s + ps) < s, (q.shape[0], pt, s + ps))], axis=1)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))  # noqa: E731
    out = jax.nn.dot_product_attention(pad(q, pt), pad(k, ps), pad(v, ps), mask=mask[:, None], scale=scale,
                                       implementation=implementation)
    return out[:, :t]


class Attention(nnx.Module):
    """Attention layer with projections ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``.

    One call covers the three ways a VLA uses attention, selected by ``kv`` and ``cache_index``:

    * ``kv=None``: self-attention over ``x``; returns this call's keys/values ``(k, v) [B, T, K, Dh]``.
    * ``kv=(k_prefix, v_prefix)`` and ``cache_index=None``: ``x`` attends to the given prefix keys followed by its
      own (an action expert sharing a backbone's per-layer prefix); returns its own ``(k, v)``.
    * ``kv=(k_buf, v_buf) [B, S, K, Dh]`` and ``cache_index``: writes this call's keys/values into the buffers at
      ``cache_index`` and attends to the whole buffer (incremental decoding); returns the updated buffers.

    ``mask [B, T, S_keys]`` is boolean over the keys attended to in each mode. ``kv_input`` (``[B, S, Dkv]``)
    turns it into cross-attention: keys/values come from ``kv_input`` instead of ``x``.
    """

    def __init__(
        self,
        features: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        *,
        kv_features: int | None = None,
        out_features: int | None = None,
        use_bias: bool = False,
        out_bias: bool | None = None,
        rope: RopeConfig | None = None,
        softcap: float | None = None,
        scale: float | None = None,
        implementation: Implementation = None,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = features // num_heads if head_dim is None else head_dim
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.softcap, self.scale, self.implementation = softcap, scale, implementation
        self.rope = rope
        kv_features = features if kv_features is None else kv_features
        out_features = features if out_features is None else out_features
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(features, num_heads * head_dim, use_bias=use_bias, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(kv_features, num_kv_heads * head_dim, use_bias=use_bias, axes=("embed", "kv"), **kw)
        self.v_proj = Dense(kv_features, num_kv_heads * head_dim, use_bias=use_bias, axes=("embed", "kv"), **kw)
        self.o_proj = Dense(num_heads * head_dim, out_features, use_bias=use_bias if out_bias is None else out_bias,
                            axes=("heads", "embed"), **kw)

    def _rotate(self, x: jax.Array, positions: jax.Array | None) -> jax.Array:
        if self.rope is None:
            return x
        if positions is None:
            raise ValueError("this attention layer uses RoPE: pass positions [B, T]")
        return apply_rope(x, positions, inverse_frequencies(self.head_dim, self.rope))

    def project_kv(self, x: jax.Array, positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Keys (after RoPE) and values of ``x [B, S, D]``: two ``[B, S, K, Dh]``."""
        k = rearrange(self.k_proj(x), "b s (k d) -> b s k d", d=self.head_dim)
        v = rearrange(self.v_proj(x), "b s (k d) -> b s k d", d=self.head_dim)
        return self._rotate(k, positions), v

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        kv: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
        kv_input: jax.Array | None = None,
        kv_positions: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """``x [B, T, D]`` -> ``(y [B, T, D_out], (k, v))``; see the class docstring for the modes."""
        q = self._rotate(rearrange(self.q_proj(x), "b t (n d) -> b t n d", d=self.head_dim), positions)
        if kv_input is not None:
            k, v = self.project_kv(kv_input, kv_positions)
        else:
            k, v = self.project_kv(x, positions)
        if kv is None:
            keys, values, returned = k, v, (k, v)
        elif cache_index is None:
            keys = jnp.concatenate([kv[0], k.astype(kv[0].dtype)], axis=1)
            values = jnp.concatenate([kv[1], v.astype(kv[1].dtype)], axis=1)
            returned = (k, v)
        else:
            start = (0, cache_index, 0, 0)
            keys = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
            values = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
            returned = (keys, values)
        out = dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask, scale=self.scale,
                                    softcap=self.softcap, implementation=self.implementation)
        return self.o_proj(rearrange(out, "b t n d -> b t (n d)")), returned
