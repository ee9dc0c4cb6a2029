"""Flow-matching action head (π0, π0.5, SmolVLA).

Training (π0's convention, t = 1 is noise): ``t ~ Beta(1.5, 1) * 0.999 + 0.001``, ``x_t = t * noise + (1 - t) * a``,
the expert predicts the velocity ``noise - a`` under MSE. Sampling integrates ``dx/dt = v`` with Euler steps from
t = 1 to 0 inside ``lax.fori_loop``; everything about the prefix (its KV cache, SmolVLA's projected keys) is
prepared once before the loop.

The suffix the expert reads is ``[state token (optional)] + H action tokens``; block-causal: the prefix sees
neither, the state token does not see the actions. Time enters either by an MLP mixing it into every action token
(π0) or through adaptive RMSNorm (π0.5, ``time_conditioning="adarms"``).

The action experts are transformers with their own weights that read the backbone's per-layer prefix keys/values.

* :class:`Pi0Expert` (π0): the backbone's depth and key/value geometry, its own width and MLP. Layer ``l`` attends
  jointly to prefix layer ``l``'s cached keys/values and to its own tokens (shared attention). With ``cond_dim``
  its norms are adaptive RMSNorms modulated by a conditioning vector (π0.5's time conditioning).
* :class:`SmolVLAExpert` (SmolVLA): a narrower expert interleaving those joint self-attention layers with
  cross-attention layers, whose keys/values are the expert's own projections of the prefix's cached keys/values.

Both split their work into ``prepare(cache)`` (loop-invariant, once per prefix) and ``__call__`` (per denoising
step), so a sampling loop never recomputes anything about the prefix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx, struct

from vlax.nn import (Attention, ContextSpec, Dense, GatedMlp, HeadContext, KVCache, RMSNorm, RopeConfig,
                     dot_product_attention, positions_from_mask, prefix_suffix_mask, scan_layers, stack_layers)
from vlax.nn.head_base import ActionHead, RngLike, guide_weight_array, masked_mean, sincos_embedding, split_rngs


# ---- action experts ------------------------------------------------------------------------------------------------
class AdaRMSNorm(nnx.Module):
    """RMSNorm whose scale, shift and residual gate come from a conditioning vector (π0.5).

    ``modulation`` is zero-initialised, as in openpi: at initialisation scale = shift = 0 and the gate closes the
    residual branch.
    """

    def __init__(self, features: int, cond_dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs):
        self.eps = eps
        self.modulation = Dense(cond_dim, 3 * features, kernel_init=nnx.initializers.zeros, axes=(None, "embed"),
                                rngs=rngs)

    def __call__(self, x: jax.Array, cond: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [B, T, D]``, ``cond [B, C]`` -> ``(normed [B, T, D], gate [B, 1, D])``."""
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        scale, shift, gate = jnp.split(self.modulation(cond.astype(jnp.float32))[:, None, :], 3, axis=-1)
        return (normed * (1.0 + scale) + shift).astype(x.dtype), gate.astype(x.dtype)


