"""OpenVLA (Prismatic ``dinosiglip-vit-so-224px`` + Llama-2): RT-2 style action tokens decoded through the LM.

Composition (every piece is a shared vlax module)::

    image [B, 224, 224, 3] -> DINOv2-L/14 (4 registers) and SigLIP So400m/14, each normalised its own way,
                              patch tokens of each tower's second-to-last block concatenated  [B, 256, D_dino + D_sig]
    projector (fused-gelu-mlp): fc1 (4 x fused width) -> GELU -> fc2 -> GELU -> fc3           [B, 256, D]
    sequence = [<s>, 256 patch embeddings, remaining prompt tokens], causal, Llama-2 -> KV cache
    head (model.head, default binned_lm): 7 action tokens decoded greedily with the KV cache; action bin k is token
    id ``base_vocab - 1 - k`` (the last 256 ids of the 32000-id Llama-2 vocabulary, not of the padded 32064).
    OpenVLA-OFT (model.head='l1_mlp'): H * A empty action slots appended after the prompt, bidirectional among
    themselves, one forward pass; the L1-regression MLP reads their last hidden states -> [B, H, A].
    OpenVLA-OFT+ (model.film=True): every block of both towers FiLM-modulates its tokens between the attention and
    MLP residuals, x * (1 + scale(c)) + shift(c), one scale/shift pair [D_llm, D_tower] per block and tower, c the
    mean LLM input embedding of the prompt (its real ids and OFT's </s>)                      c [B, D_llm]

``obs``: ``images {camera: [B, H, W, 3]}`` (uint8 or [0, 1] floats, already at the tower size) or
``pixels {"dino": [B, H, W, 3], "siglip": [B, H, W, 3]}`` (already normalised, e.g. from an image processor),
``text_ids [B, L]`` (the tokenised prompt starting with ``<s>``; OpenVLA's trailing id 29871 is appended here
unless already there) and
``text_mask [B, L]`` (right padding only). Actions are in [-1, 1] (q01/q99-normalised; see
:func:`vlax.weights.openvla.action_normalization`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.backbones import Transformer
from vlax.backbones.config import TransformerConfig
from vlax.encoders.fused import FusedEncoder
from vlax.encoders.preprocess import IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD
from vlax.encoders.vit import ViT, ViTConfig
from vlax.heads import get_head
from vlax.nn import Dense, HeadContext
from vlax.policy import PolicySpec, head_context_spec
from vlax.presets import register

# OpenVLA's prompt (prismatic PurePromptBuilder for "llama2-7b-pure" as used by predict_action).
PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
# predict_action appends Llama-2's lone "▁" (id 29871) when the prompt does not already end with it.
TRAILING_TOKEN_ID = 29871
# heads that read one context token per action value at the end of the sequence (OpenVLA-OFT)
PARALLEL_SLOT_HEADS = ("l1_mlp",)
# OFT's FiLM averages every input embedding that is not an action slot: the prompt and the </s> (id 2) that
# predict_action places after the slots
STOP_TOKEN_ID = 2


def openvla_prompt(instruction: str) -> str:
    """The text OpenVLA tokenises for ``instruction`` (its training data lower-cases instructions; predict_action
    takes the prompt as given)."""
    return PROMPT_TEMPLATE.format(instruction=instruction)


def append_trailing_token(ids: jax.Array, mask: jax.Array, token: int = TRAILING_TOKEN_ID
                          ) -> tuple[jax.Array, jax.Array]:
    """``ids, mask [B, L]`` (right padded) -> ``[B, L + 1]`` with ``token`` after the last real id of every row
    that does not already end with it, as OpenVLA's predict_action does before generating."""
    b, length = ids.shape
    n = jnp.sum(mask, axis=1).astype(jnp.int32)  # real ids per row
    last = jnp.take_along_axis(ids, jnp.maximum(n - 1, 0)[:, None], axis=1)[:, 0]
    add = (last != token) & (n > 0)
    ids = jnp.concatenate([ids, jnp.zeros((b, 1), ids.dtype)], axis=1)
    mask = jnp.concatenate([mask, jnp.zeros((b, 1), bool)], axis=1)
    at = jnp.arange(length + 1)[None, :] == n[:, None]
    return jnp.where(at & add[:, None], token, ids), mask | (at & add[:, None])


