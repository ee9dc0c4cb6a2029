"""Logical-axis sharding on 8 forced CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import vlax.nn as vn
from vlax.train import make_mesh, spec_for, state_shardings

pytestmark = pytest.mark.eight_devices  # sharding layouts over an 8-device mesh


def test_mesh_shapes_and_errors():
    assert dict(make_mesh(2, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(-1, 4).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    with pytest.raises(ValueError, match="mesh data=3 x fsdp=2 x tensor=2 = 12 does not match the 8 devices"):
        make_mesh(3, 2, 2)


def test_rules_then_fsdp_on_largest_free_axis():
    mesh = make_mesh(2, 2, 2)
    # tensor rule on 'mlp'; fsdp on the largest remaining axis because 2048*1024*4 B = 8 MiB >= 4 MiB.
    assert spec_for((1024, 2048), ("embed", "mlp"), mesh) == P("fsdp", "tensor")
    # Small arrays are only tensor-sharded.
    assert spec_for((64, 128), ("embed", "mlp"), mesh) == P(None, "tensor")
    # A stacked kernel: the layers axis is never split, fsdp goes to the largest free axis.
    assert spec_for((24, 4096, 1024), ("layers", "mlp", "embed"), mesh) == P(None, "tensor", "fsdp")
    # An axis the mesh does not divide stays replicated.
    assert spec_for((7, 64), ("heads", "embed"), mesh) == P(None, None)


def test_sharded_forward_equals_unsharded():
    mesh = make_mesh(2, 2, 2)
    layers = vn.stack_layers(lambda r: vn.DecoderBlock(64, 4, 2, 16, 256, rngs=r), 2, nnx.Rngs(0))
    graphdef, state = nnx.split(layers)
    x = jax.random.normal(jax.random.key(1), (8, 6, 64))
    pos = jnp.broadcast_to(jnp.arange(6), (8, 6))
    mask = vn.make_attn_mask(jnp.ones((8, 6), bool), jnp.ones(6))

    def forward(state, x):
        out, _ = vn.scan_layers(nnx.merge(graphdef, state), lambda l, h, _: l(h, mask=mask, positions=pos), x)
        return out

    expected = jax.jit(forward)(state, x)
    shardings = state_shardings(state, mesh, fsdp_min_bytes=1)  # force FSDP on every array
    sharded = jax.device_put(state, shardings)
    assert sharded["mlp"]["gate_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    out = jax.jit(forward)(sharded, jax.device_put(x, jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))))
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)
