"""Fine-tuning transplant: exact copies, listed re-initialisation, named refusals."""

import numpy as np
import pytest

from vlax.train.finetune import transplant


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
