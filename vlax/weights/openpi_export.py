"""vlax π0 / π0.5 / π0-FAST parameters back in openpi's ``params/`` layout (the inverse of
:func:`vlax.weights.openpi.convert_params`).

Per-layer weights stay stacked (``[L, ...]``); Dense kernels ``[L, D, N * H]`` become openpi's einsum weights
(``q_einsum [L, N, D, H]``, ``kv_einsum [L, 2, K, D, H]`` or ``qkv_einsum [L, 3, N, D, H]`` when every head has
its own key/value head, ``attn_vec_einsum [L, N, H, D]``, ``gating_einsum [L, 2, D, F]``); the action expert's
plain RMSNorm scales become Gemma's ``w`` of ``1 + w``. Used to write a tree openpi's loaders read and to check the
importer's key map by a round trip.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from vlax.weights.common import CheckpointError

ATTN, MLP = "PaliGemma/llm/layers/attn/", "PaliGemma/llm/layers/mlp"
NORMS = (("input_layernorm", "pre_attention_norm"), ("post_attention_layernorm", "pre_ffw_norm"))


def _einsum(kernel: np.ndarray, heads: int) -> np.ndarray:
    """Dense kernel ``[L, D, N * H]`` -> einsum weight ``[L, N, D, H]``."""
    layers, width, _ = kernel.shape
    return np.moveaxis(kernel.reshape(layers, width, heads, -1), 2, 1)


def _norm(tensors: Mapping[str, np.ndarray], source: str, target: str, unit_offset: bool, out: dict) -> None:
    if f"{source}.scale" in tensors:
        w = tensors[f"{source}.scale"]
        out[f"{target}/scale"] = w if unit_offset else (w.astype(np.float32) - 1.0).astype(w.dtype)
    else:
        for leaf in ("kernel", "bias"):
            out[f"{target}/Dense_0/{leaf}"] = tensors[f"{source}.modulation.{leaf}"]


def _gemma(tensors: Mapping[str, np.ndarray], source: str, suffix: str, heads: int, kv_heads: int,
           unit_offset: bool, out: dict) -> None:
    get = lambda name: tensors[f"{source}.{name}"]  # noqa: E731
    q = _einsum(get("self_attn.q_proj.kernel"), heads)
    k, v = _einsum(get("self_attn.k_proj.kernel"), kv_heads), _einsum(get("self_attn.v_proj.kernel"), kv_heads)
    if kv_heads == heads:
        out[f"{ATTN}qkv_einsum{suffix}/w"] = np.stack([q, k, v], axis=1)
    else:
        out[f"{ATTN}q_einsum{suffix}/w"] = q
        out[f"{ATTN}kv_einsum{suffix}/w"] = np.stack([k, v], axis=1)
    o = get("self_attn.o_proj.kernel")  # [L, N * H, D]
    out[f"{ATTN}attn_vec_einsum{suffix}/w"] = o.reshape(o.shape[0], heads, -1, o.shape[-1])
    out[f"{MLP}{suffix}/gating_einsum"] = np.stack([get("mlp.gate_proj.kernel"), get("mlp.up_proj.kernel")], 1)
    out[f"{MLP}{suffix}/linear"] = get("mlp.down_proj.kernel")
    for ours, theirs in NORMS:
        _norm(tensors, f"{source}.{ours}", f"PaliGemma/llm/layers/{theirs}{suffix}", unit_offset, out)


def _vision(tensors: Mapping[str, np.ndarray], heads: int, out: dict) -> None:
    img, blk = "PaliGemma/img/", "PaliGemma/img/Transformer/encoderblock/"
    out[img + "embedding/kernel"] = tensors["vision.embeddings.patch_embedding.kernel"]
    out[img + "embedding/bias"] = tensors["vision.embeddings.patch_embedding.bias"]
    out[img + "pos_embedding"] = tensors["vision.embeddings.position_embedding"][None]
    layers = "vision.encoder.layers."
    for ours, theirs in (("layer_norm1", "LayerNorm_0"), ("layer_norm2", "LayerNorm_1")):
        for leaf in ("scale", "bias"):
            out[blk + f"{theirs}/{leaf}"] = tensors[f"{layers}{ours}.{leaf}"]
    for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
        for leaf in ("kernel", "bias"):
            out[blk + f"MlpBlock_0/{theirs}/{leaf}"] = tensors[f"{layers}mlp.{ours}.{leaf}"]
    mha = blk + "MultiHeadDotProductAttention_0/"
    for ours, theirs in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        kernel, bias = tensors[f"{layers}self_attn.{ours}.kernel"], tensors[f"{layers}self_attn.{ours}.bias"]
        out[mha + f"{theirs}/kernel"] = kernel.reshape(*kernel.shape[:2], heads, -1)  # [L, D, N, H]
        out[mha + f"{theirs}/bias"] = bias.reshape(bias.shape[0], heads, -1)
    kernel = tensors[f"{layers}self_attn.o_proj.kernel"]  # [L, N * H, D]
    out[mha + "out/kernel"] = kernel.reshape(kernel.shape[0], heads, -1, kernel.shape[-1])
    out[mha + "out/bias"] = tensors[f"{layers}self_attn.o_proj.bias"]
    for leaf in ("scale", "bias"):
        out[f"{img}Transformer/encoder_norm/{leaf}"] = tensors[f"vision.post_layernorm.{leaf}"]
    for leaf in ("kernel", "bias"):
        out[img + f"head/{leaf}"] = tensors[f"img_proj.{leaf}"]


def openpi_params(tensors: Mapping[str, np.ndarray], *, vision_heads: int, heads: int, kv_heads: int
                  ) -> dict[str, np.ndarray]:
    """``{openpi key path: array}`` of flat vlax parameters (``vlax.weights.common.to_numpy_flat(policy)``).

    ``vision_heads`` / ``heads`` / ``kv_heads``: SigLIP's heads and Gemma's query / key-value heads (the kernels'
    shapes do not say how their last axis splits). Anything without a place in openpi's layout is named.
    """
    from vlax.weights.openpi import HEAD_PROJECTIONS

    adapters = [k for k in tensors if ".lora_" in k]
    if adapters:
        raise CheckpointError(f"LoRA adapters ({adapters[0]}, ...): fold them first with vlax.nn.merge_lora(policy)")
    out: dict[str, np.ndarray] = {}
    _vision(tensors, vision_heads, out)
    out["PaliGemma/llm/embedder/input_embedding"] = tensors["backbone.embed_tokens.embedding"]
    _norm(tensors, "backbone.norm", "PaliGemma/llm/final_norm", True, out)
    _gemma(tensors, "backbone.layers", "", heads, kv_heads, True, out)
    if "head.expert.layers.self_attn.q_proj.kernel" in tensors:
        _gemma(tensors, "head.expert.layers", "_1", heads, kv_heads, False, out)
        _norm(tensors, "head.expert.norm", "PaliGemma/llm/final_norm_1", False, out)
    used = {k for k in tensors if k.startswith(("vision.", "img_proj.", "backbone.", "head.expert."))}
    for key in tensors:
        name, _, leaf = key.removeprefix("head.").rpartition(".")
        if key.startswith("head.") and name in HEAD_PROJECTIONS:
            out[f"{name}/{leaf}"] = tensors[key]
            used.add(key)
    left = sorted(set(tensors) - used)
    if left:
        raise CheckpointError(f"vlax parameters with no place in openpi's layout: {left[:8]} (LoRA adapters: merge "
                              "them first with vlax.nn.merge_lora; heads other than flow / flow_pi05 / fast)")
    return out


__all__ = ["openpi_params"]
