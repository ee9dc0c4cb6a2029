"""Per-layer key/value cache of a decoder stack, as a plain pytree.

Keys are stored after RoPE, so a consumer (incremental decoding, an action expert attending to the prefix) can
use them without knowing the positions that produced them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """Keys/values of ``L`` layers over ``S`` slots.

    Attributes:
      k, v: ``[L, B, S, K, Dh]`` keys (post-RoPE) and values.
      mask: ``[B, S]`` bool, slots holding a real token.
      end: int32 scalar, the next slot to write (all rows share it; padding is expressed through ``mask``).
      next_position: ``[B]`` int32 position id of the next token of each row.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    end: jax.Array
    next_position: jax.Array

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @classmethod
    def from_prefix(cls, k: jax.Array, v: jax.Array, mask: jax.Array, max_len: int | None = None) -> "KVCache":
        """Cache holding a prefix ``k, v [L, B, P, K, Dh]`` with ``mask [B, P]``, padded to ``max_len`` slots."""
        prefix_len = k.shape[2]
        max_len = prefix_len if max_len is None else max_len
        if max_len < prefix_len:
            raise ValueError(f"max_len={max_len} is shorter than the prefix ({prefix_len} tokens)")
        pad = max_len - prefix_len
        widths = ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0))
        mask = jnp.asarray(mask, bool)
        return cls(
            k=jnp.pad(k, widths), v=jnp.pad(v, widths),
            mask=jnp.pad(mask, ((0, 0), (0, pad))),
            end=jnp.asarray(prefix_len, jnp.int32),
            next_position=jnp.sum(mask, axis=1).astype(jnp.int32),
        )

    def append_mask(self, new_mask: jax.Array) -> jax.Array:
        """Slot mask ``[B, S]`` after writing ``new_mask [B, T]`` at ``end`` (what the new tokens may see)."""
        return jax.lax.dynamic_update_slice(self.mask, jnp.asarray(new_mask, bool), (0, self.end))
