"""Flamingo's pieces against numpy written from the paper's equations (Alayrac et al. 2022, figures 4 and 5):
the perceiver resampler, the tanh-gated cross-attention dense block, and the LM with blocks inserted every n
layers, which equals its plain LM exactly while the gates are zero. fp32 tolerance 1e-5."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from vlax.backbones import Transformer, get_config
from vlax.backbones.flamingo import FlamingoLM, GatedCrossAttentionBlock
from vlax.encoders.perceiver import PerceiverResampler
from vlax.weights.common import to_numpy_flat

ATOL = 1e-5


# ---- numpy reference (the paper's equations) ----------------------------------------------------------------------

def layer_norm(x, scale, bias, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def attention(q_in, kv_in, wq, wk, wv, wo, heads, mask=None):
    """softmax(Q K^T / sqrt(d)) V per head, then the output projection (bias-free)."""
    def split(x):
        return x.reshape(*x.shape[:-1], heads, -1).swapaxes(-2, -3)  # [B, H, T, d]
    q, k, v = split(q_in @ wq), split(kv_in @ wk), split(kv_in @ wv)
    logits = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask[:, None, None, :], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    out = (p @ v).swapaxes(-2, -3)
    return out.reshape(*out.shape[:-2], -1) @ wo


def ffw(x, ln_scale, ln_bias, w1, w2):
    return gelu(layer_norm(x, ln_scale, ln_bias) @ w1) @ w2


def perceiver_reference(p, media, depth, heads):
    """Figure 5: latents attend to concat(media, latents); residual attention then residual FFW; final norm."""
    x = np.broadcast_to(p["latents"], (media.shape[0], *p["latents"].shape))
    for i in range(depth):
        g = lambda name: p[f"layers.{name}"][i]  # noqa: E731
        q = layer_norm(x, g("norm_latents.scale"), g("norm_latents.bias"))
        kv = np.concatenate([layer_norm(media, g("norm_media.scale"), g("norm_media.bias")), q], axis=1)
        x = x + attention(q, kv, g("attn.q_proj.kernel"), g("attn.k_proj.kernel"), g("attn.v_proj.kernel"),
                          g("attn.o_proj.kernel"), heads)
        x = x + ffw(x, g("ff_norm.scale"), g("ff_norm.bias"), g("ff.fc1.kernel"), g("ff.fc2.kernel"))
    return layer_norm(x, p["norm.scale"], p["norm.bias"])


def gated_xattn_reference(p, y, media, heads, mask=None):
    """Figure 4: y += tanh(a_xattn) * attn(q=y, kv=media); y += tanh(a_dense) * ffw(y)."""
    h = attention(layer_norm(y, p["norm.scale"], p["norm.bias"]), media, p["attn.q_proj.kernel"],
                  p["attn.k_proj.kernel"], p["attn.v_proj.kernel"], p["attn.o_proj.kernel"], heads, mask)
    y = y + np.tanh(p["attn_gate"][0]) * h
    return y + np.tanh(p["ff_gate"][0]) * ffw(y, p["ff_norm.scale"], p["ff_norm.bias"], p["ff.fc1.kernel"],
                                              p["ff.fc2.kernel"])


def _randomize(module, seed=0, scale=0.3):
    """A copy of ``module`` with every parameter (the zero gates included) replaced by random values."""
    graphdef, state = nnx.split(module)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(scale * rng.normal(size=x.shape), x.dtype) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


@functools.partial(jax.jit, static_argnums=0)
def _call(graphdef, state, *args):
    return nnx.merge(graphdef, state)(*args)


def _run(module, *args):
    """``module(*args)``, compiled once per module structure and argument shapes."""
    graphdef, state = nnx.split(module)
    return _call(graphdef, state, *args)


# ---- tests --------------------------------------------------------------------------------------------------------

def test_perceiver_resampler_matches_figure_5():
    resampler = _randomize(PerceiverResampler(32, depth=2, num_latents=5, num_heads=2, head_dim=8,
                                              rngs=nnx.Rngs(0)))
    media = np.random.default_rng(0).normal(size=(3, 11, 32)).astype(np.float32)
    out = np.asarray(_run(resampler, jnp.asarray(media)))
    ref = perceiver_reference(to_numpy_flat(resampler), media.astype(np.float64), depth=2, heads=2)
    assert out.shape == (3, 5, 32)
    assert np.abs(out - ref).max() <= ATOL


def test_perceiver_resampler_published_size():
    """OpenFlamingo's resampler at 1024 wide: 64 latents, 6 layers of 8 x 64 heads; 63,019,008 parameters (6 x
    (2 norms + q 1024x512 + k, v 1024x512 + out 512x1024 + FFW 1024x4096x1024 with its norm) + latents + norm)."""
    resampler = nnx.eval_shape(lambda: PerceiverResampler(rngs=nnx.Rngs(0)))
    assert resampler.num_latents == 64 and resampler.latents.shape == (64, 1024)
    per_layer = 2 * 2048 + 4 * 1024 * 512 + 2048 + 2 * 1024 * 4096
    assert sum(int(np.prod(v.shape)) for v in to_shapes(resampler)) == 6 * per_layer + 64 * 1024 + 2048 == 63_019_008


def to_shapes(module):
    return [v.get_value() for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param))]


def test_gated_cross_attention_matches_figure_4_and_starts_closed():
    block = GatedCrossAttentionBlock(16, 12, num_heads=2, head_dim=8, rngs=nnx.Rngs(0))
    assert float(block.attn_gate[0]) == 0.0 and float(block.ff_gate[0]) == 0.0
    rng = np.random.default_rng(1)
    y = rng.normal(size=(2, 7, 16)).astype(np.float32)
    media = rng.normal(size=(2, 9, 12)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(_run(block, jnp.asarray(y), jnp.asarray(media))), y)  # tanh(0) = 0
    block = _randomize(block, seed=3)
    mask = np.arange(9)[None] < np.array([[9], [4]])
    out = np.asarray(_run(block, jnp.asarray(y), jnp.asarray(media), jnp.asarray(mask)))  # masked media
    ref = gated_xattn_reference(to_numpy_flat(block), y.astype(np.float64), media.astype(np.float64), 2, mask)
    assert np.abs(out - ref).max() <= ATOL


@pytest.fixture(scope="module")
def lms():
    """One 4-layer LM and FlamingoLMs over it with a block every layer and every 2nd layer."""
    lm = Transformer(get_config("tiny", depth=4, vocab_size=64), rngs=nnx.Rngs(0))
    return lm, {n: FlamingoLM(lm, media_width=12, cross_attn_every=n, num_heads=2, head_dim=8, rngs=nnx.Rngs(1))
                for n in (1, 2)}


TOKENS = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 6)), jnp.int32)
MEDIA = np.random.default_rng(3).normal(size=(2, 5, 12)).astype(np.float32)


@pytest.mark.parametrize("every", [1, 2])
def test_fresh_flamingo_lm_equals_its_plain_lm_exactly(lms, every):
    lm, flamingo = lms[0], lms[1][every]
    assert flamingo.gated_cross_attn_layers.attn_gate.shape == (4 // every, 1)
    plain = _run(lm, TOKENS).hidden
    gated = _run(flamingo, TOKENS, jnp.asarray(MEDIA)).hidden
    np.testing.assert_array_equal(np.asarray(gated), np.asarray(plain))


def test_blocks_sit_before_every_nth_layer(lms):
    """With open gates the LM equals: layer 0, block 0, layer 1, layer 2, block 1, layer 3 (n = 2), i.e. a block
    before layer i when (i + 1) % n == 0; composed here from the LM's own layers and the reference block."""
    flamingo = _randomize(lms[1][2], seed=5, scale=0.1)
    out = np.asarray(_run(flamingo, TOKENS, jnp.asarray(MEDIA)).hidden)
    assert np.abs(out - np.asarray(_run(flamingo.lm, TOKENS).hidden)).max() > 1e-3  # the blocks act

    blocks = to_numpy_flat(flamingo.gated_cross_attn_layers)
    graphdef, state = nnx.split(flamingo.lm.layers)
    mask = jnp.tril(jnp.ones((1, 6, 6), bool))
    positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
    layer_call = jax.jit(lambda st, h: nnx.merge(graphdef, st)(h, mask=mask, positions=positions)[0])
    h = np.asarray(flamingo.lm.embed_tokens(TOKENS))
    for i in range(4):
        if (i + 1) % 2 == 0:
            h = gated_xattn_reference({k: v[i // 2] for k, v in blocks.items()}, h.astype(np.float64),
                                      MEDIA.astype(np.float64), 2).astype(np.float32)
        h = np.asarray(layer_call(jax.tree.map(lambda a: a[i], state), jnp.asarray(h)))
    ref = np.asarray(flamingo.lm.norm(jnp.asarray(h)))
    assert np.abs(out - ref).max() <= ATOL


def test_depth_must_be_a_multiple_of_the_interval(lms):
    with pytest.raises(ValueError, match="cross_attn_every=3 must be >= 1 and divide the LM's 4 layers"):
        FlamingoLM(lms[0], media_width=12, cross_attn_every=3, rngs=nnx.Rngs(0))
