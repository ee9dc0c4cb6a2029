"""Language backbones against transformers: tiny random Llama / Gemma checkpoints saved as safetensors, loaded
through vlax.weights, compared in float32 (max-abs <= 1e-5 on last hidden states and logits)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from vlax.weights import load_pretrained

TOL = 1e-5

# Tiny models covering each code path: GQA; Llama-3 RoPE scaling with tied embeddings (SmolLM2-style);
# Gemma with MQA, head_dim != width / heads, tied embeddings, sqrt(d) scaling, 1 + w norms, GeGLU, 3 layers.
HF_CONFIGS = {
    "llama_gqa": ("llama", dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)),
    "llama3_scaled_tied": ("llama", dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5,
                                         tie_word_embeddings=True, max_position_embeddings=256,
                                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                          "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 16})),
    "gemma_mqa": ("gemma", dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                                hidden_act="gelu_pytorch_tanh")),
}


def build_hf_model(name: str, directory) -> torch.nn.Module:
    """A random tiny HF causal LM saved (safetensors) to ``directory``; weights perturbed so that no parameter
    keeps its structured initial value (norm scales of exactly 1 or 0 would hide a wrong norm form)."""
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

    family, kwargs = HF_CONFIGS[name]
    config_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (GemmaConfig, GemmaForCausalLM)
    torch.manual_seed(sum(map(ord, name)))
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (HF model, vlax model loaded from the saved directory)."""
    out = {}
    for name in HF_CONFIGS:
        directory = tmp_path_factory.mktemp(name)
        out[name] = (build_hf_model(name, directory), load_pretrained(directory))
    return out


@nnx.jit(static_argnames=("output_hidden_states",))
def forward(model, tokens, embeds, input_mask, output_hidden_states=False):
    return model(tokens, embeds, input_mask=input_mask, return_logits=True,
                 output_hidden_states=output_hidden_states)


def _max_err(ours, ref: torch.Tensor) -> float:
    return float(np.max(np.abs(np.asarray(ours) - ref.detach().numpy())))


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_hidden_states_and_logits_match_transformers(models, name):
    hf, model = models[name]
    tokens = np.random.RandomState(0).randint(0, hf.config.vocab_size, size=(2, 9))
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens), output_hidden_states=True)
        ref_last = hf.model(torch.from_numpy(tokens)).last_hidden_state
    out = forward(model, jnp.asarray(tokens, jnp.int32), None, jnp.ones(tokens.shape, bool),
                  output_hidden_states=True)
    assert out.hidden.shape == ref_last.shape and out.logits.shape == ref.logits.shape
    assert _max_err(out.hidden, ref_last) <= TOL
    assert _max_err(out.logits, ref.logits) <= TOL
    # Per-layer outputs (HF's last entry is already normed, ours is the raw last layer: compare all before it).
    depth = hf.config.num_hidden_layers
    assert out.hidden_states.shape[0] == depth + 1
    for i in range(depth):
        assert _max_err(out.hidden_states[i], ref.hidden_states[i]) <= TOL, f"hidden_states[{i}]"


@pytest.mark.parametrize("name", ["llama_gqa", "gemma_mqa"])
def test_prefix_embeddings_match_transformers_inputs_embeds(models, name):
    """Image-like embeddings ahead of text equal HF's ``inputs_embeds`` = [embeds, embed_tokens(text)]."""
    hf, model = models[name]
    rs = np.random.RandomState(1)
    embeds = rs.randn(2, 3, hf.config.hidden_size).astype(np.float32)
    tokens = rs.randint(0, hf.config.vocab_size, size=(2, 5))
    with torch.no_grad():
        text = hf.model.embed_tokens(torch.from_numpy(tokens))  # includes Gemma's sqrt(d)
        ref = hf(inputs_embeds=torch.cat([torch.from_numpy(embeds), text], 1))
    out = forward(model, jnp.asarray(tokens, jnp.int32), jnp.asarray(embeds), jnp.ones((2, 8), bool))
    assert _max_err(out.logits, ref.logits) <= TOL
    np.testing.assert_allclose(np.asarray(model.embed_tokens(jnp.asarray(tokens))), text.numpy(), atol=TOL)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_unpadded_rows(models, side):
    """A row padded on either side gives, at its real tokens, HF's outputs for the unpadded row."""
    hf, model = models["llama_gqa"]
    rs = np.random.RandomState(2)
    long, short = rs.randint(0, 128, size=8), rs.randint(0, 128, size=5)
    pad = np.zeros(3, np.int64)
    row = np.concatenate([pad, short]) if side == "left" else np.concatenate([short, pad])
    valid = np.arange(8) >= 3 if side == "left" else np.arange(8) < 5
    tokens = np.stack([long, row])
    mask = np.stack([np.ones(8, bool), valid])
    out = forward(model, jnp.asarray(tokens, jnp.int32), None, jnp.asarray(mask))
    with torch.no_grad():
        ref_long = hf(torch.from_numpy(long[None])).logits[0]
        ref_short = hf(torch.from_numpy(short[None])).logits[0]
    assert _max_err(out.logits[0], ref_long) <= TOL
    assert _max_err(out.logits[1][valid], ref_short) <= TOL


def test_logits_helper_and_tied_table(models):
    """``model.logits`` is the LM head: tied models use the embedding table, untied ones ``lm_head``."""
    _, tied = models["llama3_scaled_tied"]
    _, untied = models["llama_gqa"]
    assert tied.lm_head is None and untied.lm_head is not None
    h = jax.random.normal(jax.random.key(0), (1, 2, 64))
    np.testing.assert_allclose(np.asarray(tied.logits(h)), np.asarray(h @ tied.embed_tokens.embedding[...].T),
                               atol=TOL)
