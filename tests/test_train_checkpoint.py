"""Checkpoints: round trip with JSON items, keep-N, latest-step resume, refusal of unknown items."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlax.checkpoint import Checkpointer

pytestmark = pytest.mark.eight_devices  # sharding layouts over an 8-device mesh


def _state(seed):
    k = jax.random.key(seed)
    return {"params": {"w": jax.random.normal(k, (3, 4)), "b": jnp.arange(4.0)}, "step": jnp.asarray(seed)}


def test_round_trip_keep_n_and_latest(tmp_path):
    ckpt = Checkpointer(tmp_path / "run", max_to_keep=2)
    assert ckpt.restore_latest(_state(0)) is None
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), config={"model": {"head": "flow"}}, normalization={"type": "bounds"},
                  data={"epoch": 0, "position": step * 8})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    step, state, meta = ckpt.restore_latest(_state(0))
    assert step == 3
    jax.tree.map(np.testing.assert_array_equal, state, _state(3))
    assert meta["config"] == {"model": {"head": "flow"}} and meta["data"]["position"] == 24
    assert ckpt.read_json(None, "normalization") == {"type": "bounds"}
    ckpt.close()


def test_unknown_item_is_refused(tmp_path):
    ckpt = Checkpointer(tmp_path / "run")
    with pytest.raises(ValueError, match=r"unknown checkpoint items \['optimiser'\]; known: \['config'"):
        ckpt.save(1, _state(1), optimiser={})
    ckpt.close()


def test_raw_restore_lands_on_one_device_whatever_saved_it(tmp_path):
    """A state sharded over 8 devices (as on a pod) comes back whole on one device, values unchanged."""
    from jax.sharding import NamedSharding, PartitionSpec

    from vlax.train.sharding import make_mesh

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    state = {"params": {"w": jax.random.normal(jax.random.key(0), (8, 4)), "b": jnp.arange(4.0)}}
    sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
                                                    if x.ndim == 2 else NamedSharding(mesh, PartitionSpec())), state)
    ckpt = Checkpointer(tmp_path / "run")
    ckpt.save(1, sharded)
    ckpt.wait()
    raw = ckpt.restore_raw(1)
    ckpt.close()
    for got, want in zip(jax.tree.leaves(raw), jax.tree.leaves(state)):
        assert len(got.sharding.device_set) == 1
        np.testing.assert_array_equal(got, want)
