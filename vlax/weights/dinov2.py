"""Import DINOv2 (``Dinov2Model``, ``Dinov2WithRegistersModel``) from a local HF checkpoint into a ViT.

Tensor names on disk are the published ones (``encoder.layer.<i>.attention.attention.query.weight``, ...);
transformers 5's in-memory names (``attention.q_proj``, SwiGLU ``gate_proj`` / ``up_proj``) are accepted too.
The SwiGLU MLP of DINOv2-g (``mlp.weights_in`` packing gate and up) is split into vlax's ``GatedMlp``.

Example::

    vit = load_dinov2("/ckpt/dinov2-large")   # -> ViT; vit(images).tokens [B, (H/14)(W/14), 1024]
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
from vlax.weights.siglip import conv_kernel

ARCHITECTURES = ("Dinov2Model", "Dinov2WithRegistersModel", "dinov2", "dinov2_with_registers")
PREFIXES = ("dinov2.", "dinov2_with_registers.", "")

# transformers' Dinov2Config / Dinov2WithRegistersConfig defaults (config.json files may leave them out).
DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4, hidden_act="gelu",
                layer_norm_eps=1e-6, image_size=224, patch_size=14, num_channels=3, qkv_bias=True,
                layerscale_value=1.0, use_swiglu_ffn=False, use_mask_token=True)
REGISTERS_DEFAULTS = dict(DEFAULTS, patch_size=16, num_register_tokens=4)

_L = r"encoder\.layer\.\*\."
_LAYERS = "encoder.layers."
RULES = [
    (r"embeddings\.cls_token", "embeddings.cls_token", lambda w: w.reshape(w.shape[-2:])),
    (r"embeddings\.mask_token", "embeddings.mask_token", lambda w: w.reshape(1, -1)),
    (r"embeddings\.register_tokens", "embeddings.register_tokens", lambda w: w.reshape(w.shape[-2:])),
    (r"embeddings\.position_embeddings", "embeddings.position_embedding", lambda w: w.reshape(w.shape[-2:])),
    (r"embeddings\.patch_embeddings\.projection\.weight", "embeddings.patch_embedding.kernel", conv_kernel),
    (r"embeddings\.patch_embeddings\.projection\.bias", "embeddings.patch_embedding.bias", None),
    *norm_rules(_L + r"norm([12])", _LAYERS + r"layer_norm\1"),
    *linear_rules(_L + r"attention\.attention\.query", _LAYERS + "self_attn.q_proj"),
    *linear_rules(_L + r"attention\.attention\.key", _LAYERS + "self_attn.k_proj"),
    *linear_rules(_L + r"attention\.attention\.value", _LAYERS + "self_attn.v_proj"),
    *linear_rules(_L + r"attention\.output\.dense", _LAYERS + "self_attn.o_proj"),
    *linear_rules(_L + r"attention\.([qkvo])_proj", _LAYERS + r"self_attn.\1_proj"),  # transformers 5 names
    (_L + r"layer_scale([12])\.lambda1", _LAYERS + r"layer_scale\1.lambda1", None),
    *linear_rules(_L + r"mlp\.(fc[12]|gate_proj|up_proj|down_proj)", _LAYERS + r"mlp.\1"),
    *linear_rules(_L + r"mlp\.weights_out", _LAYERS + "mlp.down_proj"),
    *norm_rules(r"layernorm", "post_layernorm"),
]


def _config_dict(config: dict) -> tuple[str, dict]:
    arch = check_architecture(config, ARCHITECTURES)
    registers = arch in ("Dinov2WithRegistersModel", "dinov2_with_registers")
    return arch, {**(REGISTERS_DEFAULTS if registers else DEFAULTS), **config}


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"{name}={value}: only square {name}s are supported")
        value = value[0]
    return int(value)


def vit_config_from_hf(config: dict, **overrides) -> ViTConfig:
    """:class:`ViTConfig` of the DINOv2 model described by an HF ``config.json`` dict."""
    arch, c = _config_dict(config)
    registers = arch in ("Dinov2WithRegistersModel", "dinov2_with_registers")
    hidden = int(c["hidden_size"])
    mlp_dim = int(hidden * c["mlp_ratio"])
    if c["use_swiglu_ffn"]:
        mlp_dim = (int(mlp_dim * 2 / 3) + 7) // 8 * 8  # HF's SwiGLU size: 2/3 of the MLP, rounded up to 8
    derived = dict(
        width=hidden,
        depth=int(c["num_hidden_layers"]),
        mlp_dim=mlp_dim,
        num_heads=int(c["num_attention_heads"]),
        patch_size=_square(c["patch_size"], "patch_size"),
        image_size=_square(c["image_size"], "image_size"),
        num_channels=int(c["num_channels"]),
        class_token=True,
        num_registers=int(c["num_register_tokens"]) if registers else 0,
        mask_token=True if registers else bool(c["use_mask_token"]),
        layer_scale=float(c["layerscale_value"]),
        pool="cls",
        act=c["hidden_act"],
        mlp_type="swiglu" if c["use_swiglu_ffn"] else "mlp",
        norm_eps=float(c["layer_norm_eps"]),
        qkv_bias=bool(c["qkv_bias"]),
        # HF interpolates the registers model's position embeddings with antialias=True, the plain one without.
        pos_antialias=registers,
    )
    return ViTConfig(**{**derived, **overrides})


def _split_weights_in(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """SwiGLU ``mlp.weights_in [2H, D]`` (gate rows first, then up) -> ``gate_proj`` and ``up_proj``."""
    out = {}
    for key, value in tensors.items():
        if ".mlp.weights_in." in key:
            gate, up = np.split(np.asarray(value), 2, axis=0)
            out[key.replace("weights_in", "gate_proj")] = gate
            out[key.replace("weights_in", "up_proj")] = up
        else:
            out[key] = value
    return out


def convert_dinov2_tensors(tensors: dict[str, np.ndarray], num_layers: int | None = None,
                           prefix: str = "") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """HF DINOv2 tensors (prefix already stripped) -> ``(flat vlax params, sources)``."""
    tensors = stack_numbered(_split_weights_in(tensors), "encoder.layer.", num_layers=num_layers)
    return rename_tensors(tensors, RULES, source_prefix=prefix)


def find_prefix(names: list[str]) -> str:
    """The prefix under which a checkpoint keeps its DINOv2 model."""
    return find_checkpoint_prefix(names, PREFIXES, "embeddings.patch_embeddings.projection.weight", "DINOv2 model")


def load_dinov2(path: str | Path, *, dtype=None, compute_dtype=None, strict: bool = True, **overrides) -> ViT:
    """A :class:`ViT` with the DINOv2 weights of the HF checkpoint directory ``path``.

    ``dtype`` (e.g. ``jnp.bfloat16``) is the dtype parameters are stored in (default float32, as the other
    loaders of :mod:`vlax.weights`); ``compute_dtype`` the dtype activations are computed in; ``overrides``
    are :class:`ViTConfig` fields (``remat="full"``, ``attn_implementation``, ...).
    Every shape and dtype kind is checked; missing and unexpected tensors are named in the error.
    """
    if dtype is not None:
        overrides["param_dtype"] = jnp.dtype(dtype).name
    if compute_dtype is not None:
        overrides["dtype"] = jnp.dtype(compute_dtype).name
    cfg = vit_config_from_hf(read_config(path), **overrides)
    prefix = find_prefix(tensor_names(path))
    flat, sources = convert_dinov2_tensors(load_prefixed(path, prefix), cfg.depth, prefix)
    model = nnx.eval_shape(lambda: ViT(cfg, rngs=nnx.Rngs(0)))
    return assign_params(model, flat, strict=strict, sources=sources)
