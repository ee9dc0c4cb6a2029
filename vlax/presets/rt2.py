"""RT-2-style VLA (Brohan et al., 2023), the open analogue: a PaliGemma-shaped ViT + LM that writes actions as
text tokens of its own vocabulary.

RT-2 itself (PaLI-X 55B / PaLM-E 12B co-fine-tuned on web and robot data) was never released; this preset is the
same recipe on open parts. Composition (every piece is a shared vlax module)::

    per camera: uint8 frames -> [-1, 1] -> SigLIP ViT (no pooling) -> linear to the LM width     [B, n_img, D]
    language:   Gemma token embeddings * sqrt(D)                                                [B, L, D]
    prefix = [images | prompt], bidirectional (PaliGemma's prefix-LM); Gemma over it -> KV cache
    head (model.head, default binned_lm): H * A action tokens decoded causally through Gemma's own (tied) LM
    head with the cache, each one of ``n_bins`` ids; bin k of a value is id ``action_vocab_size - 1 - k``.

Which ids carry the actions: RT-2 re-used existing tokens (PaLI-X's integer tokens, PaLM-E's least used ones).
Here the ``n_bins`` ids just below ``action_vocab_size`` do: with PaliGemma's 257152-id vocabulary and
``action_vocab_size = 256256`` (the published config) they are the location tokens ``<loc0000>`` ..
``<loc0255>``; with ``action_vocab_size = 0`` (tiny configs) they are the last ``n_bins`` ids of a vocabulary of
the tokenizer's ids plus ``n_bins`` (``text.vocab_size = 0``). Decoding is restricted to the action ids, as RT-2
constrains its output vocabulary when asked for an action.

``obs``: ``images {camera: [B, S, S, 3]}`` (uint8, or float in [0, 1]; ``S = spec.image_size``), ``text_ids
[B, L]``, ``text_mask [B, L]`` (right padding). Actions are normalized to [-1, 1] (``[B, H, A]``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.backbones import Transformer
from vlax.backbones.config import TransformerConfig
from vlax.encoders.vit import ViT, ViTConfig
from vlax.heads import get_head
from vlax.nn import Dense, HeadContext, RopeConfig
from vlax.policy import PolicySpec, head_context_spec
from vlax.presets import register
from vlax.presets.pi0 import PALIGEMMA_VOCAB, to_signed_pixels

# PaliGemma's first location token <loc0000>; <loc0255> is 256255, so bins end just below 256256.
PALIGEMMA_LOC0 = 256_000
VISION_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "patch_size")
TEXT_FIELDS = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class RT2Sizes:
    """Everything that shapes an :class:`RT2Policy` (read from ``model.rt2``)."""

    vision: ViTConfig
    text: TransformerConfig
    n_bins: int = 256
    action_vocab_size: int = PALIGEMMA_LOC0 + 256  # ids [action_vocab_size - n_bins, action_vocab_size) are bins


def _fields(given: Mapping[str, Any], names: tuple[str, ...], where: str) -> dict[str, int]:
    missing = [n for n in names if n not in given]
    if missing:
        raise ValueError(f"{where} lacks {missing}; start from experiments/configs/rt2.py")
    return {n: int(given[n]) for n in names}


def paligemma_sizes(c: Mapping[str, Any], *, image_size: int, text_vocab_size: int, extra_ids: int, where: str,
                    dtype: Any = None, remat: str = "none") -> tuple[ViTConfig, TransformerConfig]:
    """The SigLIP tower at ``image_size`` and the Gemma LM of ``c = {vision: {...}, text: {...}}``.

    ``text.vocab_size = 0`` means the tokenizer's ``text_vocab_size`` ids plus ``extra_ids``; an explicit
    vocabulary smaller than the tokenizer's is refused.
    """
    v = _fields(dict(c.get("vision") or {}), VISION_FIELDS, f"{where}.vision")
    t = dict(c.get("text") or {})
    vocab = int(t.get("vocab_size", PALIGEMMA_VOCAB)) or text_vocab_size + extra_ids
    if text_vocab_size > vocab:
        raise ValueError(f"the tokenizer has {text_vocab_size} ids but {where}.text.vocab_size is {vocab}; use the "
                         "checkpoint's tokenizer, raise the vocabulary, or set it to 0 (tokenizer ids + bins)")
    if image_size % v["patch_size"]:
        raise ValueError(f"data.image_size={image_size} is not a multiple of {where}.vision.patch_size="
                         f"{v['patch_size']}")
    vdt = None if dtype is None else jnp.dtype(dtype).name
    vision = ViTConfig(**v, image_size=image_size, pool="none", act="gelu_tanh", norm_eps=1e-6, dtype=vdt)
    text = TransformerConfig(vocab_size=vocab, **_fields(t, TEXT_FIELDS, f"{where}.text"), norm_eps=1e-6,
                             act="gelu_tanh", rope=RopeConfig(theta=10_000.0), embed_scale=True, tie_embeddings=True,
                             norm_unit_offset=True, remat=remat, dtype=dtype)
    return vision, text


def sizes_from_model(model: Mapping[str, Any], image_size: int, text_vocab_size: int = 0) -> RT2Sizes:
    """:class:`RT2Sizes` of ``model.rt2`` (the keys of ``experiments/configs/rt2.py``)."""
    if "rt2" not in model:
        raise ValueError("model.preset='rt2' needs model.rt2 (vision, text, n_bins, action_vocab_size); start from "
                         "experiments/configs/rt2.py")
    c = dict(model["rt2"])
    n_bins = int(c.get("n_bins", 256))
    dtype = None if model.get("dtype") in (None, "float32") else jnp.dtype(model["dtype"])
    vision, text = paligemma_sizes(c, image_size=image_size, text_vocab_size=text_vocab_size, extra_ids=n_bins,
                                   where="model.rt2", dtype=dtype, remat=str(model.get("remat", "none")))
    action_vocab = int(c.get("action_vocab_size", 0)) or text.vocab_size
    if not 2 <= n_bins <= action_vocab <= text.vocab_size:
        raise ValueError(f"model.rt2 needs 2 <= n_bins <= action_vocab_size <= text.vocab_size, got n_bins={n_bins}, "
                         f"action_vocab_size={action_vocab}, vocab_size={text.vocab_size}")
    return RT2Sizes(vision=vision, text=text, n_bins=n_bins, action_vocab_size=action_vocab)


class PaliGemmaVLM(nnx.Module):
    """SigLIP + linear projector + Gemma over ``[images | prompt]`` (PaliGemma's layout); shared by the RT-2 and
    Helix presets. Parameter names follow the π0 preset's (``vision``, ``img_proj``, ``backbone``)."""

    def __init__(self, vision: ViTConfig, text: TransformerConfig, cameras: tuple[str, ...], *, rngs: nnx.Rngs):
        self.cameras = tuple(cameras)
        self.vision = ViT(vision, rngs=rngs)
        self.img_proj = Dense(vision.width, text.width, axes=("embed", "embed"), rngs=rngs)
        self.backbone = Transformer(text, rngs=rngs)

    def embed_prefix(self, obs: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
        """``(embeds [B, n_cams * n_img + L, D], mask [B, n_cams * n_img + L])``."""
        images = obs["images"]
        missing = [c for c in self.cameras if c not in images]
        if missing:
            raise KeyError(f"observation lacks camera(s) {missing}; it has {sorted(images)}")
        parts = [self.img_proj(self.vision(to_signed_pixels(images[c])).tokens) for c in self.cameras]
        masks = [jnp.ones(p.shape[:2], bool) for p in parts]
        ids = jnp.asarray(obs["text_ids"])
        if ids.ndim != 2:
            raise ValueError(f"text_ids has shape {tuple(ids.shape)}; expected [B, L]")
        parts.append(self.backbone.embed_tokens(ids).astype(parts[0].dtype))
        masks.append(jnp.asarray(obs.get("text_mask", jnp.ones(ids.shape, bool)), bool))
        return jnp.concatenate(parts, 1), jnp.concatenate(masks, 1)


class RT2Policy(nnx.Module):
    """The RT-2-style policy (see the module docstring); keeps :class:`vlax.policy.VLA`'s contract."""

    def __init__(self, spec: PolicySpec, sizes: RT2Sizes, *, head_name: str = "binned_lm",
                 head_kwargs: Mapping[str, Any] | None = None, rngs: nnx.Rngs):
        self.spec, self.sizes = spec, sizes
        self.vlm = PaliGemmaVLM(sizes.vision, sizes.text, spec.cameras, rngs=rngs)
        self.backbone = self.vlm.backbone
        context = head_context_spec(sizes.text)
        kwargs = dict(head_kwargs or {})
        if head_name == "binned_lm":
            # the bins end at action_vocab_size, which may lie inside the LM's vocabulary (PaliGemma's <loc> ids)
            context = dataclasses.replace(context, vocab_size=sizes.action_vocab_size)
            kwargs = {"n_bins": sizes.n_bins, "constrain_to_action_tokens": True, **kwargs}
        self.head = get_head(head_name, action_dim=spec.action_dim, horizon=spec.horizon, context=context,
                             rngs=rngs, **kwargs)

    def context(self, obs: Mapping[str, Any]) -> HeadContext:
        embeds, mask = self.vlm.embed_prefix(obs)
        slots = getattr(self.head, "cache_slots", None)
        cache_size = None if slots is None else embeds.shape[1] + int(slots)
        ar = jnp.zeros(embeds.shape[1], jnp.int32)  # prefix-LM: the prefix sees itself whole
        out = self.backbone(embeds=embeds, input_mask=mask, ar_mask=ar, cache_size=cache_size)
        return HeadContext(tokens=out.hidden, mask=mask, cache=out.cache, state=None)

    def loss(self, obs: Mapping[str, Any], actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: jax.Array, train: bool = True) -> tuple[jax.Array, dict]:
        """Cross-entropy of the action tokens (teacher-forced) for normalized ``actions [B, H, A]``."""
        return self.head.loss(self.context(obs), actions, action_mask=action_mask, rngs=rngs, train=train,
                              lm=self.backbone)

    def sample(self, obs: Mapping[str, Any], *, rngs: jax.Array, num_steps: int | None = None) -> jax.Array:
        """Normalized actions ``[B, H, A]`` (bin centres of the decoded action tokens)."""
        return self.head.sample(self.context(obs), rngs=rngs, num_steps=num_steps, lm=self.backbone)


@register("rt2")
def build_rt2(model: Mapping[str, Any], spec: PolicySpec, text_vocab_size: int, rngs: nnx.Rngs) -> RT2Policy:
    """The preset builder (``model.preset='rt2'``); ``model.head`` swaps the action head."""
    head_name = model.get("head") or "binned_lm"
    head_kwargs = {**dict(dict(model.get("head_defaults", {})).get(head_name, {})),
                   **dict(model.get("head_kwargs", {}))}
    return RT2Policy(spec, sizes_from_model(model, spec.image_size, text_vocab_size), head_name=head_name,
                     head_kwargs=head_kwargs, rngs=rngs)


__all__ = ["RT2Policy", "RT2Sizes", "PaliGemmaVLM", "build_rt2", "sizes_from_model", "paligemma_sizes",
           "PALIGEMMA_LOC0"]
