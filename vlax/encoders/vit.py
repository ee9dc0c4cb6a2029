"""One Vision Transformer for SigLIP, DINOv2 and CLIP (and plain ViTs), sized by a big_vision variant string.

``ViTConfig.from_variant("So400m/14")`` decodes width / depth / MLP size / heads / patch size, as big_vision
does. The two pretrained families differ only in options:

* SigLIP: learned position embeddings for the patch grid, no class token, post-LayerNorm, optional MAP pooling
  head (``head``: probe, attention, layernorm, mlp), GELU-tanh.
* DINOv2: a class token (its position embedding included), optional register tokens (after the class token,
  without position embeddings), LayerScale on both residual branches, a ``mask_token`` parameter, exact GELU,
  final LayerNorm.
* CLIP (OpenAI's ViT-L/14 of OpenFlamingo / RoboFlamingo): a class token with a position, a bias-free patch
  embedding, a LayerNorm ahead of the blocks (``pre_norm``), QuickGELU, and the final LayerNorm applied to the
  pooled class token only (``post_norm_scope="pooled"``: the patch tokens leave the last block unnormalised, as
  transformers' ``CLIPVisionModel.last_hidden_state`` does).

FiLM (OpenVLA-OFT's language conditioning, ``film_dim``): every block modulates its tokens after the attention
residual and before the MLP, ``x = x * (1 + scale(c)) + shift(c)`` with ``c [B, film_dim]`` passed as
``film_cond`` (:class:`vlax.nn.film.FiLM`); with ``film_dim=None`` (the default) blocks hold no FiLM layer and run
exactly as without the option.

Position embeddings are resized to the input's patch grid with PyTorch-equal bicubic weights
(:mod:`vlax.encoders.interpolate`), so any resolution that is a multiple of the patch size works.

Submodule names follow HF SigLIP (``embeddings``, ``encoder.layers``, ``layer_norm1``, ``self_attn``, ``mlp``,
``post_layernorm``, ``head``), so weight import is a table of renames. Layers are stacked (``[L, ...]`` params)
and run with ``lax.scan`` under a named remat policy. Images are ``[B, H, W, C]`` (channels last), already
normalised as the checkpoint expects (see :mod:`vlax.encoders.preprocess`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct

from vlax.encoders.interpolate import resize_grid
from vlax.nn import Attention, GatedMlp, LayerNorm, LayerScale, Mlp, param, scan_layers, stack_layers
from vlax.nn.attention import Implementation
from vlax.nn.film import FiLM, FiLMInit

# big_vision's names for ViT sizes: width, depth, MLP size, heads.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}


def decode_variant(variant: str) -> dict[str, int]:
    """``"So400m/14"`` -> ``{"width": 1152, "depth": 27, "mlp_dim": 4304, "num_heads": 16, "patch_size": 14}``."""
    m = re.fullmatch(r"([A-Za-z0-9]+)/(\d+)", variant)
    if m is None or m.group(1) not in VARIANTS:
        raise ValueError(f"unknown ViT variant {variant!r}; expected '<size>/<patch>' with size in "
                         f"{list(VARIANTS)}, e.g. 'So400m/14' or 'B/16'")
    width, depth, mlp_dim, heads = VARIANTS[m.group(1)]
    return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=int(m.group(2)))


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Everything that shapes a :class:`ViT`. ``image_size`` fixes the stored position-embedding grid."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    image_size: int = 224
    num_channels: int = 3
    class_token: bool = False
    # timm's DINOv2-reg (no_embed_class, OpenVLA's tower): the position table covers the patches only
    class_token_position: bool = True
    num_registers: int = 0
    mask_token: bool = False
    layer_scale: float | None = None  # LayerScale init value; None: no LayerScale
    pool: Literal["none", "map", "cls"] = "none"
    post_norm: bool = True
    post_norm_scope: Literal["all", "pooled"] = "all"  # "pooled": only the pooled output is normalised (CLIP)
    pre_norm: bool = False  # a LayerNorm over the embeddings ahead of the first block (CLIP)
    patch_bias: bool = True
    act: str = "gelu_tanh"
    mlp_type: Literal["mlp", "swiglu"] = "mlp"
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    pos_antialias: bool = False  # bicubic position-embedding resize with anti-aliasing (DINOv2 with registers)
    remat: str = "none"
    # None/"xla", or "cudnn" on GPU (measured on H100: forward fine at any length, but its backward rejects
    # lengths such as DINOv2-reg's 261 tokens: train with "xla"), or "einsum".
    attn_implementation: Implementation = None
    dtype: str | None = None  # compute dtype, e.g. "bfloat16"; parameters stay param_dtype
    param_dtype: str = "float32"
    # FiLM in every block by a [B, film_dim] conditioning vector (OpenVLA-OFT+); None: no FiLM layers
    film_dim: int | None = None
    film_init: FiLMInit = "uniform"  # torch nn.Linear's default (OFT's); "zeros": the exact identity at init

    @classmethod
    def from_variant(cls, variant: str, **overrides) -> "ViTConfig":
        """Config from a big_vision variant string, e.g. ``ViTConfig.from_variant("B/16", pool="map")``."""
        return cls(**{**decode_variant(variant), **overrides})

    @property
    def grid_size(self) -> int:
        """Side of the stored (square) position-embedding grid."""
        return self.image_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens ahead of the patches: class token then registers."""
        return int(self.class_token) + self.num_registers


