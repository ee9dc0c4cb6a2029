"""Decoder-only transformer (Llama / Gemma / SmolLM2) with scanned layers, prefix embeddings and a KV cache."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from vlax.backbones.config import TransformerConfig
from vlax.nn import (Dense, DecoderBlock, Embed, KVCache, RMSNorm, make_attn_mask, positions_from_mask, scan_layers,
                     stack_layers)


@struct.dataclass
class TransformerOutput:
    """What a :class:`Transformer` call returns (a pytree, so it can leave ``jax.jit``).

    Attributes:
      hidden: ``[B, N, D]`` last hidden states, after the final norm.
      logits: ``[B, N, V]`` or ``None`` (only when asked for; always set by ``decode_step``).
      cache: :class:`vlax.nn.KVCache` or ``None``.
      hidden_states: ``[L + 1, B, N, D]`` or ``None``: the layer input embeddings, then the output of each layer
        (before the final norm).
    """

    hidden: jax.Array
    logits: jax.Array | None = None
    cache: KVCache | None = None
    hidden_states: jax.Array | None = None


class TokenEmbed(Embed):
    """Token embedding ``[B, T] int -> [B, T, D]``, times ``sqrt(D)`` when ``scaled`` (Gemma).

    The scale is rounded to the parameter dtype first, as HF does (``sqrt(3072)`` becomes 55.5 in bf16).
    """

    def __init__(self, num_embeddings: int, features: int, *, scaled: bool = False, dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
                         embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.scale = float(math.sqrt(features)) if scaled else None
        self.param_dtype = param_dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        ids = jnp.asarray(ids)
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        x = super().__call__(ids)
        if self.scale is not None:
            x = x * jnp.asarray(self.scale, self.param_dtype).astype(x.dtype)
        return x


class Transformer(nnx.Module):
    """Decoder-only language model. Submodules follow HF Llama names: ``embed_tokens``, ``layers`` (one stacked
    :class:`vlax.nn.DecoderBlock`, parameters ``[L, ...]``, run with ``lax.scan``), ``norm``, ``lm_head``
    (absent when embeddings are tied)."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}; build one with "
                            "vlax.backbones.get_config(name) or TransformerConfig(...)")
        self.config = cfg = config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.embed_tokens = TokenEmbed(cfg.vocab_size, cfg.width, scaled=cfg.embed_scale, rngs=rngs, **kw)

        def make_layer(r: nnx.Rngs) -> DecoderBlock:
            return DecoderBlock(cfg.width, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim, act=cfg.act,
                                norm_eps=cfg.norm_eps, norm_unit_offset=cfg.norm_unit_offset, rope=cfg.rope,
                                attn_softcap=cfg.attn_softcap, implementation=cfg.attention_impl, rngs=r, **kw)

        self.layers = stack_layers(make_layer, cfg.depth, rngs)
        self.norm = RMSNorm(cfg.width, eps=cfg.norm_eps, unit_offset=cfg.norm_unit_offset,
                            param_dtype=cfg.param_dtype, rngs=rngs)
        self.lm_head = None if cfg.tie_embeddings else Dense(cfg.width, cfg.vocab_size, use_bias=False,
                                                             axes=("embed", "vocab"), rngs=rngs, **kw)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Output logits ``[B, T, D] -> [B, T, V]`` (tied table or ``lm_head``, then the final soft-cap)."""
        out = self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        cap = self.config.final_softcap
        if cap is not None:
            out = jnp.tanh(out / cap) * cap
        return out

    def _inputs(self, tokens: jax.Array | None, embeds: jax.Array | None) -> jax.Array:
        if tokens is None and embeds is None:
            raise ValueError("pass tokens [B, T] and/or embeds [B, P, D]; got neither")
        parts = []
        if embeds is not None:
            if embeds.ndim != 3 or embeds.shape[-1] != self.config.width:
                raise ValueError(f"embeds must be [B, P, {self.config.width}] (the backbone width), got shape "
                                 f"{tuple(embeds.shape)}")
            parts.append(embeds)
        if tokens is not None:
            if tokens.ndim != 2:
                raise ValueError(f"tokens must be [B, T] int, got shape {tuple(tokens.shape)}")
            parts.append(self.embed_tokens(tokens))
        if len(parts) == 2:
            if parts[0].shape[0] != parts[1].shape[0]:
                raise ValueError(f"embeds batch {parts[0].shape[0]} != tokens batch {parts[1].shape[0]}")
            parts[0] = parts[0].astype(parts[1].dtype)
        x = jnp.concatenate(parts, axis=1) if len(parts) == 2 else parts[0]
        return x if self.config.dtype is None else x.astype(self.config.dtype)

    # ------------------------------------------------------------------------------------------------- forward
    def __call__(
        self,
        tokens: jax.Array | None = None,
        embeds: jax.Array | None = None,
        *,
        input_mask: jax.Array | None = None,
        ar_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        return_logits: bool = False,
        cache_size: int | None = None,
        output_hidden_states: bool = False,
    ) -> TransformerOutput:
        """Full forward pass over ``N = P + T`` inputs: ``embeds [B, P, D]`` (e.g. image tokens, used as given,
        not scaled) followed by the embedded ``tokens [B, T]``.

        Args:
          input_mask: ``[B, N]`` bool, real inputs (default: all). Padding may sit on either side.
          ar_mask: ``[N]`` or ``[B, N]`` for :func:`vlax.nn.make_attn_mask` (default: all ones, i.e. causal; use
            zeros over a prefix for PaliGemma-style bidirectional prefix attention).
          positions: ``[B, N]`` RoPE position ids (default: ``positions_from_mask(input_mask)``, skipping pads).
          return_logits: also compute ``logits [B, N, V]``.
          cache_size: if set, return a :class:`vlax.nn.KVCache` with this many slots holding these ``N`` inputs
            (keys after RoPE), ready for :meth:`decode_step`.
          output_hidden_states: also return every layer's output.
        """
        x = self._inputs(tokens, embeds)
        batch, length = x.shape[:2]
        input_mask = _check_mask(input_mask, (batch, length), "input_mask")
        if ar_mask is None:
            ar_mask = jnp.ones((length,), jnp.int32)
        elif jnp.shape(ar_mask) not in ((length,), (batch, length)):
            raise ValueError(f"ar_mask must be [{length}] or [{batch}, {length}], got shape {jnp.shape(ar_mask)}")
        if positions is None:
            positions = positions_from_mask(input_mask)
        elif jnp.shape(positions) != (batch, length):
            raise ValueError(f"positions must be [{batch}, {length}], got shape {jnp.shape(positions)}")
        if cache_size is not None and cache_size < length:
            raise ValueError(f"cache_size={cache_size} is shorter than the {length} inputs it must hold")
        mask = make_attn_mask(input_mask, ar_mask)
        keep_kv = cache_size is not None

        def body(layer: DecoderBlock, h: jax.Array, _):
            h, (k, v) = layer(h, mask=mask, positions=positions)
            return h, ((k, v) if keep_kv else None, h if output_hidden_states else None)

        h, (kv, per_layer_h) = scan_layers(self.layers, body, x, remat=self.config.remat)
        hidden = self.norm(h)
        cache = None
        if keep_kv:
            cache = KVCache.from_prefix(kv[0], kv[1], input_mask, max_len=cache_size)
            last = jnp.max(jnp.where(input_mask, positions, -1), axis=1)
            cache = cache.replace(next_position=(last + 1).astype(jnp.int32))
        return TransformerOutput(
            hidden=hidden,
            logits=self.logits(hidden) if return_logits else None,
            cache=cache,
            hidden_states=jnp.concatenate([x[None], per_layer_h], axis=0) if output_hidden_states else None,
        )

    def decode_step(self, tokens: jax.Array, cache: KVCache, *, input_mask: jax.Array | None = None
                    ) -> TransformerOutput:
        """Append ``T`` inputs to ``cache`` and run them: token ids ``[B, T]`` (int) or embeddings ``[B, T, D]``.

        The new inputs are written at slot ``cache.end``, get positions ``cache.next_position + 0, 1, ...``, and
        attend causally to themselves and to every valid earlier slot. Returns ``logits [B, T, V]``, ``hidden``
        and the updated cache (``end += T``, ``next_position += valid new inputs``). ``input_mask [B, T]`` marks
        new inputs that are padding (they are written but never attended to).
        Writing past ``cache.max_len`` is refused (``ValueError``) when ``cache.end`` is concrete or ``T`` alone
        exceeds it. Under ``jit`` the write would be clamped onto the last slots, so instead every returned
        ``logits`` and ``hidden`` value is NaN, for this step and every later one (``end`` keeps counting past
        ``max_len``): never finite wrong numbers. The check is one scalar compare fused into the output.
        """
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be the KVCache returned by a call with cache_size=..., got "
                            f"{type(cache).__name__}")
        tokens = jnp.asarray(tokens)
        is_ids = tokens.ndim == 2 and jnp.issubdtype(tokens.dtype, jnp.integer)
        x = self._inputs(tokens if is_ids else None, None if is_ids else tokens)
        batch, steps = x.shape[:2]
        if cache.k.shape[1] != batch:
            raise ValueError(f"cache batch {cache.k.shape[1]} != input batch {batch}")
        if cache.num_layers != self.config.depth:
            raise ValueError(f"cache has {cache.num_layers} layers, the model {self.config.depth}")
        cache.check_room(steps)
        overflow = cache.overflows(steps)  # traced under jit: poison rather than return clamped-write results
        new_mask = _check_mask(input_mask, (batch, steps), "input_mask")
        slot_mask = cache.append_mask(new_mask)
        positions = positions_from_mask(new_mask, cache.next_position)
        query_slot = cache.end + jnp.arange(steps)
        causal = jnp.arange(cache.max_len)[None, :] <= query_slot[:, None]  # [T, S]
        mask = slot_mask[:, None, :] & causal[None] & new_mask[:, :, None]

        def body(layer: DecoderBlock, h: jax.Array, buffers):
            h, (k, v) = layer(h, mask=mask, positions=positions, kv=buffers, cache_index=cache.end)
            return h, (k, v)

        h, (k, v) = scan_layers(self.layers, body, x, (cache.k, cache.v))
        hidden = jnp.where(overflow, jnp.nan, self.norm(h)).astype(h.dtype)
        logits = self.logits(hidden)
        logits = jnp.where(overflow, jnp.nan, logits).astype(logits.dtype)  # whatever the head does with NaN
        new_cache = KVCache(k=k, v=v, mask=slot_mask, end=(cache.end + steps).astype(jnp.int32),
                            next_position=cache.next_position + jnp.sum(new_mask, axis=1, dtype=jnp.int32))
        return TransformerOutput(hidden=hidden, logits=logits, cache=new_cache)


def _check_mask(mask: jax.Array | None, shape: tuple[int, int], name: str) -> jax.Array:
    if mask is None:
        return jnp.ones(shape, bool)
    if jnp.shape(mask) != shape:
        raise ValueError(f"{name} must have shape {list(shape)} (batch, inputs), got {list(jnp.shape(mask))}")
    return jnp.asarray(mask, bool)

