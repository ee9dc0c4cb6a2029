"""π0 and π0.5 presets trained on LeRobot's own v3 dataset (tests/fixtures/lerobot_ds) through experiments/train.py,
then acting from the checkpoint through the one observation pipeline (PolicyRunner).

The models are the tiny openpi sizes with SigLIP reading 28 px frames (a 2 x 2 patch grid), so a few steps run in
seconds; state and actions (4 dims in the dataset) are zero-padded to the 8 the config declares.
"""

from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from experiments.configs import pi0 as pi0_configs

FIXTURE = Path(__file__).parent / "fixtures" / "lerobot_ds"
CAMERAS = (("observation.images.top", "top"), ("observation.images.wrist", "wrist"))


def _config(variant: str, workdir: Path) -> ml_collections.ConfigDict:
    c = pi0_configs.get_config(variant)
    c.workdir = str(workdir)
    c.data.sources = [ml_collections.ConfigDict({**c.data.sources[0].to_dict(), "path": str(FIXTURE),
                                                 "cameras": CAMERAS})]
    c.data.image_size = 28
    c.model.pi0.vision.image_size = 28
    c.data.batch_size, c.data.shuffle_buffer, c.data.action_horizon = 8, 16, 4
    c.train.steps, c.train.save_every, c.train.log_every = 3, 3, 1
    return c


@pytest.mark.parametrize("variant", ["tiny", "tiny_pi05"])
def test_finetune_on_lerobot_fixture_then_act(tmp_path, variant):
    from experiments.train import train
    from vlax.inference import PolicyRunner

    c = _config(variant, tmp_path / "run")
    summary = train(c)
    assert summary["final_step"] == 3 and all(np.isfinite(summary["losses"]))
    runner = PolicyRunner.from_checkpoint(c.workdir)
    assert runner.config.model.preset == c.model.preset and runner.spec.action_dim == 8
    rng = np.random.default_rng(0)
    raw = {"images": {"top": rng.integers(0, 256, (64, 64, 3), np.uint8),
                      "wrist": rng.integers(0, 256, (64, 64, 3), np.uint8)},
           "state": rng.normal(size=4).astype(np.float32), "prompt": "pick up the red cube"}
    actions = runner.infer(raw, rng=jax.random.key(1))
    assert actions.shape == (4, 4) and np.all(np.isfinite(actions))  # the dataset's 4 dims, unpadded
