"""Fine-tuning transplant: exact copies, listed re-initialisation, named refusals."""

import numpy as np
import pytest

from vlax.train.finetune import transplant

pytestmark = pytest.mark.eight_devices  # sharding layouts over an 8-device mesh


def test_transplant_copies_and_reinitialises_exactly_what_the_regex_names():
    old = {"backbone": {"w": np.ones((4, 4))}, "head": {"out": np.ones((4, 7))}}
    new = {"backbone": {"w": np.zeros((4, 4))}, "head": {"out": np.zeros((4, 4)), "extra": np.zeros(3)}}
    params, reinit, unused = transplant(new, old, reinit=r"^head/")
    np.testing.assert_array_equal(params["backbone"]["w"], np.ones((4, 4)))
    np.testing.assert_array_equal(params["head"]["out"], np.zeros((4, 4)))
    assert reinit == ["head/extra", "head/out"] and unused == ["head/out"]


def test_shape_mismatch_and_missing_are_refused_by_name():
    old = {"head": {"out": np.ones((4, 7))}}
    new = {"head": {"out": np.zeros((4, 4))}, "state_proj": {"kernel": np.zeros((4, 8))}}
    with pytest.raises(ValueError) as e:
        transplant(new, old)
    msg = str(e.value)
    assert "head/out: checkpoint (4, 7) vs model (4, 4)" in msg
    assert "state_proj/kernel (4, 8) is not in the checkpoint" in msg and "finetune.reinit" in msg


# ---- sharded placement (8 forced CPU devices) ----------------------------------------------------------------------

import jax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from vlax.train.finetune import place_array, place_on_shardings, transplant_sharded  # noqa: E402
from vlax.train.sharding import make_mesh  # noqa: E402


class LazyArray:
    """A source read by slices, recording each slice asked for (as a memory-mapped checkpoint would be read)."""

    def __init__(self, value):
        self.value, self.shape, self.dtype, self.reads = value, value.shape, value.dtype, []

    def __getitem__(self, index):
        self.reads.append(index)
        return self.value[index]


def test_place_array_reads_only_each_devices_slice():
    mesh = make_mesh(1, 4, 2)
    value = np.arange(8 * 6, dtype=np.float64).reshape(8, 6)
    lazy = LazyArray(value)
    x = place_array(lazy, NamedSharding(mesh, P("fsdp", "tensor")), np.float32)
    np.testing.assert_array_equal(np.asarray(x), value.astype(np.float32))
    assert x.dtype == np.float32 and x.sharding.spec == P("fsdp", "tensor")
    assert {tuple((s.start, s.stop) for s in idx) for idx in lazy.reads} == {
        ((r, r + 2), (c, c + 3)) for r in range(0, 8, 2) for c in (0, 3)}  # eight eighths, never the whole
    with np.testing.assert_raises_regex(ValueError, r"w: source \(8, 6\) vs target \(6, 8\)"):
        place_array(value, NamedSharding(mesh, P()), name="w", shape=(6, 8))


def test_transplant_sharded_places_copies_keeps_reinit_and_calls_only_used_loaders():
    mesh = make_mesh(1, 4, 2)
    sharded = NamedSharding(mesh, P("fsdp", "tensor"))
    target = {"backbone": {"w": jax.device_put(np.zeros((8, 4), np.float32), sharded),
                           "b": jax.device_put(np.zeros(4, np.float32), NamedSharding(mesh, P()))},
              "head": {"out": jax.device_put(np.full((4, 2), 7, np.float32), NamedSharding(mesh, P("fsdp")))}}
    calls = []

    def loader(name, value):
        def load():
            calls.append(name)
            return value
        return load

    source = {"backbone/w": LazyArray(np.ones((8, 4), np.float64)),        # flat names, lazy slices
              "backbone/b": loader("b", np.arange(4, dtype=np.float16)),  # a loader (shape known on load)
              "head/out": loader("head", np.ones((4, 7), np.float32)),    # re-initialised: never loaded
              "old_head/kernel": loader("old", np.ones(3))}
    params, reinit, unused = transplant_sharded(target, source, reinit=r"^head/")
    np.testing.assert_array_equal(np.asarray(params["backbone"]["w"]), np.ones((8, 4), np.float32))
    np.testing.assert_array_equal(np.asarray(params["backbone"]["b"]), np.arange(4, dtype=np.float32))
    assert params["head"]["out"] is target["head"]["out"]
    assert params["backbone"]["w"].sharding == sharded and params["backbone"]["b"].dtype == np.float32
    assert calls == ["b"] and reinit == ["head/out"] and unused == ["head/out", "old_head/kernel"]
    # problems known without loading are reported together; a loader's wrong shape is named when loaded
    with np.testing.assert_raises_regex(ValueError, r"(?s)backbone/w: checkpoint \(4, 4\) vs model \(8, 4\).*"
                                                     r"head/out \(4, 2\) is not in the checkpoint"):
        transplant_sharded(target, {"backbone": {"w": np.ones((4, 4)), "b": np.ones(4)}})
    with np.testing.assert_raises_regex(ValueError, r"backbone/b: source \(5,\) vs target \(4,\)"):
        transplant_sharded(target, {"backbone/w": np.ones((8, 4)), "backbone/b": lambda: np.ones(5)},
                           reinit="^head/")
    # a whole tree laid out from loaders, one array after another
    tree = place_on_shardings({"a": lambda: np.ones((8, 2)), "b": np.zeros(3)},
                              {"a": sharded, "b": NamedSharding(mesh, P())})
    assert tree["a"].sharding == sharded and np.asarray(tree["a"]).sum() == 16


def test_a_lora_model_starts_from_a_plain_checkpoint():
    # vlax.nn.apply_lora moves a Dense's weights under base/ and adds lora_a / lora_b: the plain checkpoint fills
    # base/, the adapters keep their fresh values (lora_b = 0: the model computes what the checkpoint did)
    old = {"backbone": {"q_proj": {"kernel": np.full((4, 6), 2.0)}, "norm": {"scale": np.ones(4)}}}
    new = {"backbone": {"q_proj": {"base": {"kernel": np.zeros((4, 6))}, "lora_a": np.full((4, 2), 0.5),
                                   "lora_b": np.zeros((2, 6))}, "norm": {"scale": np.zeros(4)}}}
    params, reinit, unused = transplant(new, old)
    np.testing.assert_array_equal(params["backbone"]["q_proj"]["base"]["kernel"], np.full((4, 6), 2.0))
    np.testing.assert_array_equal(params["backbone"]["q_proj"]["lora_a"], np.full((4, 2), 0.5))
    assert reinit == ["backbone/q_proj/lora_a", "backbone/q_proj/lora_b"] and unused == []
    sharding = NamedSharding(make_mesh(1, 1, 1, devices=jax.devices()[:1]), P())
    target = jax.tree.map(lambda x: jax.device_put(x, sharding), new)
    placed, reinit, unused = transplant_sharded(target, old)
    np.testing.assert_array_equal(np.asarray(placed["backbone"]["q_proj"]["base"]["kernel"]), np.full((4, 6), 2.0))
    assert reinit == ["backbone/q_proj/lora_a", "backbone/q_proj/lora_b"] and unused == []
