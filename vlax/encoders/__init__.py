"""Vision encoders: one ViT for SigLIP / DINOv2 / CLIP, OpenVLA's fused DINOv2 + SigLIP, a small conv stem and a ResNet.

Look one up by name (configs name their encoder)::

    enc = get_encoder("siglip_so400m14_224", rngs=nnx.Rngs(0))
    enc = get_encoder("dinov2", variant="B/14", num_registers=4, rngs=nnx.Rngs(0))
    enc = get_encoder("conv_stem", width=128, rngs=nnx.Rngs(0))

Pretrained weights come from :mod:`vlax.weights.siglip` / :mod:`vlax.weights.dinov2`.
"""

from __future__ import annotations

from typing import Callable

from flax import nnx

from vlax.encoders.conv_stem import ConvStem
from vlax.encoders.fused import FusedEncoder, dinosiglip
from vlax.encoders.resnet import ResNet
from vlax.encoders.vit import ViT, ViTConfig, ViTOutput, clip_config, decode_variant, dinov2_config, siglip_config


def _vit(*, rngs: nnx.Rngs, variant: str = "B/16", **overrides) -> ViT:
    return ViT(ViTConfig.from_variant(variant, **overrides), rngs=rngs)


def _siglip(variant: str, image_size: int) -> Callable[..., nnx.Module]:
    def make(*, rngs: nnx.Rngs, variant: str = variant, image_size: int = image_size, **overrides) -> ViT:
        return ViT(siglip_config(variant, image_size, **overrides), rngs=rngs)

    return make


def _dinov2(variant: str, num_registers: int) -> Callable[..., nnx.Module]:
    def make(*, rngs: nnx.Rngs, variant: str = variant, image_size: int = 518, num_registers: int = num_registers,
             **overrides) -> ViT:
        return ViT(dinov2_config(variant, image_size, num_registers, **overrides), rngs=rngs)

    return make


ENCODERS: dict[str, Callable[..., nnx.Module]] = {
    "vit": _vit,
    "siglip": _siglip("So400m/14", 224),
    "siglip_b16_224": _siglip("B/16", 224),
    "siglip_so400m14_224": _siglip("So400m/14", 224),
    "siglip_so400m14_384": _siglip("So400m/14", 384),
    "dinov2": _dinov2("L/14", 0),
    "dinov2_b14": _dinov2("B/14", 0),
    "dinov2_l14": _dinov2("L/14", 0),
    "dinov2_l14_reg4": _dinov2("L/14", 4),
    "clip_l14": lambda *, rngs, variant="L/14", image_size=224, **kw: ViT(clip_config(variant, image_size, **kw),
                                                                          rngs=rngs),
    "dinosiglip": lambda *, rngs, **kw: dinosiglip(rngs=rngs, **kw),
    "conv_stem": lambda *, rngs, **kw: ConvStem(rngs=rngs, **kw),
    "resnet": lambda *, rngs, **kw: ResNet(rngs=rngs, **kw),
    "resnet18": lambda *, rngs, **kw: ResNet(18, rngs=rngs, **kw),
}


def get_encoder(name: str, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """The encoder registered as ``name``, built with ``kwargs`` (sizes, ``image_size``, ``remat``, ...)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
    return ENCODERS[name](rngs=rngs, **kwargs)


__all__ = [
    "ENCODERS", "ConvStem", "FusedEncoder", "ResNet", "ViT", "ViTConfig", "ViTOutput", "clip_config", "decode_variant",
    "dinosiglip", "dinov2_config", "get_encoder", "siglip_config",
]
