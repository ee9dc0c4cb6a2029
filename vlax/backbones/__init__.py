"""Decoder-only language backbones: one transformer family configured for Llama-2/3, Gemma and SmolLM2.

>>> from flax import nnx
>>> from vlax.backbones import Transformer, get_config
>>> model = Transformer(get_config("tiny"), rngs=nnx.Rngs(0))
>>> out = model(tokens, return_logits=True, cache_size=32)      # hidden [B, T, D], logits, KVCache
>>> step = model.decode_step(next_ids, out.cache)              # logits [B, 1, V], updated cache
"""

from vlax.backbones.config import CONFIGS, TransformerConfig, get_config
from vlax.backbones.transformer import TokenEmbed, Transformer, TransformerOutput

__all__ = ["CONFIGS", "TransformerConfig", "get_config", "TokenEmbed", "Transformer", "TransformerOutput"]
