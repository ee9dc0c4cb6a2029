"""Helix-style dual system (after Figure AI's Helix, 2025; closed): a slow VLM (S2) that reads the scene and the
instruction into one latent vector, and a small fast visuomotor transformer (S1) that acts on the newest frames,
the proprioceptive state and the most recent latent. The latent is the only thing S1 sees of S2; both are trained
end to end through it.

Composition (every piece is a shared vlax module)::

    S2 ("plan", slow): PaliGemma-shaped VLM (:class:`vlax.presets.rt2.PaliGemmaVLM`: SigLIP + projector + Gemma)
        prefix [images | prompt] bidirectional, plus one learned latent query token that sees the prefix (and
        that the prefix does not see); its final hidden state -> linear -> latent            [B, latent_dim]
    S1 ("act", fast): per camera a fully convolutional ResNet (GroupNorm) -> linear -> tokens with fixed 2-D sine
        positions and a camera embedding; one token for the latent, one for the state (learned positions);
        a pre-norm transformer encoder over [latent | state | image tokens]                  [B, N, D1]
    head (model.head, default chunk): a cross-attention decoder over S1's tokens -> [B, H, A]. Any head that
        needs no LM cache swaps in (diffusion, binned, l1_mlp, ...).

Dual-rate execution: :meth:`HelixPolicy.plan` is the slow step and ``sample(obs, plan=latent)`` the fast one;
:class:`vlax.dual_rate.DualRateExecutor` runs the plan every ``plan_every`` control steps (``model.helix.
plan_every``; the published system's ~8 Hz S2 under a 200 Hz S1 is 25) and the act step every step with the
latest latent, synchronously or with S2 in a background thread. Without ``plan``, ``loss`` and ``sample`` run S2
on the same observation (training, and callers that know nothing of plans).

``obs``: ``images {camera: [B, S, S, 3]}`` (uint8, or float in [0, 1]), ``state [B, state_dim]`` (normalized;
absent when ``state_dim`` is 0), ``text_ids [B, L]``, ``text_mask [B, L]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.backbones.config import TransformerConfig
from vlax.encoders.preprocess import to_unit_float
from vlax.encoders.resnet import ResNet
from vlax.encoders.vit import ViTConfig
from vlax.heads import get_head
from vlax.heads.chunk import ACTEncoder
from vlax.nn import ContextSpec, Dense, HeadContext, param
from vlax.policy import PolicySpec
from vlax.presets import register
from vlax.presets.act import image_position_embedding
from vlax.presets.rt2 import PaliGemmaVLM, paligemma_sizes

S1_FIELDS = ("width", "depth", "num_heads", "mlp_dim", "decoder_depth", "resnet_depth", "resnet_widths")


@dataclasses.dataclass(frozen=True)
class HelixSizes:
    """Everything that shapes a :class:`HelixPolicy` (read from ``model.helix``)."""

    s2_vision: ViTConfig
    s2_text: TransformerConfig
    latent_dim: int
    width: int             # S1
    depth: int
    num_heads: int
    mlp_dim: int
    decoder_depth: int     # the default chunk head's layers
    resnet_depth: int
    resnet_widths: tuple[int, ...]
    plan_every: int


def sizes_from_model(model: Mapping[str, Any], image_size: int, text_vocab_size: int = 0) -> HelixSizes:
    """:class:`HelixSizes` of ``model.helix`` (the keys of ``experiments/configs/helix.py``)."""
    if "helix" not in model:
        raise ValueError("model.preset='helix' needs model.helix (s2, s1, latent_dim, plan_every); start from "
                         "experiments/configs/helix.py")
    c = dict(model["helix"])
    dtype = None if model.get("dtype") in (None, "float32") else jnp.dtype(model["dtype"])
    vision, text = paligemma_sizes(dict(c.get("s2") or {}), image_size=image_size, text_vocab_size=text_vocab_size,
                                   extra_ids=0, where="model.helix.s2", dtype=dtype,
                                   remat=str(model.get("remat", "none")))
    s1 = dict(c.get("s1") or {})
    missing = [f for f in S1_FIELDS if f not in s1]
    if missing:
        raise ValueError(f"model.helix.s1 lacks {missing}; start from experiments/configs/helix.py")
    plan_every, latent_dim = int(c.get("plan_every", 1)), int(c.get("latent_dim", 0))
    if plan_every < 1:
        raise ValueError(f"model.helix.plan_every={plan_every}; S2 runs every plan_every >= 1 control steps")
    if latent_dim < 1:
        raise ValueError(f"model.helix.latent_dim={latent_dim}; the S2 -> S1 latent needs >= 1 dimension")
    if int(s1["width"]) % int(s1["num_heads"]):
        raise ValueError(f"model.helix.s1.width={s1['width']} is not a multiple of num_heads={s1['num_heads']}")
    return HelixSizes(s2_vision=vision, s2_text=text, latent_dim=latent_dim, width=int(s1["width"]),
                      depth=int(s1["depth"]), num_heads=int(s1["num_heads"]), mlp_dim=int(s1["mlp_dim"]),
                      decoder_depth=int(s1["decoder_depth"]), resnet_depth=int(s1["resnet_depth"]),
                      resnet_widths=tuple(int(w) for w in s1["resnet_widths"]), plan_every=plan_every)


class HelixS2(nnx.Module):
    """The slow system: images + instruction -> latent ``[B, latent_dim]``."""

    def __init__(self, sizes: HelixSizes, cameras: tuple[str, ...], *, rngs: nnx.Rngs):
        self.vlm = PaliGemmaVLM(sizes.s2_vision, sizes.s2_text, cameras, rngs=rngs)
        self.latent_query = param(rngs, nnx.initializers.normal(0.02), (1, sizes.s2_text.width), (None, "embed"))
        self.latent_out = Dense(sizes.s2_text.width, sizes.latent_dim, axes=("embed", None), rngs=rngs)

    def __call__(self, obs: Mapping[str, Any]) -> jax.Array:
        embeds, mask = self.vlm.embed_prefix(obs)
        b, n, d = embeds.shape
        query = jnp.broadcast_to(self.latent_query[...].astype(embeds.dtype), (b, 1, d))
        embeds = jnp.concatenate([embeds, query], axis=1)
        mask = jnp.concatenate([mask, jnp.ones((b, 1), bool)], axis=1)
        ar = jnp.zeros(n + 1, jnp.int32).at[n].set(1)  # the query sees the prefix; the prefix does not see it
        hidden = self.vlm.backbone(embeds=embeds, input_mask=mask, ar_mask=ar).hidden
        return self.latent_out(hidden[:, -1]).astype(jnp.float32)


class HelixS1(nnx.Module):
    """The fast system's encoder: newest frames, state and the latent -> context tokens ``[B, N, width]``."""

    def __init__(self, sizes: HelixSizes, spec: PolicySpec, *, rngs: nnx.Rngs):
        self.cameras, self.state_dim = tuple(spec.cameras), int(spec.state_dim)
        width = sizes.width
        self.resnet = ResNet(sizes.resnet_depth, norm="group", widths=sizes.resnet_widths, rngs=rngs)
        self.image_proj = Dense(sizes.resnet_widths[-1], width, axes=(None, "embed"), rngs=rngs)
        self.camera_embedding = param(rngs, nnx.initializers.normal(0.02), (len(self.cameras), width),
                                      (None, "embed"))
        self.latent_proj = Dense(sizes.latent_dim, width, axes=(None, "embed"), rngs=rngs)
        self.state_proj = Dense(self.state_dim, width, axes=(None, "embed"), rngs=rngs) if self.state_dim else None
        self.token_pos = param(rngs, nnx.initializers.normal(0.02), (2, width), (None, "embed"))
        self.encoder = ACTEncoder(width, sizes.depth, sizes.num_heads, sizes.mlp_dim, pre_norm=True, rngs=rngs)

    def __call__(self, obs: Mapping[str, Any], latent: jax.Array) -> jax.Array:
        images = obs["images"]
        missing = [c for c in self.cameras if c not in images]
        if missing:
            raise KeyError(f"observation lacks camera(s) {missing}; it has {sorted(images)}")
        b = latent.shape[0]
        tokens = [self.latent_proj(latent.astype(jnp.float32))[:, None]]
        positions = [self.token_pos[0][None]]
        if self.state_proj is not None:
            state = jnp.asarray(obs["state"], jnp.float32)
            if state.ndim != 2 or state.shape[-1] != self.state_dim:
                raise ValueError(f"state has shape {tuple(state.shape)}; Helix's S1 expects [B, {self.state_dim}]")
            tokens.append(self.state_proj(state)[:, None])
            positions.append(self.token_pos[1][None])
        for i, camera in enumerate(self.cameras):
            features = self.resnet(to_unit_float(images[camera]) * 2.0 - 1.0)  # [B, h, w, C]
            _, h, w, _ = features.shape
            tokens.append(self.image_proj(features.reshape(b, h * w, -1)))
            positions.append(image_position_embedding(h, w, tokens[-1].shape[-1]) + self.camera_embedding[i])
        x = jnp.concatenate(tokens, axis=1)
        pos = jnp.concatenate(positions, axis=0)[None].astype(x.dtype)
        return self.encoder(x, pos)


