"""DDPM diffusion action head (Octo, Diffusion Policy).

The context is pooled once into a conditioning vector (masked mean or attention pooling, plus the state if
configured); a denoiser (:mod:`vlax.heads.denoisers`) is trained to predict the noise (or the clean chunk, or the
velocity) of ``x_t = sqrt(abar_t) a + sqrt(1 - abar_t) noise`` at a uniformly drawn timestep. Sampling runs DDPM
(``fixed_small`` / ``fixed_large`` variance) or DDIM steps (:mod:`vlax.heads.noise_schedules`, diffusers'
arithmetic) inside ``lax.fori_loop``; the pooled condition is computed once, before the loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.heads import noise_schedules as ns
from vlax.heads.common import ActionHead, AttentionPool, RngLike, masked_mean, masked_mean_pool, split_rngs
from vlax.heads.denoisers import ConditionalUnet1D, MLPResNetDenoiser
from vlax.nn import ContextSpec, HeadContext

DENOISERS = ("mlp_resnet", "unet1d")
SAMPLERS = ("ddpm", "ddim")


class DiffusionHead(ActionHead):
    """Denoising-diffusion head.

    Args:
      action_dim, horizon: actions are ``[B, horizon, action_dim]``.
      context: :class:`vlax.nn.ContextSpec` (``width`` of the context tokens).
      denoiser: ``"mlp_resnet"`` (Octo) or ``"unet1d"`` (Diffusion Policy); ``denoiser_kwargs`` go to its
        constructor (e.g. ``hidden_dim``, ``num_blocks`` / ``down_dims``, ``n_groups``).
      schedule, num_train_timesteps, beta_start, beta_end: the :class:`NoiseSchedule`.
      prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
      sampler: ``"ddpm"`` (``variance_type`` ``"fixed_small"`` / ``"fixed_large"``) or ``"ddim"`` (``eta``).
      num_steps: default sampling steps (``None``: every training timestep for DDPM, 10 for DDIM), spaced by
        ``timestep_spacing`` / ``steps_offset`` as in diffusers.
      clip_sample, clip_sample_range: clip the predicted clean chunk at every step.
      pool: ``"mean"`` or ``"map"`` pooling of the context; ``state_dim``: append ``ctx.state`` to the condition.
    """

    def __init__(self, action_dim: int, horizon: int, context: ContextSpec | int, *, denoiser: str = "mlp_resnet",
                 schedule: str = "cosine", num_train_timesteps: int = 20, beta_start: float = 1e-4,
                 beta_end: float = 0.02, prediction_type: str = "epsilon", sampler: str = "ddpm",
                 variance_type: str = "fixed_large", num_steps: int | None = None, timestep_spacing: str = "leading",
                 steps_offset: int = 0, eta: float = 0.0, set_alpha_to_one: bool = True, clip_sample: bool = True,
                 clip_sample_range: float = 1.0, pool: str = "mean", num_heads: int | None = None,
                 state_dim: int | None = None, denoiser_kwargs: dict | None = None, rngs: nnx.Rngs):
        self._init_contract(action_dim, horizon, context)
        for value, known, what in ((denoiser, DENOISERS, "denoiser"), (sampler, SAMPLERS, "sampler"),
                                   (prediction_type, ns.PREDICTION_TYPES, "prediction_type"),
                                   (variance_type, ns.VARIANCE_TYPES, "variance_type"),
                                   (timestep_spacing, ns.SPACINGS, "timestep_spacing"), (pool, ("mean", "map"), "pool")):
            if value not in known:
                raise ValueError(f"unknown {what} {value!r}; known: {list(known)}")
        self.schedule = ns.NoiseSchedule(schedule, num_train_timesteps, beta_start, beta_end)
        self.prediction_type, self.sampler, self.variance_type = prediction_type, sampler, variance_type
        self.num_steps = num_steps or (num_train_timesteps if sampler == "ddpm" else min(10, num_train_timesteps))
        self.spacing, self.steps_offset, self.eta, self.set_alpha_to_one = timestep_spacing, steps_offset, eta, \
            set_alpha_to_one
        self.clip_sample, self.clip_sample_range = clip_sample, float(clip_sample_range)
        ns.inference_timesteps(num_train_timesteps, self.num_steps, timestep_spacing, steps_offset)  # validates
        width = self.context.width
        self.pool = AttentionPool(width, num_heads or max(1, width // 64), rngs=rngs) if pool == "map" else None
        self.state_dim = state_dim
        cond_dim = width + (state_dim or 0)
        kwargs = dict(denoiser_kwargs or {})
        if denoiser == "mlp_resnet":
            self.denoiser = MLPResNetDenoiser(self.action_dim, self.horizon, cond_dim, rngs=rngs, **kwargs)
        else:
            self.denoiser = ConditionalUnet1D(self.action_dim, self.horizon, cond_dim, rngs=rngs, **kwargs)

    def condition(self, ctx: HeadContext) -> jax.Array:
        """The conditioning vector ``[B, C]`` (computed once per chunk)."""
        self.check_context(ctx)
        if self.pool is not None:
            cond = self.pool(ctx.tokens, ctx.mask)[:, 0]
        else:
            cond = masked_mean_pool(ctx.tokens, ctx.mask)
        if self.state_dim:
            if ctx.state is None or ctx.state.shape[-1] != self.state_dim:
                got = None if ctx.state is None else tuple(ctx.state.shape)
                raise ValueError(f"this head conditions on the state: ctx.state must be [B, {self.state_dim}], "
                                 f"got {got}")
            cond = jnp.concatenate([cond, ctx.state.astype(cond.dtype)], axis=-1)
        return cond

    def loss(self, ctx: HeadContext, actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: RngLike, train: bool = True, lm=None) -> tuple[jax.Array, dict]:
        """MSE between the denoiser output and its target at a random timestep, over real entries."""
        actions, mask = self.prepare_actions(actions, action_mask)
        noise_key, drop_key = split_rngs(rngs)
        k_noise, k_time = jax.random.split(noise_key)
        b = actions.shape[0]
        t = jax.random.randint(k_time, (b,), 0, self.schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, actions.shape, actions.dtype)
        x_t = ns.add_noise(self.schedule, actions, noise, t).astype(actions.dtype)
        pred = self.denoiser(x_t, t, self.condition(ctx), key=drop_key, train=train)
        target = ns.training_target(self.schedule, actions, noise, t, self.prediction_type)
        loss = masked_mean(jnp.square(pred - target), mask)
        return loss, {"loss": loss}

    def sample(self, ctx: HeadContext, *, rngs: RngLike, num_steps: int | None = None, lm=None) -> jax.Array:
        """Reverse diffusion from Gaussian noise: ``[B, H, A]``."""
        steps = int(num_steps or self.num_steps)
        big_t = self.schedule.num_train_timesteps
        timesteps = ns.inference_timesteps(big_t, steps, self.spacing, self.steps_offset)
        if self.sampler == "ddpm":
            previous = ns.ddpm_previous_timesteps(timesteps)
        else:
            previous = ns.ddim_previous_timesteps(timesteps, big_t, steps)
        cond = self.condition(ctx)  # once: the loop below only runs the denoiser
        key = split_rngs(rngs)[0]
        init_key, loop_key = jax.random.split(key)
        b = ctx.batch_size
        x = jax.random.normal(init_key, (b, *self.action_shape), ctx.tokens.dtype)
        ts, prevs = jnp.asarray(timesteps, jnp.int32), jnp.asarray(previous, jnp.int32)
        common = dict(prediction_type=self.prediction_type, clip_sample=self.clip_sample,
                      clip_sample_range=self.clip_sample_range)

        def step(i, x):
            t, prev = ts[i], prevs[i]
            out = self.denoiser(x, jnp.full((b,), t), cond, train=False)
            noise = jax.random.normal(jax.random.fold_in(loop_key, i), x.shape, x.dtype)
            if self.sampler == "ddpm":
                new, _ = ns.ddpm_step(self.schedule, out, t, prev, x, noise, variance_type=self.variance_type,
                                      **common)
            else:
                new, _ = ns.ddim_step(self.schedule, out, t, prev, x, noise, eta=self.eta,
                                      set_alpha_to_one=self.set_alpha_to_one, **common)
            return new.astype(x.dtype)

        return jax.lax.fori_loop(0, steps, step, x)
