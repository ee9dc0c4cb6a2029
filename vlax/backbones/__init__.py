"""Decoder-only language backbones: one transformer family configured for Llama-2/3, Gemma and SmolLM2.

Example::

    from flax import nnx
    from vlax.backbones import Transformer, get_config

    model = Transformer(get_config("tiny"), rngs=nnx.Rngs(0))
    out = model(tokens, return_logits=True, cache_size=32)   # tokens [B, T] -> hidden, logits, KVCache
    step = model.decode_step(next_ids, out.cache)           # next_ids [B, 1] -> logits [B, 1, V], new cache

Checkpoints: ``vlax.weights.load_pretrained(hf_dir)`` (LlamaForCausalLM / SmolLM2, GemmaForCausalLM).
"""

from vlax.backbones.config import CONFIGS, TransformerConfig, get_config
from vlax.backbones.transformer import TokenEmbed, Transformer, TransformerOutput

__all__ = ["CONFIGS", "TransformerConfig", "get_config", "TokenEmbed", "Transformer", "TransformerOutput"]