@dataclasses.dataclass(frozen=True)
class OpenVLASizes:
    """Everything that shapes an :class:`OpenVLAPolicy` (read from ``model.openvla``)."""

    dino: ViTConfig
    siglip: ViTConfig
    text: TransformerConfig
    n_bins: int = 256
    action_vocab_size: int = 32000  # ids below this are the tokenizer's; the action bins are its last n_bins
    append_trailing_token: bool = True  # predict_action's trailing 29871 (False for other tokenizers)
    dino_mean: tuple = IMAGENET_MEAN
    dino_std: tuple = IMAGENET_STD
    siglip_mean: tuple = SIGLIP_MEAN
    siglip_std: tuple = SIGLIP_STD
    # OpenVLA-OFT+ FiLM (both towers built with film_dim = text.width, see with_film): the id whose embedding the
    # language mean counts once besides the prompt's real ids; None: the prompt's ids only
    film_stop_token: int | None = STOP_TOKEN_ID

    @property
    def fused_width(self) -> int:
        return self.dino.width + self.siglip.width

    @property
    def film(self) -> bool:
        """Whether the towers carry OFT's FiLM layers."""
        return self.dino.film_dim is not None or self.siglip.film_dim is not None


def with_film(sizes: OpenVLASizes, *, init: str = "uniform", stop_token: int | None = STOP_TOKEN_ID) -> OpenVLASizes:
    """``sizes`` with OpenVLA-OFT's FiLM in every block of both towers, conditioned on the LLM width."""
    width = sizes.text.width
    if stop_token is not None and not 0 <= int(stop_token) < sizes.text.vocab_size:
        raise ValueError(f"film_stop_token={stop_token} is outside the {sizes.text.vocab_size}-id vocabulary: use "
                         "the tokenizer's </s> id, or None to average the prompt's ids only")
    return dataclasses.replace(
        sizes, dino=dataclasses.replace(sizes.dino, film_dim=width, film_init=init),
        siglip=dataclasses.replace(sizes.siglip, film_dim=width, film_init=init),
        film_stop_token=None if stop_token is None else int(stop_token))


def timm_dinov2_reg(width: int = 1024, depth: int = 24, num_heads: int = 16, *, image_size: int = 224,
                    mlp_ratio: float = 4.0, **kw) -> ViTConfig:
    """timm ``vit_large_patch14_reg4_dinov2`` as OpenVLA builds it: 224 px grid, no class position, LayerScale."""
    return ViTConfig(width=width, depth=depth, mlp_dim=int(width * mlp_ratio), num_heads=num_heads, patch_size=14,
                     image_size=image_size, class_token=True, class_token_position=False, num_registers=4,
                     mask_token=False, layer_scale=1e-5, pool="none", post_norm=True, act="gelu", norm_eps=1e-6,
                     **kw)


def timm_siglip(width: int = 1152, depth: int = 27, num_heads: int = 16, *, image_size: int = 224,
                mlp_ratio: float = 3.7362, **kw) -> ViTConfig:
    """timm ``vit_so400m_patch14_siglip_224``: no class token, MAP pool, and timm's exact-erf GELU (not tanh)."""
    return ViTConfig(width=width, depth=depth, mlp_dim=int(width * mlp_ratio), num_heads=num_heads, patch_size=14,
                     image_size=image_size, pool="map", post_norm=True, act="gelu", norm_eps=1e-6, **kw)


