"""Octo's continuous action head: attention-pool the readout tokens, one linear map to the chunk, tanh squash.

``chunk = max_action * tanh(Dense(pool(tokens)) / max_action)`` -> ``[B, H, A]``, trained with an L1 loss
(Octo's ``L1ActionHead``; ``loss="mse"`` is its ``MSEActionHead``). ``pool="map"`` is multi-head attention
pooling with one learned probe (8 heads, MLP 4x, tanh GELU as Flax's), ``"mean"`` a masked mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.nn import ContextSpec, Dense, HeadContext
from vlax.nn.head_base import ActionHead, AttentionPool, RngLike, masked_mean, masked_mean_pool

LOSSES = ("l1", "mse")


class L1MapHead(ActionHead):
    """Args: ``pool`` (``"map"`` / ``"mean"``), ``num_heads`` of the pool (Octo: 8), ``max_action`` (5.0),
    ``loss`` (``"l1"`` / ``"mse"``)."""

    def __init__(self, action_dim: int, horizon: int, context: ContextSpec | int, *, pool: str = "map",
                 num_heads: int = 8, max_action: float = 5.0, loss: str = "l1", pool_act: str = "gelu_tanh",
                 rngs: nnx.Rngs):
        self._init_contract(action_dim, horizon, context)
        if pool not in ("map", "mean"):
            raise ValueError(f"unknown pool {pool!r}; known: ['map', 'mean']")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; known: {list(LOSSES)}")
        width = self.context.width
        if pool == "map" and width % num_heads:
            raise ValueError(f"context width {width} is not a multiple of the pool's num_heads={num_heads}")
        self.pool = AttentionPool(width, num_heads, act=pool_act, rngs=rngs) if pool == "map" else None
        self.max_action, self.loss_kind = float(max_action), loss
        self.mean_proj = Dense(width, self.horizon * self.action_dim, axes=("embed", None), rngs=rngs)

    def predict(self, ctx: HeadContext) -> jax.Array:
        """``[B, H, A]`` from the context tokens."""
        self.check_context(ctx)
        if self.pool is not None:
            pooled = self.pool(ctx.tokens, ctx.mask)[:, 0]
        else:
            pooled = masked_mean_pool(ctx.tokens, ctx.mask)
        mean = self.mean_proj(pooled).reshape(ctx.batch_size, self.horizon, self.action_dim)
        return jnp.tanh(mean / self.max_action) * self.max_action

    def loss(self, ctx: HeadContext, actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: RngLike | None = None, train: bool = True, lm=None) -> tuple[jax.Array, dict]:
        actions, mask = self.prepare_actions(actions, action_mask)
        diff = self.predict(ctx) - actions
        err = jnp.abs(diff) if self.loss_kind == "l1" else jnp.square(diff)
        loss = masked_mean(err, mask)
        return loss, {"loss": loss, "mse": masked_mean(jnp.square(diff), mask)}

    def sample(self, ctx: HeadContext, *, rngs: RngLike | None = None, num_steps: int | None = None,
               lm=None) -> jax.Array:
        return self.predict(ctx)


__all__ = ["L1MapHead"]
