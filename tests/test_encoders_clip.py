"""CLIP vision tower (OpenFlamingo's ViT-L/14): vlax's ViT with CLIP options equals transformers' CLIPVisionModel.

A tiny random CLIPVisionModel is saved by the test and imported with :func:`vlax.weights.clip.load_clip`.
Tolerance: fp32 max-abs <= 1e-5 on the patch tokens, the pooled class token and every hidden state (relative to
the magnitude of the un-normalised residual stream).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from flax import nnx

from vlax.encoders import clip_config, get_encoder
from vlax.encoders.vit import ViT
from vlax.nn import count_params
from vlax.weights.clip import load_clip

ATOL = 1e-5
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=28,
            patch_size=7)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = T.CLIPVisionModel(T.CLIPVisionConfig(**TINY))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial biases, class token and norms
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("clip_vision")
    model.eval().save_pretrained(path)
    return path, model


def test_clip_vision_matches_transformers(clip_dir):
    path, ref_model = clip_dir
    vit = load_clip(path)
    assert vit.config.class_token and vit.config.pre_norm and vit.config.act == "quick_gelu"
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = ref_model(x, output_hidden_states=True)
    graphdef, state = nnx.split(vit)
    out = jax.jit(lambda s, px: nnx.merge(graphdef, s)(px, output_hidden_states=True))(
        state, jnp.asarray(x.permute(0, 2, 3, 1).numpy()))
    err = lambda a, b: float(np.abs(np.asarray(a) - b.numpy()).max())  # noqa: E731
    assert out.tokens.shape == (2, 16, 64) and out.prefix.shape == (2, 1, 64)
    assert err(out.tokens, ref.last_hidden_state[:, 1:]) <= ATOL
    assert err(out.prefix, ref.last_hidden_state[:, :1]) <= ATOL
    assert err(out.pooled, ref.pooler_output) <= ATOL
    for i, h in enumerate(ref.hidden_states):
        assert err(out.hidden_states[i], h) <= ATOL * max(1.0, float(h.abs().max()))


def test_clip_l14_has_openai_clip_vision_size():
    """ViT-L/14 at 224 px: 24 x 1024, 256 patches + class token; 303,179,776 parameters, the count of
    transformers' CLIPVisionModel for openai/clip-vit-large-patch14."""
    vit = nnx.eval_shape(lambda: get_encoder("clip_l14", rngs=nnx.Rngs(0)))
    assert isinstance(vit, ViT) and vit.config == clip_config("L/14", 224)
    assert count_params(vit) == 303_179_776
    assert vit.embeddings.patch_embedding.bias is None