class HelixPolicy(nnx.Module):
    """S2 + S1 + head (see the module docstring); keeps :class:`vlax.policy.VLA`'s contract and adds
    :meth:`plan` (the slow step) and a ``plan`` argument to :meth:`loss` / :meth:`sample` (the fast step)."""

    def __init__(self, spec: PolicySpec, sizes: HelixSizes, *, head_name: str = "chunk",
                 head_kwargs: Mapping[str, Any] | None = None, rngs: nnx.Rngs):
        if spec.obs_history != 1:
            raise ValueError(f"Helix's S1 reads the newest frame; the spec has obs_history={spec.obs_history} "
                             "(set data.obs_history=1)")
        self.spec, self.sizes, self.plan_every = spec, sizes, sizes.plan_every
        self.s2 = HelixS2(sizes, spec.cameras, rngs=rngs)
        self.s1 = HelixS1(sizes, spec, rngs=rngs)
        kwargs = dict(head_kwargs or {})
        if head_name == "chunk":
            kwargs = {**dict(width=sizes.width, depth=sizes.decoder_depth, num_heads=sizes.num_heads,
                             mlp_dim=sizes.mlp_dim, dropout=0.0), **kwargs}
        self.head = get_head(head_name, action_dim=spec.action_dim, horizon=spec.horizon,
                             context=ContextSpec(width=sizes.width), rngs=rngs, **kwargs)
        self.backbone = None  # the head reads S1's tokens; S2's LM is self.s2.vlm.backbone

    def plan(self, obs: Mapping[str, Any]) -> jax.Array:
        """S2: the latent ``[B, latent_dim]`` of ``obs`` (images, ``text_ids``, ``text_mask``)."""
        return self.s2(obs)

    def context(self, obs: Mapping[str, Any], plan: jax.Array | None = None) -> HeadContext:
        """S1's tokens for the newest ``obs`` and ``plan`` (S2 is run on ``obs`` when no plan is given)."""
        latent = self.plan(obs) if plan is None else jnp.asarray(plan)
        if latent.ndim != 2 or latent.shape[-1] != self.sizes.latent_dim:
            raise ValueError(f"plan has shape {tuple(latent.shape)}; Helix's latent is [B, {self.sizes.latent_dim}]")
        tokens = self.s1(obs, latent)
        return HeadContext(tokens=tokens, mask=jnp.ones(tokens.shape[:2], bool))

    def loss(self, obs: Mapping[str, Any], actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: jax.Array, train: bool = True, plan: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """The head's loss on normalized ``actions [B, H, A]``; gradients reach S2 through the latent."""
        return self.head.loss(self.context(obs, plan), actions, action_mask=action_mask, rngs=rngs, train=train)

    def sample(self, obs: Mapping[str, Any], *, rngs: jax.Array, num_steps: int | None = None,
               plan: jax.Array | None = None) -> jax.Array:
        """Normalized actions ``[B, H, A]`` from the newest ``obs`` and the latest ``plan``."""
        return self.head.sample(self.context(obs, plan), rngs=rngs, num_steps=num_steps)


@register("helix")
def build_helix(model: Mapping[str, Any], spec: PolicySpec, text_vocab_size: int, rngs: nnx.Rngs) -> HelixPolicy:
    """The preset builder (``model.preset='helix'``); ``model.head`` swaps S1's action head."""
    head_name = model.get("head") or "chunk"
    head_kwargs = {**dict(dict(model.get("head_defaults", {})).get(head_name, {})),
                   **dict(model.get("head_kwargs", {}))}
    if head_name == "chunk":  # the config's generic chunk sizes would not match S1's width
        head_kwargs = dict(model.get("head_kwargs", {}))
    return HelixPolicy(spec, sizes_from_model(model, spec.image_size, text_vocab_size), head_name=head_name,
                       head_kwargs=head_kwargs, rngs=rngs)


__all__ = ["HelixPolicy", "HelixSizes", "HelixS1", "HelixS2", "build_helix", "sizes_from_model"]
