"""Backbone API: named configs, remat policies, logical axes, Gemma's embedding scale, soft-capping, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from vlax.backbones import TokenEmbed, Transformer, TransformerConfig, get_config
from vlax.nn import logical_axes_of

pytestmark = pytest.mark.eight_devices  # sharding layouts over an 8-device mesh

TOL = 1e-5


def test_unknown_config_name_and_field_are_refused():
    with pytest.raises(ValueError, match=r"unknown backbone config 'llama9'; known: \[.*'gemma_2b'.*'tiny'\]"):
        get_config("llama9")
    with pytest.raises(ValueError, match=r"unknown TransformerConfig field\(s\) \['heads'\]"):
        get_config("tiny", heads=3)
    with pytest.raises(ValueError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
        get_config("tiny", num_kv_heads=3)
    with pytest.raises(ValueError, match=r"unknown remat policy 'everything'; known"):
        get_config("tiny", remat="everything")
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        get_config("tiny", act="tanh")


@pytest.fixture(scope="module")
def tiny():
    return Transformer(get_config("tiny", depth=3), rngs=nnx.Rngs(0))


def test_remat_policies_give_same_loss_and_gradients():
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, size=(2, 6)), jnp.int32)

    def loss_with(remat):
        # Same seed, same parameters; only the rematerialisation policy differs.
        graphdef, state = nnx.split(Transformer(get_config("tiny", remat=remat), rngs=nnx.Rngs(0)))

        def loss(params):
            logits = nnx.merge(graphdef, params)(tokens, return_logits=True).logits
            return jnp.mean(jax.nn.log_softmax(logits)[..., 0])
        return jax.jit(jax.value_and_grad(loss))(state)

    ref_loss, ref_grads = loss_with("none")
    value, grads = loss_with("full")
    assert abs(float(value - ref_loss)) <= TOL
    worst = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), grads, ref_grads)))
    assert worst <= TOL


def test_parameters_carry_logical_axes(tiny):
    axes = {".".join(map(str, path)): logical_axes_of(var)
            for path, var in nnx.to_flat_state(nnx.state(tiny, nnx.Param))}
    assert axes["embed_tokens.embedding"] == ("vocab", "embed")
    assert axes["layers.self_attn.q_proj.kernel"] == ("layers", "embed", "heads")
    assert axes["layers.self_attn.k_proj.kernel"] == ("layers", "embed", "kv")
    assert axes["layers.mlp.down_proj.kernel"] == ("layers", "mlp", "embed")
    assert axes["lm_head.kernel"] == ("embed", "vocab")
    assert axes["norm.scale"] == ("embed",)


def test_gemma_embedding_scale_is_rounded_like_transformers():
    """sqrt(3072) is 55.43 in float32 but 55.5 in bfloat16: HF multiplies by the scale in the weight dtype."""
    from transformers.models.gemma.modeling_gemma import GemmaTextScaledWordEmbedding

    width = 3072
    ref = GemmaTextScaledWordEmbedding(3, width, padding_idx=0, embed_scale=width ** 0.5).to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(3, width).to(torch.bfloat16))
        expected = ref(torch.tensor([[0, 2, 1]])).float().numpy()
    ours = TokenEmbed(3, width, scaled=True, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ours.embedding.set_value(jnp.asarray(ref.weight.detach().float().numpy(), jnp.bfloat16))
    got = np.asarray(ours(jnp.asarray([[0, 2, 1]])).astype(jnp.float32))
    np.testing.assert_array_equal(got, expected)
    assert np.asarray(jnp.asarray(width ** 0.5, jnp.bfloat16), np.float32) == 55.5


def test_final_softcap_bounds_logits():
    config = get_config("tiny", final_softcap=2.0, attn_softcap=5.0)
    model = Transformer(config, rngs=nnx.Rngs(1))
    uncapped = Transformer(get_config("tiny", attn_softcap=5.0), rngs=nnx.Rngs(1))
    hidden = 30.0 * jax.random.normal(jax.random.key(0), (1, 3, 64))
    capped = model.logits(hidden)
    np.testing.assert_allclose(np.asarray(capped), np.asarray(2.0 * jnp.tanh(uncapped.logits(hidden) / 2.0)),
                               atol=TOL)
    assert float(jnp.max(jnp.abs(capped))) <= 2.0


def test_pure_function_jit_over_split_state(tiny):
    """The hot-path pattern: jax.jit over (graphdef, state), no object-graph walk per call."""
    graphdef, state = nnx.split(tiny)
    tokens = jnp.ones((1, 4), jnp.int32)

    @jax.jit
    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens, return_logits=True, cache_size=6)

    out = forward(state, tokens)
    assert out.logits.shape == (1, 4, 256) and out.cache.k.shape == (3, 1, 6, 2, 16)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(tiny(tokens, return_logits=True).logits),
                               atol=TOL)


def test_bad_inputs_get_one_clear_error(tiny):
    tokens = jnp.ones((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="pass tokens"):
        tiny()
    with pytest.raises(ValueError, match=r"input_mask must have shape \[2, 4\] \(batch, inputs\), got \[2, 5\]"):
        tiny(tokens, input_mask=jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match=r"embeds must be \[B, P, 64\] \(the backbone width\), got shape \(2, 3, 32\)"):
        tiny(tokens, jnp.zeros((2, 3, 32)))
    with pytest.raises(ValueError, match=r"ar_mask must be \[4\] or \[2, 4\], got shape \(3,\)"):
        tiny(tokens, ar_mask=jnp.ones(3))
    with pytest.raises(ValueError, match="cache_size=3 is shorter than the 4 inputs"):
        tiny(tokens, cache_size=3)
    with pytest.raises(TypeError, match="token ids must be integers, got dtype float32"):
        tiny.embed_tokens(jnp.ones((2, 4)))
    with pytest.raises(TypeError, match="config must be a TransformerConfig"):
        Transformer({"width": 64}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="TransformerConfig.width must be a positive int, got 0"):
        TransformerConfig(vocab_size=8, width=0, depth=1, mlp_dim=8, num_heads=1, num_kv_heads=1, head_dim=8)


def test_sharded_prefill_and_decode_equal_unsharded(tiny):
    """Logical axes are enough to shard the backbone (2 data x 2 fsdp x 2 tensor on 8 CPU devices)."""
    from jax.sharding import NamedSharding, PartitionSpec

    from vlax.train.sharding import batch_sharding, make_mesh, state_shardings

    mesh = make_mesh(2, 2, 2)
    graphdef, state = nnx.split(tiny)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 256, size=(4, 5)), jnp.int32)

    @jax.jit
    def prefill_and_step(state, tokens):
        model = nnx.merge(graphdef, state)
        out = model(tokens, return_logits=True, cache_size=6)
        step = model.decode_step(jnp.argmax(out.logits[:, -1:], -1).astype(jnp.int32), out.cache)
        return out.logits, step.logits

    expected = prefill_and_step(state, tokens)
    sharded = jax.device_put(state, state_shardings(state, mesh, fsdp_min_bytes=1))
    assert sharded["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    got = prefill_and_step(sharded, jax.device_put(tokens, batch_sharding(mesh, 2)))
    assert isinstance(got[1].sharding, NamedSharding)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=TOL)
