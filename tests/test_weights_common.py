"""Checkpoint reading and assignment helpers: safe formats only, every mismatch named."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from vlax.nn import Dense, LayerNorm, stack_layers
from vlax.weights.common import (
    CheckpointError,
    assign_params,
    check_architecture,
    linear_kernel,
    load_hf_dir,
    param_shapes,
    rename_tensors,
    stack_numbered,
    strip_prefix,
    to_numpy_flat,
)


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = Dense(3, 4, rngs=rngs)
        self.layers = stack_layers(lambda r: LayerNorm(4, rngs=r), 2, rngs)


def _write_dir(tmp_path, tensors: dict, config=None, shards: int = 1):
    (tmp_path / "config.json").write_text(json.dumps(config or {"architectures": ["TinyModel"]}))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(tmp_path / "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(tmp_path / fname))
        weight_map.update({n: fname for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _torch_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.proj.weight": torch.randn(4, 3, generator=g),
        "model.proj.bias": torch.randn(4, generator=g),
        **{f"model.layers.{i}.weight": torch.randn(4, generator=g) for i in range(2)},
        **{f"model.layers.{i}.bias": torch.randn(4, generator=g) for i in range(2)},
    }


RULES = [
    (r"proj\.weight", "proj.kernel", linear_kernel),
    (r"proj\.bias", "proj.bias", None),
    (r"layers\.\*\.weight", "layers.scale", None),
    (r"layers\.\*\.bias", "layers.bias", None),
]


def _convert(tensors):
    tensors, prefix = strip_prefix(tensors, ("model.", ""))
    assert prefix == "model."
    return rename_tensors(stack_numbered(tensors, "layers."), RULES, source_prefix=prefix)


@pytest.mark.parametrize("shards", [1, 3])
def test_load_rename_stack_assign_roundtrip(tmp_path, shards):
    ref = _torch_tensors()
    _write_dir(tmp_path, ref, shards=shards)
    config, tensors = load_hf_dir(tmp_path)
    assert config["architectures"] == ["TinyModel"]
    assert set(tensors) == set(ref)
    flat, sources = _convert(tensors)
    model = nnx.eval_shape(lambda: Tiny(nnx.Rngs(0)))  # abstract: assignment fills it
    assign_params(model, flat, sources=sources)
    got = to_numpy_flat(model)
    np.testing.assert_array_equal(got["proj.kernel"], ref["model.proj.weight"].numpy().T)
    np.testing.assert_array_equal(got["layers.scale"][1], ref["model.layers.1.weight"].numpy())
    y = model.layers  # scanned layout [L, D]
    assert y.scale.shape == (2, 4)


def test_bf16_tensors_and_dtype_cast(tmp_path):
    ref = {k: v.to(torch.bfloat16) for k, v in _torch_tensors().items()}
    _write_dir(tmp_path, ref)
    _, tensors = load_hf_dir(tmp_path, select=lambda n: "layers" in n or "proj" in n)
    assert str(tensors["model.proj.weight"].dtype) == "bfloat16"
    np.testing.assert_array_equal(tensors["model.proj.weight"].astype(np.float32),
                                  ref["model.proj.weight"].float().numpy())
    flat, sources = _convert(tensors)
    model = assign_params(Tiny(nnx.Rngs(0)), flat, sources=sources)
    assert model.proj.kernel[...].dtype == jnp.float32  # cast to the parameter's dtype by default
    model = assign_params(Tiny(nnx.Rngs(0)), flat, dtype=jnp.bfloat16)
    assert model.proj.kernel[...].dtype == jnp.bfloat16


def test_select_reads_only_chosen_tensors(tmp_path):
    _write_dir(tmp_path, _torch_tensors())
    _, tensors = load_hf_dir(tmp_path, select=lambda n: n.startswith("model.layers."))
    assert sorted(tensors) == sorted(k for k in _torch_tensors() if k.startswith("model.layers."))


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*safetensors"):
        load_hf_dir(tmp_path)
    with pytest.raises(CheckpointError, match="refusing to load pickle"):
        load_hf_dir(tmp_path / "pytorch_model.bin")


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_hf_dir(tmp_path)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_hf_dir(tmp_path)


def test_unsupported_architecture_named():
    with pytest.raises(CheckpointError, match=r"'BertModel'.*supported: \['SiglipVisionModel'\]"):
        check_architecture({"architectures": ["BertModel"]}, ["SiglipVisionModel"])
    assert check_architecture({"model_type": "dinov2"}, ["dinov2"]) == "dinov2"


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    ref = _torch_tensors()
    ref["model.proj.weight"] = torch.zeros(5, 3)
    _write_dir(tmp_path, ref)
    flat, sources = _convert(load_hf_dir(tmp_path)[1])
    with pytest.raises(CheckpointError, match=r"proj\.kernel \(checkpoint 'model\.proj\.weight'\): "
                                              r"checkpoint shape \(3, 5\) != model shape \(3, 4\)"):
        assign_params(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))), flat, sources=sources)


def test_missing_and_unexpected_keys_named():
    flat = {"proj.kernel": np.zeros((3, 4), np.float32), "layers.scale": np.zeros((2, 4), np.float32),
            "layers.bias": np.zeros((2, 4), np.float32), "extra.weight": np.zeros(2, np.float32)}
    with pytest.raises(CheckpointError) as err:
        assign_params(Tiny(nnx.Rngs(0)), flat)
    assert "missing keys: ['proj.bias']" in str(err.value)
    assert "unexpected keys: ['extra.weight']" in str(err.value)
    before = np.asarray(Tiny(nnx.Rngs(0)).proj.bias[...])
    model = assign_params(Tiny(nnx.Rngs(0)), flat, strict=False)  # concrete: missing ones keep their values
    np.testing.assert_array_equal(model.proj.bias[...], before)
    with pytest.raises(CheckpointError, match="abstract"):
        assign_params(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))), flat, strict=False)


def test_integer_tensor_into_float_param_refused():
    flat = {k: np.zeros(v.shape, np.int32) for k, v in param_shapes(Tiny(nnx.Rngs(0))).items()}
    with pytest.raises(CheckpointError, match="dtype int32 cannot be loaded into a float32 parameter"):
        assign_params(Tiny(nnx.Rngs(0)), flat)


def test_stack_numbered_reports_missing_layer():
    t = {"l.0.w": np.zeros(2), "l.1.w": np.zeros(2), "l.0.b": np.zeros(2)}
    with pytest.raises(CheckpointError, match=r"missing per-layer tensors: \['l\.1\.b'\]"):
        stack_numbered(t, "l.")
    with pytest.raises(CheckpointError, match="more layers than the model's 1"):
        stack_numbered({"l.0.w": np.zeros(2), "l.1.w": np.zeros(2)}, "l.", num_layers=1)
    out = stack_numbered({"l.0.w": np.zeros(2), "l.1.w": np.ones(2), "x": np.zeros(1)}, "l.", "stack.")
    assert out["stack.w"].shape == (2, 2) and "x" in out
    assert sorted(stack_numbered({"l.0.w": np.zeros(2)}, "l.")) == ["l.*.w"]


def test_abstract_shapes_need_no_allocation():
    shapes = param_shapes(nnx.eval_shape(lambda: Tiny(nnx.Rngs(0))))
    assert shapes["proj.kernel"] == jax.ShapeDtypeStruct((3, 4), jnp.float32)
    assert shapes["layers.scale"].shape == (2, 4)


def test_tensor_names_reads_headers_only(tmp_path):
    _write_dir(tmp_path, _torch_tensors(), shards=2)
    from vlax.weights.common import tensor_names

    assert tensor_names(tmp_path) == sorted(_torch_tensors())


def test_malformed_config_json_is_named(tmp_path):
    _write_dir(tmp_path, {"w": torch.zeros(2)})
    (tmp_path / "config.json").write_text('{"architectures": ["TinyModel"],')
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON .*model configuration is damaged; "
                                              r"download it again") as info:
        load_hf_dir(tmp_path)
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one error, no JSON traceback
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"config.json must hold a JSON object, got list"):
        load_hf_dir(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # safetensors' reader and the memmap path
@pytest.mark.parametrize("keep", ["4 bytes", "half header", "half data", "all but one byte"])
def test_truncated_safetensors_is_named(tmp_path, dtype, keep):
    _write_dir(tmp_path, {"a": torch.ones(64, dtype=dtype), "b": torch.ones(8, dtype=dtype)})
    file = tmp_path / "model.safetensors"
    data = file.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    cut = {"4 bytes": 4, "half header": header_end // 2, "half data": (header_end + len(data)) // 2,
           "all but one byte": len(data) - 1}[keep]
    file.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a complete .safetensors file: .*; "
                                              r"download it again") as info:
        load_hf_dir(tmp_path)
    assert info.value.__cause__ is None


def test_damaged_shard_index_is_named(tmp_path):
    _write_dir(tmp_path, {n: t for n, t in _torch_tensors().items()}, shards=2)
    (tmp_path / "model.safetensors.index.json").write_text("{\"weight_map\": ")
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json is not valid JSON .*shard index"):
        load_hf_dir(tmp_path)
