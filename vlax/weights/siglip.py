"""Import a SigLIP vision tower from a local Hugging Face checkpoint into :class:`vlax.encoders.vit.ViT`.

Accepted checkpoints (``config.json`` + safetensors):

* ``SiglipVisionModel``: tensor names start at ``embeddings.`` (transformers 5) or ``vision_model.embeddings.``
  (transformers 4);
* ``SiglipModel``: the vision half, under ``vision_model.`` (the text tower is not read);
* ``PaliGemmaForConditionalGeneration``: the vision tower, under ``vision_tower.vision_model.`` (published
  checkpoints), ``vision_tower.`` (saved by transformers 5) or ``model.vision_tower.`` (the in-memory names).

Example::

    vit = load_siglip("/ckpt/siglip-so400m-patch14-224")   # -> ViT; vit(images).tokens [B, 256, 1152]
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlax.encoders.vit import ViT, ViTConfig
from vlax.weights.common import find_prefix as find_checkpoint_prefix
from vlax.weights.common import (
    CheckpointError,
    load_prefixed,
    assign_params,
    check_architecture,
    linear_rules,
    norm_rules,
    read_config,
    rename_tensors,
    stack_numbered,
    tensor_names,
)

ARCHITECTURES = ("SiglipVisionModel", "SiglipModel", "PaliGemmaForConditionalGeneration", "siglip_vision_model")

# Where the vision tower's tensors live, most specific first.
PREFIXES = (
    "model.vision_tower.vision_model.",
    "vision_tower.vision_model.",
    "model.vision_tower.",
    "vision_tower.",
    "vision_model.",
    "",
)

# transformers' SiglipVisionConfig defaults (config.json files often leave them out).
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                       layer_norm_eps=1e-6, vision_use_head=True)
# ... and those PaliGemma uses when its config has no vision_config at all.
PALIGEMMA_VISION_DEFAULTS = dict(VISION_DEFAULTS, intermediate_size=4096, hidden_size=1152, patch_size=14,
                                 num_hidden_layers=27, num_attention_heads=16, vision_use_head=False)


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """torch ``Conv2d.weight [D, C, p, p]`` -> vlax patch kernel ``[p, p, C, D]``."""
    return np.transpose(w, (2, 3, 1, 0))


_L = r"encoder\.layers\.\*\."
RULES = [
    (r"embeddings\.patch_embedding\.weight", "embeddings.patch_embedding.kernel", conv_kernel),
    (r"embeddings\.patch_embedding\.bias", "embeddings.patch_embedding.bias", None),
    (r"embeddings\.position_embedding\.weight", "embeddings.position_embedding", None),
    *norm_rules(_L + r"(layer_norm[12])", r"encoder.layers.\1"),
    *linear_rules(_L + r"self_attn\.([qkv])_proj", r"encoder.layers.self_attn.\1_proj"),
    *linear_rules(_L + r"self_attn\.out_proj", "encoder.layers.self_attn.o_proj"),
    *linear_rules(_L + r"mlp\.(fc[12])", r"encoder.layers.mlp.\1"),
    *norm_rules(r"post_layernorm", "post_layernorm"),
    (r"head\.probe", "head.probe", lambda w: w.reshape(w.shape[-2:])),
    *linear_rules(r"head\.attention\.([qkv])_proj", r"head.attention.\1_proj"),  # split from in_proj
    *linear_rules(r"head\.attention\.out_proj", "head.attention.o_proj"),
    *norm_rules(r"head\.layernorm", "head.layernorm"),
    *linear_rules(r"head\.mlp\.(fc[12])", r"head.mlp.\1"),
]


def vision_config_dict(config: dict) -> dict:
    """The SigLIP vision settings of a ``config.json`` (any supported architecture), HF defaults filled in."""
    arch = check_architecture(config, ARCHITECTURES)
    if arch in ("SiglipVisionModel", "siglip_vision_model"):
        return {**VISION_DEFAULTS, **config}
    if "vision_config" not in config or config["vision_config"] is None:
        if arch == "PaliGemmaForConditionalGeneration":
            return dict(PALIGEMMA_VISION_DEFAULTS)
        return dict(VISION_DEFAULTS)
    return {**VISION_DEFAULTS, **config["vision_config"]}


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"{name}={value}: only square {name}s are supported")
        value = value[0]
    return int(value)


def vit_config_from_hf(config: dict, **overrides) -> ViTConfig:
    """:class:`ViTConfig` of the SigLIP vision tower described by an HF ``config.json`` dict.

    ``overrides`` set the run-time options (``remat``, ``dtype``, ``attn_implementation``, ...).
    """
    v = vision_config_dict(config)
    hidden, heads = int(v["hidden_size"]), int(v["num_attention_heads"])
    if hidden % heads:
        raise CheckpointError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    derived = dict(
        width=hidden,
        depth=int(v["num_hidden_layers"]),
        mlp_dim=int(v["intermediate_size"]),
        num_heads=heads,
        patch_size=_square(v["patch_size"], "patch_size"),
        image_size=_square(v["image_size"], "image_size"),
        num_channels=int(v["num_channels"]),
        pool="map" if v["vision_use_head"] else "none",
        act=v["hidden_act"],
        norm_eps=float(v["layer_norm_eps"]),
    )
    return ViTConfig(**{**derived, **overrides})


def _split_in_proj(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``nn.MultiheadAttention``'s packed ``in_proj`` ``[3D, D]`` -> separate q/k/v projections."""
    out = dict(tensors)
    for kind in ("weight", "bias"):
        packed = out.pop(f"head.attention.in_proj_{kind}", None)
        if packed is None:
            continue
        if packed.shape[0] % 3:
            raise CheckpointError(f"head.attention.in_proj_{kind} has shape {packed.shape}: first axis not 3 * D")
        for name, part in zip("qkv", np.split(np.asarray(packed), 3, axis=0)):
            out[f"head.attention.{name}_proj.{kind}"] = part
    return out


