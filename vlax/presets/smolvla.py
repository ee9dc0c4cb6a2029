"""SmolVLA (LeRobot's ``SmolVLAPolicy``): SmolVLM2 truncated to its first layers + a narrow flow-matching expert.

Composition (every piece is a shared vlax module)::

    per camera: pixels [0, 1] -> resize with left/top padding -> * 2 - 1 -> SigLIP-style ViT (no pooling head)
                -> pixel-shuffle connector -> * sqrt(D)                           [B, n_img, D]
    language:   token embeddings * sqrt(D)                                         [B, L, D]
    state:      zero-padded to max_state_dim, one linear token                     [B, 1, D]
    prefix = [images | language | state], bidirectional except that nothing before the state sees it;
    SmolLM2 text model (first num_vlm_layers layers) over the prefix -> per-layer KV cache
    head (model.head, default flow_smolvla): expert 0.75 wide, self-attention to the cache every
    self_attn_every_n_layers layers and cross-attention to projected cached keys/values between;
    Euler steps from t = 1 (noise) to 0; actions padded to max_action_dim.

Details LeRobot fixes and this preset follows (they change outputs):

* RoPE in the VLM and the expert uses SmolVLA's own wavelength 10000, not the text config's ``rope_theta``.
* Vision position ids are those of transformers 5.x by default (``vision_position_ids="sequential"``: ``0 .. n-1``
  per axis of the full patch grid, a plain learned table; LeRobot 0.6.1 with transformers 5.5.4). transformers
  4.57 bucketized them to ``0, 0, 1, ..., n-2`` per axis (``"bucketized"``; LeRobot 0.4.4's outputs). A
  checkpoint trained under one behaviour should run under the same one.
* The time features are computed in float64 (``float64_time_features``), as LeRobot does on CPU.
* ``add_image_special_tokens`` is False in published configs; True is refused rather than silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlax.backbones import Transformer
from vlax.backbones.config import TransformerConfig
from vlax.data.resize import padded_extent
from vlax.encoders.pixel_shuffle import PixelShuffleConnector, num_tokens
from vlax.encoders.vit import ViT, ViTConfig
from vlax.heads import get_head
from vlax.nn import Dense, HeadContext, RopeConfig
from vlax.policy import PolicySpec, head_context_spec
from vlax.presets import register

# SmolVLA's apply_rope ignores the text config's rope_theta and always uses this wavelength.
SMOLVLA_ROPE = RopeConfig(theta=10_000.0)


def expert_mlp_dim(width: int, multiplier: int = 4, multiple_of: int = 256) -> int:
    """LeRobot's expert MLP size: ``4 * int(2 * width / 3)`` rounded up to a multiple of 256."""
    hidden = multiplier * int(2 * width / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclasses.dataclass(frozen=True)
class SmolVLASizes:
    """Everything that shapes a :class:`SmolVLAPolicy` (read from ``model.smolvla``)."""

    vision: ViTConfig
    text: TransformerConfig
    scale_factor: int
    resize: tuple[int, int]  # (height, width) of resize_imgs_with_padding
    max_state_dim: int
    max_action_dim: int
    expert_width: int
    expert_mlp_dim: int
    self_attn_every: int
    num_steps: int
    min_period: float
    max_period: float
    vision_position_ids: str = "sequential"

    @property
    def tokens_per_image(self) -> int:
        return num_tokens(self.vision.image_size, self.vision.patch_size, self.scale_factor)


def sizes_from_model(model: Mapping[str, Any], text_vocab_size: int = 0) -> SmolVLASizes:
    """:class:`SmolVLASizes` of ``model.smolvla`` (the keys of ``experiments/configs/smolvla.py``)."""
    if "smolvla" not in model:
        raise ValueError("model.preset='smolvla' needs model.smolvla (vision, text, scale_factor, ...); start from "
                         "experiments/configs/smolvla.py")
    c = dict(model["smolvla"])
    if c.get("add_image_special_tokens", False):
        raise ValueError("add_image_special_tokens=True is not supported by the smolvla preset (published SmolVLA "
                         "checkpoints use False)")
    v, t = dict(c["vision"]), dict(c["text"])
    dtype = None if model.get("dtype") in (None, "float32") else jnp.dtype(model["dtype"])
    vision = ViTConfig(width=int(v["width"]), depth=int(v["depth"]), mlp_dim=int(v["mlp_dim"]),
                       num_heads=int(v["num_heads"]), patch_size=int(v["patch_size"]),
                       image_size=int(v["image_size"]), pool="none", act=v.get("act", "gelu_tanh"),
                       norm_eps=float(v.get("norm_eps", 1e-6)), dtype=None if dtype is None else dtype.name)
    vocab = int(t["vocab_size"])
    if text_vocab_size > vocab:
        raise ValueError(f"the tokenizer has {text_vocab_size} ids but model.smolvla.text.vocab_size is {vocab}; "
                         "use the checkpoint's tokenizer (its vlm/ directory) or raise the vocabulary")
    depth = int(c.get("num_vlm_layers", -1))
    depth = int(t["depth"]) if depth <= 0 else depth
    text = TransformerConfig(vocab_size=vocab, width=int(t["width"]), depth=depth, mlp_dim=int(t["mlp_dim"]),
                             num_heads=int(t["num_heads"]), num_kv_heads=int(t["num_kv_heads"]),
                             head_dim=int(t["head_dim"]), norm_eps=float(t.get("norm_eps", 1e-5)), act="silu",
                             rope=SMOLVLA_ROPE, embed_scale=True, tie_embeddings=bool(t.get("tie_embeddings", False)),
                             dtype=dtype)
    expert_layers = int(c.get("num_expert_layers", -1))
    if expert_layers > 0 and expert_layers != depth:
        raise ValueError(f"num_expert_layers={expert_layers} differs from num_vlm_layers={depth}; the smolvla "
                         "preset pairs one expert layer with every VLM layer (num_expert_layers <= 0)")
    width = int(t["width"] * float(c.get("expert_width_multiplier", 0.75)))
    resize = tuple(int(x) for x in c.get("resize_imgs_with_padding") or (vision.image_size,) * 2)
    return SmolVLASizes(vision=vision, text=text, scale_factor=int(c["scale_factor"]),
                        resize=(resize[1], resize[0]),  # LeRobot stores (width, height)
                        max_state_dim=int(c["max_state_dim"]), max_action_dim=int(c["max_action_dim"]),
                        expert_width=width, expert_mlp_dim=expert_mlp_dim(width),
                        self_attn_every=int(c.get("self_attn_every_n_layers", 2)),
                        num_steps=int(c.get("num_steps", 10)), min_period=float(c.get("min_period", 4e-3)),
                        max_period=float(c.get("max_period", 4.0)),
                        vision_position_ids=_position_ids_mode(c.get("vision_position_ids", "sequential")))


POSITION_IDS = ("sequential", "bucketized")


def _position_ids_mode(mode: str) -> str:
    if mode not in POSITION_IDS:
        raise ValueError(f"model.smolvla.vision_position_ids={mode!r}; known: {list(POSITION_IDS)} (transformers "
                         ">= 5 / transformers 4.57)")
    return mode


def bucketized_position_ids(side: int) -> np.ndarray:
    """transformers 4.57's SmolVLM position ids of a full ``side x side`` grid: per axis ``bucketize(i / side *
    (1 - 1e-6))`` over the boundaries ``k / side``, i.e. ``0, 0, 1, ..., side - 2``; ``[side * side]``."""
    axis = np.maximum(np.arange(side) - 1, 0)
    return (axis[:, None] * side + axis[None, :]).reshape(-1)


def resize_with_pad(images: jax.Array, height: int, width: int) -> jax.Array:
    """``[B, h, w, C]`` in [0, 1] -> ``[B, height, width, C]``: bilinear resize keeping the aspect ratio (no
    anti-aliasing, as ``F.interpolate``), then zero padding on the left and top, as LeRobot's SmolVLA does."""
    b, h, w, c = images.shape
    if (h, w) == (height, width):
        return images
    rh, rw = padded_extent(h, w, (height, width))
    resized = jax.image.resize(images, (b, rh, rw, c), method="bilinear", antialias=False)
    return jnp.pad(resized, ((0, 0), (height - rh, 0), (width - rw, 0), (0, 0)))


def to_unit_pixels(images: jax.Array) -> jax.Array:
    """uint8 frames -> float32 in [0, 1] (``/ 255``, as LeRobot's decoders); float frames are taken as given."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


class SmolVLAPolicy(nnx.Module):
    """The SmolVLA policy (see the module docstring); keeps :class:`vlax.policy.VLA`'s contract.

    ``obs``: ``images {camera: [B, h, w, 3]}`` (uint8, or float in [0, 1]), ``state [B, max_state_dim]``
    (normalized, zero-padded), ``text_ids [B, L]``, ``text_mask [B, L]``. Actions are ``[B, H, max_action_dim]``.
    """

    def __init__(self, spec: PolicySpec, sizes: SmolVLASizes, *, head_name: str = "flow_smolvla",
                 head_kwargs: Mapping[str, Any] | None = None, rngs: nnx.Rngs):
        if spec.state_dim != sizes.max_state_dim or spec.action_dim != sizes.max_action_dim:
            raise ValueError(f"the policy spec has state_dim={spec.state_dim}, action_dim={spec.action_dim}; SmolVLA "
                             f"pads to max_state_dim={sizes.max_state_dim}, max_action_dim={sizes.max_action_dim}: "
                             "set model.state_dim / model.action_dim to those")
        self.spec, self.sizes = spec, sizes
        self.vision = ViT(sizes.vision, rngs=rngs)
        self.connector = PixelShuffleConnector(sizes.vision.width, sizes.text.width, sizes.scale_factor, rngs=rngs)
        self.backbone = Transformer(sizes.text, rngs=rngs)
        self.state_proj = Dense(sizes.max_state_dim, sizes.text.width, axes=(None, "embed"), rngs=rngs)
        kwargs = dict(head_kwargs or {})
        if head_name == "flow_smolvla":
            kwargs = {**dict(width=sizes.expert_width, mlp_dim=sizes.expert_mlp_dim,
                             self_attn_every=sizes.self_attn_every, rope=SMOLVLA_ROPE, norm_eps=sizes.text.norm_eps,
                             num_steps=sizes.num_steps, time_min_period=sizes.min_period,
                             time_max_period=sizes.max_period, float64_time_features=True), **kwargs}
        self.head = get_head(head_name, action_dim=spec.action_dim, horizon=spec.horizon,
                             context=head_context_spec(sizes.text), rngs=rngs, **kwargs)

    def embed_image(self, images: jax.Array) -> jax.Array:
        """Frames ``[B, h, w, 3]`` -> image tokens ``[B, n_img, D]`` (scaled by ``sqrt(D)``)."""
        height, width = self.sizes.resize
        pixels = resize_with_pad(to_unit_pixels(images), height, width) * 2.0 - 1.0
        vision = self.vision
        if self.sizes.vision_position_ids == "bucketized":  # the same ViT reading a re-indexed position table
            graphdef, state = nnx.split(vision)
            pure = nnx.to_pure_dict(state)  # a copy: the module's own table stays as it is
            table = pure["embeddings"]["position_embedding"]
            pure["embeddings"]["position_embedding"] = table[bucketized_position_ids(self.sizes.vision.grid_size)]
            vision = nnx.merge(graphdef, pure)
        tokens = self.connector(vision(pixels).tokens)
        return tokens * jnp.asarray(math.sqrt(tokens.shape[-1]), tokens.dtype)

    def embed_prefix(self, obs: Mapping[str, Any]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(embeds [B, N, D], input_mask [B, N], ar_mask [N])``: images, language, then the state token."""
        images = obs["images"]
        missing = [c for c in self.spec.cameras if c not in images]
        if missing:
            raise KeyError(f"observation lacks camera(s) {missing}; it has {sorted(images)}")
        state = jnp.asarray(obs["state"], jnp.float32)
        if state.ndim != 2 or state.shape[-1] != self.sizes.max_state_dim:
            raise ValueError(f"state has shape {tuple(state.shape)}; SmolVLA takes [B, {self.sizes.max_state_dim}] "
                             "(normalized, zero-padded to max_state_dim)")
        parts = [self.embed_image(images[c]) for c in self.spec.cameras]
        masks = [jnp.ones(p.shape[:2], bool) for p in parts]
        parts.append(self.backbone.embed_tokens(jnp.asarray(obs["text_ids"])).astype(parts[0].dtype))
        masks.append(jnp.asarray(obs["text_mask"], bool))
        parts.append(self.state_proj(state.astype(parts[0].dtype))[:, None])
        masks.append(jnp.ones((state.shape[0], 1), bool))
        n = sum(p.shape[1] for p in parts)
        ar = jnp.zeros(n, jnp.int32).at[-1].set(1)  # nothing before the state token sees it
        return jnp.concatenate(parts, 1), jnp.concatenate(masks, 1), ar

    def context(self, obs: Mapping[str, Any]) -> HeadContext:
        embeds, mask, ar = self.embed_prefix(obs)
        slots = getattr(self.head, "cache_slots", None)
        cache_size = None if slots is None else embeds.shape[1] + int(slots)
        out = self.backbone(embeds=embeds, input_mask=mask, ar_mask=ar, cache_size=cache_size)
        return HeadContext(tokens=out.hidden, mask=mask, cache=out.cache, state=None)

    def loss(self, obs: Mapping[str, Any], actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: jax.Array, train: bool = True) -> tuple[jax.Array, dict]:
        """Training loss on normalized, padded ``actions [B, H, max_action_dim]``."""
        return self.head.loss(self.context(obs), actions, action_mask=action_mask, rngs=rngs, train=train,
                              lm=self.backbone)

    def sample(self, obs: Mapping[str, Any], *, rngs: jax.Array, num_steps: int | None = None,
               noise: jax.Array | None = None) -> jax.Array:
        """Normalized actions ``[B, H, max_action_dim]``; ``noise [B, H, max_action_dim]`` fixes the flow's start."""
        kwargs = {} if noise is None else {"noise": jnp.asarray(noise)}
        return self.head.sample(self.context(obs), rngs=rngs, num_steps=num_steps, lm=self.backbone, **kwargs)


@register("smolvla")
def build_smolvla(model: Mapping[str, Any], spec: PolicySpec, text_vocab_size: int, rngs: nnx.Rngs
                  ) -> SmolVLAPolicy:
    """The preset builder (``model.preset='smolvla'``); ``model.head`` swaps the action head."""
    head_name = model.get("head", "flow_smolvla")
    head_kwargs = {**dict(dict(model.get("head_defaults", {})).get(head_name, {})),
                   **dict(model.get("head_kwargs", {}))}
    return SmolVLAPolicy(spec, sizes_from_model(model, text_vocab_size), head_name=head_name,
                         head_kwargs=head_kwargs, rngs=rngs)


__all__ = ["SmolVLAPolicy", "SmolVLASizes", "build_smolvla", "sizes_from_model", "resize_with_pad",
           "expert_mlp_dim", "SMOLVLA_ROPE"]