def siglip_config(variant: str = "So400m/14", image_size: int = 224, **overrides) -> ViTConfig:
    """SigLIP vision tower: no class token, MAP head, GELU-tanh, post-LayerNorm."""
    return ViTConfig.from_variant(variant, image_size=image_size, **{"pool": "map", "act": "gelu_tanh", **overrides})


def clip_config(variant: str = "L/14", image_size: int = 224, **overrides) -> ViTConfig:
    """CLIP vision tower: class token, bias-free patches, pre-LayerNorm, QuickGELU, post-norm on the pooled token."""
    defaults = dict(class_token=True, pool="cls", act="quick_gelu", norm_eps=1e-5, pre_norm=True, patch_bias=False,
                    post_norm_scope="pooled")
    return ViTConfig.from_variant(variant, image_size=image_size, **{**defaults, **overrides})


def dinov2_config(variant: str = "L/14", image_size: int = 518, num_registers: int = 0, **overrides) -> ViTConfig:
    """DINOv2 (with ``num_registers`` register tokens if > 0): class token, LayerScale, exact GELU."""
    defaults = dict(class_token=True, num_registers=num_registers, mask_token=True, layer_scale=1.0, pool="cls",
                    act="gelu", pos_antialias=num_registers > 0)
    return ViTConfig.from_variant(variant, image_size=image_size, **{**defaults, **overrides})


@struct.dataclass
class ViTOutput:
    """What a :class:`ViT` returns (a pytree, so it passes through ``jit``).

    ``tokens [B, N, D]``: patch tokens after the final norm. ``prefix [B, P, D]``: class and register tokens
    after the final norm (``P = 0`` for SigLIP). ``pooled [B, D]``: MAP-head output or class token (``None`` for
    ``pool="none"``). ``hidden_states [L + 1, B, P + N, D]``: the embeddings and every layer's output before the
    final norm, in HF's ``output_hidden_states`` order, only when asked for.
    """

    tokens: jax.Array
    prefix: jax.Array
    pooled: jax.Array | None = None
    hidden_states: jax.Array | None = None


def _dtype(name: str | None):
    return None if name is None else jnp.dtype(name)


