"""Import a CLIP vision tower from a local Hugging Face checkpoint into :class:`vlax.encoders.vit.ViT`.

Accepted checkpoints (``config.json`` + safetensors): ``CLIPVisionModel`` (tensors under ``vision_model.``) and
``CLIPModel`` (its vision half, under ``vision_model.``; the text tower and the projections are not read).
OpenFlamingo / RoboFlamingo use OpenAI's ViT-L/14 at 224 px (``openai/clip-vit-large-patch14``).

Example::

    vit = load_clip("/ckpt/clip-vit-large-patch14")   # -> ViT; vit(images).tokens [B, 256, 1024]

The patch tokens are transformers' ``last_hidden_state[:, 1:]`` (no final norm); ``pooled`` is its
``pooler_output`` (the post-LayerNorm class token).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlax.encoders.vit import ViT, ViTConfig, clip_config
from vlax.weights.common import (
    CheckpointError,
    assign_params,
    check_architecture,
    find_prefix,
    linear_rules,
    load_prefixed,
    norm_rules,
    read_config,
    rename_tensors,
    stack_numbered,
    tensor_names,
)
from vlax.weights.siglip import _square, conv_kernel

ARCHITECTURES = ("CLIPVisionModel", "CLIPModel", "clip_vision_model", "clip")
PREFIXES = ("vision_model.", "")

# transformers' CLIPVisionConfig defaults (config.json files often leave them out).
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)

_L = r"encoder\.layers\.\*\."
RULES = [
    (r"embeddings\.patch_embedding\.weight", "embeddings.patch_embedding.kernel", conv_kernel),
    (r"embeddings\.class_embedding", "embeddings.cls_token", lambda w: np.asarray(w).reshape(1, -1)),
    (r"embeddings\.position_embedding\.weight", "embeddings.position_embedding", None),
    *norm_rules(r"pre_layrnorm", "pre_layernorm"),  # transformers' spelling
    *norm_rules(_L + r"(layer_norm[12])", r"encoder.layers.\1"),
    *linear_rules(_L + r"self_attn\.([qkv])_proj", r"encoder.layers.self_attn.\1_proj"),
    *linear_rules(_L + r"self_attn\.out_proj", "encoder.layers.self_attn.o_proj"),
    *linear_rules(_L + r"mlp\.(fc[12])", r"encoder.layers.mlp.\1"),
    *norm_rules(r"post_layernorm", "post_layernorm"),
]


def vit_config_from_hf(config: dict, **overrides) -> ViTConfig:
    """:class:`ViTConfig` of the CLIP vision tower an HF ``config.json`` dict describes (``overrides``: run-time
    options such as ``remat`` or ``dtype``)."""
    arch = check_architecture(config, ARCHITECTURES)
    vision = config if arch in ("CLIPVisionModel", "clip_vision_model") else (config.get("vision_config") or {})
    v = {**VISION_DEFAULTS, **vision}
    hidden, heads = int(v["hidden_size"]), int(v["num_attention_heads"])
    if hidden % heads:
        raise CheckpointError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    derived = dict(width=hidden, depth=int(v["num_hidden_layers"]), mlp_dim=int(v["intermediate_size"]),
                   num_heads=heads, patch_size=_square(v["patch_size"], "patch_size"),
                   image_size=_square(v["image_size"], "image_size"), num_channels=int(v["num_channels"]),
                   act=v["hidden_act"], norm_eps=float(v["layer_norm_eps"]))
    base = clip_config("B/16")  # CLIP's structural options; the sizes come from the checkpoint
    options = {f: getattr(base, f) for f in ("class_token", "pool", "pre_norm", "patch_bias", "post_norm_scope")}
    return ViTConfig(**{**options, **derived, **overrides})


def convert_clip_tensors(tensors: dict[str, np.ndarray], num_layers: int | None = None, prefix: str = ""
                         ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """HF CLIP vision tensors (prefix stripped) -> ``(flat vlax params, sources)``. ``position_ids`` buffers that
    older checkpoints carry are dropped."""
    tensors = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
    return rename_tensors(stack_numbered(tensors, "encoder.layers.", num_layers=num_layers), RULES,
                          source_prefix=prefix)


def load_clip(path: str | Path, *, dtype=None, compute_dtype=None, strict: bool = True, **overrides) -> ViT:
    """A :class:`ViT` with the CLIP vision weights of the HF checkpoint directory ``path``.

    ``dtype``: storage dtype of the parameters (default float32); ``compute_dtype``: activation dtype;
    ``overrides``: :class:`ViTConfig` fields. Every shape and dtype kind is checked.
    """
    if dtype is not None:
        overrides["param_dtype"] = jnp.dtype(dtype).name
    if compute_dtype is not None:
        overrides["dtype"] = jnp.dtype(compute_dtype).name
    cfg = vit_config_from_hf(read_config(path), **overrides)
    prefix = find_prefix(tensor_names(path), PREFIXES, "embeddings.patch_embedding.weight", "CLIP vision tower")
    # CLIPModel's text tower and projections live outside vision_model.; with the bare prefix skip them by name.
    skip = (lambda n: n.startswith(("text_model.", "visual_projection.", "text_projection.", "logit_scale"))) \
        if prefix == "" else None
    flat, sources = convert_clip_tensors(load_prefixed(path, prefix, skip), cfg.depth, prefix)
    model = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
    return assign_params(model, flat, strict=strict, sources=sources)


__all__ = ["ARCHITECTURES", "convert_clip_tensors", "load_clip", "vit_config_from_hf"]