def convert_siglip_tensors(tensors: dict[str, np.ndarray], num_layers: int | None = None,
                           prefix: str = "") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """HF SigLIP vision tensors (prefix already stripped) -> ``(flat vlax params, sources)``."""
    tensors = stack_numbered(_split_in_proj(tensors), "encoder.layers.", num_layers=num_layers)
    return rename_tensors(tensors, RULES, source_prefix=prefix)


def find_prefix(names: list[str]) -> str:
    """The prefix under which a checkpoint keeps its SigLIP vision tower."""
    return find_checkpoint_prefix(names, PREFIXES, "embeddings.patch_embedding.weight", "SigLIP vision tower")


def load_siglip(path: str | Path, *, dtype=None, compute_dtype=None, strict: bool = True, **overrides) -> ViT:
    """A :class:`ViT` with the SigLIP vision weights of the HF checkpoint directory ``path``.

    ``dtype`` (e.g. ``jnp.bfloat16``) is the dtype parameters are stored in (default float32, as the other
    loaders of :mod:`vlax.weights`); ``compute_dtype`` the dtype activations are computed in; ``overrides``
    are :class:`ViTConfig` fields (``remat="full"``, ``attn_implementation``, ...).
    ``pool="none"`` skips the checkpoint's MAP head (e.g. for :class:`vlax.encoders.fused.FusedEncoder`).
    Every shape and dtype kind is checked; missing and unexpected tensors are named in the error.
    """
    if dtype is not None:
        overrides["param_dtype"] = jnp.dtype(dtype).name
    if compute_dtype is not None:
        overrides["dtype"] = jnp.dtype(compute_dtype).name
    cfg = vit_config_from_hf(read_config(path), **overrides)
    prefix = find_prefix(tensor_names(path))
    skip_head = (lambda n: n.startswith(prefix + "head.")) if cfg.pool == "none" else None
    flat, sources = convert_siglip_tensors(load_prefixed(path, prefix, skip_head), cfg.depth, prefix)
    model = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
    return assign_params(model, flat, strict=strict, sources=sources)
