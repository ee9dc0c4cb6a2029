"""Configuration of the decoder-only transformer family, and the published sizes by name."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from vlax.nn import REMAT_POLICIES, RopeConfig, activation


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyper-parameters of one decoder-only language model (Llama-2/3, Gemma, SmolLM2).

    Attributes:
      vocab_size, width, depth, mlp_dim: vocabulary, residual width ``D``, number of layers, gated-MLP hidden size.
      num_heads, num_kv_heads, head_dim: query heads, key/value heads (``< num_heads``: GQA, ``1``: MQA) and the
        per-head size (Gemma's 256 differs from ``width / num_heads``).
      norm_eps: RMSNorm epsilon.
      act: gate activation, ``"silu"`` (SwiGLU, Llama) or ``"gelu_tanh"`` (GeGLU, Gemma); HF spellings accepted.
      rope: rotary-embedding settings (theta, Llama-3 scaling).
      embed_scale: multiply token embeddings by ``sqrt(width)`` rounded to the parameter dtype (Gemma).
      tie_embeddings: the output projection is the transposed token-embedding table (no ``lm_head``).
      norm_unit_offset: RMSNorm scale is ``1 + w`` (Gemma).
      attn_softcap, final_softcap: ``tanh`` soft-capping of attention logits / output logits (``None``: off).
      remat: rematerialisation policy of the scanned layers, by name (see ``vlax.nn.REMAT_POLICIES``).
      dtype: computation dtype (``None``: that of the inputs / parameters); param_dtype: storage dtype.
      attention_impl: ``None``/``"xla"``/``"cudnn"``/``"einsum"``, passed to ``vlax.nn.dot_product_attention``.
    """

    vocab_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    act: str = "silu"
    rope: RopeConfig = RopeConfig()
    embed_scale: bool = False
    tie_embeddings: bool = False
    norm_unit_offset: bool = False
    attn_softcap: float | None = None
    final_softcap: float | None = None
    remat: str = "none"
    dtype: Any = None
    param_dtype: Any = jnp.float32
    attention_impl: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"TransformerConfig.num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"TransformerConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat policy {self.remat!r}; known: {sorted(REMAT_POLICIES)}")
        activation(self.act)  # raises with the known names
        if self.attention_impl not in (None, "xla", "cudnn", "einsum"):
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; known: None, 'xla', 'cudnn', "
                             "'einsum'")


# Published sizes (values from each model's config.json on the Hugging Face hub).
CONFIGS: dict[str, dict[str, Any]] = {
    "llama2_7b": dict(vocab_size=32000, width=4096, depth=32, mlp_dim=11008, num_heads=32, num_kv_heads=32,
                      head_dim=128, norm_eps=1e-5, act="silu", rope=RopeConfig(theta=10_000.0)),
    "llama3_8b": dict(vocab_size=128256, width=4096, depth=32, mlp_dim=14336, num_heads=32, num_kv_heads=8,
                      head_dim=128, norm_eps=1e-5, act="silu", rope=RopeConfig(theta=500_000.0)),
    "llama3_2_1b": dict(vocab_size=128256, width=2048, depth=16, mlp_dim=8192, num_heads=32, num_kv_heads=8,
                        head_dim=64, norm_eps=1e-5, act="silu", tie_embeddings=True,
                        rope=RopeConfig(theta=500_000.0, scaling="llama3", factor=32.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "gemma_2b": dict(vocab_size=256000, width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1,
                     head_dim=256, norm_eps=1e-6, act="gelu_tanh", rope=RopeConfig(theta=10_000.0),
                     embed_scale=True, tie_embeddings=True, norm_unit_offset=True),
    "smollm2_135m": dict(vocab_size=49152, width=576, depth=30, mlp_dim=1536, num_heads=9, num_kv_heads=3,
                         head_dim=64, norm_eps=1e-5, act="silu", rope=RopeConfig(theta=100_000.0),
                         tie_embeddings=True),
    "smollm2_360m": dict(vocab_size=49152, width=960, depth=32, mlp_dim=2560, num_heads=15, num_kv_heads=5,
                         head_dim=64, norm_eps=1e-5, act="silu", rope=RopeConfig(theta=100_000.0),
                         tie_embeddings=True),
    # For tests and CPU demos.
    "tiny": dict(vocab_size=256, width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=2, head_dim=16,
                 norm_eps=1e-6, act="silu", rope=RopeConfig(theta=10_000.0)),
}


def get_config(name: str, **overrides: Any) -> TransformerConfig:
    """A published configuration by name (``llama2_7b``, ``gemma_2b``, ``smollm2_360m``, ...), with overrides.

    Example: ``get_config("gemma_2b", vocab_size=257152, remat="dots")`` (PaliGemma's vocabulary).
    """
    if name not in CONFIGS:
        raise ValueError(f"unknown backbone config {name!r}; known: {sorted(CONFIGS)}")
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown TransformerConfig field(s) {unknown}; known: {sorted(fields)}")
    return TransformerConfig(**{**CONFIGS[name], **overrides})
