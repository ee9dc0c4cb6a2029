"""DINOv2 + SigLIP on the same image, patch features concatenated channel-wise (OpenVLA's vision backbone).

OpenVLA (Prismatic ``dinosiglip-vit-so-224px``) runs DINOv2-L/14 with 4 registers and SigLIP So400m/14 on one
224 px image, each normalised its own way, takes the patch tokens output by the *second-to-last* block of each
(timm ``get_intermediate_layers(n={depth - 2})``: no final norm, class/register tokens dropped) and concatenates
them: ``[B, 256, 1024 + 1152]``.

Build it from loaded towers::

    fused = FusedEncoder(load_dinov2(dino_dir), load_siglip(siglip_dir, pool="none"))
    feats = fused(images_uint8)          # [B, 256, 2176]

or, randomly initialised at the published sizes, with :func:`dinosiglip`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.encoders.preprocess import IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD, normalize
from vlax.encoders.vit import ViT, dinov2_config, siglip_config


class FusedEncoder(nnx.Module):
    """Channel-wise concatenation of two ViTs' intermediate patch features.

    ``layer`` picks the block whose output is used (``-2``: second-to-last, as OpenVLA). Each tower has its own
    pixel normalisation (``dino_mean``/``dino_std``, ``siglip_mean``/``siglip_std``).
    """

    def __init__(
        self,
        dino: ViT,
        siglip: ViT,
        *,
        layer: int = -2,
        dino_mean: Sequence[float] = IMAGENET_MEAN,
        dino_std: Sequence[float] = IMAGENET_STD,
        siglip_mean: Sequence[float] = SIGLIP_MEAN,
        siglip_std: Sequence[float] = SIGLIP_STD,
    ):
        self.dino, self.siglip, self.layer = dino, siglip, layer
        self.dino_norm = (tuple(dino_mean), tuple(dino_std))
        self.siglip_norm = (tuple(siglip_mean), tuple(siglip_std))

    @property
    def width(self) -> int:
        """Channels of the fused features: DINOv2 width + SigLIP width."""
        return self.dino.config.width + self.siglip.config.width

    def __call__(self, images: jax.Array | Mapping[str, jax.Array], *,
                 film_cond: jax.Array | None = None) -> jax.Array:
        """Fused patch features ``[B, N, D_dino + D_siglip]``.

        ``images``: ``[B, H, W, 3]`` ``uint8`` or float in ``[0, 1]`` (normalised here for each tower), or a
        mapping ``{"dino": pixels, "siglip": pixels}`` of already-normalised inputs. ``film_cond`` ``[B, C]``:
        the conditioning of towers built with FiLM (``ViTConfig.film_dim``; OpenVLA-OFT+), the same for both.
        """
        if isinstance(images, Mapping):
            missing = {"dino", "siglip"} - set(images)
            if missing:
                raise ValueError(f"image mapping lacks {sorted(missing)}; expected keys 'dino' and 'siglip'")
            dino_px, siglip_px = images["dino"], images["siglip"]
        else:
            dino_px = normalize(images, *self.dino_norm)
            siglip_px = normalize(images, *self.siglip_norm)
        dino = self.dino.intermediate(dino_px, self.layer, film_cond=film_cond)
        siglip = self.siglip.intermediate(siglip_px, self.layer, film_cond=film_cond)
        if dino.shape[1] != siglip.shape[1]:
            raise ValueError(f"the towers give different patch counts (DINOv2 {dino.shape[1]}, SigLIP "
                             f"{siglip.shape[1]}): use the same patch size and image size for both")
        return jnp.concatenate([dino, siglip.astype(dino.dtype)], axis=-1)


def dinosiglip(image_size: int = 224, *, rngs: nnx.Rngs, dino_variant: str = "L/14",
               siglip_variant: str = "So400m/14", num_registers: int = 4, dino_image_size: int = 518,
               **overrides) -> FusedEncoder:
    """A randomly initialised OpenVLA-style fused encoder (DINOv2-L/14-reg4 + SigLIP So400m/14 by default).

    The DINOv2 tower keeps its published ``dino_image_size`` (518 px) position grid, resized to ``image_size``
    on the fly as when a checkpoint is loaded; the SigLIP tower is built for ``image_size`` without its MAP
    head, which the fused features do not use. ``overrides`` (``remat``, ``dtype``, sizes for tests...) go to both configs.
    """
    dino_cfg = dinov2_config(dino_variant, image_size=dino_image_size, num_registers=num_registers, **overrides)
    dino = ViT(dino_cfg, rngs=rngs)
    siglip = ViT(siglip_config(siglip_variant, image_size=image_size, **{"pool": "none", **overrides}), rngs=rngs)
    return FusedEncoder(dino, siglip)
