"""Checkpoints: round trip with JSON items, keep-N, latest-step resume, refusal of unknown items."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlax.train.checkpoint import Checkpointer


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
