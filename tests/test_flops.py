"""The jaxpr FLOP count equals hand counts, including scanned layers (which XLA's cost analysis counts once)."""

import jax
import jax.numpy as jnp
from flax import nnx

from vlax.backbones import Transformer, get_config
from vlax.train.flops import count_flops


def test_matmul_scan_conv():
    assert count_flops(lambda a, b: a @ b, jnp.ones((64, 128)), jnp.ones((128, 32))) == 2 * 64 * 128 * 32
    scanned = lambda x, ws: jax.lax.scan(lambda c, w: (c @ w, None), x, ws)[0]  # noqa: E731
    assert count_flops(scanned, jnp.ones((8, 16)), jnp.ones((24, 16, 16))) == 24 * 2 * 8 * 16 * 16
    conv = lambda x, k: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert count_flops(conv, jnp.ones((2, 32, 32, 3)), jnp.ones((3, 3, 3, 16))) == 2 * 2 * 16 * 16 * 16 * 3 * 9


def test_backbone_forward_matches_analytic_count():
    b, t, d, layers, mlp, vocab, heads, kv, hd = 2, 64, 128, 8, 256, 512, 4, 2, 32
    cfg = get_config("tiny", width=d, depth=layers, mlp_dim=mlp, num_heads=heads, num_kv_heads=kv, head_dim=hd,
                     vocab_size=vocab)
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    flops = count_flops(lambda s, ids: nnx.merge(graphdef, s)(ids, return_logits=True).logits, state,
                        jnp.ones((b, t), jnp.int32))
    projections = 2 * b * t * (d * heads * hd + 2 * d * kv * hd + heads * hd * d)
    mlp_flops = 2 * b * t * 3 * d * mlp
    attention = 2 * 2 * b * heads * t * t * hd
    assert flops == layers * (projections + mlp_flops + attention) + 2 * b * t * d * vocab
