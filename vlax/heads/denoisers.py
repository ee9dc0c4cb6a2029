"""Denoisers for the diffusion head: ``denoiser(x_t [B, H, A], t [B], cond [B, C]) -> [B, H, A]``.

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

from vlax.heads.common import dropout
from vlax.nn import Dense, LayerNorm, scan_layers, stack_layers
from vlax.nn.params import param


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

    def __init__(self, cin: int, cout: int, cond_dim: int, kernel_size: int, groups: int, *, rngs: nnx.Rngs):
        self.block1 = ConvBlock(cin, cout, kernel_size, groups, rngs=rngs)
        self.block2 = ConvBlock(cout, cout, kernel_size, groups, rngs=rngs)
        self.film = Dense(cond_dim, 2 * cout, rngs=rngs)
        self.residual = Conv1d(cin, cout, 1, rngs=rngs) if cin != cout else None

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.film(mish(cond))[:, None, :], 2, axis=-1)
        h = self.block2(scale * self.block1(x) + shift)
        return h + (x if self.residual is None else self.residual(x))


def _sinusoidal(t: jax.Array, dim: int) -> jax.Array:
    """Transformer-style sinusoidal embedding ``[B, dim]`` of integer timesteps (``[sin, cos]`` halves)."""
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half) * -(math.log(10000.0) / (half - 1)))
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class ConditionalUnet1D(nnx.Module):
    """Diffusion Policy's temporal U-Net over the horizon axis, FiLM-conditioned on ``[step embedding, cond]``.

    ``len(down_dims) - 1`` stride-2 down/up-samplings: the horizon must be divisible by ``2 ** (len(down_dims) - 1)``.
    """

    def __init__(self, action_dim: int, horizon: int, cond_dim: int, *, down_dims: Sequence[int] = (256, 512, 1024),
                 kernel_size: int = 5, n_groups: int = 8, step_embed_dim: int = 256, rngs: nnx.Rngs):
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
        block = lambda cin, cout: FiLMResidualBlock(cin, cout, film_dim, kernel_size, n_groups, rngs=rngs)  # noqa
        self.down = nnx.List([nnx.List([block(cin, cout), block(cout, cout)]) for cin, cout in pairs])
        self.downsample = nnx.List([Conv1d(cout, cout, 3, stride=2, padding=1, rngs=rngs) for _, cout in pairs[:-1]])
        self.mid = nnx.List([block(down_dims[-1], down_dims[-1]), block(down_dims[-1], down_dims[-1])])
        ups = list(reversed(pairs[1:]))
        self.up = nnx.List([nnx.List([block(2 * cout, cin), block(cin, cin)]) for cin, cout in ups])
        self.upsample = nnx.List([Conv1d(cin, cin, 4, stride=2, padding=1, transpose=True, rngs=rngs)
                                  for cin, _ in ups])
        self.final_block = ConvBlock(down_dims[0], down_dims[0], kernel_size, n_groups, rngs=rngs)
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
