"""ACT (Zhao et al., 2023; LeRobot's ``ACTPolicy``) as a preset: ResNet-18 per camera, a transformer encoder over
``[latent, state, image features]``, and ACT's decoder as the head.

* Each camera's image, scaled to [0, 1] and normalised by that camera's pixel statistics (LeRobot's VISUAL
  MEAN_STD), goes through a frozen-batch-norm ResNet-18 (the same weights for every camera); its layer-4 map
  ``[B, h, w, 512]`` is projected by a 1x1 conv to ``dim_model`` and flattened row by row into ``h * w`` tokens
  with a fixed 2-D sinusoidal position embedding.
* The latent token (``latent_dim`` -> ``dim_model``) and the state token carry learned 1-D position embeddings.
* The encoder adds the positions to queries and keys of every layer (post-norm unless ``pre_norm``).
* ``model.head="act"`` (default) is ACT's decoder (:class:`vlax.heads.chunk.ACTDecoderHead`), which also adds
  the encoder's positions to its cross-attention keys. Any other registered head reads the encoder output as its
  context tokens, so ``model.head`` still swaps the action head.
* Training with ``use_vae``: the VAE encoder reads ``[CLS, state, a_1 .. a_H]`` (fixed 1-D sinusoidal positions)
  and samples the latent; the loss is L1 + ``kl_weight`` * KL. At inference the latent is zero.

Temporal ensembling (coefficient 0.01 in the paper) is :class:`vlax.heads.execution.TemporalEnsembler`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlax.encoders.preprocess import to_unit_float
from vlax.encoders.resnet import ResNet
from vlax.heads import get_head
from vlax.heads.chunk import ACTDecoderHead, ACTEncoder
from vlax.nn import ContextSpec, Dense, HeadContext, param
from vlax.policy import PolicySpec
from vlax.presets import register

# LeRobot's ACTConfig defaults (the published ACT / ALOHA sizes).
DEFAULTS = dict(dim_model=512, n_heads=8, dim_feedforward=3200, n_encoder_layers=4, n_decoder_layers=1,
                n_vae_encoder_layers=4, latent_dim=32, use_vae=True, kl_weight=10.0, pre_norm=False, dropout=0.1,
                backbone_depth=18, backbone_widths=(64, 128, 256, 512), pixel_stats=None)
# LeRobot adds 1e-8 to the std when it normalises.
PIXEL_STD_EPS = 1e-8


def image_position_embedding(height: int, width: int, dim_model: int) -> jax.Array:
    """ACT's (DETR's) fixed 2-D sine embedding ``[h * w, dim_model]``: ``dim_model / 2`` channels for the row,
    then as many for the column; positions are normalised to ``(0, 2 pi]`` and channel ``2k``/``2k+1`` hold the
    sine/cosine of one frequency."""
    half = dim_model // 2
    eps, two_pi = 1e-6, 2 * math.pi
    y = jnp.arange(1, height + 1, dtype=jnp.float32)
    x = jnp.arange(1, width + 1, dtype=jnp.float32)
    y = y / (y[-1] + eps) * two_pi
    x = x / (x[-1] + eps) * two_pi
    inverse_frequency = 10000.0 ** (2 * (jnp.arange(half, dtype=jnp.float32) // 2) / half)
    even = (jnp.arange(half) % 2) == 0

    def embed(p):  # [n] -> [n, half]
        angle = p[:, None] / inverse_frequency
        return jnp.where(even, jnp.sin(angle), jnp.cos(angle))

    ey, ex = embed(y), embed(x)
    grid = jnp.concatenate([jnp.broadcast_to(ey[:, None], (height, width, half)),
                            jnp.broadcast_to(ex[None, :], (height, width, half))], axis=-1)
    return grid.reshape(height * width, dim_model)


def sequence_position_table(length: int, dim_model: int) -> np.ndarray:
    """The VAE encoder's fixed 1-D sinusoidal table ``[length, dim_model]`` (float64 angles, float32 result)."""
    p = np.arange(length, dtype=np.float64)[:, None]
    j = np.arange(dim_model)
    angle = p / np.power(10000.0, 2 * (j // 2) / dim_model)
    return np.where(j % 2 == 0, np.sin(angle), np.cos(angle)).astype(np.float32)


class ACTPolicy(nnx.Module):
    """The ACT policy (module docstring); keeps :class:`vlax.policy.VLA`'s contract."""

    def __init__(self, spec: PolicySpec, *, head_name: str = "act", head_kwargs: Mapping[str, Any] | None = None,
                 dim_model: int, n_heads: int, dim_feedforward: int, n_encoder_layers: int, n_decoder_layers: int,
                 n_vae_encoder_layers: int, latent_dim: int, use_vae: bool, kl_weight: float, pre_norm: bool,
                 dropout: float, backbone_depth: int, backbone_widths, pixel_stats=None, rngs: nnx.Rngs):
        if spec.obs_history != 1:
            raise ValueError(f"ACT sees one observation step; the spec has obs_history={spec.obs_history} "
                             "(set data.obs_history=1)")
        if spec.state_dim < 1:
            raise ValueError("ACT embeds the robot state as a token; the spec has state_dim=0")
        self.spec, self.head_name = spec, head_name
        self.dim_model, self.latent_dim = dim_model, latent_dim
        self.use_vae, self.kl_weight, self.rate = use_vae, float(kl_weight), float(dropout)
        # per camera ((mean r, g, b), (std r, g, b)) of LeRobot's VISUAL MEAN_STD, or None: pixels stay in [0, 1]
        stats = dict(pixel_stats or {})
        unknown = sorted(set(stats) - set(spec.cameras))
        if unknown:
            raise ValueError(f"pixel statistics for camera(s) {unknown} the policy does not have; its cameras are "
                             f"{list(spec.cameras)}")
        self.pixel_stats = tuple((tuple(map(float, stats[c][0])), tuple(map(float, stats[c][1])))
                                 if stats.get(c) is not None else None for c in spec.cameras)
        self.resnet = ResNet(backbone_depth, norm="frozen_batch", widths=tuple(backbone_widths), rngs=rngs)
        self.image_proj = nnx.Conv(self.resnet.out_channels, dim_model, (1, 1), rngs=rngs)
        self.latent_proj = Dense(latent_dim, dim_model, axes=(None, "embed"), rngs=rngs)
        self.state_proj = Dense(spec.state_dim, dim_model, axes=(None, "embed"), rngs=rngs)
        self.token_pos = param(rngs, nnx.initializers.normal(1.0), (2, dim_model), (None, "embed"))
        self.encoder = ACTEncoder(dim_model, n_encoder_layers, n_heads, dim_feedforward, pre_norm=pre_norm,
                                  rngs=rngs)
        if use_vae:
            self.vae_cls = param(rngs, nnx.initializers.normal(1.0), (1, dim_model), (None, "embed"))
            self.vae_state_proj = Dense(spec.state_dim, dim_model, axes=(None, "embed"), rngs=rngs)
            self.vae_action_proj = Dense(spec.action_dim, dim_model, axes=(None, "embed"), rngs=rngs)
            self.vae_encoder = ACTEncoder(dim_model, n_vae_encoder_layers, n_heads, dim_feedforward,
                                          pre_norm=pre_norm, rngs=rngs)
            self.vae_out = Dense(dim_model, 2 * latent_dim, axes=("embed", None), rngs=rngs)
        head_kwargs = dict(head_kwargs or {})
        if head_name == "act":
            head_kwargs = {**dict(depth=n_decoder_layers, num_heads=n_heads, mlp_dim=dim_feedforward,
                                  pre_norm=pre_norm, dropout=dropout), **head_kwargs}
        self.head = get_head(head_name, action_dim=spec.action_dim, horizon=spec.horizon,
                             context=ContextSpec(width=dim_model), rngs=rngs, **head_kwargs)
        self.backbone = None

    # ---- observation -> encoder tokens ------------------------------------------------------------------------

    def _camera_tokens(self, images: jax.Array, stats, normalized: bool) -> tuple[jax.Array, jax.Array]:
        x = images.astype(jnp.float32) if normalized else to_unit_float(images)
        if stats is not None and not normalized:
            mean, std = (jnp.asarray(s, x.dtype) for s in stats)
            x = (x - mean) / (std + PIXEL_STD_EPS)
        features = self.image_proj(self.resnet(x))
        b, h, w, d = features.shape
        return features.reshape(b, h * w, d), image_position_embedding(h, w, d).astype(features.dtype)

    def encode(self, obs: Mapping[str, Any], latent: jax.Array | None = None, *, key: jax.Array | None = None,
               train: bool = False, pixels_normalized: bool = False) -> tuple[jax.Array, jax.Array]:
        """``(encoder output [B, N, D], positions [1, N, D])``; ``latent [B, latent_dim]`` (zeros if ``None``).

        ``pixels_normalized``: the images are already LeRobot-normalized floats (its preprocessor's output), so
        neither the [0, 1] scaling nor the pixel statistics are applied again.
        """
        images = obs["images"]
        missing = [c for c in self.spec.cameras if c not in images]
        if missing:
            raise KeyError(f"observation lacks camera(s) {missing}; it has {sorted(images)}")
        state = jnp.asarray(obs["state"], jnp.float32)
        if state.ndim != 2 or state.shape[-1] != self.spec.state_dim:
            raise ValueError(f"state has shape {tuple(state.shape)}; ACT expects [B, {self.spec.state_dim}]")
        b = state.shape[0]
        if latent is None:
            latent = jnp.zeros((b, self.latent_dim), state.dtype)
        tokens = [self.latent_proj(latent)[:, None], self.state_proj(state)[:, None]]
        positions = [self.token_pos[...]]
        for camera, stats in zip(self.spec.cameras, self.pixel_stats):
            cam_tokens, cam_pos = self._camera_tokens(images[camera], stats, pixels_normalized)
            tokens.append(cam_tokens)
            positions.append(cam_pos)
        x = jnp.concatenate(tokens, axis=1)
        pos = jnp.concatenate(positions, axis=0)[None].astype(x.dtype)
        return self.encoder(x, pos, rate=self.rate, key=key, train=train), pos

    def context(self, obs: Mapping[str, Any]) -> HeadContext:
        """The encoder output with the zero latent as the head's context ``[B, N, D]``."""
        tokens, _ = self.encode(obs)
        return HeadContext(tokens=tokens, mask=jnp.ones(tokens.shape[:2], bool))

    # ---- the VAE ------------------------------------------------------------------------------------------------

    def posterior(self, state: jax.Array, actions: jax.Array, step_mask: jax.Array, *, key: jax.Array | None = None,
                  train: bool = True) -> tuple[jax.Array, jax.Array]:
        """``(mu, log_var)`` ``[B, latent_dim]`` from ``state [B, S]``, ``actions [B, H, A]``; ``step_mask [B, H]``
        hides padded steps from the attention."""
        b = actions.shape[0]
        tokens = jnp.concatenate([jnp.broadcast_to(self.vae_cls[...][None], (b, 1, self.dim_model)),
                                  self.vae_state_proj(state)[:, None], self.vae_action_proj(actions)], axis=1)
        pos = jnp.asarray(sequence_position_table(tokens.shape[1], self.dim_model))[None]
        mask = jnp.concatenate([jnp.ones((b, 2), bool), step_mask.astype(bool)], axis=1)
        out = self.vae_encoder(tokens, pos, mask, rate=self.rate, key=key, train=train)
        stats = self.vae_out(out[:, 0])
        return stats[:, :self.latent_dim], stats[:, self.latent_dim:]

    # ---- the policy contract --------------------------------------------------------------------------------------

    def loss(self, obs: Mapping[str, Any], actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: jax.Array, train: bool = True) -> tuple[jax.Array, dict]:
        """Training loss on normalized ``actions [B, H, A]``: L1 (+ ``kl_weight`` * KL with the VAE in training)."""
        vae_key, noise_key, enc_key, head_key = jax.random.split(rngs, 4)
        latent, kl = None, jnp.zeros((), jnp.float32)
        if self.use_vae and train:
            mask = jnp.ones(actions.shape, bool) if action_mask is None else \
                jnp.broadcast_to(jnp.asarray(action_mask), actions.shape)
            mu, log_var = self.posterior(jnp.asarray(obs["state"], jnp.float32), actions, mask.any(-1),
                                         key=vae_key, train=train)
            latent = mu + jnp.exp(0.5 * log_var) * jax.random.normal(noise_key, mu.shape, mu.dtype)
            kl = jnp.mean(jnp.sum(-0.5 * (1.0 + log_var - jnp.square(mu) - jnp.exp(log_var)), axis=-1))
        tokens, pos = self.encode(obs, latent, key=enc_key, train=train)
        ctx = HeadContext(tokens=tokens, mask=jnp.ones(tokens.shape[:2], bool))
        extra = {"memory_pos": pos} if isinstance(self.head, ACTDecoderHead) else {}
        recon, metrics = self.head.loss(ctx, actions, action_mask=action_mask, rngs=head_key, train=train, **extra)
        loss = recon + self.kl_weight * kl
        return loss, {**metrics, "loss": loss, "kl": kl}

    def sample(self, obs: Mapping[str, Any], *, rngs: jax.Array | None = None,
               num_steps: int | None = None) -> jax.Array:
        """Normalized actions ``[B, H, A]`` (zero latent)."""
        tokens, pos = self.encode(obs)
        ctx = HeadContext(tokens=tokens, mask=jnp.ones(tokens.shape[:2], bool))
        if isinstance(self.head, ACTDecoderHead):
            return self.head.sample(ctx, memory_pos=pos)
        return self.head.sample(ctx, rngs=rngs, num_steps=num_steps)


def _plain(value: Any) -> dict:
    """A ConfigDict / mapping as a plain dict (nested ConfigDicts too)."""
    if value is None:
        return {}
    return value.to_dict() if hasattr(value, "to_dict") else dict(value)


def act_settings(model: Mapping[str, Any]) -> dict:
    """ACT's sizes from ``model.act`` over :data:`DEFAULTS`; an unknown name is an error listing the known ones."""
    given = _plain(model.get("act"))
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown model.act setting(s) {unknown}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **given}


@register("act")
def build_act(model: Mapping[str, Any], spec: PolicySpec, text_vocab_size: int, rngs: nnx.Rngs) -> ACTPolicy:
    """The ACT preset from ``model``: ``head`` (default ``"act"``, ACT's decoder), ``head_kwargs`` over
    ``head_defaults[head]``, and ``act`` (sizes, see :data:`DEFAULTS`); ``text_vocab_size`` is unused."""
    head = model.get("head", "act") or "act"
    head_kwargs = {**_plain(_plain(model.get("head_defaults")).get(head)), **_plain(model.get("head_kwargs"))}
    return ACTPolicy(spec, head_name=head, head_kwargs=head_kwargs, rngs=rngs, **act_settings(model))
