"""Neural building blocks shared by encoders, backbones and heads.

Everything here is plain Flax NNX; parameters carry logical axis names (see :mod:`vlax.nn.params`).
"""

from vlax.nn.attention import Attention, dot_product_attention
from vlax.nn.blocks import DecoderBlock, EncoderBlock, MaskedEncoder
from vlax.nn.context import ContextSpec, HeadContext, LanguageModel, unpack_decode
from vlax.nn.kv_cache import KVCache
from vlax.nn.linear import Dense, Embed
from vlax.nn.lora import LoRADense, LoRAParam, apply_lora, merge_lora
from vlax.nn.masks import make_attn_mask, positions_from_mask, prefix_suffix_mask
from vlax.nn.mlp import GatedMlp, Mlp, activation
from vlax.nn.norms import LayerNorm, LayerScale, RMSNorm
from vlax.nn.params import count_params, logical_axes_of, param
from vlax.nn.rope import RopeConfig, apply_rope, inverse_frequencies
from vlax.nn.scan import REMAT_POLICIES, remat_policy, scan_layers, stack_layers
from vlax.nn.head_base import ActionHead, AttentionPool, combine_masks, split_rngs
from vlax.nn.noise_schedules import NoiseSchedule

__all__ = [
    "Attention", "dot_product_attention", "KVCache", "Dense", "Embed", "LoRADense", "LoRAParam", "apply_lora",
    "merge_lora", "make_attn_mask", "positions_from_mask", "prefix_suffix_mask", "GatedMlp", "Mlp", "activation",
    "LayerNorm", "LayerScale", "RMSNorm", "count_params", "logical_axes_of", "param", "RopeConfig", "apply_rope",
    "inverse_frequencies", "DecoderBlock", "EncoderBlock", "MaskedEncoder", "REMAT_POLICIES", "remat_policy", "scan_layers", "stack_layers",
    "ContextSpec", "HeadContext", "LanguageModel", "unpack_decode",
    "ActionHead", "AttentionPool", "combine_masks", "split_rngs", "NoiseSchedule",
]
