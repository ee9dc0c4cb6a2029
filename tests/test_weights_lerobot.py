"""One entry point for LeRobot policy directories: each supported type comes back as (policy, pipeline) that acts
from a raw observation; other types are refused with the list."""

import json

import jax
import numpy as np
import pytest

from lerobot_refs import policy_dir
from vlax.weights.common import CheckpointError
from vlax.weights.lerobot import load_lerobot


@pytest.mark.parametrize("name", ["act", "diffusion"])
def test_load_lerobot_acts_from_a_raw_observation(name, tmp_path):
    policy, pipeline = load_lerobot(policy_dir(name, tmp_path))
    history = getattr(policy.spec, "obs_history", 1)
    shape = (1, history) if history > 1 else (1,)
    rng = np.random.default_rng(0)
    raw = {"images": {c: rng.integers(0, 256, (*shape, 64, 64, 3), np.uint8) for c in policy.spec.cameras},
           "state": rng.normal(size=(*shape, 4)).astype(np.float32), "prompt": [""]}
    actions = pipeline.actions(policy.sample(pipeline.model_inputs(raw), rngs=jax.random.key(0)))
    assert actions.shape == (1, policy.spec.horizon, 4) and np.all(np.isfinite(actions))


def test_unsupported_type_lists_the_supported_ones(tmp_path):
    path = policy_dir("act", tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "type": "vqbet"}))
    with pytest.raises(CheckpointError, match=r"type 'vqbet'.*\['act', 'diffusion', 'pi0', 'pi05', 'smolvla'\]"):
        load_lerobot(path)
