"""Import of Hugging Face ``LlamaForCausalLM`` checkpoints (Llama-2/3, SmolLM2) into a vlax ``Transformer``.

The tensor layout is shared by the whole decoder family (Gemma uses the same names), so this module also holds
the rename table :mod:`vlax.weights.gemma` reuses::

    model.embed_tokens.weight                         -> embed_tokens.embedding
    model.layers.<i>.input_layernorm.weight           -> layers.input_layernorm.scale          (stacked [L, D])
    model.layers.<i>.self_attn.{q,k,v,o}_proj.weight  -> layers.self_attn.{q,k,v,o}_proj.kernel (stacked, transposed)
    model.layers.<i>.post_attention_layernorm.weight  -> layers.post_attention_layernorm.scale
    model.layers.<i>.mlp.{gate,up,down}_proj.weight   -> layers.mlp.{gate,up,down}_proj.kernel (stacked, transposed)
    model.norm.weight                                 -> norm.scale
    lm_head.weight                                    -> lm_head.kernel (transposed; dropped when tied)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from flax import nnx

from vlax.backbones import Transformer, TransformerConfig
from vlax.nn import RopeConfig
from vlax.weights.common import (CheckpointError, assign_params, check_architecture, linear_kernel, load_hf_dir,
                                 rename_tensors, stack_numbered, strip_prefix)

ARCHITECTURES = ("LlamaForCausalLM", "llama")  # "llama": the model_type, when config.json has no architectures

DECODER_RULES = [
    (r"embed_tokens\.weight", "embed_tokens.embedding", None),
    (r"layers\.(self_attn|mlp)\.(\w+_proj)\.weight", r"layers.\1.\2.kernel", linear_kernel),
    (r"layers\.(input_layernorm|post_attention_layernorm)\.weight", r"layers.\1.scale", None),
    (r"norm\.weight", "norm.scale", None),
    (r"lm_head\.weight", "lm_head.kernel", linear_kernel),
]

# HF activation spellings -> vlax names (vlax.nn.activation accepts both; one spelling keeps configs comparable)
HF_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
                  "swish": "silu"}

_ROPE_FLOAT_KEYS = ("factor", "low_freq_factor", "high_freq_factor")


def required(hf: Mapping[str, Any], key: str) -> Any:
    """``hf[key]``, or an error naming the missing config.json field."""
    if hf.get(key) is None:
        raise CheckpointError(f"config.json lacks the field {key!r} needed to build the model")
    return hf[key]


def rope_from_hf(hf: Mapping[str, Any], default_theta: float = 10_000.0) -> RopeConfig:
    """RoPE settings from a config.json: ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters") or {})
    params = {**(hf.get("rope_scaling") or {}), **params}
    theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return RopeConfig(theta=float(theta))
    if kind not in ("linear", "llama3"):
        raise CheckpointError(f"unsupported RoPE scaling {kind!r} in config.json; supported: default, linear, llama3")
    if params.get("factor") is None:
        raise CheckpointError(f"RoPE scaling {kind!r} needs a 'factor' in config.json (got {params})")
    extra = {k: float(params[k]) for k in _ROPE_FLOAT_KEYS if params.get(k) is not None}
    if params.get("original_max_position_embeddings") is not None:
        extra["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeConfig(theta=float(theta), scaling=kind, **extra)


def decoder_config_from_hf(hf: Mapping[str, Any], family: Mapping[str, Any], overrides: Mapping[str, Any]
                           ) -> TransformerConfig:
    """Config from the fields every decoder config.json shares, then ``family`` values, then ``overrides``."""
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise CheckpointError(f"config.json sets {flag}=true; vlax decoders have no projection biases")
    heads = int(required(hf, "num_attention_heads"))
    width = int(required(hf, "hidden_size"))
    base = dict(
        vocab_size=int(required(hf, "vocab_size")),
        width=width,
        depth=int(required(hf, "num_hidden_layers")),
        mlp_dim=int(required(hf, "intermediate_size")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or width // heads),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=rope_from_hf(hf),
    )
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown TransformerConfig field(s) {unknown}; known: {sorted(known)}")
    family = {**family, "act": HF_ACTIVATIONS.get(family["act"], family["act"])}
    return TransformerConfig(**{**base, **family, **overrides})


def llama_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    """:class:`TransformerConfig` of a Llama / SmolLM2 ``config.json`` (as a dict); ``overrides`` win."""
    family = dict(act=str(hf.get("hidden_act") or "silu"), tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    return decoder_config_from_hf(hf, family, overrides)


def hf_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor (names without the ``model.`` prefix) that ``config`` implies."""
    d, f, v = config.width, config.mlp_dim, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    layer = {
        "input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d), "mlp.down_proj.weight": (d, f),
    }
    shapes = {"embed_tokens.weight": (v, d), "norm.weight": (d,)}
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(config.depth):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
    return shapes


def _check_tensors(tensors: Mapping[str, np.ndarray], config: TransformerConfig, prefix: str) -> None:
    """One error naming (by checkpoint name) every missing, unexpected or wrongly shaped tensor."""
    expected = hf_shapes(config)

    def original(key: str) -> str:
        return key if key == "lm_head.weight" else prefix + key

    problems = []
    missing = [original(k) for k in expected if k not in tensors]
    if missing:
        problems.append(f"missing tensors: {missing}")
    unexpected = sorted(original(k) for k in tensors if k not in expected)
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    problems += [f"{original(k)}: checkpoint shape {tuple(np.shape(t))} != {tuple(expected[k])} expected from "
                 "config.json" for k, t in sorted(tensors.items()) if k in expected
                 and tuple(np.shape(t)) != tuple(expected[k])]
    if problems:
        geometry = (f"hidden_size={config.width}, intermediate_size={config.mlp_dim}, num_attention_heads="
                    f"{config.num_heads}, num_key_value_heads={config.num_kv_heads}, head_dim={config.head_dim}, "
                    f"num_hidden_layers={config.depth}, vocab_size={config.vocab_size}, "
                    f"tie_word_embeddings={config.tie_embeddings}")
        raise CheckpointError(f"checkpoint does not match its config.json ({geometry}):\n  " + "\n  ".join(problems))


def convert_decoder_tensors(tensors: Mapping[str, np.ndarray], config: TransformerConfig
                            ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """HF decoder tensors (``model.``-prefixed or not) -> ``({vlax dotted path: array}, {path: HF name})``.

    Names and shapes are checked per tensor (errors name the checkpoint tensor) before layers are stacked.
    """
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # a tied copy some exporters write out
    tensors, prefix = strip_prefix(tensors, ("model.", ""))
    _check_tensors(tensors, config, prefix)
    stacked = stack_numbered(tensors, "layers.", "layers.", num_layers=config.depth)
    return rename_tensors(stacked, DECODER_RULES)


def load_decoder(path: str | Path, architectures: tuple[str, ...], make_config, *, dtype=None,
                 **overrides: Any) -> Transformer:
    """Read a checkpoint directory, build the abstract model from its config, and fill it (validated)."""
    hf, tensors = load_hf_dir(path)
    check_architecture(hf, architectures)
    if dtype is not None:
        overrides.setdefault("param_dtype", dtype)
    config = make_config(hf, **overrides)
    flat, sources = convert_decoder_tensors(tensors, config)
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    return assign_params(model, flat, sources=sources, dtype=dtype)


def load_llama(path: str | Path, *, dtype=None, **overrides: Any) -> Transformer:
    """A :class:`vlax.backbones.Transformer` holding a local ``LlamaForCausalLM`` checkpoint (safetensors).

    ``dtype`` (e.g. ``jnp.bfloat16``) sets the parameter dtype; ``overrides`` are :class:`TransformerConfig`
    fields (``remat="dots"``, ``dtype=jnp.bfloat16`` for computation, ...). Every tensor's shape and dtype kind
    is checked; missing and unexpected tensors are reported by name.
    """
    return load_decoder(path, ARCHITECTURES, llama_config_from_hf, dtype=dtype, **overrides)


load = load_llama
