"""RoboFlamingo (Li et al. 2024, "Vision-Language Foundation Models as Effective Robot Imitators") as a preset:
OpenFlamingo's vision-language model read frame by frame, and a recurrent policy head over the frames.

Per observation frame ``t`` of the ``obs_history`` window (RoboFlamingo: 12), oldest first:

* every camera's image goes through the CLIP vision tower (:func:`vlax.encoders.clip_config`, ViT-L/14 at
  224 px at published size; pixels normalised with CLIP's statistics) and its patch tokens through the
  :class:`vlax.encoders.perceiver.PerceiverResampler` (64 latents); the cameras' latents are concatenated along
  the token axis (RoboFlamingo's "post" fusion of the static and gripper cameras: one shared resampler);
* the instruction runs through the language model with gated cross-attention blocks every
  ``cross_attn_every`` layers (:class:`vlax.backbones.flamingo.FlamingoLM`) attending to those latents;
* the final hidden states are max-pooled over the real instruction tokens: one feature ``[D]`` per frame.

The head reads the frame features as context tokens ``[B, T, D]``: ``model.head='lstm'`` is RoboFlamingo's
policy head (:class:`vlax.heads.lstm.LSTMHead`: 4-layer LSTM, tanh pose + sigmoid gripper), any other registered
head that reads context tokens (``chunk``, ``flow``, ``diffusion``, ...) swaps in. The chunk covers
``horizon`` steps from the oldest frame, as the data pipeline's history window yields it; the step to execute
now is index ``obs_history - 1`` (:meth:`RoboFlamingo.executed`).

The language model is vlax's Llama-style :class:`vlax.backbones.Transformer` (published 9B: LLaMA-7B, as
RoboFlamingo's ``llama_9b``; 3B: a Llama-style stand-in at MPT-1B's width, depth and parameter count, see
``experiments/configs/roboflamingo.py``). Its output projection is unused (tie it: no ``lm_head``). The
instruction needs no ``<image>`` token: every text token attends to its frame's latents.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.backbones import Transformer, get_config
from vlax.backbones.flamingo import FlamingoLM
from vlax.encoders.perceiver import PerceiverResampler
from vlax.encoders.preprocess import CLIP_MEAN, CLIP_STD, normalize
from vlax.encoders.vit import ViT, clip_config
from vlax.heads import HEADS, get_head, head_class
from vlax.nn import ContextSpec, HeadContext
from vlax.policy import PolicySpec
from vlax.presets import register

# OpenFlamingo's sizes around a 1024-wide ViT-L/14.
DEFAULTS: dict[str, Any] = dict(
    vision=dict(variant="L/14", image_size=224),
    resampler=dict(depth=6, num_latents=64, num_heads=8, head_dim=64, ff_mult=4),
    lm=dict(backbone="llama2_7b", overrides={}),
    cross_attn_every=4,
    cross_attn=dict(num_heads=8, head_dim=64, ff_mult=4),
)


def check_spec(spec: PolicySpec) -> None:
    if spec.state_input not in ("none", "head"):
        raise ValueError(f"RoboFlamingo reads no state tokens: state_input={spec.state_input!r}; use 'none' or "
                         "'head' (ctx.state for heads that embed the state)")


class RoboFlamingo(nnx.Module):
    """CLIP + perceiver resampler + gated-cross-attention LM per frame, then a head over the frame features."""

    backbone = None  # the heads read per-frame features, never the LM's cache

    def __init__(self, spec: PolicySpec, *, vision: ViT, resampler: PerceiverResampler, lm: FlamingoLM,
                 head: nnx.Module):
        check_spec(spec)
        if vision.config.width != resampler.width or lm.media_width != resampler.width:
            raise ValueError(f"the vision width {vision.config.width}, resampler width {resampler.width} and "
                             f"cross-attention media width {lm.media_width} must agree")
        if tuple(head.action_shape) != (spec.horizon, spec.action_dim):
            raise ValueError(f"head predicts {tuple(head.action_shape)} (horizon, action_dim) but the policy spec "
                             f"says ({spec.horizon}, {spec.action_dim})")
        self.spec = spec
        self.vision = vision
        self.resampler = resampler
        self.lm = lm
        self.head = head

    # ---- observation -> per-frame features ----------------------------------------------------------------------

    def _frames(self, x: jax.Array, frame_ndim: int, name: str) -> jax.Array:
        """``[B, T, ...]`` (or ``[B, ...]`` when the history is 1) -> ``[B, T, ...]``."""
        x = jnp.asarray(x)
        t = self.spec.obs_history
        if x.ndim == frame_ndim + 1 and t == 1:
            x = x[:, None]
        if x.ndim != frame_ndim + 2 or x.shape[1] != t:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; the policy sees {t} frames: [B, {t}, ...] "
                             "oldest first (data.obs_history)")
        return x

    def media(self, images: Mapping[str, jax.Array]) -> jax.Array:
        """``{camera: uint8 [B, T, h, w, 3]}`` -> resampled latents ``[B * T, n_cams * K, Dv]``."""
        missing = [c for c in self.spec.cameras if c not in images]
        if missing:
            raise KeyError(f"observation lacks camera(s) {missing}; it has {sorted(images)}")
        frames = [self._frames(images[c], 3, f"camera {c!r}") for c in self.spec.cameras]
        stacked = jnp.stack(frames, axis=2)  # [B, T, n, h, w, 3]: every camera and frame through one pass
        b, t, n = stacked.shape[:3]
        pixels = normalize(stacked.reshape(-1, *stacked.shape[3:]), CLIP_MEAN, CLIP_STD)
        latents = self.resampler(self.vision(pixels).tokens)  # [B*T*n, K, Dv]
        return latents.reshape(b * t, n * latents.shape[1], latents.shape[2])

    def frame_features(self, obs: Mapping[str, Any]) -> jax.Array:
        """Observation -> max-pooled LM hidden states per frame ``[B, T, D]``."""
        media = self.media(obs["images"])
        ids, mask = jnp.asarray(obs["text_ids"]), jnp.asarray(obs["text_mask"], bool)
        b, t = ids.shape[0], self.spec.obs_history
        ids, mask = jnp.repeat(ids, t, axis=0), jnp.repeat(mask, t, axis=0)  # the same instruction every frame
        hidden = self.lm(ids, media, input_mask=mask).hidden  # [B*T, L, D]
        pooled = jnp.max(jnp.where(mask[..., None], hidden, -jnp.inf), axis=1)
        pooled = jnp.where(mask.any(axis=1, keepdims=True), pooled, 0.0)  # an empty instruction pools to zero
        return pooled.reshape(b, t, -1)

    def context(self, obs: Mapping[str, Any]) -> HeadContext:
        feats = self.frame_features(obs)
        state = None
        if self.spec.state_input == "head":
            state = self._frames(obs["state"], 1, "state")[:, -1].astype(feats.dtype)
        return HeadContext(tokens=feats, mask=jnp.ones(feats.shape[:2], bool), state=state)

    # ---- the policy contract --------------------------------------------------------------------------------------

    def loss(self, obs: Mapping[str, Any], actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: Any, train: bool = True) -> tuple[jax.Array, dict]:
        """Head loss on normalized ``actions [B, H, A]`` (the chunk from the oldest frame)."""
        return self.head.loss(self.context(obs), actions, action_mask=action_mask, rngs=rngs, train=train)

    def sample(self, obs: Mapping[str, Any], *, rngs: Any, num_steps: int | None = None) -> jax.Array:
        """Normalized actions ``[B, H, A]`` from the oldest frame."""
        return self.head.sample(self.context(obs), rngs=rngs, num_steps=num_steps)

    def executed(self, chunk: jax.Array) -> jax.Array:
        """From the chunk ``[B, H, A]``, the actions from the current step on: ``[B, H - T + 1, A]``."""
        return chunk[:, self.spec.obs_history - 1:]


# ---- the builder ---------------------------------------------------------------------------------------------------

def settings(model: Mapping[str, Any]) -> dict[str, Any]:
    """``model.roboflamingo`` over :data:`DEFAULTS` (one level deep)."""
    given = dict(model.get("roboflamingo", {}))
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown model.roboflamingo key(s) {unknown}; known: {sorted(DEFAULTS)}")
    out = {}
    for key, default in DEFAULTS.items():
        value = given.get(key, default)
        out[key] = {**default, **dict(value)} if isinstance(default, dict) else value
    return out


def build_parts(options: Mapping[str, Any], text_vocab_size: int, rngs: nnx.Rngs, dtype: str | None = None
                ) -> tuple[ViT, PerceiverResampler, FlamingoLM]:
    """The vision tower, resampler and cross-attended LM ``options`` (see :func:`settings`) describe. ``dtype``
    (e.g. ``"bfloat16"``) is the compute dtype of CLIP and the LM; the resampler, the cross-attention blocks and
    the head compute in the dtype of what they receive. Parameters stay float32."""
    vision_kw = dict(options["vision"])
    if dtype is not None:
        vision_kw.setdefault("dtype", dtype)
    vision = ViT(clip_config(vision_kw.pop("variant"), vision_kw.pop("image_size"), **vision_kw), rngs=rngs)
    width = vision.config.width
    resampler = PerceiverResampler(width, rngs=rngs, **dict(options["resampler"]))
    lm_kw = dict(options["lm"])
    overrides = {"tie_embeddings": True, **({"dtype": jnp.dtype(dtype)} if dtype else {}),
                 **dict(lm_kw.get("overrides", {}))}
    vocab = int(overrides.get("vocab_size", 0) or text_vocab_size)
    if vocab < text_vocab_size:
        raise ValueError(f"model.roboflamingo.lm.overrides.vocab_size={vocab} is smaller than the tokenizer's "
                         f"{text_vocab_size} ids; raise it or leave it 0 (the tokenizer's)")
    overrides["vocab_size"] = vocab
    lm = Transformer(get_config(lm_kw["backbone"], **overrides), rngs=rngs)
    flamingo = FlamingoLM(lm, width, cross_attn_every=int(options["cross_attn_every"]), rngs=rngs,
                          **dict(options["cross_attn"]))
    return vision, resampler, flamingo


@register("roboflamingo")
def build(model: Mapping[str, Any], spec: PolicySpec, text_vocab_size: int, rngs: nnx.Rngs) -> RoboFlamingo:
    """``model.roboflamingo``: ``vision`` (``variant``, ``image_size`` and ViTConfig fields), ``resampler``
    (PerceiverResampler keywords), ``lm`` (``backbone`` config name, ``overrides``), ``cross_attn_every``,
    ``cross_attn`` (block keywords); ``model.dtype``; ``model.head`` / ``head_kwargs`` / ``head_defaults`` as for
    every policy."""
    check_spec(spec)
    options = settings(model)
    head_name = model["head"]
    if head_name not in HEADS:
        raise ValueError(f"unknown action head {head_name!r} (model.head); known: {sorted(HEADS)}")
    head_kwargs = {**dict(dict(model.get("head_defaults", {})).get(head_name, {})),
                   **dict(model.get("head_kwargs", {}))}
    if spec.state_input == "head" and "state_dim" in inspect.signature(head_class(head_name)[0]).parameters:
        head_kwargs.setdefault("state_dim", spec.state_dim)
    dtype = None if model.get("dtype") in (None, "float32") else str(model["dtype"])
    vision, resampler, lm = build_parts(options, text_vocab_size, rngs, dtype)
    head = get_head(head_name, action_dim=spec.action_dim, horizon=spec.horizon,
                    context=ContextSpec(width=lm.config.width), rngs=rngs, **head_kwargs)
    return RoboFlamingo(spec, vision=vision, resampler=resampler, lm=lm, head=head)


__all__ = ["DEFAULTS", "RoboFlamingo", "build", "build_parts", "settings"]
