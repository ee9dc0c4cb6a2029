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
        ``end > max_len`` marks a cache that overflowed (a write past the last slot was clamped, so its contents
        are no longer trustworthy); see :meth:`overflows`.
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

    def overflows(self, steps: int) -> jax.Array:
        """bool scalar: writing ``steps`` more slots does not fit (or the cache already overflowed earlier).

        Traceable, so a jitted decoder can poison its outputs instead of silently using a clamped write.
        """
        return self.end + steps > self.max_len

    def check_room(self, steps: int) -> None:
        """Raise when ``steps`` new slots cannot fit and that is known without running: ``steps`` alone exceeds
        ``max_len`` (static), or ``end`` is concrete (eager). Under ``jit`` with a traced ``end`` this is a no-op;
        pair it with :meth:`overflows`."""
        end = _concrete_int(self.end)
        if steps > self.max_len or (end is not None and end + steps > self.max_len):
            used = "?" if end is None else end
            raise ValueError(f"cache full: {used} slots used + {steps} new > cache_size={self.max_len}; "
                             "build the prefix with a larger cache_size")

    def append_mask(self, new_mask: jax.Array) -> jax.Array:
        """Slot mask ``[B, S]`` after writing ``new_mask [B, T]`` at ``end`` (what the new tokens may see)."""
        return jax.lax.dynamic_update_slice(self.mask, jnp.asarray(new_mask, bool), (0, self.end))


def _concrete_int(x: jax.Array) -> int | None:
    """``int(x)`` outside of tracing, ``None`` under ``jit`` (where the value is not known)."""
    try:
        return int(x)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return None
