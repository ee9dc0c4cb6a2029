"""Llama / Gemma checkpoint import: published-size parameter counts, config mapping, sharded and bf16 loading,
and one clear error for each kind of bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from test_backbone_parity import build_hf_model  # the tiny HF checkpoints of the parity tests
from vlax.backbones import Transformer, get_config
from vlax.nn import count_params
from vlax.weights import CheckpointError, load_pretrained
from vlax.weights.gemma import gemma_config_from_hf, load_gemma
from vlax.weights.llama import llama_config_from_hf, load_llama

# Values from each model's config.json on the Hugging Face hub.
PUBLISHED = {
    "llama2_7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, hidden_act="silu",
                                max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                                tie_word_embeddings=False)),
    "gemma_2b": ("gemma", dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                               num_attention_heads=8, num_key_value_heads=1, head_dim=256, hidden_act="gelu",
                               max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=10000.0)),
    "smollm2_360m": ("llama", dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                   num_attention_heads=15, num_key_value_heads=5, hidden_act="silu",
                                   max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                                   tie_word_embeddings=True)),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_parameter_counts_equal_transformers(name):
    from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig

    family, values = PUBLISHED[name]
    hf_config = (LlamaConfig if family == "llama" else GemmaConfig)(**values)
    with torch.device("meta"):
        hf_count = sum(p.numel() for p in AutoModelForCausalLM.from_config(hf_config).parameters())
    abstract = nnx.eval_shape(lambda: Transformer(get_config(name), rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))  # nothing allocated
    assert count_params(params) == hf_count
    # The named config is what the importer builds from the same config.json.
    from_hf = (llama_config_from_hf if family == "llama" else gemma_config_from_hf)(hf_config.to_dict())
    assert from_hf == get_config(name)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    return build_hf_model("llama_gqa", directory), directory


def _logits(model, tokens):
    return np.asarray(nnx.jit(lambda m, t: m(t, return_logits=True).logits)(model, tokens), np.float32)


def test_sharded_checkpoint_and_bf16_load(llama_dir, tmp_path):
    hf, _ = llama_dir
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 128, size=(1, 6)), jnp.int32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()
    sharded = load_pretrained(tmp_path)
    assert np.max(np.abs(_logits(sharded, tokens) - ref)) <= 1e-5
    half = load_llama(tmp_path, dtype=jnp.bfloat16)
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(half, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    # bf16 weights (8 mantissa bits) and bf16 activations: agreement to about 1 % of the logit range.
    assert np.max(np.abs(_logits(half, tokens) - ref)) <= 0.02 * np.abs(ref).max() + 0.02


def _rewrite(directory, tmp_path, edit_tensors=None, edit_config=None):
    """Copy of a checkpoint with its tensors / config.json edited."""
    tensors = load_file(directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_wrong_shape_tensor_names_key_and_shapes(llama_dir, tmp_path):
    def edit(t):
        t["model.layers.1.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)

    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight: checkpoint shape "
                                              r"\(16, 64\) != \(32, 64\) expected from config.json"):
        load_pretrained(_rewrite(llama_dir[1], tmp_path, edit_tensors=edit))


def test_config_disagreeing_with_tensors_lists_every_tensor(llama_dir, tmp_path):
    def edit(c):
        c["intermediate_size"] = 96

    with pytest.raises(CheckpointError) as err:
        load_pretrained(_rewrite(llama_dir[1], tmp_path, edit_config=edit))
    message = str(err.value)
    assert "intermediate_size=96" in message
    for i in (0, 1):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{i}.mlp.{proj}.weight" in message


def test_missing_and_unexpected_tensors_are_named(llama_dir, tmp_path):
    def edit(t):
        del t["model.norm.weight"]
        t["model.extra_head.weight"] = np.zeros((2, 2), np.float32)

    with pytest.raises(CheckpointError) as err:
        load_pretrained(_rewrite(llama_dir[1], tmp_path, edit_tensors=edit))
    assert "missing tensors: ['model.norm.weight']" in str(err.value)
    assert "unexpected tensors: ['model.extra_head.weight']" in str(err.value)


def test_missing_layer_tensor_is_named(llama_dir, tmp_path):
    def edit(t):
        del t["model.layers.1.mlp.up_proj.weight"]

    with pytest.raises(CheckpointError, match=r"missing tensors: \['model\.layers\.1\.mlp\.up_proj\.weight'\]"):
        load_pretrained(_rewrite(llama_dir[1], tmp_path, edit_tensors=edit))


def test_unsupported_architecture_lists_supported(llama_dir, tmp_path):
    def edit(c):
        c["architectures"] = ["MistralForCausalLM"]

    with pytest.raises(CheckpointError, match=r"unsupported architecture \['MistralForCausalLM'\].*GemmaForCausalLM"):
        load_pretrained(_rewrite(llama_dir[1], tmp_path, edit_config=edit))
    # A loader asked directly for another family refuses too.
    with pytest.raises(CheckpointError, match=r"unsupported architecture \['LlamaForCausalLM'\] in config.json; "
                                              r"supported: \['GemmaForCausalLM', 'gemma'\]"):
        load_gemma(llama_dir[1])


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="refusing to load pickle-based weights .*pytorch_model.bin"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    (dict(attention_bias=True), "attention_bias=true; vlax decoders have no projection biases"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
     "unsupported RoPE scaling 'yarn' in config.json; supported: default, linear, llama3"),
    (dict(hidden_size=None), "config.json lacks the field 'hidden_size'"),
])
def test_unsupported_config_values_are_refused(change, message):
    _, values = PUBLISHED["smollm2_360m"]
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(")):
        llama_config_from_hf({**values, **change})


def test_config_reading_accepts_both_rope_spellings():
    old = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
           "num_attention_heads": 2, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}}
    new = {**{k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")},
           "rope_parameters": {**old["rope_scaling"], "rope_theta": 500000.0}}
    assert llama_config_from_hf(old) == llama_config_from_hf(new)
    assert llama_config_from_hf(old).rope == get_config("llama3_2_1b").rope
    assert llama_config_from_hf(old, remat="full").remat == "full"
    with pytest.raises(ValueError, match=r"unknown TransformerConfig field\(s\) \['widht'\]"):
        llama_config_from_hf(old, widht=3)


def test_registry_resolves_every_architecture_to_its_loader():
    import importlib

    from vlax.weights import LOADERS

    for architecture, module_name in LOADERS.items():
        module = importlib.import_module(module_name)
        stem = module_name.rsplit(".", 1)[-1]
        assert callable(getattr(module, f"load_{stem}", None)), module_name
        assert architecture in module.ARCHITECTURES, (architecture, module_name)