class PatchEmbedding(nnx.Module):
    """Non-overlapping ``p x p`` patches projected to ``D``: a stride-``p`` convolution, kernel ``[p, p, C, D]``."""

    def __init__(self, patch_size: int, num_channels: int, width: int, *, dtype=None, param_dtype=jnp.float32,
                 use_bias: bool = True, rngs: nnx.Rngs):
        self.patch_size, self.dtype = patch_size, dtype
        init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
        self.kernel = param(rngs, init, (patch_size, patch_size, num_channels, width),
                            (None, None, None, "embed"), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (width,), ("embed",), param_dtype) if use_bias else None

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H // p, W // p, D]`` (trailing rows/columns that do not fill a patch are dropped,
        as a valid-padding convolution does)."""
        p = self.patch_size
        b, h, w, c = pixels.shape
        gh, gw = h // p, w // p
        if gh == 0 or gw == 0:
            raise ValueError(f"image {h}x{w} is smaller than one {p}x{p} patch")
        dtype = self.dtype or pixels.dtype
        x = pixels[:, : gh * p, : gw * p].astype(dtype).reshape(b, gh, p, gw, p, c)
        y = jnp.einsum("bhpwqc,pqcd->bhwd", x, self.kernel[...].astype(dtype))
        return y if self.bias is None else y + self.bias[...].astype(dtype)


class Embeddings(nnx.Module):
    """Patch embedding + position embedding (+ class token, register tokens, mask token as configured)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d, pdt = cfg.width, _dtype(cfg.param_dtype)
        self.cfg = cfg
        self.patch_embedding = PatchEmbedding(cfg.patch_size, cfg.num_channels, d, dtype=_dtype(cfg.dtype),
                                              param_dtype=pdt, use_bias=cfg.patch_bias, rngs=rngs)
        num_positions = cfg.grid_size ** 2 + self.num_class_positions
        std = nnx.initializers.normal(stddev=d ** -0.5)
        self.position_embedding = param(rngs, std, (num_positions, d), (None, "embed"), pdt)
        small = nnx.initializers.truncated_normal(stddev=0.02)
        self.cls_token = param(rngs, small, (1, d), (None, "embed"), pdt) if cfg.class_token else None
        self.register_tokens = (param(rngs, nnx.initializers.zeros, (cfg.num_registers, d), (None, "embed"), pdt)
                                if cfg.num_registers else None)
        self.mask_token = param(rngs, nnx.initializers.zeros, (1, d), (None, "embed"), pdt) if cfg.mask_token else None

    @property
    def num_class_positions(self) -> int:
        """Rows of the position table ahead of the patch grid (1 for a class token that has a position)."""
        return int(self.cfg.class_token and self.cfg.class_token_position)

    def __call__(self, pixels: jax.Array, masked_patches: jax.Array | None = None) -> jax.Array:
        """``pixels [B, H, W, C]`` -> tokens ``[B, P + N, D]`` (class token, registers, then patches).

        ``masked_patches [B, N]`` bool replaces those patch embeddings by ``mask_token`` (DINOv2 pretraining).
        """
        cfg = self.cfg
        x = self.patch_embedding(pixels)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)
        if masked_patches is not None:
            if self.mask_token is None:
                raise ValueError("masked_patches needs a mask token: build the ViT with mask_token=True")
            x = jnp.where(masked_patches[..., None], self.mask_token[...].astype(x.dtype), x)
        pos = self.position_embedding[...]
        n_cls = self.num_class_positions
        cls_pos, patch_pos = pos[:n_cls], pos[n_cls:]
        g = cfg.grid_size
        patch_pos = resize_grid(patch_pos.reshape(g, g, d), (gh, gw), antialias=cfg.pos_antialias)
        x = x + patch_pos.reshape(1, gh * gw, d).astype(x.dtype)
        parts = []
        if self.cls_token is not None:
            cls = self.cls_token[...] + cls_pos if n_cls else self.cls_token[...]
            parts.append(jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)))
        if self.register_tokens is not None:
            parts.append(jnp.broadcast_to(self.register_tokens[...].astype(x.dtype), (b, cfg.num_registers, d)))
        return jnp.concatenate([*parts, x], axis=1) if parts else x


