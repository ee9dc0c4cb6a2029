"""SigLIP and DINOv2 checkpoint import: outputs equal transformers' on tiny random models saved by the tests.

Tolerance: fp32 max-abs <= 1e-5 on last hidden states and pooled outputs (measured ~2e-6). Per-layer hidden
states are compared relative to their magnitude (they are not normalised and grow through the residual stream).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx
from safetensors.torch import load_file, save_file

from vlax.weights.common import CheckpointError, to_numpy_flat
from vlax.weights.dinov2 import load_dinov2
from vlax.weights.siglip import load_siglip

ATOL = 1e-5
SIGLIP_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     image_size=32, patch_size=8)


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make every parameter non-trivial (HF zero-initialises biases, tokens and registers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _nhwc(x: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def _max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _forward(vit, pixels, **kwargs):
    """One compiled forward pass (eager NNX dispatches op by op and re-traces the layer scan every call)."""
    graphdef, state = nnx.split(vit)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, **kwargs))(state, pixels)


def _pixels(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def siglip_vision_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = _perturb(T.SiglipVisionModel(T.SiglipVisionConfig(**SIGLIP_VISION)))
    path = tmp_path_factory.mktemp("siglip_vision")
    model.save_pretrained(path)
    return path, model


@pytest.mark.parametrize("hw", [(32, 32), (48, 40)])
def test_siglip_vision_matches_transformers(siglip_vision_dir, hw):
    path, ref_model = siglip_vision_dir
    vit = load_siglip(path)
    x = _pixels(*hw)
    with torch.no_grad():
        ref = ref_model(x, interpolate_pos_encoding=hw != (32, 32), output_hidden_states=True)
    out = _forward(vit, _nhwc(x), output_hidden_states=True)
    assert out.tokens.shape == (2, (hw[0] // 8) * (hw[1] // 8), 64)
    assert _max_abs(out.tokens, ref.last_hidden_state) <= ATOL
    assert _max_abs(out.pooled, ref.pooler_output) <= ATOL
    for i, h in enumerate(ref.hidden_states):
        assert _max_abs(out.hidden_states[i], h) <= ATOL * max(1.0, float(h.abs().max()))


def test_siglip_legacy_vision_model_prefix(siglip_vision_dir, tmp_path):
    """transformers 4 saved SiglipVisionModel under ``vision_model.``; both layouts load to the same model."""
    path, _ = siglip_vision_dir
    tensors = load_file(str(path / "model.safetensors"))
    save_file({"vision_model." + k: v for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    legacy, current = to_numpy_flat(load_siglip(tmp_path)), to_numpy_flat(load_siglip(path))
    assert legacy.keys() == current.keys()
    assert all(np.array_equal(legacy[k], current[k]) for k in current)


def test_siglip_model_vision_tower_matches_transformers(tmp_path):
    torch.manual_seed(1)
    config = T.SiglipConfig(vision_config=SIGLIP_VISION, text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64))
    model = _perturb(T.SiglipModel(config), seed=1)
    model.save_pretrained(tmp_path)
    assert any(k.startswith("vision_model.") for k in load_file(str(tmp_path / "model.safetensors")))
    vit = load_siglip(tmp_path)
    x = _pixels(32, 32, seed=1)
    with torch.no_grad():
        ref = model.vision_model(x)
    out = _forward(vit, _nhwc(x))
    assert _max_abs(out.tokens, ref.last_hidden_state) <= ATOL
    assert _max_abs(out.pooled, ref.pooler_output) <= ATOL


def test_paligemma_vision_tower_matches_transformers(tmp_path):
    torch.manual_seed(2)
    config = T.PaliGemmaConfig(
        vision_config=dict(SIGLIP_VISION, vision_use_head=False),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=300),
        vocab_size=300, image_token_index=299, projection_dim=32)
    model = _perturb(T.PaliGemmaForConditionalGeneration(config), seed=2)
    model.save_pretrained(tmp_path)
    names = load_file(str(tmp_path / "model.safetensors"))
    assert any(k.startswith("vision_tower.") for k in names) and any("language_model" in k for k in names)
    vit = load_siglip(tmp_path)
    assert vit.head is None
    x = _pixels(32, 32, seed=2)
    with torch.no_grad():
        ref = model.model.vision_tower(x)
    assert _max_abs(_forward(vit, _nhwc(x)).tokens, ref.last_hidden_state) <= ATOL


@pytest.mark.parametrize(
    "registers,swiglu,sizes",
    [
        # 56 px is the training grid (4x4); the others resize the position embeddings up, down, non-square.
        (False, False, [(56, 56), (84, 84), (28, 42)]),
        (True, False, [(84, 84), (28, 42)]),  # the registers model resizes with anti-aliasing
        (False, True, [(42, 42)]),
    ],
    ids=["dinov2", "dinov2_registers", "dinov2_swiglu"],
)
def test_dinov2_matches_transformers_at_other_resolutions(tmp_path, registers, swiglu, sizes):
    torch.manual_seed(3)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14,
                  layerscale_value=0.5, use_swiglu_ffn=swiglu)
    if registers:
        model = T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(num_register_tokens=3, **common))
    else:
        model = T.Dinov2Model(T.Dinov2Config(**common))
    _perturb(model, seed=3).save_pretrained(tmp_path)
    vit = load_dinov2(tmp_path)
    assert vit.num_prefix_tokens == 1 + 3 * registers
    for hw in sizes:
        x = _pixels(*hw, seed=hw[0])
        with torch.no_grad():
            ref = model(x, output_hidden_states=True)
        out = _forward(vit, _nhwc(x), output_hidden_states=True)
        full = jnp.concatenate([out.prefix, out.tokens], axis=1)
        assert out.tokens.shape == (2, (hw[0] // 14) * (hw[1] // 14), 64)
        assert _max_abs(full, ref.last_hidden_state) <= ATOL, hw
        assert _max_abs(out.pooled, ref.pooler_output) <= ATOL, hw
        for i, h in enumerate(ref.hidden_states):
            assert _max_abs(out.hidden_states[i], h) <= ATOL * max(1.0, float(h.abs().max())), (hw, i)


def test_dinov2_mask_token_matches_transformers(tmp_path):
    torch.manual_seed(4)
    model = _perturb(T.Dinov2Model(T.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   image_size=28, patch_size=14)), seed=4)
    model.save_pretrained(tmp_path)
    x = _pixels(28, 28, seed=4)
    masked = torch.tensor([[True, False, False, True], [False, True, False, False]])
    with torch.no_grad():
        ref = model(x, bool_masked_pos=masked)
    out = _forward(load_dinov2(tmp_path), _nhwc(x), masked_patches=jnp.asarray(masked.numpy()))
    assert _max_abs(jnp.concatenate([out.prefix, out.tokens], 1), ref.last_hidden_state) <= ATOL


def test_bf16_parameters(siglip_vision_dir):
    path, _ = siglip_vision_dir
    vit = load_siglip(path, dtype=jnp.bfloat16)
    assert vit.encoder.layers.mlp.fc1.kernel[...].dtype == jnp.bfloat16
    x = _nhwc(_pixels(32, 32))
    err = _max_abs(_forward(vit, x).tokens, _forward(load_siglip(path), x).tokens)
    assert 0 < err < 0.1  # bf16 weights: close, not equal


# --------------------------------------------------------------------------------------------- bad input


def test_pickle_checkpoint_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["SiglipVisionModel"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors"):
        load_siglip(tmp_path)


def test_unsupported_architecture_named(siglip_vision_dir, tmp_path):
    path, _ = siglip_vision_dir
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["CLIPVisionModel"]}))
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"'CLIPVisionModel'.*supported: \['SiglipVisionModel'"):
        load_siglip(tmp_path)
    with pytest.raises(CheckpointError, match=r"'CLIPVisionModel'.*supported: \['Dinov2Model'"):
        load_dinov2(tmp_path)


def _rewrite(path, tmp_path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    return tmp_path


def test_wrong_shape_names_key_and_shapes(siglip_vision_dir, tmp_path):
    path, _ = siglip_vision_dir

    def edit(t):
        t["encoder.layers.1.mlp.fc1.weight"] = torch.zeros(100, 64)

    with pytest.raises(CheckpointError, match=r"encoder\.layers\.<i>\.mlp\.fc1\.weight has different shapes across "
                                              r"layers: \(128, 64\) in layers \[0\], \(100, 64\) in layers \[1\]"):
        load_siglip(_rewrite(path, tmp_path, edit))

    def edit_all(t):
        t["post_layernorm.weight"] = torch.zeros(65)

    with pytest.raises(CheckpointError, match=r"post_layernorm\.scale \(checkpoint 'post_layernorm\.weight'\): "
                                              r"checkpoint shape \(65,\) != model shape \(64,\)"):
        load_siglip(_rewrite(path, tmp_path, edit_all))


def test_missing_and_unexpected_keys_named(siglip_vision_dir, tmp_path):
    path, _ = siglip_vision_dir

    def edit(t):
        del t["head.probe"]
        t["head.extra.weight"] = torch.zeros(3)

    with pytest.raises(CheckpointError) as err:
        load_siglip(_rewrite(path, tmp_path, edit))
    assert "missing keys: ['head.probe']" in str(err.value)
    assert "unexpected keys: ['head.extra.weight']" in str(err.value)


def test_missing_layer_named(siglip_vision_dir, tmp_path):
    path, _ = siglip_vision_dir

    def edit(t):
        del t["encoder.layers.1.self_attn.q_proj.bias"]

    with pytest.raises(CheckpointError, match=r"missing per-layer tensors: \['encoder\.layers\.1\.self_attn\.q_proj"):
        load_siglip(_rewrite(path, tmp_path, edit))


def test_load_pretrained_dispatches_vision_architectures(siglip_vision_dir):
    from vlax.encoders import ViT
    from vlax.weights import load_pretrained

    path, _ = siglip_vision_dir
    vit = load_pretrained(path, dtype=jnp.bfloat16)
    assert isinstance(vit, ViT) and vit.config.param_dtype == "bfloat16"
