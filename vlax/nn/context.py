"""What an action head receives from the backbone, and what it may ask of the language model.

A head never imports a backbone. It gets a :class:`HeadContext` (a pytree of arrays) at call time and a
:class:`ContextSpec` (plain numbers) at construction time; heads that decode through the backbone's own LM head
(RT-2 / OpenVLA style) are handed any object satisfying :class:`LanguageModel`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import struct

from vlax.nn.kv_cache import KVCache


@struct.dataclass
class HeadContext:
    """Backbone outputs an action head conditions on.

    Attributes:
      tokens: ``[B, N, D]`` token embeddings (for LM-decoding heads: the final hidden states that
        ``LanguageModel.logits`` maps to next-token logits).
      mask: ``[B, N]`` bool, real (non-padding) tokens.
      cache: optional per-layer key/value cache of the same prefix (:class:`vlax.nn.KVCache`, keys post-RoPE);
        needed by heads whose expert attends to the backbone's layers and by LM decoding.
      state: optional ``[B, S]`` proprioceptive state, for heads that embed it themselves.
    """

    tokens: jax.Array
    mask: jax.Array
    cache: KVCache | None = None
    state: jax.Array | None = None

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        return self.tokens.shape[-1]

    @classmethod
    def from_backbone_output(cls, output: Any, input_mask: jax.Array, state: jax.Array | None = None
                             ) -> "HeadContext":
        """Context from an object with ``hidden [B, N, D]`` and ``cache`` attributes (a backbone output)."""
        return cls(tokens=output.hidden, mask=jnp.asarray(input_mask, bool), cache=getattr(output, "cache", None),
                   state=state)


@dataclasses.dataclass(frozen=True)
class ContextSpec:
    """Static description of the context a head will receive (used to size the head at construction).

    ``width`` is ``D`` of ``HeadContext.tokens``. The attention geometry (``num_layers``, ``num_heads``,
    ``num_kv_heads``, ``head_dim``) is that of the backbone whose cache an expert attends to; ``vocab_size`` is
    that of the LM head an LM-decoding head samples from. Fields a head does not need may stay ``None``.
    """

    width: int
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None

    @classmethod
    def from_config(cls, config: Any) -> "ContextSpec":
        """Spec from a backbone config object, reading the common attribute spellings."""

        def pick(*names):
            for name in names:
                value = getattr(config, name, None)
                if value is not None:
                    return int(value)
            return None

        width = pick("width", "hidden_size", "embed_dim", "d_model")
        if width is None:
            raise ValueError(f"cannot read the width of {type(config).__name__}: expected one of width, hidden_size")
        num_heads = pick("num_heads", "num_attention_heads")
        head_dim = pick("head_dim")
        if head_dim is None and num_heads:
            head_dim = width // num_heads
        return cls(width=width, num_layers=pick("num_layers", "depth", "num_hidden_layers"), num_heads=num_heads,
                   num_kv_heads=pick("num_kv_heads", "num_key_value_heads") or num_heads, head_dim=head_dim,
                   vocab_size=pick("vocab_size"))

    def require(self, *fields: str, why: str) -> None:
        """Raise one error naming every missing field (``why`` says which head needs them)."""
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            raise ValueError(f"{why} needs ContextSpec fields {missing}; got {self}")


@runtime_checkable
class LanguageModel(Protocol):
    """The two calls an LM-decoding head makes on the backbone.

    ``decode_step(tokens [B, T], cache)`` appends ``T`` tokens after the cached ones (causal among themselves) and
    returns their next-token logits ``[B, T, V]`` with the updated cache, either as a tuple ``(logits, cache)`` or
    as an object with ``logits`` and ``cache`` attributes. ``logits(hidden [..., D])`` is the LM head.
    """

    def decode_step(self, tokens: jax.Array, cache: KVCache, *, input_mask: jax.Array | None = None) -> Any: ...

    def logits(self, hidden: jax.Array) -> jax.Array: ...


def unpack_decode(result: Any) -> tuple[jax.Array, KVCache]:
    """``(logits, cache)`` from what a :class:`LanguageModel` ``decode_step`` returned."""
    if isinstance(result, tuple):
        logits, cache = result[0], result[1]
    else:
        logits, cache = result.logits, result.cache
    if logits is None or cache is None:
        raise ValueError("decode_step must return logits and the updated cache (got None)")
    return logits, cache