def _norm(norm: nnx.Module, x: jax.Array, cond: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
    if isinstance(norm, AdaRMSNorm):
        if cond is None:
            raise ValueError("this expert uses adaptive RMSNorm: pass cond")
        return norm(x, cond)
    return norm(x), None


def _residual(x: jax.Array, y: jax.Array, gate: jax.Array | None) -> jax.Array:
    return x + (y if gate is None else y * gate).astype(x.dtype)


class ExpertBlock(nnx.Module):
    """Pre-norm block (HF Llama names). Joint attention to ``(prefix_k, prefix_v)`` + own tokens, or, with
    ``cross_kv_features``, cross-attention to keys/values projected from the prefix's cached keys/values."""

    def __init__(self, width: int, num_heads: int, num_kv_heads: int, head_dim: int, mlp_dim: int, *, act: str,
                 rope: RopeConfig | None, cond_dim: int | None = None, cross_kv_features: int | None = None,
                 norm_eps: float = 1e-6, rngs: nnx.Rngs):
        def make_norm():
            if cond_dim:
                return AdaRMSNorm(width, cond_dim, eps=norm_eps, rngs=rngs)
            return RMSNorm(width, eps=norm_eps, rngs=rngs)

        self.cross = cross_kv_features is not None
        self.head_dim = head_dim
        self.input_layernorm = make_norm()
        self.self_attn = Attention(width, num_heads, num_kv_heads, head_dim, kv_features=cross_kv_features,
                                   rope=rope, rngs=rngs)
        self.post_attention_layernorm = make_norm()
        self.mlp = GatedMlp(width, mlp_dim, act=act, rngs=rngs)

    def project_prefix(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Cross layers: expert keys/values ``[B, S, K, Dh]`` from the prefix's cached ``k, v [B, S, Kp, Dhp]``."""
        flat = lambda a: rearrange(a, "b s k d -> b s (k d)")  # noqa: E731
        split = lambda a: rearrange(a, "b s (k d) -> b s k d", d=self.head_dim)  # noqa: E731
        return split(self.self_attn.k_proj(flat(k))), split(self.self_attn.v_proj(flat(v)))

    def __call__(self, x: jax.Array, *, mask: jax.Array, positions: jax.Array, prefix_kv: tuple[jax.Array, jax.Array],
                 cond: jax.Array | None = None) -> jax.Array:
        h, gate = _norm(self.input_layernorm, x, cond)
        if not self.cross:
            a, _ = self.self_attn(h, mask=mask, positions=positions, kv=prefix_kv)
        else:
            attn = self.self_attn
            q = rearrange(attn.q_proj(h), "b t (n d) -> b t n d", d=self.head_dim)
            # SmolVLA rotates cross-attention queries by their position within the suffix (from 0); the prefix
            # keys were rotated by the backbone already.
            q = attn._rotate(q, positions - jnp.min(positions, axis=1, keepdims=True)) if attn.rope else q
            k, v = prefix_kv
            out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)
            a = attn.o_proj(rearrange(out, "b t n d -> b t (n d)"))
        x = _residual(x, a, gate)
        h, gate = _norm(self.post_attention_layernorm, x, cond)
        return _residual(x, self.mlp(h), gate)


@struct.dataclass
class PreparedPrefix:
    """Loop-invariant view of the prefix an expert reads: stacked per-layer keys/values and slot mask/positions."""

    k: jax.Array  # [L_self, B, S, K, Dh] keys for the joint-attention layers
    v: jax.Array
    mask: jax.Array  # [B, S]
    next_position: jax.Array  # [B]
    cross_k: jax.Array | None = None  # [L_cross, B, S, K, Dh] expert-projected keys of the cross layers
    cross_v: jax.Array | None = None


def _check_cache(cache: KVCache | None, context: ContextSpec) -> KVCache:
    if cache is None:
        raise ValueError("this expert attends to the backbone's layers: the context needs its prefix KV cache "
                         "(HeadContext.cache)")
    expected = (context.num_layers, context.num_kv_heads, context.head_dim)
    got = (cache.k.shape[0], cache.k.shape[3], cache.k.shape[4])
    if got != expected:
        raise ValueError(f"prefix cache k has shape {tuple(cache.k.shape)} (layers, kv heads, head dim = {got}); "
                         f"the expert was built for {expected}")
    return cache


class Pi0Expert(nnx.Module):
    """π0 action expert: ``context.num_layers`` blocks sharing attention with the backbone's layers.

    Args:
      context: the backbone's :class:`vlax.nn.ContextSpec` (``num_layers``, ``num_kv_heads``, ``head_dim``;
        ``num_heads`` is the default number of query heads).
      width, mlp_dim: the expert's own sizes (π0: 1024 / 4096 beside Gemma-2B's 2048).
      act: MLP gate activation (Gemma: ``"gelu_tanh"``).
      cond_dim: if set, adaptive RMSNorm conditioned on a ``[B, cond_dim]`` vector (π0.5).
      rope: must equal the backbone's RoPE so that suffix queries and cached prefix keys line up.
    """

    def __init__(self, context: ContextSpec, *, width: int, mlp_dim: int, num_heads: int | None = None,
                 act: str = "gelu_tanh", cond_dim: int | None = None, rope: RopeConfig | None = RopeConfig(),
                 rngs: nnx.Rngs):
        context.require("num_layers", "num_kv_heads", "head_dim", why="the π0 expert")
        self.context = context
        num_heads = num_heads or context.num_heads or context.num_kv_heads
        self.layers = stack_layers(
            lambda r: ExpertBlock(width, num_heads, context.num_kv_heads, context.head_dim, mlp_dim, act=act,
                                  rope=rope, cond_dim=cond_dim, rngs=r), context.num_layers, rngs)
        self.norm = AdaRMSNorm(width, cond_dim, rngs=rngs) if cond_dim else RMSNorm(width, rngs=rngs)

    def prepare(self, cache: KVCache | None) -> PreparedPrefix:
        cache = _check_cache(cache, self.context)
        return PreparedPrefix(k=cache.k, v=cache.v, mask=cache.mask, next_position=cache.next_position)

    def __call__(self, x: jax.Array, prefix: PreparedPrefix, suffix_mask: jax.Array, suffix_ar: jax.Array,
                 cond: jax.Array | None = None) -> jax.Array:
        """Suffix tokens ``x [B, T, W]`` -> ``[B, T, W]``; the prefix cannot see them (block-causal masks)."""
        mask = prefix_suffix_mask(prefix.mask, suffix_mask, suffix_ar)
        positions = positions_from_mask(suffix_mask, prefix.next_position)

        def body(layer, h, kv):
            return layer(h, mask=mask, positions=positions, prefix_kv=kv, cond=cond), None

        x, _ = scan_layers(self.layers, body, x, (prefix.k, prefix.v))
        return _norm(self.norm, x, cond)[0]


class SmolVLAExpert(nnx.Module):
    """SmolVLA action expert: groups of one joint self-attention layer and ``self_attn_every - 1`` cross layers.

    Layer ``l`` of the expert pairs with prefix layer ``l``: self-attention layers (``l % self_attn_every == 0``)
    attend to that layer's cached keys/values plus the suffix; cross-attention layers attend to the prefix only,
    through the expert's own ``k_proj``/``v_proj`` applied to that layer's cached keys and values. Query heads and
    head size match the backbone's (the self-attention layers concatenate keys with it).
    """

    def __init__(self, context: ContextSpec, *, width: int, mlp_dim: int, num_heads: int | None = None,
                 self_attn_every: int = 2, act: str = "silu", rope: RopeConfig | None = RopeConfig(),
                 norm_eps: float = 1e-6, rngs: nnx.Rngs):
        context.require("num_layers", "num_kv_heads", "head_dim", why="the SmolVLA expert")
        depth, n = context.num_layers, self_attn_every
        if n < 1 or depth % n:
            raise ValueError(f"self_attn_every={n} must divide the backbone depth num_layers={depth}")
        self.context, self.every, self.groups = context, n, depth // n
        num_heads = num_heads or context.num_heads or context.num_kv_heads
        kv, dh = context.num_kv_heads, context.head_dim
        self.self_layers = stack_layers(
            lambda r: ExpertBlock(width, num_heads, kv, dh, mlp_dim, act=act, rope=rope, norm_eps=norm_eps, rngs=r),
            self.groups, rngs)
        self.cross_layers = stack_layers(
            lambda r: ExpertBlock(width, num_heads, kv, dh, mlp_dim, act=act, rope=rope, cross_kv_features=kv * dh,
                                  norm_eps=norm_eps, rngs=r), self.groups * (n - 1), rngs) if n > 1 else None
        self.norm = RMSNorm(width, eps=norm_eps, rngs=rngs)

    def prepare(self, cache: KVCache | None) -> PreparedPrefix:
        cache = _check_cache(cache, self.context)
        n = self.every
        grouped = lambda a: a.reshape(self.groups, n, *a.shape[1:])  # noqa: E731
        k, v = grouped(cache.k), grouped(cache.v)
        prefix = PreparedPrefix(k=k[:, 0], v=v[:, 0], mask=cache.mask, next_position=cache.next_position)
        if self.cross_layers is None:
            return prefix
        cross = lambda a: a[:, 1:].reshape(self.groups * (n - 1), *a.shape[2:])  # noqa: E731

        def body(layer, carry, kv):
            return carry, layer.project_prefix(*kv)

        _, (ck, cv) = scan_layers(self.cross_layers, body, None, (cross(k), cross(v)))
        return prefix.replace(cross_k=ck, cross_v=cv)

    def __call__(self, x: jax.Array, prefix: PreparedPrefix, suffix_mask: jax.Array, suffix_ar: jax.Array,
                 cond: jax.Array | None = None) -> jax.Array:
        n = self.every
        joint_mask = prefix_suffix_mask(prefix.mask, suffix_mask, suffix_ar)
        cross_mask = prefix.mask[:, None, :].astype(bool) & suffix_mask[:, :, None].astype(bool)
        positions = positions_from_mask(suffix_mask, prefix.next_position)
        self_def, self_state = nnx.split(self.self_layers)
        per_group = [self_state, prefix.k, prefix.v]
        if self.cross_layers is not None:
            cross_def, cross_state = nnx.split(self.cross_layers)
            grouped = lambda a: a.reshape(self.groups, n - 1, *a.shape[1:])  # noqa: E731
            per_group += [jax.tree.map(grouped, cross_state), grouped(prefix.cross_k), grouped(prefix.cross_v)]

        def step(h, xs):
            layer = nnx.merge(self_def, xs[0])
            h = layer(h, mask=joint_mask, positions=positions, prefix_kv=(xs[1], xs[2]), cond=cond)
            for j in range(n - 1):
                cross_layer = nnx.merge(cross_def, jax.tree.map(lambda a: a[j], xs[3]))
                h = cross_layer(h, mask=cross_mask, positions=positions, prefix_kv=(xs[4][j], xs[5][j]), cond=cond)
            return h, None

        x, _ = jax.lax.scan(step, x, tuple(per_group))
        return self.norm(x)


# ---- the head ------------------------------------------------------------------------------------------------------
EXPERTS = ("pi0", "smolvla")


def sample_beta(key: jax.Array, a: float, b: float, shape: tuple[int, ...]) -> jax.Array:
    """Draws from Beta(a, b). With ``b == 1`` (π0's Beta(1.5, 1)) or ``a == 1`` the CDF is ``x^a`` (or
    ``1 - (1 - x)^b``) and inverting it is exact; that compiles in a tenth of the time of ``jax.random.beta``'s
    gamma rejection loop, which would otherwise dominate compiling a small flow train step."""
    if b == 1.0:
        return jax.random.uniform(key, shape) ** (1.0 / a)
    if a == 1.0:
        return 1.0 - jax.random.uniform(key, shape) ** (1.0 / b)
    return jax.random.beta(key, a, b, shape)


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
      norm_eps: RMSNorm epsilon of the SmolVLA expert (SmolLM2: 1e-5).
      float64_time_features: compute the sampling loop's time features in float64 on the host (LeRobot's
        SmolVLA does; float32 angles of up to ~1571 rad move them by ~1e-4).
      accumulate_time: Euler times as ``t += dt`` from 1 (openpi's π0 / π0.5) instead of ``1 + i dt``.
    """

    def __init__(self, action_dim: int, horizon: int, context: ContextSpec, *, expert: str = "pi0",
                 width: int | None = None, mlp_dim: int | None = None, num_heads: int | None = None,
                 time_conditioning: str = "concat", state_dim: int | None = None, width_ratio: float = 0.75,
                 self_attn_every: int = 2, causal_actions: bool = False, act: str | None = None,
                 rope: RopeConfig | None = RopeConfig(), num_steps: int = 10,
                 time_beta: tuple[float, float] = (1.5, 1.0), time_min_period: float = 4e-3,
                 time_max_period: float = 4.0, norm_eps: float = 1e-6, float64_time_features: bool = False,
                 accumulate_time: bool = False, rngs: nnx.Rngs):
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
        self.float64_time_features = bool(float64_time_features)
        self.accumulate_time = bool(accumulate_time)
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
                                        self_attn_every=self_attn_every, act=act or "silu", rope=rope,
                                        norm_eps=norm_eps, rngs=rngs)
        self.action_out_proj = Dense(width, self.action_dim, axes=("embed", None), rngs=rngs)

    @property
    def cache_slots(self) -> int:
        return 0  # both experts read the backbone's per-layer prefix keys/values, appending nothing

    def _suffix_ar(self) -> np.ndarray:
        actions = [1] * self.horizon if self.causal_actions else [1] + [0] * (self.horizon - 1)
        return np.asarray(([1] if self.state_proj is not None else []) + actions, np.int32)

    def velocity(self, prefix: PreparedPrefix, state: jax.Array | None, x_t: jax.Array, t: jax.Array,
                 time_emb: jax.Array | None = None) -> jax.Array:
        """Predicted velocity ``[B, H, A]`` of ``x_t [B, H, A]`` at times ``t [B]`` (``time_emb [W]``: the
        features of ``t`` computed beforehand, see ``float64_time_features``)."""
        b = x_t.shape[0]
        tokens = self.action_in_proj(x_t)
        if time_emb is None:
            time_emb = sincos_embedding(t, self.width, *self.periods).astype(tokens.dtype)
        else:
            time_emb = jnp.broadcast_to(time_emb.astype(tokens.dtype), (b, self.width))
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
        return None if self.state_proj is None else self.require_state(ctx, self.state_dim)

    def loss(self, ctx: HeadContext, actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: RngLike, train: bool = True, lm=None) -> tuple[jax.Array, dict]:
        """Flow-matching MSE over real entries."""
        self.check_context(ctx)
        actions, mask = self.prepare_actions(actions, action_mask)
        noise_key, _ = split_rngs(rngs)
        k_noise, k_time = jax.random.split(noise_key)
        b = actions.shape[0]
        noise = jax.random.normal(k_noise, actions.shape, actions.dtype)
        t = sample_beta(k_time, *self.time_beta, (b,)) * 0.999 + 0.001
        te = t[:, None, None].astype(actions.dtype)
        x_t = te * noise + (1.0 - te) * actions
        v = self.velocity(self.expert.prepare(ctx.cache), self._state(ctx), x_t, t)
        loss = masked_mean(jnp.square(v - (noise - actions)), mask)
        return loss, {"loss": loss}

    def sample(self, ctx: HeadContext, *, rngs: RngLike, num_steps: int | None = None, lm=None,
               noise: jax.Array | None = None, guide_actions: jax.Array | None = None,
               guide_weights: jax.Array | None = None, max_guidance: float = 5.0) -> jax.Array:
        """Euler integration from ``noise`` (drawn from the noise stream if not given) at t = 1 to t = 0.

        With ``guide_actions [B, H, A]`` (normalized, aligned with the chunk being sampled) and ``guide_weights``
        (``[B, H]`` or ``[B, H, A]`` in [0, 1]), the velocity is guided so that the chunk inpaints those actions
        where the weights are set: real-time chunking (Black et al. 2025, guided inpainting). Without them the
        integration is exactly the unguided one.
        """
        self.check_context(ctx)
        steps = int(num_steps or self.num_steps)
        prefix = self.expert.prepare(ctx.cache)  # once: the loop below only runs the expert
        state = self._state(ctx)
        if noise is None:
            noise = jax.random.normal(split_rngs(rngs)[0], (ctx.batch_size, *self.action_shape), ctx.tokens.dtype)
        dt = -1.0 / steps
        b = noise.shape[0]
        if guide_actions is not None:
            return self._sample_guided(prefix, state, noise, steps, guide_actions, guide_weights, max_guidance)

        table = self._time_feature_table(steps) if self.float64_time_features else None

        def step(i, carry):
            # accumulate_time: t += dt as openpi does; 1 + i dt differs by float32 ulps, which the time features'
            # ~1571 rad angles turn into ~1e-5 in the actions
            x, t = carry
            emb = None if table is None else table[i]
            now = t if self.accumulate_time else 1.0 + i * dt
            x = x + dt * self.velocity(prefix, state, x, jnp.full((b,), now, jnp.float32), emb).astype(x.dtype)
            return x, t + jnp.float32(dt)

        return jax.lax.fori_loop(0, steps, step, (noise, jnp.float32(1.0)))[0]

    def _time_feature_table(self, steps: int) -> jax.Array:
        """``[steps, W]`` sin-cos features of the Euler times ``1 + i dt``, in float64 on the host, then float32.

        The angles reach ``2 pi / min_period`` (~1571 rad), where float32 rounding moves a feature by ~1e-4;
        LeRobot's SmolVLA computes them in float64, and so does this table (the times are known in advance).
        """
        times = np.float32(1.0 + np.arange(steps) * (-1.0 / steps)).astype(np.float64)
        if self.accumulate_time:  # the float32 times t += dt visits (LeRobot's π0 / π0.5)
            t, visited = np.float32(1.0), []
            for _ in range(steps):
                visited.append(t)
                t = np.float32(t + np.float32(-1.0 / steps))
            times = np.asarray(visited, np.float64)
        fraction = np.linspace(0.0, 1.0, self.width // 2, dtype=np.float64)
        lo, hi = self.periods
        period = lo * (hi / lo) ** fraction
        angles = times[:, None] * (1.0 / period * 2 * np.pi)[None, :]
        return jnp.asarray(np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).astype(np.float32))

    def _sample_guided(self, prefix: PreparedPrefix, state: jax.Array | None, noise: jax.Array, steps: int,
                       target: jax.Array, weights: jax.Array | None, max_guidance: float) -> jax.Array:
        """Euler steps on the RTC-guided velocity (π0's time: t = 1 noise, t = 0 actions).

        At each step the predicted clean chunk ``a(x) = x - t v(x)`` is pulled toward ``target`` on the weighted
        entries through one vector-Jacobian product, ``g = (da/dx)^T W (target - a)``, and the velocity becomes
        ``v - c(t) g`` with the paper's weight ``c = min(beta, (1 - tau) / (tau r^2))``, ``tau = 1 - t``,
        ``r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2)`` (the clip ``beta`` keeps the first, noisiest steps stable).
        """
        weights = guide_weight_array(weights, target)
        target = jnp.asarray(target, noise.dtype)
        dt = -1.0 / steps
        b = noise.shape[0]

        def step(i, x):
            t = jnp.full((b,), 1.0 + i * dt, jnp.float32)

            def clean(x_):
                v_ = self.velocity(prefix, state, x_, t).astype(x_.dtype)
                return x_ - t[:, None, None].astype(x_.dtype) * v_, v_

            a_hat, vjp, v = jax.vjp(clean, x, has_aux=True)
            (g,) = vjp((weights * (target - a_hat)).astype(a_hat.dtype))
            tau = 1.0 - t
            r2 = jnp.square(1.0 - tau) / (jnp.square(tau) + jnp.square(1.0 - tau))
            c = jnp.minimum(max_guidance, (1.0 - tau) / jnp.maximum(tau * r2, 1e-12))
            return x + dt * (v - c[:, None, None].astype(x.dtype) * g)

        return jax.lax.fori_loop(0, steps, step, noise)
