"""Building blocks against transformers / torch references (fp32, max-abs <= 1e-5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import vlax.nn as vn

TOL = 1e-5


def _np(t):
    return t.detach().numpy()


@pytest.mark.parametrize("scaling", [None, "llama3"])
def test_rope_matches_transformers(scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, heads = 16, 2
    rope_params = {"rope_type": "default", "rope_theta": 500000.0}
    cfg = vn.RopeConfig(theta=500000.0)
    if scaling == "llama3":
        rope_params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        cfg = vn.RopeConfig(theta=500000.0, scaling="llama3", factor=8.0, low_freq_factor=1.0,
                            high_freq_factor=4.0, original_max_position_embeddings=64)
    hf_cfg = LlamaConfig(hidden_size=head_dim * heads, num_attention_heads=heads, rope_parameters=rope_params,
                         max_position_embeddings=4096)
    rot = LlamaRotaryEmbedding(hf_cfg)
    x = np.random.RandomState(0).randn(1, heads, 7, head_dim).astype(np.float32)
    positions = np.array([[0, 3, 17, 100, 511, 1000, 4000]])
    cos, sin = rot(torch.from_numpy(x), torch.from_numpy(positions))
    ref, _ = apply_rotary_pos_emb(torch.from_numpy(x), torch.from_numpy(x), cos, sin)
    ours = vn.apply_rope(jnp.asarray(x.transpose(0, 2, 1, 3)), jnp.asarray(positions),
                         vn.inverse_frequencies(head_dim, cfg))
    np.testing.assert_allclose(np.asarray(ours), _np(ref).transpose(0, 2, 1, 3), atol=TOL)


def test_rmsnorm_and_gemma_rmsnorm_match_transformers():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = np.random.RandomState(1).randn(2, 5, 32).astype(np.float32)
    w = np.random.RandomState(2).randn(32).astype(np.float32)
    llama = LlamaRMSNorm(32, eps=1e-5)
    llama.weight.data = torch.from_numpy(w)
    ours = vn.RMSNorm(32, eps=1e-5)
    ours.scale.set_value(jnp.asarray(w))
    assert np.abs(np.asarray(ours(jnp.asarray(x))) - _np(llama(torch.from_numpy(x)))).max() <= TOL
    gemma = GemmaRMSNorm(32, eps=1e-6)
    gemma.weight.data = torch.from_numpy(w)
    ours = vn.RMSNorm(32, eps=1e-6, unit_offset=True)
    ours.scale.set_value(jnp.asarray(w))
    assert np.abs(np.asarray(ours(jnp.asarray(x))) - _np(gemma(torch.from_numpy(x)))).max() <= TOL


def test_layernorm_matches_torch():
    x = np.random.RandomState(3).randn(4, 48).astype(np.float32) * 3 + 1
    ref = torch.nn.LayerNorm(48, eps=1e-6)
    torch.nn.init.normal_(ref.weight)
    torch.nn.init.normal_(ref.bias)
    ours = vn.LayerNorm(48, eps=1e-6)
    ours.scale.set_value(jnp.asarray(_np(ref.weight)))
    ours.bias.set_value(jnp.asarray(_np(ref.bias)))
    assert np.abs(np.asarray(ours(jnp.asarray(x))) - _np(ref(torch.from_numpy(x)))).max() <= TOL


@pytest.mark.parametrize("act,torch_act", [("gelu_tanh", lambda t: torch.nn.functional.gelu(t, approximate="tanh")),
                                           ("silu", torch.nn.functional.silu)])
def test_gated_mlp_matches_torch_formula(act, torch_act):
    mlp = vn.GatedMlp(16, 40, act=act, rngs=nnx.Rngs(0))
    x = np.random.RandomState(4).randn(3, 16).astype(np.float32)
    g, u, d = (torch.from_numpy(np.array(m.kernel[...])) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    xt = torch.from_numpy(x)
    ref = (torch_act(xt @ g) * (xt @ u)) @ d
    assert np.abs(np.asarray(mlp(jnp.asarray(x))) - _np(ref)).max() <= TOL


def test_unknown_activation_lists_known():
    with pytest.raises(ValueError, match="known:.*silu"):
        vn.activation("swishy")


def _naive_attention(q, k, v, mask, scale, softcap=None):
    groups = q.shape[2] // k.shape[2]
    k = np.repeat(k, groups, axis=2)
    v = np.repeat(v, groups, axis=2)
    logits = np.einsum("btnd,bsnd->bnts", q, k) * scale
    if softcap:
        logits = np.tanh(logits / softcap) * softcap
    logits = np.where(mask[:, None], logits, -1e30)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnd->btnd", p, v)


@pytest.mark.parametrize("num_kv", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("impl", ["xla", "einsum"])
def test_attention_paths_match_naive(num_kv, impl):
    rs = np.random.RandomState(5)
    q = rs.randn(2, 5, 4, 8).astype(np.float32)
    k = rs.randn(2, 7, num_kv, 8).astype(np.float32)
    v = rs.randn(2, 7, num_kv, 8).astype(np.float32)
    mask = rs.rand(2, 5, 7) > 0.3
    mask[..., 0] = True
    out = vn.dot_product_attention(*map(jnp.asarray, (q, k, v)), jnp.asarray(mask), implementation=impl)
    np.testing.assert_allclose(np.asarray(out), _naive_attention(q, k, v, mask, 8 ** -0.5), atol=TOL)


def test_softcap_attention():
    rs = np.random.RandomState(6)
    q, k, v = (rs.randn(1, 4, 2, 8).astype(np.float32) * 4 for _ in range(3))
    mask = np.tril(np.ones((1, 4, 4), bool))
    out = vn.dot_product_attention(*map(jnp.asarray, (q, k, v)), jnp.asarray(mask), softcap=5.0)
    np.testing.assert_allclose(np.asarray(out), _naive_attention(q, k, v, mask, 8 ** -0.5, 5.0), atol=TOL)


def test_gqa_head_mismatch_is_refused():
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        vn.Attention(48, 6, 4, rngs=nnx.Rngs(0))


def test_attention_cache_decode_equals_full_pass():
    """Writing keys one token at a time into a cache gives the same outputs as one causal pass."""
    attn = vn.Attention(32, 4, 2, rope=vn.RopeConfig(), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
    full, _ = attn(x, mask=vn.make_attn_mask(jnp.ones((2, 6), bool), jnp.ones(6)), positions=pos)
    # Prefix of 4 tokens in one pass, then 2 decode steps into an 8-slot cache.
    _, (k, v) = attn(x[:, :4], mask=vn.make_attn_mask(jnp.ones((2, 4), bool), jnp.ones(4)), positions=pos[:, :4])
    cache = vn.KVCache.from_prefix(k[None], v[None], jnp.ones((2, 4), bool), max_len=8)
    buffers = (cache.k[0], cache.v[0])
    outs = []
    for t in (4, 5):
        slot_mask = jax.lax.dynamic_update_slice(cache.mask, jnp.ones((2, 1), bool), (0, t))
        cache = cache.replace(mask=slot_mask, end=jnp.asarray(t + 1))
        y, buffers = attn(x[:, t:t + 1], mask=slot_mask[:, None, :], positions=pos[:, t:t + 1], kv=buffers,
                          cache_index=jnp.asarray(t))
        outs.append(y)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full[:, 4:]), atol=TOL)


def test_attention_with_prefix_kv_equals_joint_pass():
    """Suffix tokens attending to given prefix keys equal the same tokens in one joint pass."""
    attn = vn.Attention(32, 4, 1, rope=vn.RopeConfig(), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (1, 7, 32))
    pos = jnp.arange(7)[None]
    ar = jnp.asarray([0, 0, 0, 0, 1, 0, 0])
    full, _ = attn(x, mask=vn.make_attn_mask(jnp.ones((1, 7), bool), ar), positions=pos)
    _, (pk, pv) = attn(x[:, :4], mask=jnp.ones((1, 4, 4), bool), positions=pos[:, :4])
    mask = vn.prefix_suffix_mask(jnp.ones((1, 4), bool), jnp.ones((1, 3), bool), ar[4:])
    suffix, _ = attn(x[:, 4:], mask=mask, positions=pos[:, 4:], kv=(pk, pv))
    np.testing.assert_allclose(np.asarray(suffix), np.asarray(full[:, 4:]), atol=TOL)


def test_kv_cache_refuses_short_buffer():
    k = jnp.zeros((1, 1, 5, 1, 4))
    with pytest.raises(ValueError, match="max_len=3 is shorter than the prefix \\(5 tokens\\)"):
        vn.KVCache.from_prefix(k, k, jnp.ones((1, 5), bool), max_len=3)


def test_parameters_carry_logical_axes():
    block = vn.DecoderBlock(32, 4, 2, 8, 64, rngs=nnx.Rngs(0))
    axes = {"/".join(map(str, p)): vn.logical_axes_of(v) for p, v in nnx.iter_graph(block)
            if isinstance(v, nnx.Param)}
    assert axes["self_attn/q_proj/kernel"] == ("embed", "heads")
    assert axes["self_attn/k_proj/kernel"] == ("embed", "kv")
    assert axes["mlp/down_proj/kernel"] == ("mlp", "embed")
    stacked = vn.stack_layers(lambda r: vn.DecoderBlock(32, 4, 2, 8, 64, rngs=r), 3, nnx.Rngs(0))
    q = stacked.self_attn.q_proj.kernel
    assert q.shape == (3, 32, 32) and vn.logical_axes_of(q) == ("layers", "embed", "heads")


def test_scan_equals_python_loop_and_remat_changes_nothing():
    stacked = vn.stack_layers(lambda r: vn.DecoderBlock(32, 4, 2, 8, 64, rngs=r), 3, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 5, 32))
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    mask = vn.make_attn_mask(jnp.ones((2, 5), bool), jnp.ones(5))

    def body(layer, h, _):
        return layer(h, mask=mask, positions=pos)

    scanned, kv = vn.scan_layers(stacked, body, x)
    rematted, _ = vn.scan_layers(stacked, body, x, remat="full")
    graphdef, state = nnx.split(stacked)
    h = x
    for i in range(3):
        h, _ = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))(h, mask=mask, positions=pos)
    assert kv[0].shape == (3, 2, 5, 2, 8)
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(h), atol=TOL)
    np.testing.assert_allclose(np.asarray(rematted), np.asarray(scanned), atol=TOL)
    with pytest.raises(ValueError, match="unknown remat policy 'some'; known"):
        vn.scan_layers(stacked, body, x, remat="some")


def test_cudnn_block_padding_leaves_attention_unchanged():
    """The padding that makes any sequence length acceptable to cuDNN's kernel (checked here with the XLA kernel,
    which CI has) changes nothing: padded keys are masked, padded queries are dropped."""
    from vlax.nn.attention import _cudnn_padded, dot_product_attention

    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, 13, 4, 8))
    k, v = (jax.random.normal(kk, (2, 21, 2, 8)) for kk in keys[1:3])
    mask = jax.random.bernoulli(keys[3], 0.7, (2, 13, 21)).at[:, :, 0].set(True)
    ref = dot_product_attention(q, k, v, mask, implementation="xla")
    got = _cudnn_padded(q, k, v, mask, 8 ** -0.5, implementation="xla")
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-6)
