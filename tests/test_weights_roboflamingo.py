"""RoboFlamingo checkpoints: a tiny checkpoint written by the test in RoboFlamingo's layout with torch.save, converted
by experiments/convert_torch_checkpoint.py (torch.load(weights_only=True)), imported by vlax.weights.roboflamingo;
the resampler, the cross-attention blocks and the LSTM head then equal references computed straight from the torch
tensors (numpy for the resampler and blocks, torch.nn.LSTM for the head). fp32 tolerance 1e-5."""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open

from experiments.configs import roboflamingo as config
from experiments.convert_torch_checkpoint import convert
from test_backbones_flamingo import attention, ffw, layer_norm
from vlax.build import build_policy
from vlax.policy import PolicySpec
from vlax.weights.common import CheckpointError
from vlax.weights.roboflamingo import load_roboflamingo

ATOL = 1e-5
T, VOCAB = 3, 256
SPEC = PolicySpec(cameras=("rgb",), image_size=32, state_dim=0, action_dim=4, horizon=T, max_text_len=8,
                  state_input="none", obs_history=T)


def _random_state_dict(seed=0):
    """RoboFlamingo's trained tensors at the tiny config's sizes (torch layout: Linear weights [out, in])."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: 0.3 * torch.randn(*shape, generator=g)  # noqa: E731
    ln = lambda d: (1.0 + r(d), r(d))  # noqa: E731
    sd = {"perceiver.latents": r(4, 32), "perceiver.norm.weight": ln(32)[0], "perceiver.norm.bias": r(32)}
    p = "perceiver.layers.0."
    for norm in ("norm_media", "norm_latents"):
        sd[p + f"0.{norm}.weight"], sd[p + f"0.{norm}.bias"] = ln(32)
    sd.update({p + "0.to_q.weight": r(32, 32), p + "0.to_kv.weight": r(64, 32), p + "0.to_out.weight": r(32, 32),
               p + "1.1.weight": r(64, 32), p + "1.3.weight": r(32, 64)})
    sd[p + "1.0.weight"], sd[p + "1.0.bias"] = ln(32)
    for i in range(2):  # cross_attn_every=1: a block before both decoder layers
        x = f"lang_encoder.gated_cross_attn_layers.{i}."
        sd[x + "attn.norm.weight"], sd[x + "attn.norm.bias"] = ln(32)
        sd.update({x + "attn.to_q.weight": r(32, 32), x + "attn.to_kv.weight": r(64, 32),
                   x + "attn.to_out.weight": r(32, 32), x + "attn_gate": r(1), x + "ff_gate": r(1),
                   x + "ff.1.weight": r(64, 32), x + "ff.3.weight": r(32, 64)})
        sd[x + "ff.0.weight"], sd[x + "ff.0.bias"] = ln(32)
    sd["lang_encoder.transformer.wte.weight"] = r(VOCAB, 32)
    torch.manual_seed(seed)
    rnn = torch.nn.LSTM(32, 32, num_layers=2, batch_first=True)
    actions = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3), torch.nn.Tanh())
    gripper = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1),
                                  torch.nn.Sigmoid())
    for name, module in (("rnn", rnn), ("actions.mlp", actions), ("gripper.mlp", gripper)):
        sd.update({f"lm_head.{name}.{k}": v for k, v in module.state_dict().items()})
    return sd, (rnn, actions, gripper)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    sd, torch_head = _random_state_dict()
    saved = {f"module.{k}": v for k, v in sd.items()}
    for i in range(2):  # OpenFlamingo's second name of each block: the same tensors
        for k, v in sd.items():
            if k.startswith(f"lang_encoder.gated_cross_attn_layers.{i}."):
                rest = k[len(f"lang_encoder.gated_cross_attn_layers.{i}."):]
                saved[f"module.lang_encoder.transformer.blocks.{i}.gated_cross_attn_layer.{rest}"] = v
    saved["module.lang_encoder.transformer.blocks.0.decoder_layer.attn.Wqkv.weight"] = torch.zeros(96, 32)
    saved["module.normalizer.params_dict.scale"] = torch.ones(7)
    path = tmp_path_factory.mktemp("rf")
    torch.save({"epoch": 4, "model_state_dict": saved, "optimizer_state_dict": {}}, path / "checkpoint.pth")
    written = convert(path / "checkpoint.pth", path / "rf.safetensors")
    model = config.get_config("tiny").model.to_dict()
    policy = build_policy(model, SPEC, VOCAB, nnx.Rngs(0))
    load_roboflamingo(policy, path / "rf.safetensors")
    return policy, sd, torch_head, path, written


def _np(t):
    return t.detach().double().numpy()


def test_the_converter_writes_every_tensor_by_name(imported):
    _, sd, _, path, written = imported
    assert len(written) == len(sd) + 2 * 11 + 2  # the aliases and the skipped names are kept in the file
    with safe_open(str(path / "rf.safetensors"), framework="np") as f:
        assert f.metadata() == {"converted_from": "checkpoint.pth"}
        np.testing.assert_array_equal(f.get_tensor("module.perceiver.latents"), sd["perceiver.latents"].numpy())


def test_resampler_equals_the_checkpoint_tensors_forward(imported):
    policy, sd, _, _, _ = imported
    media = np.random.default_rng(0).normal(size=(2, 5, 32))
    out = np.asarray(jax.jit(lambda m: policy.resampler(m))(jnp.asarray(media, jnp.float32)))
    s = {k: _np(v) for k, v in sd.items() if k.startswith("perceiver.")}
    p = "perceiver.layers.0."
    x = np.broadcast_to(s["perceiver.latents"], (2, 4, 32))
    q = layer_norm(x, s[p + "0.norm_latents.weight"], s[p + "0.norm_latents.bias"])
    kv = np.concatenate([layer_norm(media, s[p + "0.norm_media.weight"], s[p + "0.norm_media.bias"]), q], axis=1)
    wk, wv = np.split(s[p + "0.to_kv.weight"], 2)
    x = x + attention(q, kv, s[p + "0.to_q.weight"].T, wk.T, wv.T, s[p + "0.to_out.weight"].T, heads=2)
    x = x + ffw(x, s[p + "1.0.weight"], s[p + "1.0.bias"], s[p + "1.1.weight"].T, s[p + "1.3.weight"].T)
    ref = layer_norm(x, s["perceiver.norm.weight"], s["perceiver.norm.bias"])
    assert np.abs(out - ref).max() <= ATOL


def test_cross_attention_blocks_equal_the_checkpoint_tensors_forward(imported):
    policy, sd, _, _, _ = imported
    rng = np.random.default_rng(1)
    y, media = rng.normal(size=(2, 6, 32)), rng.normal(size=(2, 4, 32))
    graphdef, state = nnx.split(policy.lm.gated_cross_attn_layers)
    for i in range(2):
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
        out = np.asarray(block(jnp.asarray(y, jnp.float32), jnp.asarray(media, jnp.float32)))
        s = {k.split(f"layers.{i}.")[1]: _np(v) for k, v in sd.items()
             if k.startswith(f"lang_encoder.gated_cross_attn_layers.{i}.")}
        wk, wv = np.split(s["attn.to_kv.weight"], 2)
        h = attention(layer_norm(y, s["attn.norm.weight"], s["attn.norm.bias"]), media, s["attn.to_q.weight"].T,
                      wk.T, wv.T, s["attn.to_out.weight"].T, heads=2)
        ref = y + np.tanh(s["attn_gate"][0]) * h
        ref = ref + np.tanh(s["ff_gate"][0]) * ffw(ref, s["ff.0.weight"], s["ff.0.bias"], s["ff.1.weight"].T,
                                                    s["ff.3.weight"].T)
        assert np.abs(out - ref).max() <= ATOL
    np.testing.assert_array_equal(np.asarray(policy.lm.lm.embed_tokens.embedding[...]),
                                  sd["lang_encoder.transformer.wte.weight"].numpy())


def test_lstm_head_equals_torch(imported):
    policy, _, (rnn, actions, gripper), _, _ = imported
    feats = np.random.default_rng(2).normal(size=(2, T, 32)).astype(np.float32)
    with torch.no_grad():
        hidden, _ = rnn(torch.from_numpy(feats))
        pose_ref, grip_ref = actions(hidden).numpy(), gripper(hidden).numpy()
    from vlax.nn import HeadContext

    ctx = HeadContext(tokens=jnp.asarray(feats), mask=jnp.ones((2, T), bool))
    pose, logits = policy.head._outputs(ctx, False, None)
    assert np.abs(np.asarray(pose)[:, :, 0] - pose_ref).max() <= ATOL
    assert np.abs(np.asarray(jax.nn.sigmoid(logits))[:, :, 0] - grip_ref).max() <= ATOL
    chunk = np.asarray(policy.head.sample(ctx))  # frame t's action at chunk index t
    np.testing.assert_allclose(chunk[..., :3], pose_ref, atol=ATOL)
    np.testing.assert_array_equal(chunk[..., 3], np.where(grip_ref[..., 0] > 0.5, 1.0, -1.0))


def test_a_checkpoint_with_another_block_interval_is_refused_with_the_fix(imported, tmp_path):
    _, sd, _, _, _ = imported
    from safetensors.torch import save_file

    save_file({k.replace("gated_cross_attn_layers.0.", "gated_cross_attn_layers.2."): v.contiguous()
               for k, v in sd.items() if "gated_cross_attn_layers.1." not in k}, str(tmp_path / "bad.safetensors"))
    policy = nnx.eval_shape(lambda: build_policy(config.get_config("tiny").model.to_dict(), SPEC, VOCAB,
                                                 nnx.Rngs(0)))
    with pytest.raises(CheckpointError, match=r"block at decoder layer 2, but the model has one before layers i "
                                              r"with \(i \+ 1\) % 1 == 0 of 2"):
        load_roboflamingo(policy, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="refusing to load pickle-based weights"):
        load_roboflamingo(policy, imported[3] / "checkpoint.pth")


def test_the_converter_refuses_objects_weights_only_cannot_load(tmp_path):
    torch.save({"model_state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1e-4)},
               tmp_path / "unsafe.pth")
    with pytest.raises(ValueError, match=r"cannot be read with torch.load\(weights_only=True\)"):
        convert(tmp_path / "unsafe.pth", tmp_path / "out.safetensors")