class EncoderBlock(nnx.Module):
    """Pre-norm block: ``x += ls1(attn(ln1(x))); x += ls2(mlp(ln2(x)))`` (LayerScale optional); with
    ``film_dim``, ``x = film(x, c)`` between the two residuals (OpenVLA-OFT's placement)."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d, dt, pdt = cfg.width, _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        self.layer_norm1 = LayerNorm(d, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.self_attn = Attention(d, cfg.num_heads, use_bias=cfg.qkv_bias, out_bias=True,
                                   implementation=cfg.attn_implementation, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.layer_norm2 = LayerNorm(d, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        if cfg.mlp_type == "swiglu":
            self.mlp = GatedMlp(d, cfg.mlp_dim, act="silu", use_bias=True, dtype=dt, param_dtype=pdt, rngs=rngs)
        elif cfg.mlp_type == "mlp":
            self.mlp = Mlp(d, cfg.mlp_dim, act=cfg.act, dtype=dt, param_dtype=pdt, rngs=rngs)
        else:
            raise ValueError(f"unknown mlp_type {cfg.mlp_type!r}; known: ['mlp', 'swiglu']")
        scale = cfg.layer_scale
        self.layer_scale1 = LayerScale(d, init_value=scale, param_dtype=pdt, rngs=rngs) if scale is not None else None
        self.layer_scale2 = LayerScale(d, init_value=scale, param_dtype=pdt, rngs=rngs) if scale is not None else None
        # created last, so that the block's other parameters draw the same random numbers with or without FiLM
        self.film = (FiLM(cfg.film_dim, d, init=cfg.film_init, dtype=dt, param_dtype=pdt, rngs=rngs)
                     if cfg.film_dim is not None else None)

    def __call__(self, x: jax.Array, film_cond: jax.Array | None = None) -> jax.Array:
        """``[B, T, D] -> [B, T, D]``; ``film_cond [B, film_dim]`` is required with FiLM, refused without."""
        h, _ = self.self_attn(self.layer_norm1(x))
        if self.layer_scale1 is not None:
            h = self.layer_scale1(h)
        x = x + h.astype(x.dtype)
        if self.film is not None:
            x = self.film(x, film_cond)
        h = self.mlp(self.layer_norm2(x))
        if self.layer_scale2 is not None:
            h = self.layer_scale2(h)
        return x + h.astype(x.dtype)


class MAPHead(nnx.Module):
    """Multihead attention pooling: a learned probe attends to all tokens, then a residual MLP."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        d, dt, pdt = cfg.width, _dtype(cfg.dtype), _dtype(cfg.param_dtype)
        self.probe = param(rngs, nnx.initializers.xavier_uniform(), (1, d), (None, "embed"), pdt)
        # One query: cuDNN's fused kernel rejects a length-1 Q, and there is nothing for it to fuse anyway.
        impl = None if cfg.attn_implementation == "cudnn" else cfg.attn_implementation
        self.attention = Attention(d, cfg.num_heads, use_bias=True, out_bias=True,
                                   implementation=impl, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.layernorm = LayerNorm(d, eps=cfg.norm_eps, param_dtype=pdt, rngs=rngs)
        self.mlp = Mlp(d, cfg.mlp_dim, act=cfg.act, dtype=dt, param_dtype=pdt, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, T, D] -> [B, D]``."""
        probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        h, _ = self.attention(probe, kv_input=x)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class Encoder(nnx.Module):
    """The stacked blocks: parameters ``[L, ...]`` under ``layers``."""

    def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
        self.layers = stack_layers(lambda r: EncoderBlock(cfg, rngs=r), cfg.depth, rngs)


class ViT(nnx.Module):
    """Vision Transformer covering SigLIP and DINOv2; see the module docstring.

    Example::

        vit = ViT(siglip_config("B/16", image_size=224), rngs=nnx.Rngs(0))
        out = vit(images)                     # images [B, 224, 224, 3] -> out.tokens [B, 196, 768]
        feats = vit.intermediate(images, -2)  # second-to-last block's patch tokens [B, 196, 768]
    """

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        pdt = _dtype(config.param_dtype)
        self.embeddings = Embeddings(config, rngs=rngs)
        self.pre_layernorm = LayerNorm(config.width, eps=config.norm_eps, param_dtype=pdt,
                                       rngs=rngs) if config.pre_norm else None
        self.encoder = Encoder(config, rngs=rngs)
        self.post_layernorm = LayerNorm(config.width, eps=config.norm_eps, param_dtype=pdt,
                                        rngs=rngs) if config.post_norm else None
        if config.pool == "map":
            self.head = MAPHead(config, rngs=rngs)
        elif config.pool not in ("none", "cls"):
            raise ValueError(f"unknown pool {config.pool!r}; known: ['none', 'map', 'cls']")
        else:
            self.head = None
        if config.pool == "cls" and not config.class_token:
            raise ValueError("pool='cls' needs class_token=True")
        if config.post_norm_scope not in ("all", "pooled"):
            raise ValueError(f"unknown post_norm_scope {config.post_norm_scope!r}; known: ['all', 'pooled']")

    @property
    def num_prefix_tokens(self) -> int:
        return self.config.num_prefix_tokens

    def _embed(self, pixels: jax.Array, masked_patches: jax.Array | None = None) -> jax.Array:
        x = self.embeddings(pixels, masked_patches)
        return x if self.pre_layernorm is None else self.pre_layernorm(x)

    def _check_film(self, film_cond: jax.Array | None) -> None:
        film_dim = self.config.film_dim
        if film_dim is None and film_cond is not None:
            raise ValueError("film_cond was given but this ViT has no FiLM layers: build it with "
                             "ViTConfig(film_dim=<conditioning width>) or drop film_cond")
        if film_dim is not None and (film_cond is None or film_cond.ndim != 2 or film_cond.shape[-1] != film_dim):
            got = None if film_cond is None else tuple(film_cond.shape)
            raise ValueError(f"this ViT has FiLM layers (film_dim={film_dim}): pass film_cond [B, {film_dim}] "
                             f"(OpenVLA-OFT: the mean language embedding), got {got}")

    def _run_layers(self, x: jax.Array, num_layers: int, keep: bool, film_cond: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array | None]:
        layers = self.encoder.layers
        if num_layers < self.config.depth:
            graphdef, state = nnx.split(layers)
            layers = nnx.merge(graphdef, jax.tree.map(lambda a: a[:num_layers], state))

        def body(layer: EncoderBlock, h, _):
            h = layer(h) if film_cond is None else layer(h, film_cond)
            return h, (h if keep else None)

        return scan_layers(layers, body, x, remat=self.config.remat)

    def __call__(self, pixels: jax.Array, *, output_hidden_states: bool = False,
                 masked_patches: jax.Array | None = None, film_cond: jax.Array | None = None) -> ViTOutput:
        """``pixels [B, H, W, C]`` -> :class:`ViTOutput` (``tokens [B, (H/p)(W/p), D]``); ``film_cond [B, C]``
        only for a ViT with ``film_dim``."""
        self._check_film(film_cond)
        x = self._embed(pixels, masked_patches)
        last, per_layer = self._run_layers(x, self.config.depth, output_hidden_states, film_cond)
        hidden = jnp.concatenate([x[None], per_layer], axis=0) if output_hidden_states else None
        norm_all = self.post_layernorm is not None and self.config.post_norm_scope == "all"
        out = self.post_layernorm(last) if norm_all else last
        p = self.num_prefix_tokens
        if self.config.pool == "map":
            pooled = self.head(out)
        elif self.config.pool == "cls":
            pooled = out[:, 0] if norm_all or self.post_layernorm is None else self.post_layernorm(out[:, 0])
        else:
            pooled = None
        return ViTOutput(tokens=out[:, p:], prefix=out[:, :p], pooled=pooled, hidden_states=hidden)

    def intermediate(self, pixels: jax.Array, layer: int = -1, *, film_cond: jax.Array | None = None) -> jax.Array:
        """Patch tokens ``[B, N, D]`` output by block ``layer`` (negative counts from the end), before any final
        norm and without the prefix tokens; only blocks up to ``layer`` run.

        ``layer=-2`` is OpenVLA's featurizer: timm ``get_intermediate_layers(n={depth - 2})``, i.e. HF's
        ``hidden_states[-2][:, prefix:]``. ``film_cond [B, C]``: as in :meth:`__call__`.
        """
        self._check_film(film_cond)
        depth = self.config.depth
        index = layer + depth if layer < 0 else layer
        if not 0 <= index < depth:
            raise ValueError(f"layer {layer} out of range for a {depth}-layer ViT")
        x, _ = self._run_layers(self._embed(pixels), index + 1, False, film_cond)
        return x[:, self.num_prefix_tokens:]
