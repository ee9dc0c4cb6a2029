"""Import of T5 encoders (:class:`vlax.encoders.t5.T5Encoder`) from Hugging Face checkpoints.

Two name layouts are read:

* PyTorch / safetensors (``T5EncoderModel``, ``T5ForConditionalGeneration``): ``shared.weight``,
  ``encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight``, ``...relative_attention_bias.weight`` (block 0),
  ``encoder.block.{i}.layer.{0,1}.layer_norm.weight``, ``encoder.block.{i}.layer.1.DenseReluDense.{wi | wi_0,
  wi_1, wo}.weight``, ``encoder.final_layer_norm.weight``; decoder tensors are ignored.
* HF-Flax (the tree Octo stores under ``task_tokenizers_language/hf_model``): the same names with ``/``,
  ``kernel`` (already ``[in, out]``) and ``embedding`` for the tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import nnx

from vlax.encoders.t5 import T5Config, T5Encoder
from vlax.weights.common import CheckpointError, assign_params, linear_rules, load_hf_dir, rename_tensors

_BLOCK = r"encoder\.block\.(\d+)\.layer\."
RULES = [
    (r"shared\.weight", "embed.embedding", None),
    (_BLOCK + r"0\.SelfAttention\.relative_attention_bias\.weight", r"relative_bias.embedding", None),
    *linear_rules(_BLOCK + r"0\.SelfAttention\.([qkvo])", r"layers.\1.attn.\2"),
    (_BLOCK + r"0\.layer_norm\.weight", r"layers.\1.attn_norm.scale", None),
    *linear_rules(_BLOCK + r"1\.DenseReluDense\.(wi|wi_0|wi_1|wo)", r"layers.\1.ff.\2"),
    (_BLOCK + r"1\.layer_norm\.weight", r"layers.\1.ff_norm.scale", None),
    (r"encoder\.final_layer_norm\.weight", "final_norm.scale", None),
]


def t5_config_from_hf(config: Mapping[str, Any]) -> T5Config:
    """:class:`T5Config` of a transformers ``T5Config`` dict (``config.json``)."""
    ff = str(config.get("feed_forward_proj", "relu"))
    return T5Config(vocab_size=int(config["vocab_size"]), d_model=int(config["d_model"]), d_kv=int(config["d_kv"]),
                    d_ff=int(config["d_ff"]), num_layers=int(config["num_layers"]),
                    num_heads=int(config["num_heads"]),
                    relative_attention_num_buckets=int(config.get("relative_attention_num_buckets", 32)),
                    relative_attention_max_distance=int(config.get("relative_attention_max_distance", 128)),
                    feed_forward_proj="gated-gelu" if ff == "gated-gelu" else ff,
                    layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-6)))


def flax_names_to_torch(tree: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF-Flax ``{"shared/embedding": ..., ".../q/kernel": [in, out]}`` -> PyTorch names (``[out, in]`` weights)."""
    out = {}
    for name, value in tree.items():
        parts = name.split("/")
        leaf = parts[-1]
        value = np.asarray(value)
        if leaf == "kernel":
            value = value.T
        out[".".join(parts[:-1] + ["weight"]) if leaf in ("kernel", "embedding") else ".".join(parts)] = value
    return out


def convert_t5_tensors(tensors: Mapping[str, np.ndarray], config: T5Config
                       ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """PyTorch-named T5 tensors -> ``({vlax path: array}, {path: checkpoint name})`` (the encoder only)."""
    keep = {k: v for k, v in tensors.items() if k.startswith(("encoder.", "shared."))}
    if "shared.weight" not in keep and "encoder.embed_tokens.weight" in keep:
        keep["shared.weight"] = keep["encoder.embed_tokens.weight"]
    keep.pop("encoder.embed_tokens.weight", None)  # tied to shared.weight
    flat, sources = rename_tensors(keep, RULES)
    if not any(k.startswith("layers.") for k in flat):
        raise CheckpointError(f"no T5 encoder blocks (encoder.block.<i>.*) among the tensors; first names: "
                              f"{sorted(tensors)[:8]}")
    return flat, sources


def load_t5_encoder(path: str | Path) -> T5Encoder:
    """A :class:`T5Encoder` holding the encoder of a local HF T5 checkpoint directory (safetensors)."""
    config, tensors = load_hf_dir(path)
    cfg = t5_config_from_hf(config)
    flat, sources = convert_t5_tensors(tensors, cfg)
    model = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))
    return assign_params(model, flat, sources=sources)


__all__ = ["t5_config_from_hf", "convert_t5_tensors", "flax_names_to_torch", "load_t5_encoder", "RULES"]
