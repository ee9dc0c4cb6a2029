"""ResNet encoder: equal to transformers' ResNetModel (a BatchNorm model in eval mode = frozen batch norm) and,
with every BatchNorm swapped for GroupNorm(C // 16) as Diffusion Policy does, to that torch model.

The weights are random torch ones copied through the torchvision key names the LeRobot importers use, so the
key table is checked too.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from vlax.encoders import get_encoder
from vlax.encoders.resnet import ResNet, assign_frozen_stats, torchvision_rules
from vlax.weights.common import assign_params, rename_tensors

transformers = pytest.importorskip("transformers")

WIDTHS = (16, 32, 48, 64)


def _hf_model(depths=(2, 2, 2, 2), widths=WIDTHS, stem=16, seed=0):
    torch.manual_seed(seed)
    config = transformers.ResNetConfig(num_channels=3, embedding_size=stem, hidden_sizes=list(widths),
                                       depths=list(depths), layer_type="basic", hidden_act="relu",
                                       downsample_in_first_stage=False)
    model = transformers.ResNetModel(config).eval()
    # Random statistics and affine terms, so every normalisation term is exercised.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(1 + 0.2 * torch.randn(c))
                module.bias.copy_(0.2 * torch.randn(c))
                module.running_mean.copy_(0.2 * torch.randn(c))
                module.running_var.copy_(torch.rand(c) + 0.5)
    return model


def _to_torchvision_names(state: dict) -> dict[str, np.ndarray]:
    """transformers' ResNet state-dict names -> torchvision's (what ACT / Diffusion checkpoints use)."""
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        k = key.replace("embedder.embedder.convolution", "conv1").replace("embedder.embedder.normalization", "bn1")
        k = re.sub(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.",
                   lambda m: f"layer{int(m.group(1)) + 1}.{m.group(2)}.", k)
        k = (k.replace("shortcut.convolution", "downsample.0").replace("shortcut.normalization", "downsample.1")
             .replace("layer.0.convolution", "conv1").replace("layer.0.normalization", "bn1")
             .replace("layer.1.convolution", "conv2").replace("layer.1.normalization", "bn2"))
        out[k] = value.detach().numpy()
    return out


def _load(resnet: ResNet, torch_state: dict, norm: str) -> None:
    flat, sources = rename_tensors(_to_torchvision_names(torch_state), torchvision_rules(norm=norm))
    missing = assign_frozen_stats(resnet, flat)
    assert missing == []
    assign_params(resnet, flat, sources=sources)


def _images(seed=1, size=64):
    return np.random.default_rng(seed).standard_normal((2, size, size, 3)).astype(np.float32)


def test_frozen_batch_norm_resnet18_equals_transformers_resnet():
    hf = _hf_model()
    resnet = get_encoder("resnet", depth=18, widths=WIDTHS, stem_width=16, rngs=nnx.Rngs(0))
    _load(resnet, hf.state_dict(), "frozen_batch")
    x = _images()
    with torch.no_grad():
        out = hf(torch.from_numpy(x.transpose(0, 3, 1, 2)), output_hidden_states=True)
    ours, stages = resnet(jnp.asarray(x), return_stages=True)
    want = out.last_hidden_state.numpy().transpose(0, 2, 3, 1)
    assert ours.shape == (2, 2, 2, WIDTHS[-1])
    np.testing.assert_allclose(np.asarray(ours), want, atol=1e-5, rtol=1e-5)
    # hidden_states = (embeddings, stage1, ..., stage4)
    for ours_stage, theirs in zip(stages, out.hidden_states[1:]):
        # Stage activations reach |x| ~ 4 after up to 17 convolutions summing 9 * C products each: float32 round-off
        # of different convolution algorithms (oneDNN vs XLA) reaches ~1.2e-5 there (measured), so 2e-5 absolute.
        np.testing.assert_allclose(np.asarray(ours_stage), theirs.numpy().transpose(0, 2, 3, 1), atol=2e-5, rtol=1e-5)


def test_frozen_statistics_are_not_trainable_parameters():
    resnet = ResNet(18, widths=WIDTHS, stem_width=16, rngs=nnx.Rngs(0))
    params = nnx.state(resnet, nnx.Param)
    names = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(params)]
    assert all(n.endswith("kernel") for n in names), names
    stats = nnx.state(resnet, nnx.BatchStat)
    assert len(list(nnx.to_flat_state(stats))) == 4 * 20  # 20 norms in ResNet-18 (17 convs + 3 downsample)


def test_group_norm_resnet_equals_torch_with_group_norm_swapped_in():
    hf = _hf_model(seed=3)

    def swap(module):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.BatchNorm2d):
                c = child.num_features
                gn = torch.nn.GroupNorm(c // 16, c)
                with torch.no_grad():
                    gn.weight.copy_(1 + 0.2 * torch.randn(c))
                    gn.bias.copy_(0.2 * torch.randn(c))
                setattr(module, name, gn)
            else:
                swap(child)

    swap(hf)
    resnet = ResNet(18, norm="group", widths=WIDTHS, stem_width=16, rngs=nnx.Rngs(0))
    _load(resnet, hf.state_dict(), "group")
    x = _images(seed=4, size=96)
    with torch.no_grad():
        want = hf(torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(resnet(jnp.asarray(x)))
    assert ours.shape == (2, 3, 3, WIDTHS[-1])
    np.testing.assert_allclose(ours, want, atol=1e-5, rtol=1e-5)


def test_resnet34_layout_and_bad_options():
    r34 = nnx.eval_shape(lambda: ResNet(34, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(r34, nnx.Param)))
    # torchvision resnet34 has 21,797,672 parameters; without its fc (512*1000 + 1000) and the BN affine terms
    # (frozen here) that is 21,284,672 - 2 * (number of BN channels) = the convolution weights alone.
    assert n == 21_797_672 - 513_000 - 2 * 8_512
    with pytest.raises(ValueError, match="norm='bogus'"):
        ResNet(18, norm="bogus", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="depth=50"):
        ResNet(50, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiple of 16"):
        ResNet(18, norm="group", widths=(8, 16, 32, 64), rngs=nnx.Rngs(0))
