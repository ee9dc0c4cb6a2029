"""Import of Hugging Face ``GemmaForCausalLM`` checkpoints into :class:`vlax.backbones.Transformer`.

Gemma stores its tensors under the same names as Llama (see :mod:`vlax.weights.llama` for the table); what
differs is the architecture the config implies: ``sqrt(width)`` embedding scaling, RMSNorm with a ``1 + w``
scale, GeGLU, tied embeddings by default, and ``head_dim`` independent of ``width / num_heads``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from vlax.backbones import Transformer, TransformerConfig
from vlax.weights.llama import decoder_config_from_hf, load_decoder

ARCHITECTURES = ("GemmaForCausalLM", "gemma")  # "gemma": the model_type, when config.json has no architectures


def gemma_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> TransformerConfig:
    """:class:`TransformerConfig` of a Gemma ``config.json`` (as a dict); ``overrides`` win."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act == "gelu":
        act = "gelu_tanh"  # the original releases say "gelu" but were trained with the tanh approximation
    family = dict(act=act, embed_scale=True, norm_unit_offset=True,
                  tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    return decoder_config_from_hf(hf, family, overrides)


def load_gemma(path: str | Path, *, dtype=None, **overrides: Any) -> Transformer:
    """A :class:`vlax.backbones.Transformer` holding a local ``GemmaForCausalLM`` checkpoint (safetensors).

    Arguments as in :func:`vlax.weights.llama.load_llama`.
    """
    return load_decoder(path, ARCHITECTURES, gemma_config_from_hf, dtype=dtype, **overrides)


load = load_gemma
