"""The ViT: variant decoding, torch-equal position resizing, published parameter counts, layers, remat, axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from flax import nnx

from vlax.encoders import get_encoder
from vlax.encoders.interpolate import bicubic_matrix, resize_grid
from vlax.encoders.vit import ViT, ViTConfig, decode_variant, dinov2_config, siglip_config
from vlax.nn import count_params, logical_axes_of
from vlax.weights import dinov2 as dinov2_weights
from vlax.weights import siglip as siglip_weights

TINY = dict(width=32, depth=3, mlp_dim=64, num_heads=2, patch_size=4, image_size=16)


def _abstract_count(make) -> int:
    """Parameter count of a module built abstractly: nothing is allocated."""
    return count_params(nnx.state(nnx.eval_shape(make), nnx.Param))


def _torch_meta_count(model_cls, config) -> int:
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())


def test_decode_variant():
    assert decode_variant("So400m/14") == dict(width=1152, depth=27, mlp_dim=4304, num_heads=16, patch_size=14)
    assert decode_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)
    assert decode_variant("L/14") == dict(width=1024, depth=24, mlp_dim=4096, num_heads=16, patch_size=14)
    with pytest.raises(ValueError, match=r"unknown ViT variant 'X/16'.*'So400m'"):
        decode_variant("X/16")
    with pytest.raises(ValueError, match="unknown ViT variant 'B16'"):
        decode_variant("B16")


@pytest.mark.parametrize("antialias", [False, True])
def test_bicubic_matrix_equals_torch_interpolate(antialias):
    sizes = [(4, 6), (6, 4), (37, 16), (16, 37), (5, 7), (7, 2), (2, 9), (16, 24), (3, 1), (8, 8)]
    g = torch.Generator().manual_seed(0)
    for n_in, n_out in sizes:
        x = torch.randn(1, 3, n_in, n_in + 1, dtype=torch.float64, generator=g)
        ref = F.interpolate(x, size=(n_out, n_out + 2), mode="bicubic", align_corners=False, antialias=antialias)
        got = np.einsum("oh,chw,pw->cop", bicubic_matrix(n_in, n_out, antialias), x[0].numpy(),
                        bicubic_matrix(n_in + 1, n_out + 2, antialias))
        np.testing.assert_allclose(got, ref[0].numpy(), rtol=0, atol=1e-12, err_msg=f"{n_in}->{n_out}")


def test_resize_grid_float32_and_identity():
    grid = jax.random.normal(jax.random.key(0), (5, 5, 8))
    assert resize_grid(grid, (5, 5)) is grid
    ref = F.interpolate(torch.tensor(np.asarray(grid)).permute(2, 0, 1)[None], size=(7, 3), mode="bicubic",
                        align_corners=False)[0].permute(1, 2, 0).numpy()
    # float32: only rounding differs (torch accumulates in another order), about 1 ulp of values near 2.
    np.testing.assert_allclose(resize_grid(grid, (7, 3)), ref, rtol=0, atol=3e-6)


# Published configurations (values from the released config.json files).
SO400M_224 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  patch_size=14, image_size=224, vision_use_head=True)
DINOV2_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
                    image_size=518, layerscale_value=1.0)


@pytest.mark.parametrize("image_size", [224, 384])
def test_siglip_so400m_parameter_count_equals_transformers(image_size):
    hf = dict(SO400M_224, image_size=image_size)
    want = _torch_meta_count(T.SiglipVisionModel, T.SiglipVisionConfig(**hf))
    cfg = siglip_weights.vit_config_from_hf({"architectures": ["SiglipVisionModel"], **hf})
    assert _abstract_count(lambda: ViT(cfg, rngs=nnx.Rngs(0))) == want
    # The variant string names the same model.
    assert _abstract_count(lambda: ViT(siglip_config("So400m/14", image_size), rngs=nnx.Rngs(0))) == want
    print(f"SigLIP So400m/14 @{image_size}: {want:,} parameters")


@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_large_parameter_count_equals_transformers(registers):
    if registers:
        arch, want = "Dinov2WithRegistersModel", _torch_meta_count(
            T.Dinov2WithRegistersModel, T.Dinov2WithRegistersConfig(num_register_tokens=registers, **DINOV2_LARGE))
    else:
        arch, want = "Dinov2Model", _torch_meta_count(T.Dinov2Model, T.Dinov2Config(**DINOV2_LARGE))
    cfg = dinov2_weights.vit_config_from_hf({"architectures": [arch], "num_register_tokens": registers,
                                             **DINOV2_LARGE})
    assert _abstract_count(lambda: ViT(cfg, rngs=nnx.Rngs(0))) == want
    assert _abstract_count(lambda: get_encoder("dinov2_l14_reg4" if registers else "dinov2_l14",
                                               rngs=nnx.Rngs(0))) == want
    print(f"DINOv2-L/14 registers={registers}: {want:,} parameters")


def _forward(model, x, **kwargs):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, **kwargs))(state, x)


def test_outputs_intermediate_layers_and_prefix_tokens():
    vit = ViT(ViTConfig(**TINY, class_token=True, num_registers=2, layer_scale=0.1, pool="cls"),
              rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, 20, 3))
    out = _forward(vit, x, output_hidden_states=True)
    assert out.tokens.shape == (2, 20, 32) and out.prefix.shape == (2, 3, 32) and out.pooled.shape == (2, 32)
    assert out.hidden_states.shape == (4, 2, 23, 32)
    np.testing.assert_array_equal(out.pooled, out.prefix[:, 0])
    for layer in (-2, 0):
        got = nnx.jit(lambda m, x: m.intermediate(x, layer))(vit, x)
        np.testing.assert_allclose(got, out.hidden_states[layer + (4 if layer < 0 else 1)][:, 3:], atol=1e-6)
    with pytest.raises(ValueError, match="layer 3 out of range for a 3-layer ViT"):
        vit.intermediate(x, 3)


def test_remat_policies_keep_values_and_gradients():
    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    results = []
    for remat in ("none", "full"):
        vit = ViT(ViTConfig(**{**TINY, "depth": 2}, remat=remat), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(vit, nnx.Param)

        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p)(x).tokens ** 2)

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (v0, g0), (v1, g1) = results
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g0)
    assert all(float(jnp.abs(leaf).sum()) > 0 for leaf in jax.tree.leaves(g0))


def test_parameters_carry_logical_axes():
    vit = ViT(dinov2_config("S/14", image_size=28, depth=2, num_registers=1), rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(vit, nnx.Param)):
        axes = logical_axes_of(var)
        assert len(axes) == var.get_value().ndim
        assert any(a is not None for a in axes), path
        assert (path[:2] == ("encoder", "layers")) == (axes[0] == "layers"), (path, axes)
    assert logical_axes_of(vit.encoder.layers.self_attn.q_proj.kernel) == ("layers", "embed", "heads")


def test_bfloat16_compute():
    vit = ViT(ViTConfig(**TINY, pool="map", dtype="bfloat16"), rngs=nnx.Rngs(0))
    out = _forward(vit, jnp.ones((1, 16, 16, 3)))
    assert out.tokens.dtype == jnp.bfloat16 and vit.embeddings.position_embedding[...].dtype == jnp.float32


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="pool='cls' needs class_token=True"):
        ViT(ViTConfig(**TINY, pool="cls"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"unknown pool 'avg'; known: \['none', 'map', 'cls'\]"):
        ViT(ViTConfig(**TINY, pool="avg"), rngs=nnx.Rngs(0))
    vit = ViT(ViTConfig(**TINY), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="image 3x16 is smaller than one 4x4 patch"):
        vit(jnp.zeros((1, 3, 16, 3)))
    with pytest.raises(ValueError, match="masked_patches needs a mask token"):
        vit(jnp.zeros((1, 16, 16, 3)), masked_patches=jnp.zeros((1, 16), bool))


def test_registry_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown encoder 'efficientnet'; known: \[.*'dinov2'.*'siglip'"):
        get_encoder("efficientnet", rngs=nnx.Rngs(0))
    vit = get_encoder("vit", variant="Ti/16", depth=1, image_size=32, rngs=nnx.Rngs(0))
    assert isinstance(vit, ViT) and vit.config.width == 192
    siglip = nnx.eval_shape(lambda: get_encoder("siglip_so400m14_224", rngs=nnx.Rngs(0)))
    assert siglip.config.pool == "map" and siglip.embeddings.position_embedding.shape == (256, 1152)