def sizes_from_model(model: Mapping[str, Any], text_vocab_size: int = 0) -> OpenVLASizes:
    """:class:`OpenVLASizes` of ``model.openvla`` (the keys of ``experiments/configs/openvla.py``)."""
    if "openvla" not in model:
        raise ValueError("model.preset='openvla' needs model.openvla (dino, siglip, text, ...); start from "
                         "experiments/configs/openvla.py")
    c = dict(model["openvla"])
    dtype = None if model.get("dtype") in (None, "float32") else jnp.dtype(model["dtype"])
    vdt = None if dtype is None else dtype.name
    d, s, t = dict(c["dino"]), dict(c["siglip"]), dict(c["text"])
    dino = timm_dinov2_reg(int(d["width"]), int(d["depth"]), int(d["num_heads"]),
                           image_size=int(c.get("image_size", 224)), mlp_ratio=float(d.get("mlp_ratio", 4.0)),
                           dtype=vdt)
    siglip = timm_siglip(int(s["width"]), int(s["depth"]), int(s["num_heads"]),
                         image_size=int(c.get("image_size", 224)), mlp_ratio=float(s.get("mlp_ratio", 3.7362)),
                         dtype=vdt)
    vocab = int(t["vocab_size"])
    action_vocab = int(c.get("action_vocab_size", 32000))
    if text_vocab_size > vocab:
        raise ValueError(f"the tokenizer has {text_vocab_size} ids but model.openvla.text.vocab_size is {vocab}; "
                         "use the checkpoint's tokenizer or raise the vocabulary")
    if not 0 < int(c.get("n_bins", 256)) <= action_vocab <= vocab:
        raise ValueError(f"model.openvla needs n_bins <= action_vocab_size <= text.vocab_size, got "
                         f"{c.get('n_bins', 256)}, {action_vocab}, {vocab}")
    if bool(c.get("append_trailing_token", True)) and vocab <= TRAILING_TOKEN_ID:
        raise ValueError(f"model.openvla.append_trailing_token appends Llama-2's id {TRAILING_TOKEN_ID}, outside a "
                         f"{vocab}-id vocabulary: set model.openvla.append_trailing_token=False for this tokenizer")
    heads = int(t["num_heads"])
    text = TransformerConfig(vocab_size=vocab, width=int(t["width"]), depth=int(t["depth"]),
                             mlp_dim=int(t["mlp_dim"]), num_heads=heads,
                             num_kv_heads=int(t.get("num_kv_heads", heads)),
                             head_dim=int(t.get("head_dim", int(t["width"]) // heads)),
                             norm_eps=float(t.get("norm_eps", 1e-5)), act="silu", dtype=dtype)
    sizes = OpenVLASizes(dino=dino, siglip=siglip, text=text, n_bins=int(c.get("n_bins", 256)),
                         action_vocab_size=action_vocab,
                         append_trailing_token=bool(c.get("append_trailing_token", True)))
    if not isinstance(model.get("film", False), bool):
        raise ValueError(f"model.film must be True or False (OpenVLA-OFT+'s FiLM), got {model['film']!r}")
    if model.get("film", False):
        sizes = with_film(sizes, init=str(c.get("film_init", "uniform")),
                          stop_token=c.get("film_stop_token", STOP_TOKEN_ID))
    return sizes


class FusedGeluMLPProjector(nnx.Module):
    """Prismatic's ``fused-gelu-mlp``: ``fc3(gelu(fc2(gelu(fc1(x)))))``, fc1 widening to 4 x the vision width."""

    def __init__(self, vision_width: int, llm_width: int, *, dtype=None, rngs: nnx.Rngs):
        hidden = 4 * vision_width
        self.fc1 = Dense(vision_width, hidden, axes=(None, "mlp"), dtype=dtype, rngs=rngs)
        self.fc2 = Dense(hidden, llm_width, axes=("mlp", "embed"), dtype=dtype, rngs=rngs)
        self.fc3 = Dense(llm_width, llm_width, axes=("embed", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, N, D_vision] -> [B, N, D_llm]`` (exact erf GELU, as torch's ``nn.GELU()``)."""
        x = jax.nn.gelu(self.fc1(x), approximate=False)
        x = jax.nn.gelu(self.fc2(x), approximate=False)
        return self.fc3(x)


class OpenVLAPolicy(nnx.Module):
    """The OpenVLA policy (see the module docstring); keeps :class:`vlax.policy.VLA`'s contract."""

    def __init__(self, spec: PolicySpec, sizes: OpenVLASizes, *, head_name: str = "binned_lm",
                 head_kwargs: Mapping[str, Any] | None = None, rngs: nnx.Rngs):
        self.spec, self.sizes = spec, sizes
        if sizes.film and not sizes.dino.film_dim == sizes.siglip.film_dim == sizes.text.width:
            raise ValueError(f"OpenVLA's FiLM conditions both towers on the LLM width {sizes.text.width}; got "
                             f"film_dim {sizes.dino.film_dim} (DINOv2) and {sizes.siglip.film_dim} (SigLIP): build "
                             "the sizes with vlax.presets.openvla.with_film")
        self.vision = FusedEncoder(ViT(sizes.dino, rngs=rngs), ViT(sizes.siglip, rngs=rngs),
                                   dino_mean=sizes.dino_mean, dino_std=sizes.dino_std,
                                   siglip_mean=sizes.siglip_mean, siglip_std=sizes.siglip_std)
        self.projector = FusedGeluMLPProjector(sizes.fused_width, sizes.text.width, dtype=sizes.text.dtype,
                                               rngs=rngs)
        self.backbone = Transformer(sizes.text, rngs=rngs)
        context = head_context_spec(sizes.text)
        kwargs = dict(head_kwargs or {})
        if head_name == "binned_lm":
            # OpenVLA's bins live at the end of the tokenizer's 32000 ids (the LM head is padded to 32064), and
            # greedy decoding takes the argmax over the whole vocabulary.
            context = dataclasses.replace(context, vocab_size=sizes.action_vocab_size)
            kwargs = {"n_bins": sizes.n_bins, "constrain_to_action_tokens": False, **kwargs}
        self.head = get_head(head_name, action_dim=spec.action_dim, horizon=spec.horizon, context=context,
                             rngs=rngs, **kwargs)
        # OpenVLA-OFT's parallel decoding: H * A empty action slots after the prompt, attending to each other
        self.num_action_slots = spec.horizon * spec.action_dim if head_name in PARALLEL_SLOT_HEADS else 0

    def _prompt(self, obs: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
        """``(ids, mask) [B, L (+ 1)]``: the prompt with predict_action's trailing id when configured."""
        ids = jnp.asarray(obs["text_ids"])
        if ids.ndim != 2 or ids.shape[1] < 1:
            raise ValueError(f"text_ids has shape {tuple(ids.shape)}; OpenVLA takes [B, L] starting with <s>")
        text_mask = jnp.asarray(obs.get("text_mask", jnp.ones(ids.shape, bool)), bool)
        if self.sizes.append_trailing_token:
            ids, text_mask = append_trailing_token(ids, text_mask)
        return ids, text_mask

    def language_embedding(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """FiLM's conditioning ``[B, D_llm]`` (float32): the mean of the prompt's input embeddings
        ``tokens [B, L, D_llm]`` over its real ids (``mask [B, L]``) and the ``film_stop_token`` embedding.

        OFT averages the embeddings of every non-action position (``input_embeddings[~all_actions_mask]``): at
        inference ``<s>``, the prompt, the trailing 29871 and the ``</s>`` after the slots. Its training batches
        also average their right padding (the mean spans the padded length); the masked mean here is the
        inference value for any padding.
        """
        w = mask.astype(jnp.float32)[..., None]
        total = jnp.sum(tokens.astype(jnp.float32) * w, axis=1)
        count = jnp.sum(w, axis=1)
        stop = self.sizes.film_stop_token
        if stop is not None:
            total = total + self.backbone.embed_tokens(jnp.asarray([stop], jnp.int32)).astype(jnp.float32)
            count = count + 1
        return total / jnp.maximum(count, 1)

    def vision_features(self, obs: Mapping[str, Any], language: jax.Array | None = None) -> jax.Array:
        """Fused patch features ``[B, N, D_dino + D_siglip]`` from ``obs["pixels"]`` or the first camera.

        With FiLM, ``language [B, D_llm]`` (:meth:`language_embedding`; computed from ``obs``'s prompt when not
        given) modulates both towers."""
        if self.sizes.film and language is None:
            ids, mask = self._prompt(obs)
            language = self.language_embedding(self.backbone.embed_tokens(ids), mask)
        if not self.sizes.film and language is not None:
            raise ValueError("language was given but this OpenVLA policy has no FiLM layers (model.film=False)")
        if "pixels" in obs:
            return self.vision(obs["pixels"], film_cond=language)
        images = obs["images"]
        camera = self.spec.cameras[0] if self.spec.cameras else next(iter(images))
        if camera not in images:
            raise KeyError(f"observation lacks camera {camera!r}; it has {sorted(images)}")
        return self.vision(images[camera], film_cond=language)

    def embed_prefix(self, obs: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
        """``(embeds [B, 1 + N + L - 1, D], mask)``: ``<s>``, the projected patches, then the rest of the prompt."""
        ids, text_mask = self._prompt(obs)
        tokens = self.backbone.embed_tokens(ids)
        language = self.language_embedding(tokens, text_mask) if self.sizes.film else None
        patches = self.projector(self.vision_features(obs, language))
        tokens = tokens.astype(patches.dtype)
        embeds = jnp.concatenate([tokens[:, :1], patches, tokens[:, 1:]], axis=1)
        mask = jnp.concatenate([text_mask[:, :1], jnp.ones(patches.shape[:2], bool), text_mask[:, 1:]], axis=1)
        return embeds, mask

    def context(self, obs: Mapping[str, Any]) -> HeadContext:
        embeds, mask = self.embed_prefix(obs)
        ar_mask = None  # causal
        if self.num_action_slots:
            b, n, d = embeds.shape
            # zero input embeddings (OFT's empty action tokens): only their RoPE positions tell them apart; the
            # slots form one bidirectional block after the causal prompt
            embeds = jnp.concatenate([embeds, jnp.zeros((b, self.num_action_slots, d), embeds.dtype)], axis=1)
            mask = jnp.concatenate([mask, jnp.ones((b, self.num_action_slots), bool)], axis=1)
            ar_mask = jnp.concatenate([jnp.ones(n + 1, jnp.int32), jnp.zeros(self.num_action_slots - 1, jnp.int32)])
        slots = getattr(self.head, "cache_slots", None)
        cache_size = None if slots is None else embeds.shape[1] + int(slots)
        out = self.backbone(embeds=embeds, input_mask=mask, ar_mask=ar_mask, cache_size=cache_size)
        return HeadContext(tokens=out.hidden, mask=mask, cache=out.cache, state=None)

    def loss(self, obs: Mapping[str, Any], actions: jax.Array, *, action_mask: jax.Array | None = None,
             rngs: jax.Array, train: bool = True) -> tuple[jax.Array, dict]:
        """Training loss on normalized ``actions [B, H, A]`` in [-1, 1]."""
        return self.head.loss(self.context(obs), actions, action_mask=action_mask, rngs=rngs, train=train,
                              lm=self.backbone)

    def sample(self, obs: Mapping[str, Any], *, rngs: jax.Array, num_steps: int | None = None) -> jax.Array:
        """Normalized actions ``[B, H, A]`` (bin centres for the binned heads)."""
        return self.head.sample(self.context(obs), rngs=rngs, num_steps=num_steps, lm=self.backbone)


@register("openvla")
def build_openvla(model: Mapping[str, Any], spec: PolicySpec, text_vocab_size: int, rngs: nnx.Rngs
                  ) -> OpenVLAPolicy:
    """The preset builder (``model.preset='openvla'``); ``model.head`` swaps the action head."""
    head_name = model.get("head", "binned_lm")
    head_kwargs = {**dict(dict(model.get("head_defaults", {})).get(head_name, {})),
                   **dict(model.get("head_kwargs", {}))}
    sizes = sizes_from_model(model, text_vocab_size)
    if spec.image_size != sizes.dino.image_size:  # a patch-14 tower would silently crop the image's remainder
        raise ValueError(f"data.image_size={spec.image_size} but the OpenVLA towers take "
                         f"{sizes.dino.image_size} px images (model.openvla.image_size); set both to one size")
    return OpenVLAPolicy(spec, sizes, head_name=head_name, head_kwargs=head_kwargs, rngs=rngs)


__all__ = ["OpenVLAPolicy", "OpenVLASizes", "FusedGeluMLPProjector", "build_openvla", "sizes_from_model",
           "openvla_prompt", "append_trailing_token", "timm_dinov2_reg", "timm_siglip", "with_film", "PROMPT_TEMPLATE",
           "TRAILING_TOKEN_ID", "STOP_TOKEN_ID"]
