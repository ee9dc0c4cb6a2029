"""OpenVLA-style fused encoder: second-to-last-layer patch features of DINOv2 and SigLIP, concatenated.

Checked against transformers: the same tiny random towers run with ``output_hidden_states`` give
``hidden_states[-2]`` (patch tokens only) for each; those, concatenated, must equal the fused features.
Tolerance 1e-5 relative to the features' magnitude (they are taken before any final norm).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx

from vlax.encoders import FusedEncoder, dinosiglip
from vlax.encoders.preprocess import IMAGENET_MEAN, IMAGENET_STD
from vlax.weights.dinov2 import load_dinov2
from vlax.weights.siglip import load_siglip


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    torch.manual_seed(0)
    dino = _perturb(T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14,
        num_register_tokens=2)), 0)
    siglip = _perturb(T.SiglipVisionModel(T.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28,
        patch_size=14)), 1)
    dino_dir, siglip_dir = tmp_path_factory.mktemp("dino"), tmp_path_factory.mktemp("siglip")
    dino.save_pretrained(dino_dir)
    siglip.save_pretrained(siglip_dir)
    return dino, siglip, dino_dir, siglip_dir


def test_fused_features_equal_second_to_last_layers_of_transformers(towers):
    dino, siglip, dino_dir, siglip_dir = towers
    fused = FusedEncoder(load_dinov2(dino_dir), load_siglip(siglip_dir, pool="none"))
    assert fused.siglip.head is None and fused.width == 48 + 32
    images = np.random.default_rng(0).integers(0, 256, (2, 42, 42, 3), dtype=np.uint8)
    graphdef, state = nnx.split(fused)
    got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(images))
    assert got.shape == (2, 9, 80)

    unit = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    dino_px = (unit - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    siglip_px = (unit - 0.5) / 0.5
    with torch.no_grad():
        dino_h = dino(dino_px, output_hidden_states=True).hidden_states
        siglip_h = siglip(siglip_px, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states
    assert len(dino_h) == len(siglip_h) == 4  # embeddings + 3 layers: [-2] is the output of layer 2 of 3
    ref = torch.cat([dino_h[-2][:, 1 + 2:], siglip_h[-2]], dim=-1).numpy()
    err = float(np.abs(np.asarray(got) - ref).max())
    assert err <= 1e-5 * max(1.0, float(np.abs(ref).max())), err
    # The final layer plays no part: the features differ from the last layer's.
    last = torch.cat([dino_h[-1][:, 3:], siglip_h[-1]], dim=-1).numpy()
    assert np.abs(np.asarray(got) - last).max() > 1e-2

    # Already-normalised inputs per tower give the same features.
    to_nhwc = lambda t: jnp.asarray(t.permute(0, 2, 3, 1).numpy())  # noqa: E731
    by_tower = jax.jit(lambda s, d, g: nnx.merge(graphdef, s)({"dino": d, "siglip": g}))(
        state, to_nhwc(dino_px), to_nhwc(siglip_px))
    np.testing.assert_allclose(by_tower, got, atol=1e-5)


def test_mismatched_patch_grids_are_refused(towers):
    _, _, dino_dir, siglip_dir = towers
    from vlax.encoders.vit import ViT, siglip_config

    other = ViT(siglip_config("S/16", image_size=32, depth=2, width=32, mlp_dim=64, num_heads=2, pool="none"),
                rngs=nnx.Rngs(0))
    fused = FusedEncoder(load_dinov2(dino_dir), other)
    graphdef, state = nnx.split(fused)
    with pytest.raises(ValueError, match=r"different patch counts \(DINOv2 9, SigLIP 4\)"):
        jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jnp.zeros((1, 42, 42, 3), jnp.uint8))
    with pytest.raises(ValueError, match=r"image mapping lacks \['siglip'\]"):
        fused({"dino": jnp.zeros((1, 42, 42, 3))})


def test_published_dinosiglip_shapes_abstractly():
    """OpenVLA's 224 px pair gives 256 patches of 1024 + 1152 channels (shapes only; nothing is computed)."""
    fused = nnx.eval_shape(lambda: dinosiglip(224, rngs=nnx.Rngs(0)))
    assert fused.dino.config.num_registers == 4 and fused.siglip.config.depth == 27
    graphdef, state = nnx.split(fused)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                         jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.uint8))
    assert out.shape == (2, 256, 2176) and out.dtype == jnp.float32
