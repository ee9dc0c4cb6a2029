"""The action-head contract and the small pieces every head shares: input checks, masks, RNG streams, pooling.

Every head is an ``nnx.Module`` with

* ``loss(ctx, actions, *, action_mask=None, rngs, train=True, lm=None) -> (loss, metrics)``
* ``sample(ctx, *, rngs, num_steps=None, lm=None) -> actions [B, H, A]``

``ctx`` is a :class:`vlax.nn.HeadContext`; ``actions`` are ``[B, H, A]``; ``action_mask`` is boolean and
broadcastable to ``[B, H, A]`` (``[B, H, 1]`` marks padded time steps, ``[A]`` or ``[B, 1, A]`` padded action
dimensions; :func:`combine_masks` builds one from both). ``rngs`` is a key or an ``nnx.Rngs``; noise and dropout
always come from separate streams. ``lm`` is only read by heads that decode through the backbone's LM head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.nn.attention import Attention
from vlax.nn.context import ContextSpec, HeadContext
from vlax.nn.mlp import Mlp
from vlax.nn.norms import LayerNorm
from vlax.nn.params import param

RngLike = nnx.Rngs | jax.Array


def split_rngs(rngs: RngLike) -> tuple[jax.Array, jax.Array]:
    """``(noise_key, dropout_key)`` from a key or an ``nnx.Rngs``.

    With an ``nnx.Rngs`` the ``noise`` and ``dropout`` streams are used when present, else ``default``; a raw key
    is folded into two independent streams. Diffusion/flow noise never shares the dropout stream.
    """
    if isinstance(rngs, nnx.Rngs):
        noise = rngs["noise"]() if "noise" in rngs else rngs.default()
        drop = rngs["dropout"]() if "dropout" in rngs else rngs.default()
        return noise, drop
    key = jnp.asarray(rngs)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != (2,) or key.dtype != jnp.uint32:
            raise ValueError(f"rngs must be an nnx.Rngs or a PRNG key, got an array {key.dtype}{tuple(key.shape)}")
        key = jax.random.wrap_key_data(key)
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def combine_masks(time_mask: jax.Array | None = None, dim_mask: jax.Array | None = None) -> jax.Array | None:
    """One action mask ``[B, H, A]``-broadcastable from ``time_mask [B, H]`` and ``dim_mask [B, A]`` or ``[A]``."""
    mask = None
    if time_mask is not None:
        mask = jnp.asarray(time_mask, bool)[..., None]
    if dim_mask is not None:
        dims = jnp.asarray(dim_mask, bool)
        dims = dims[:, None, :] if dims.ndim == 2 else dims
        mask = dims if mask is None else mask & dims
    return mask


def dropout(x: jax.Array, rate: float, key: jax.Array | None, train: bool) -> jax.Array:
    """Inverted dropout with an explicit key (identity when not training or ``rate == 0``)."""
    if not train or rate <= 0.0:
        return x
    if key is None:
        raise ValueError("dropout during training needs a dropout key (pass rngs)")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``values`` over entries where ``mask`` (same shape, float or bool) is set; 0 when none is."""
    mask = mask.astype(values.dtype)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sincos_embedding(t: jax.Array, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> jax.Array:
    """Sine-cosine features ``[B, dim]`` of scalars ``t [B]`` with periods spaced geometrically (π0's time code)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dim must be even, got {dim}")
    fraction = jnp.linspace(0.0, 1.0, dim // 2)
    period = min_period * (max_period / min_period) ** fraction
    # openpi's exact float32 order (1 / period * 2 pi, full-precision product): the angles reach ~1571 rad, where
    # rounding the frequency another way moves a feature by ~6e-5.
    angles = jnp.einsum("i,j->ij", t.astype(jnp.float32), 1.0 / period * 2 * jnp.pi,
                        precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def last_valid_index(mask: jax.Array) -> jax.Array:
    """Index ``[B]`` of the last ``True`` of each row of ``mask [B, N]`` (0 for an all-padding row)."""
    n = mask.shape[1]
    return n - 1 - jnp.argmax(mask[:, ::-1].astype(jnp.int32), axis=1)


class AttentionPool(nnx.Module):
    """Multi-head attention pooling with learned probes (big_vision's MAP head): ``[B, N, D] -> [B, P, D]``.

    ``act``: the MLP's activation (``"gelu_tanh"`` for Flax-trained models such as Octo, whose ``nn.gelu`` is
    the tanh form)."""

    def __init__(self, width: int, num_heads: int, *, num_probes: int = 1, mlp_dim: int | None = None,
                 act: str = "gelu", rngs: nnx.Rngs):
        self.probe = param(rngs, nnx.initializers.xavier_uniform(), (num_probes, width), (None, "embed"))
        self.attn = Attention(width, num_heads, use_bias=True, rngs=rngs)
        self.norm = LayerNorm(width, rngs=rngs)
        self.mlp = Mlp(width, mlp_dim or 4 * width, act=act, rngs=rngs)

    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        b = tokens.shape[0]
        probe = jnp.broadcast_to(self.probe[...].astype(tokens.dtype), (b, *self.probe.shape))
        attn_mask = jnp.broadcast_to(mask[:, None, :].astype(bool), (b, probe.shape[1], tokens.shape[1]))
        x, _ = self.attn(probe, mask=attn_mask, kv_input=tokens)
        return x + self.mlp(self.norm(x))


def masked_mean_pool(tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over real tokens: ``[B, N, D], [B, N] -> [B, D]``."""
    m = mask.astype(tokens.dtype)[..., None]
    return jnp.sum(tokens * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class ActionHead(nnx.Module):
    """Shared checks of the head contract; subclasses implement ``loss`` and ``sample``."""

    def _init_contract(self, action_dim: int, horizon: int, context: ContextSpec | int) -> None:
        if action_dim < 1 or horizon < 1:
            raise ValueError(f"action_dim and horizon must be >= 1, got action_dim={action_dim}, horizon={horizon}")
        self.action_dim, self.horizon = int(action_dim), int(horizon)
        self.context = context if isinstance(context, ContextSpec) else ContextSpec(width=int(context))

    @property
    def action_shape(self) -> tuple[int, int]:
        return self.horizon, self.action_dim

    @property
    def cache_slots(self) -> int | None:
        """Extra KV-cache positions the head needs after the prefix: ``None`` when it reads no cache (tokens
        only), ``0`` when it reads the prefix cache without appending, ``n`` when it decodes ``n`` tokens."""
        return None

    def require_state(self, ctx: HeadContext, state_dim: int) -> jax.Array:
        """``ctx.state [B, state_dim]`` for heads that read the state; one error naming both shapes otherwise."""
        if ctx.state is None or ctx.state.shape[-1] != state_dim:
            got = None if ctx.state is None else tuple(ctx.state.shape)
            raise ValueError(f"this head reads the state: ctx.state must be [B, {state_dim}], got {got}")
        return ctx.state

    def check_context(self, ctx: HeadContext) -> None:
        if ctx.tokens.ndim != 3 or ctx.tokens.shape[-1] != self.context.width:
            raise ValueError(f"context tokens have shape {tuple(ctx.tokens.shape)}; this head expects "
                             f"[B, N, {self.context.width}] (ContextSpec.width)")
        if ctx.mask.shape != ctx.tokens.shape[:2]:
            raise ValueError(f"context mask shape {tuple(ctx.mask.shape)} does not match tokens "
                             f"{tuple(ctx.tokens.shape[:2])}")

    def prepare_actions(self, actions: jax.Array, action_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """Check ``actions [B, H, A]``; return them with padded entries zeroed, and the mask as float ``[B, H, A]``.

        Zeroing makes padded entries invisible: whatever a dataset leaves there changes neither loss nor gradients.
        """
        expected = (self.horizon, self.action_dim)
        if actions.ndim != 3 or tuple(actions.shape[1:]) != expected:
            raise ValueError(f"actions have shape {tuple(actions.shape)}; this head expects [B, {expected[0]}, "
                             f"{expected[1]}] (horizon={self.horizon}, action_dim={self.action_dim})")
        if action_mask is None:
            mask = jnp.ones(actions.shape, jnp.float32)
        else:
            action_mask = jnp.asarray(action_mask)
            try:
                mask = jnp.broadcast_to(action_mask, actions.shape).astype(jnp.float32)
            except ValueError:
                raise ValueError(f"action_mask of shape {tuple(action_mask.shape)} does not broadcast to actions "
                                 f"{tuple(actions.shape)}; use [B, H, 1] for padded steps, [A] for padded dims, "
                                 f"or combine_masks(time_mask, dim_mask)") from None
        return jnp.where(mask > 0, actions, 0.0).astype(actions.dtype), mask


def guide_weight_array(weights: jax.Array | None, target: jax.Array) -> jax.Array:
    """Real-time-chunking guidance weights ``[B, H]`` or ``[B, H, A]`` (``None``: every entry) as ``[B, H, A]`` float32."""
    if weights is None:
        return jnp.ones(target.shape, jnp.float32)
    weights = jnp.asarray(weights, jnp.float32)
    if weights.ndim == target.ndim - 1:
        weights = weights[..., None]
    if weights.ndim != target.ndim:
        raise ValueError(f"guide_weights has shape {tuple(weights.shape)}; expected [B, H] or [B, H, A] for "
                         f"guide_actions of shape {tuple(target.shape)}")
    return jnp.broadcast_to(weights, target.shape)
