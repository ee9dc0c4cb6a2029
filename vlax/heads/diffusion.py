"""DDPM diffusion action head (Octo, Diffusion Policy).

The context is pooled once into a conditioning vector (masked mean or attention pooling, plus the state if
configured); a denoiser is trained to predict the noise (or the clean chunk, or the velocity) of
``x_t = sqrt(abar_t) a + sqrt(1 - abar_t) noise`` at a uniformly drawn timestep. Sampling runs DDPM
(``fixed_small`` / ``fixed_large`` variance) or DDIM steps (:mod:`vlax.nn.noise_schedules`, diffusers'
arithmetic) inside ``lax.fori_loop``; the pooled condition is computed once, before the loop.

Two denoisers, each ``denoiser(x_t [B, H, A], t [B], cond [B, C]) -> [B, H, A]``:

* :class:`MLPResNetDenoiser`: Octo's score network: learned Fourier features of the timestep through a small MLP,
  concatenated with the conditioning vector and the flattened noisy chunk, then an MLP-ResNet.
* :class:`ConditionalUnet1D`: Diffusion Policy's 1-D temporal U-Net; every residual block is FiLM-modulated
  (per-channel scale and bias) by the timestep embedding concatenated with the conditioning vector.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.nn import ContextSpec, Dense, HeadContext, LayerNorm, scan_layers, stack_layers
from vlax.nn import noise_schedules as ns
from vlax.nn.head_base import (ActionHead, AttentionPool, RngLike, dropout, guide_weight_array, masked_mean,
                               masked_mean_pool, split_rngs)
from vlax.nn.params import param


# ---- denoisers -----------------------------------------------------------------------------------------------------
def mish(x: jax.Array) -> jax.Array:
    return x * jnp.tanh(jax.nn.softplus(x))


class FourierFeatures(nnx.Module):
    """``[cos(2π t w), sin(2π t w)]`` with ``w`` learned (initialised ``N(0, 0.2²)``, as in Octo)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        if dim % 2:
            raise ValueError(f"Fourier feature dim must be even, got {dim}")
        self.kernel = param(rngs, nnx.initializers.normal(0.2), (dim // 2, 1), (None, None))

    def __call__(self, t: jax.Array) -> jax.Array:
        """``t [B]`` -> ``[B, dim]``."""
        f = 2 * math.pi * t.astype(jnp.float32)[:, None] @ self.kernel[...].T
        return jnp.concatenate([jnp.cos(f), jnp.sin(f)], axis=-1)


class MLPResNetBlock(nnx.Module):
    """``x + Dense(act(Dense_4x(LayerNorm(dropout(x)))))``."""

    def __init__(self, width: int, *, use_layer_norm: bool = True, rngs: nnx.Rngs):
        self.norm = LayerNorm(width, rngs=rngs) if use_layer_norm else None
        self.dense1 = Dense(width, 4 * width, rngs=rngs)
        self.dense2 = Dense(4 * width, width, axes=("mlp", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array, *, rate: float, key: jax.Array | None, train: bool) -> jax.Array:
        h = dropout(x, rate, key, train)
        if self.norm is not None:
            h = self.norm(h)
        return x + self.dense2(jax.nn.swish(self.dense1(h)))


class MLPResNetDenoiser(nnx.Module):
    """Octo's ``ScoreActor`` (defaults: 32 Fourier features, 3 blocks of width 256, layer norm, no dropout)."""

    def __init__(self, action_dim: int, horizon: int, cond_dim: int, *, hidden_dim: int = 256, num_blocks: int = 3,
                 time_dim: int = 32, dropout: float = 0.0, use_layer_norm: bool = True, rngs: nnx.Rngs):
        self.horizon, self.action_dim, self.rate, self.num_blocks = horizon, action_dim, float(dropout), num_blocks
        self.time_features = FourierFeatures(time_dim, rngs=rngs)
        self.time_mlp_in = Dense(time_dim, 2 * time_dim, rngs=rngs)
        self.time_mlp_out = Dense(2 * time_dim, time_dim, rngs=rngs)
        self.input_proj = Dense(time_dim + cond_dim + horizon * action_dim, hidden_dim, rngs=rngs)
        self.blocks = stack_layers(lambda r: MLPResNetBlock(hidden_dim, use_layer_norm=use_layer_norm, rngs=r),
                                   num_blocks, rngs)
        self.output_proj = Dense(hidden_dim, horizon * action_dim, axes=("embed", None), rngs=rngs)

    def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array, *, key: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        b = x.shape[0]
        time = self.time_mlp_out(jax.nn.swish(self.time_mlp_in(self.time_features(t))))
        h = self.input_proj(jnp.concatenate([time.astype(x.dtype), cond.astype(x.dtype), x.reshape(b, -1)], -1))
        keys = jax.random.split(key, self.num_blocks) if key is not None else None

        def body(block, carry, k):
            return block(carry, rate=self.rate, key=k, train=train), None

        h, _ = scan_layers(self.blocks, body, h, keys)
        return self.output_proj(jax.nn.swish(h)).reshape(b, self.horizon, self.action_dim)


class Conv1d(nnx.Module):
    """Channels-last 1-D convolution ``[B, L, Cin] -> [B, L', Cout]`` (kernel ``[k, Cin, Cout]``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 padding: int | None = None, transpose: bool = False, rngs: nnx.Rngs):
        self.stride, self.transpose = stride, transpose
        self.padding = kernel_size // 2 if padding is None else padding
        init = nnx.initializers.variance_scaling(1.0 / 3, "fan_in", "uniform", in_axis=(0, 1), out_axis=2)
        self.kernel = param(rngs, init, (kernel_size, in_channels, out_channels), (None, "embed", "mlp"))
        self.bias = param(rngs, nnx.initializers.zeros, (out_channels,), ("mlp",))

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel[...].astype(x.dtype)
        dims = ("NWC", "WIO", "NWC")
        if self.transpose:
            # Transposed convolution (torch ConvTranspose1d semantics): dilate the input by the stride.
            pad = k.shape[0] - 1 - self.padding
            y = jax.lax.conv_general_dilated(x, k, (1,), [(pad, pad)], lhs_dilation=(self.stride,),
                                             dimension_numbers=dims)
        else:
            y = jax.lax.conv_general_dilated(x, k, (self.stride,), [(self.padding, self.padding)],
                                             dimension_numbers=dims)
        return y + self.bias[...].astype(x.dtype)


class GroupNorm(nnx.Module):
    def __init__(self, channels: int, groups: int, *, eps: float = 1e-5, rngs: nnx.Rngs):
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
        self.groups, self.eps = groups, eps
        self.scale = param(rngs, nnx.initializers.ones, (channels,), ("mlp",))
        self.bias = param(rngs, nnx.initializers.zeros, (channels,), ("mlp",))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        g = x.astype(jnp.float32).reshape(b, n, self.groups, c // self.groups)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, n, c)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class ConvBlock(nnx.Module):
    """Conv1d -> GroupNorm -> Mish."""

    def __init__(self, cin: int, cout: int, kernel_size: int, groups: int, *, rngs: nnx.Rngs):
        self.conv = Conv1d(cin, cout, kernel_size, rngs=rngs)
        self.norm = GroupNorm(cout, groups, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return mish(self.norm(self.conv(x)))


class FiLMResidualBlock(nnx.Module):
    """Diffusion Policy's ``ConditionalResidualBlock1D``: conv block, FiLM by the condition, conv block, residual."""

    def __init__(self, cin: int, cout: int, cond_dim: int, kernel_size: int, groups: int, *, film_scale: bool = True,
                 rngs: nnx.Rngs):
        self.block1 = ConvBlock(cin, cout, kernel_size, groups, rngs=rngs)
        self.block2 = ConvBlock(cout, cout, kernel_size, groups, rngs=rngs)
        self.film_scale = film_scale
        self.film = Dense(cond_dim, 2 * cout if film_scale else cout, rngs=rngs)
        self.residual = Conv1d(cin, cout, 1, rngs=rngs) if cin != cout else None

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        film = self.film(mish(cond))[:, None, :]
        if self.film_scale:
            scale, shift = jnp.split(film, 2, axis=-1)
            h = self.block2(scale * self.block1(x) + shift)
        else:  # bias-only FiLM (Diffusion Policy's use_film_scale_modulation=False)
            h = self.block2(self.block1(x) + film)
        return h + (x if self.residual is None else self.residual(x))


def _sinusoidal(t: jax.Array, dim: int) -> jax.Array:
    """Transformer-style sinusoidal embedding ``[B, dim]`` of integer timesteps (``[sin, cos]`` halves)."""
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half) * -(math.log(10000.0) / (half - 1)))
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class ConditionalUnet1D(nnx.Module):
    """Diffusion Policy's temporal U-Net over the horizon axis, FiLM-conditioned on ``[step embedding, cond]``.

    ``film_scale``: FiLM with a per-channel scale and bias (else the bias only); ``final_n_groups``: the GroupNorm
    groups of the last conv block (default ``n_groups``). ``len(down_dims) - 1`` stride-2 down/up-samplings: the
    horizon must be divisible by ``2 ** (len(down_dims) - 1)``.
    """

    def __init__(self, action_dim: int, horizon: int, cond_dim: int, *, down_dims: Sequence[int] = (256, 512, 1024),
                 kernel_size: int = 5, n_groups: int = 8, step_embed_dim: int = 256, film_scale: bool = True,
                 final_n_groups: int | None = None, rngs: nnx.Rngs):
        down_dims = tuple(int(d) for d in down_dims)
        factor = 2 ** (len(down_dims) - 1)
        if horizon % factor:
            raise ValueError(f"horizon={horizon} must be divisible by {factor} for a U-Net with down_dims={down_dims} "
                             f"({len(down_dims) - 1} halvings); pad the horizon or use fewer levels")
        if step_embed_dim % 2 or step_embed_dim < 4:
            raise ValueError(f"step_embed_dim must be even and >= 4, got {step_embed_dim}")
        self.step_embed_dim = step_embed_dim
        self.step_mlp_in = Dense(step_embed_dim, 4 * step_embed_dim, rngs=rngs)
        self.step_mlp_out = Dense(4 * step_embed_dim, step_embed_dim, rngs=rngs)
        film_dim = step_embed_dim + cond_dim
        dims = (action_dim, *down_dims)
        pairs = list(zip(dims[:-1], dims[1:]))
        block = lambda cin, cout: FiLMResidualBlock(cin, cout, film_dim, kernel_size, n_groups,  # noqa
                                                    film_scale=film_scale, rngs=rngs)
        self.down = nnx.List([nnx.List([block(cin, cout), block(cout, cout)]) for cin, cout in pairs])
        self.downsample = nnx.List([Conv1d(cout, cout, 3, stride=2, padding=1, rngs=rngs) for _, cout in pairs[:-1]])
        self.mid = nnx.List([block(down_dims[-1], down_dims[-1]), block(down_dims[-1], down_dims[-1])])
        ups = list(reversed(pairs[1:]))
        self.up = nnx.List([nnx.List([block(2 * cout, cin), block(cin, cin)]) for cin, cout in ups])
        self.upsample = nnx.List([Conv1d(cin, cin, 4, stride=2, padding=1, transpose=True, rngs=rngs)
                                  for cin, _ in ups])
        # LeRobot's final block keeps GroupNorm's default 8 groups whatever n_groups is (final_n_groups=8 there).
        self.final_block = ConvBlock(down_dims[0], down_dims[0], kernel_size, final_n_groups or n_groups, rngs=rngs)
        self.final_conv = Conv1d(down_dims[0], action_dim, 1, rngs=rngs)

    def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array, *, key: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        step = self.step_mlp_out(mish(self.step_mlp_in(_sinusoidal(t, self.step_embed_dim))))
        film = jnp.concatenate([step.astype(x.dtype), cond.astype(x.dtype)], axis=-1)
        skips = []
        for level, (res1, res2) in enumerate(self.down):
            x = res2(res1(x, film), film)
            skips.append(x)
            if level < len(self.downsample):
                x = self.downsample[level](x)
        for res in self.mid:
            x = res(x, film)
        for level, (res1, res2) in enumerate(self.up):
            x = jnp.concatenate([x, skips[-(level + 1)]], axis=-1)  # the finest skip stays unused, as in DP
            x = self.upsample[level](res2(res1(x, film), film))
        return self.final_conv(self.final_block(x))


# ---- the head ------------------------------------------------------------------------------------------------------
DENOISERS = ("mlp_resnet", "unet1d")
SAMPLERS = ("ddpm", "ddim", "octo")


class DiffusionHead(ActionHead):
    """Denoising-diffusion head.

    Args:
      action_dim, horizon: actions are ``[B, horizon, action_dim]``.
      context: :class:`vlax.nn.ContextSpec` (``width`` of the context tokens).
      denoiser: ``"mlp_resnet"`` (Octo) or ``"unet1d"`` (Diffusion Policy); ``denoiser_kwargs`` go to its
        constructor (e.g. ``hidden_dim``, ``num_blocks`` / ``down_dims``, ``n_groups``).
      schedule, num_train_timesteps, beta_start, beta_end: the :class:`NoiseSchedule`.
      prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
      sampler: ``"ddpm"`` (``variance_type`` ``"fixed_small"`` / ``"fixed_large"``), ``"ddim"`` (``eta``) or
        ``"octo"`` (Octo's DDPM step on ``x_t`` itself, every timestep, ``x`` clipped to ``clip_sample_range``
        when ``clip_sample``; see :func:`vlax.nn.noise_schedules.ddpm_sample_space_step`; epsilon prediction).
      num_steps: default sampling steps (``None``: every training timestep for DDPM, 10 for DDIM), spaced by
        ``timestep_spacing`` / ``steps_offset`` as in diffusers.
      clip_sample, clip_sample_range: clip the predicted clean chunk at every step.
      pool: ``"mean"`` or ``"map"`` pooling of the context; ``state_dim``: append ``ctx.state`` to the condition.
      embodiment_action_dim: with the ``"octo"`` sampler, sample only the first this many action dims; the rest
        (dims padded for other embodiments in training) are held at the noise level the denoiser saw for them at
        each step, ``sqrt(1 - abar_t) * z``, as Octo's ``predict_action(embodiment_action_dim=...)`` does, so
        untrained padding does not steer the real dims. ``None``: every dim.
    """

    def __init__(self, action_dim: int, horizon: int, context: ContextSpec | int, *, denoiser: str = "mlp_resnet",
                 schedule: str = "cosine", num_train_timesteps: int = 20, beta_start: float = 1e-4,
                 beta_end: float = 0.02, prediction_type: str = "epsilon", sampler: str = "ddpm",
                 variance_type: str = "fixed_large", num_steps: int | None = None, timestep_spacing: str = "leading",
                 steps_offset: int = 0, eta: float = 0.0, set_alpha_to_one: bool = True, clip_sample: bool = True,
                 clip_sample_range: float = 1.0, pool: str = "mean", num_heads: int | None = None,
                 state_dim: int | None = None, denoiser_kwargs: dict | None = None,
                 embodiment_action_dim: int | None = None, rngs: nnx.Rngs):
        self._init_contract(action_dim, horizon, context)
        for value, known, what in ((denoiser, DENOISERS, "denoiser"), (sampler, SAMPLERS, "sampler"),
                                   (prediction_type, ns.PREDICTION_TYPES, "prediction_type"),
                                   (variance_type, ns.VARIANCE_TYPES, "variance_type"),
                                   (timestep_spacing, ns.SPACINGS, "timestep_spacing"),
                                   (pool, ("mean", "map"), "pool")):
            if value not in known:
                raise ValueError(f"unknown {what} {value!r}; known: {list(known)}")
        self.schedule = ns.NoiseSchedule(schedule, num_train_timesteps, beta_start, beta_end)
        if sampler == "octo" and (prediction_type != "epsilon" or num_steps not in (None, num_train_timesteps)):
            raise ValueError(f"sampler='octo' predicts the noise at every one of the {num_train_timesteps} "
                             f"timesteps; got prediction_type={prediction_type!r}, num_steps={num_steps}")
        self.prediction_type, self.sampler, self.variance_type = prediction_type, sampler, variance_type
        self.embodiment_action_dim = self._check_embodiment_dim(embodiment_action_dim)
        self.num_steps = num_steps or (num_train_timesteps if sampler in ("ddpm", "octo")
                                       else min(10, num_train_timesteps))
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

    def _check_embodiment_dim(self, dims: int | None) -> int | None:
        if dims is None:
            return None
        if self.sampler != "octo":
            raise ValueError(f"embodiment_action_dim={dims} needs sampler='octo' (Octo's masked reverse process); "
                             f"this head samples with {self.sampler!r}")
        if not 0 < int(dims) <= self.action_dim:
            raise ValueError(f"embodiment_action_dim={dims} is outside 1..{self.action_dim} (the head's action_dim)")
        return int(dims)

    def condition(self, ctx: HeadContext) -> jax.Array:
        """The conditioning vector ``[B, C]`` (computed once per chunk)."""
        self.check_context(ctx)
        if self.pool is not None:
            cond = self.pool(ctx.tokens, ctx.mask)[:, 0]
        else:
            cond = masked_mean_pool(ctx.tokens, ctx.mask)
        if self.state_dim:
            cond = jnp.concatenate([cond, self.require_state(ctx, self.state_dim).astype(cond.dtype)], axis=-1)
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

    def sample(self, ctx: HeadContext, *, rngs: RngLike, num_steps: int | None = None, lm=None,
               guide_actions: jax.Array | None = None, guide_weights: jax.Array | None = None,
               max_guidance: float = 5.0, noise: jax.Array | None = None,
               step_noise: jax.Array | None = None, embodiment_action_dim: int | None = None) -> jax.Array:
        """Reverse diffusion from Gaussian noise: ``[B, H, A]``.

        ``embodiment_action_dim`` overrides the head's setting for this call (see the class docstring).

        ``noise [B, H, A]`` replaces the initial draw and ``step_noise [steps, B, H, A]`` the draw of every step
        (to reproduce another implementation's sample from its noise).

        With ``guide_actions [B, H, A]`` (normalized) and ``guide_weights`` (``[B, H]`` or ``[B, H, A]``), every step
        first pulls the predicted clean chunk toward those actions (real-time chunking's guided inpainting, see
        :meth:`_guided_output`); without them the sampling is exactly the unguided one.
        """
        steps = self.num_steps if self.sampler == "octo" else int(num_steps or self.num_steps)
        big_t = self.schedule.num_train_timesteps
        timesteps = ns.inference_timesteps(big_t, steps, self.spacing, self.steps_offset)
        if self.sampler in ("ddpm", "octo"):
            previous = ns.ddpm_previous_timesteps(timesteps)
        else:
            previous = ns.ddim_previous_timesteps(timesteps, big_t, steps)
        cond = self.condition(ctx)  # once: the loop below only runs the denoiser
        key = split_rngs(rngs)[0]
        init_key, loop_key = jax.random.split(key)
        b = ctx.batch_size
        if noise is None:
            x = jax.random.normal(init_key, (b, *self.action_shape), ctx.tokens.dtype)
        else:
            if tuple(noise.shape) != (b, *self.action_shape):
                raise ValueError(f"noise has shape {tuple(noise.shape)}; the head samples {(b, *self.action_shape)}")
            x = jnp.asarray(noise, ctx.tokens.dtype)
        if step_noise is not None and tuple(step_noise.shape) != (steps, *x.shape):
            raise ValueError(f"step_noise has shape {tuple(step_noise.shape)}; expected {(steps, *x.shape)}")
        ts, prevs = jnp.asarray(timesteps, jnp.int32), jnp.asarray(previous, jnp.int32)
        common = dict(prediction_type=self.prediction_type, clip_sample=self.clip_sample,
                      clip_sample_range=self.clip_sample_range)

        real_dims = self._check_embodiment_dim(embodiment_action_dim) or self.embodiment_action_dim
        if real_dims is not None and real_dims < self.action_dim:
            real = jnp.arange(self.action_dim) < real_dims
            padded_std = jnp.sqrt(1.0 - jnp.asarray(self.schedule.alphas_cumprod, jnp.float32))
        else:
            real = None
        if guide_actions is not None:
            weights = guide_weight_array(guide_weights, guide_actions)
            target = jnp.asarray(guide_actions, x.dtype)

        def step(i, x):
            t, prev = ts[i], prevs[i]
            if guide_actions is None:
                out = self.denoiser(x, jnp.full((b,), t), cond, train=False)
            else:
                out = self._guided_output(x, t, cond, target, weights, max_guidance)
            if step_noise is None:
                noise = jax.random.normal(jax.random.fold_in(loop_key, i), x.shape, x.dtype)
            else:
                noise = jnp.asarray(step_noise, x.dtype)[i]
            if self.sampler == "octo":
                new, _ = ns.ddpm_sample_space_step(self.schedule, out, t, x, noise,
                                                   clip_range=self.clip_sample_range if self.clip_sample else None)
                if real is not None:
                    new = jnp.where(real, new, padded_std[t].astype(x.dtype) * noise)
            elif self.sampler == "ddpm":
                new, _ = ns.ddpm_step(self.schedule, out, t, prev, x, noise, variance_type=self.variance_type,
                                      **common)
            else:
                new, _ = ns.ddim_step(self.schedule, out, t, prev, x, noise, eta=self.eta,
                                      set_alpha_to_one=self.set_alpha_to_one, **common)
            return new.astype(x.dtype)

        return jax.lax.fori_loop(0, steps, step, x)

    def _guided_output(self, x: jax.Array, t: jax.Array, cond: jax.Array, target: jax.Array, weights: jax.Array,
                       max_guidance: float) -> jax.Array:
        """The denoiser's output at ``x [B, H, A]``, timestep ``t``, after RTC guidance toward ``target``.

        The flow rule carried over through the equivalent linear-path time: the VP sample
        ``x = sqrt(abar) a + sqrt(1 - abar) n`` divided by ``k = sqrt(abar) + sqrt(1 - abar)`` is
        ``tau a + (1 - tau) n`` with ``tau = sqrt(abar) / k``. The predicted clean chunk moves by
        ``min(beta (1 - tau), (tau^2 + (1 - tau)^2) / tau) * k * (da/dx)^T W (target - a)`` (the flow head's
        velocity correction expressed on ``a``), and the output is re-expressed in the head's prediction type.
        """
        abar = jnp.asarray(self.schedule.alphas_cumprod)[jnp.maximum(t, 0)].astype(jnp.float32)
        sa, sb = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        b = x.shape[0]

        def clean(x_):
            out_ = self.denoiser(x_, jnp.full((b,), t), cond, train=False)
            if self.prediction_type == "epsilon":
                a_ = (x_ - sb * out_) / sa
            elif self.prediction_type == "sample":
                a_ = out_
            else:  # v_prediction
                a_ = sa * x_ - sb * out_
            return a_.astype(x_.dtype), out_

        a_hat, vjp, _ = jax.vjp(clean, x, has_aux=True)
        (g,) = vjp((weights * (target - a_hat)).astype(a_hat.dtype))
        k = sa + sb
        tau = sa / k
        c = jnp.minimum(max_guidance * (1.0 - tau), (jnp.square(tau) + jnp.square(1.0 - tau)) / jnp.maximum(tau, 1e-12))
        a_new = a_hat + (c * k).astype(x.dtype) * g
        if self.clip_sample:
            # The step clips the clean chunk anyway; clipping before the noise is re-derived keeps DDIM's update
            # bounded when an early, noisy step's Jacobian (~ 1 / sqrt(abar) for noise prediction) overshoots.
            a_new = jnp.clip(a_new, -self.clip_sample_range, self.clip_sample_range)
        eps = (x - sa * a_new) / jnp.maximum(sb, 1e-12)
        if self.prediction_type == "epsilon":
            return eps.astype(x.dtype)
        if self.prediction_type == "sample":
            return a_new.astype(x.dtype)
        return (sa * eps - sb * a_new).astype(x.dtype)
