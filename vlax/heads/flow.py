"""Flow-matching action head (π0, π0.5, SmolVLA).

Training (π0's convention, t = 1 is noise): ``t ~ Beta(1.5, 1) * 0.999 + 0.001``, ``x_t = t * noise + (1 - t) * a``,
the expert predicts the velocity ``noise - a`` under MSE. Sampling integrates ``dx/dt = v`` with Euler steps from
t = 1 to 0 inside ``lax.fori_loop``; everything about the prefix (its KV cache, SmolVLA's projected keys) is
prepared once before the loop.

The suffix the expert reads is ``[state token (optional)] + H action tokens``; block-causal: the prefix sees
neither, the state token does not see the actions. Time enters either by an MLP mixing it into every action token
(π0) or through adaptive RMSNorm (π0.5, ``time_conditioning="adarms"``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlax.heads.common import ActionHead, RngLike, masked_mean, sincos_embedding, split_rngs
from vlax.heads.experts import Pi0Expert, PreparedPrefix, SmolVLAExpert
from vlax.nn import ContextSpec, Dense, HeadContext, RopeConfig

EXPERTS = ("pi0", "smolvla")
TIME_CONDITIONING = ("concat", "adarms")


class FlowHead(ActionHead):
    """Flow matching with an action expert sharing attention with the backbone.

    Args:
      action_dim, horizon: actions are ``[B, horizon, action_dim]``.
      context: the backbone's :class:`vlax.nn.ContextSpec` (``num_layers``, ``num_kv_heads``, ``head_dim``).
      expert: ``"pi0"`` (joint attention in every layer) or ``"smolvla"`` (self/cross interleaved).
      width: expert width; default ``context.width // 2`` for π0, ``width_ratio * context.width`` for SmolVLA.
      mlp_dim: expert MLP size (default ``4 * width``).
      time_conditioning: ``"concat"`` (π0: action-time MLP) or ``"adarms"`` (π0.5: adaptive RMSNorm).
      state_dim: if set, ``ctx.state [B, state_dim]`` becomes one suffix token (π0's state token).
      self_attn_every: SmolVLA's interleaving (one self-attention layer per this many layers).
      causal_actions: action tokens attend causally among themselves (SmolVLA) instead of bidirectionally (π0).
      rope: the backbone's RoPE settings.
      num_steps: default number of Euler steps.
    """

    def __init__(self, action_dim: int, horizon: int, context: ContextSpec, *, expert: str = "pi0",
                 width: int | None = None, mlp_dim: int | None = None, num_heads: int | None = None,
                 time_conditioning: str = "concat", state_dim: int | None = None, width_ratio: float = 0.75,
                 self_attn_every: int = 2, causal_actions: bool = False, act: str | None = None,
                 rope: RopeConfig | None = RopeConfig(), num_steps: int = 10, time_beta: tuple[float, float] = (1.5, 1.0),
                 time_min_period: float = 4e-3, time_max_period: float = 4.0, rngs: nnx.Rngs):
        self._init_contract(action_dim, horizon, context)
        if expert not in EXPERTS:
            raise ValueError(f"unknown flow expert {expert!r}; known: {list(EXPERTS)}")
        if time_conditioning not in TIME_CONDITIONING:
            raise ValueError(f"unknown time_conditioning {time_conditioning!r}; known: {list(TIME_CONDITIONING)}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        ctxw = self.context.width
        if width is None:
            width = ctxw // 2 if expert == "pi0" else int(round(ctxw * width_ratio))
        width = int(width)
        if width % 2:
            raise ValueError(f"expert width must be even (sin-cos time features), got {width}")
        mlp_dim = int(mlp_dim or 4 * width)
        self.width, self.state_dim, self.num_steps = width, state_dim, int(num_steps)
        self.adarms = time_conditioning == "adarms"
        self.time_beta, self.periods = tuple(map(float, time_beta)), (float(time_min_period), float(time_max_period))
        self.causal_actions = causal_actions
        self.action_in_proj = Dense(self.action_dim, width, axes=(None, "embed"), rngs=rngs)
        self.state_proj = Dense(state_dim, width, axes=(None, "embed"), rngs=rngs) if state_dim else None
        if self.adarms:
            self.time_mlp_in = Dense(width, width, axes=("embed", "embed"), rngs=rngs)
            self.time_mlp_out = Dense(width, width, axes=("embed", "embed"), rngs=rngs)
        else:
            self.action_time_mlp_in = Dense(2 * width, width, axes=("embed", "embed"), rngs=rngs)
            self.action_time_mlp_out = Dense(width, width, axes=("embed", "embed"), rngs=rngs)
        cond_dim = width if self.adarms else None
        if expert == "pi0":
            self.expert = Pi0Expert(self.context, width=width, mlp_dim=mlp_dim, num_heads=num_heads,
                                    act=act or "gelu_tanh", cond_dim=cond_dim, rope=rope, rngs=rngs)
        else:
            if self.adarms:
                raise ValueError("time_conditioning='adarms' is a π0.5 option of expert='pi0'")
            self.expert = SmolVLAExpert(self.context, width=width, mlp_dim=mlp_dim, num_heads=num_heads,
                                        self_attn_every=self_attn_every, act=act or "silu", rope=rope, rngs=rngs)
        self.action_out_proj = Dense(width, self.action_dim, axes=("embed", None), rngs=rngs)

    @property
    def cache_slots(self) -> int:
        return 0  # both experts read the backbone's per-layer prefix keys/values, appending nothing

    def _suffix_ar(self) -> np.ndarray:
        actions = [1] * self.horizon if self.causal_actions else [1] + [0] * (self.horizon - 1)
        return np.asarray(([1] if self.state_proj is not None else []) + actions, np.int32)

    def velocity(self, prefix: PreparedPrefix, state: jax.Array | None, x_t: jax.Array, t: jax.Array) -> jax.Array:
        """Predicted velocity ``[B, H, A]`` of ``x_t [B, H, A]`` at times ``t [B]``."""
        b = x_t.shape[0]
        tokens = self.action_in_proj(x_t)
        time_emb = sincos_embedding(t, self.width, *self.periods).astype(tokens.dtype)
        cond = None
        if self.adarms:
            cond = jax.nn.swish(self.time_mlp_out(jax.nn.swish(self.time_mlp_in(time_emb))))
        else:
            mixed = jnp.concatenate([tokens, jnp.broadcast_to(time_emb[:, None], tokens.shape)], axis=-1)
            tokens = self.action_time_mlp_out(jax.nn.swish(self.action_time_mlp_in(mixed)))
        if self.state_proj is not None:
            tokens = jnp.concatenate([self.state_proj(state)[:, None].astype(tokens.dtype), tokens], axis=1)
        suffix_mask = jnp.ones((b, tokens.shape[1]), bool)
        out = self.expert(tokens, prefix, suffix_mask, jnp.asarray(self._suffix_ar()), cond)
        return self.action_out_proj(out[:, -self.horizon:])

    def _state(self, ctx: HeadContext) -> jax.Array | None:
        if self.state_proj is None:
            return None
        if ctx.state is None or ctx.state.shape[-1] != self.state_dim:
            got = None if ctx.state is None else tuple(ctx.state.shape)
            raise ValueError(f"this head embeds the state: ctx.state must be [B, {self.state_dim}], got {got}")
        return ctx.state

    def loss(self, ctx: HeadContext, actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: RngLike, train: bool = True, lm=None) -> tuple[jax.Array, dict]:
        """Flow-matching MSE over real entries."""
        self.check_context(ctx)
        actions, mask = self.prepare_actions(actions, action_mask)
        noise_key, _ = split_rngs(rngs)
        k_noise, k_time = jax.random.split(noise_key)
        b = actions.shape[0]
        noise = jax.random.normal(k_noise, actions.shape, actions.dtype)
        t = jax.random.beta(k_time, *self.time_beta, (b,)) * 0.999 + 0.001
        te = t[:, None, None].astype(actions.dtype)
        x_t = te * noise + (1.0 - te) * actions
        v = self.velocity(self.expert.prepare(ctx.cache), self._state(ctx), x_t, t)
        loss = masked_mean(jnp.square(v - (noise - actions)), mask)
        return loss, {"loss": loss}

    def sample(self, ctx: HeadContext, *, rngs: RngLike, num_steps: int | None = None, lm=None,
               noise: jax.Array | None = None) -> jax.Array:
        """Euler integration from ``noise`` (drawn from the noise stream if not given) at t = 1 to t = 0."""
        self.check_context(ctx)
        steps = int(num_steps or self.num_steps)
        prefix = self.expert.prepare(ctx.cache)  # once: the loop below only runs the expert
        state = self._state(ctx)
        if noise is None:
            noise = jax.random.normal(split_rngs(rngs)[0], (ctx.batch_size, *self.action_shape), ctx.tokens.dtype)
        dt = -1.0 / steps
        b = noise.shape[0]

        def step(i, x):
            t = jnp.full((b,), 1.0 + i * dt, jnp.float32)
            return x + dt * self.velocity(prefix, state, x, t).astype(x.dtype)

        return jax.lax.fori_loop(0, steps, step, noise)
