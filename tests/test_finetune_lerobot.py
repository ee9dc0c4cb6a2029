"""Fine-tuning on a LeRobot v3 dataset that LeRobot itself wrote (tests/fixtures/lerobot_ds: 3 episodes, a video
camera "top" and a PNG camera "wrist" at 64 px, state [4], action [4]), from the finetune config with one path
override, then acting with the trained checkpoint through the one observation pipeline and measuring open-loop
error on the held-out episodes; the trainer's own validation metrics land in metrics.jsonl."""

from pathlib import Path

import jax
import numpy as np
import pytest

from train_helpers import tiny_finetune_config
from vlax.data import DataConfig, build_pipeline
from vlax.data.pipeline import episode_bucket
from vlax.data.source_config import open_source
from vlax.eval.open_loop import open_loop_metrics
from vlax.inference import PolicyRunner
from vlax.train.metrics import read_metrics

FIXTURE = Path(__file__).parent / "fixtures" / "lerobot_ds"
CAMERAS = (("observation.images.top", "top"), ("observation.images.wrist", "wrist"))  # as a config spells it


def val_fraction_holding_out_one(source) -> float:
    """A val_fraction between the smallest and the next episode bucket: exactly one episode is held out."""
    buckets = sorted(float(episode_bucket(t)) for t in source.trajectories(0, 1, shuffle=False))
    assert buckets[1] > buckets[0]
    return (buckets[0] + buckets[1]) / 2


def test_train_on_lerobot_fixture_then_act_and_validate(tmp_path):
    source = open_source({"kind": "auto", "path": str(FIXTURE), "cameras": CAMERAS})
    val_fraction = val_fraction_holding_out_one(source)
    c = tiny_finetune_config(tmp_path / "run", {"path": str(FIXTURE), "cameras": CAMERAS})
    c.data.val_fraction, c.data.val_every, c.data.val_batches = val_fraction, 3, 1

    from experiments.train import train

    summary = train(c)
    assert summary["final_step"] == 3 and all(np.isfinite(summary["losses"]))
    val = [m for m in read_metrics(c.workdir) if "val/lerobot_ds/action_mse" in m]
    assert [m["step"] for m in val] == [3] and np.isfinite(val[0]["val/lerobot_ds/action_mse"])

    runner = PolicyRunner.from_checkpoint(c.workdir)
    assert runner.spec.cameras == ("top", "wrist") and runner.spec.action_dim == 4
    rng = np.random.default_rng(0)
    raw = {"images": {"top": rng.integers(0, 256, (64, 64, 3), np.uint8),
                      "wrist": rng.integers(0, 256, (48, 80, 3), np.uint8)},  # any size: resized by the pipeline
           "state": rng.normal(size=4).astype(np.float32), "prompt": "pick up the red cube"}
    key = jax.random.key(1)
    actions = runner.infer(raw, rng=key)
    assert actions.shape == (4, 4) and actions.dtype == np.float32 and np.all(np.isfinite(actions))
    # Dataset units: the model's normalized chunk times the data's own std plus its mean ("normal" artifact).
    batched = {"images": {k: v[None] for k, v in raw["images"].items()}, "state": raw["state"][None],
               "prompt": [raw["prompt"]]}
    normalized = np.asarray(runner.sample_normalized(runner.pipeline.model_inputs(batched), key))[0]
    stats = runner.artifact.stats["action"]
    np.testing.assert_allclose(actions, normalized * (np.asarray(stats["std"]) + 1e-8) + np.asarray(stats["mean"]),
                               rtol=1e-5, atol=1e-6)

    val_config = DataConfig(batch_size=4, action_horizon=4, image_size=32, normalization="normal", train=False,
                            split="val", val_fraction=val_fraction, drop_remainder=False)
    val_batches = build_pipeline([source], val_config, tokenize=runner.pipeline.tokenize)
    names = {n for b in val_batches for n in b["dataset_name"]}
    assert names == {b"lerobot_ds"}
    metrics = open_loop_metrics(runner, iter(val_batches), 2)
    assert metrics["num_batches"] >= 1 and metrics["num_values"] > 0
    assert np.isfinite(metrics["action_mse"]) and np.isfinite(metrics["action_l1"])


@pytest.mark.parametrize("bad", [{"cameras": {"observation.images.side": "side"}}])
def test_camera_map_naming_a_missing_key_lists_the_image_keys(bad):
    from vlax.data.source_config import DataSourceError

    with pytest.raises(DataSourceError, match=r"observation\.images\.side.*observation\.images\.top.*"
                                              r"observation\.images\.wrist"):
        open_source({"kind": "lerobot", "path": str(FIXTURE), **bad})
