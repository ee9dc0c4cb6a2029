"""Fine-tuning on an RLDS dataset the Meta-World generator did not make: written here with tfds' own RLDS builder
machinery (``tfds.rlds.rlds_base``), with other key names, two cameras of different sizes, a state made of two keys
and 7-dim actions whose last dim is a gripper; trained from config, the gripper left unnormalized in the saved
artifact, and the checkpoint acts through the one observation pipeline."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.rlds import rlds_base

from train_helpers import tiny_finetune_config
from vlax.checkpoint import Checkpointer, checkpoints_dir
from vlax.data.source_config import DataSourceError, open_source
from vlax.inference import PolicyRunner
from vlax.observation import read_artifacts

EPISODES, LENGTH = 4, 10
INSTRUCTIONS = ["stack the cups", "wipe the table"]


class ArmRlds(tfds.core.GeneratorBasedBuilder):
    """4 episodes of 10 steps of an imaginary 6-joint arm with a gripper."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [rlds_base.DatasetConfig(
        name="arm",
        observation_info=tfds.features.FeaturesDict({
            "wrist_rgb": tfds.features.Image(shape=(48, 48, 3)),
            "scene_rgb": tfds.features.Image(shape=(80, 64, 3)),
            "joint_state": tfds.features.Tensor(shape=(6,), dtype=np.float32),
            "gripper_state": tfds.features.Tensor(shape=(1,), dtype=np.float32),
        }),
        # RLDS's own "action" holds absolute targets here; the policy learns the step's "delta_action".
        action_info=tfds.features.Tensor(shape=(7,), dtype=np.float32),
        reward_info=tfds.features.Tensor(shape=(), dtype=np.float32),
        discount_info=tfds.features.Tensor(shape=(), dtype=np.float32),
        step_metadata_info={"language_instruction": tfds.features.Text(),
                            "delta_action": tfds.features.Tensor(shape=(7,), dtype=np.float32)},
    )]

    def _info(self):
        return rlds_base.build_info(self.builder_config, self)

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(EPISODES):
            # Joint deltas of a few tens of units, a gripper command that is exactly 0 or 1.
            delta = np.concatenate([rng.normal(0, 30, (LENGTH, 6)), (rng.random((LENGTH, 1)) > 0.5)], axis=-1)
            yield f"episode_{i}", {"steps": [{
                "observation": {"wrist_rgb": rng.integers(0, 256, (48, 48, 3), np.uint8),
                                "scene_rgb": rng.integers(0, 256, (80, 64, 3), np.uint8),
                                "joint_state": rng.normal(size=6).astype(np.float32),
                                "gripper_state": rng.random(1).astype(np.float32)},
                "action": np.full(7, 1e4, np.float32), "delta_action": delta[t].astype(np.float32),
                "reward": float(t == LENGTH - 1), "discount": 1.0,
                "is_first": t == 0, "is_last": t == LENGTH - 1, "is_terminal": t == LENGTH - 1,
                "language_instruction": INSTRUCTIONS[i % 2],
            } for t in range(LENGTH)]}


@pytest.fixture(scope="module")
def arm_rlds(tmp_path_factory) -> Path:
    """The dataset's directory above its version directory (``<root>/arm_rlds/arm``)."""
    builder = ArmRlds(data_dir=str(tmp_path_factory.mktemp("arm_rlds")))
    builder.download_and_prepare()
    return Path(builder.data_dir).parent


def arm_source(path: Path) -> dict:
    return {"path": str(path), "cameras": (("wrist_rgb", "wrist"), ("scene_rgb", "scene")),
            "state_keys": ("joint_state", "gripper_state"), "action_keys": ("delta_action",), "gripper_dims": (6,)}


def test_train_on_an_rlds_dataset_of_other_keys_then_act(arm_rlds, tmp_path):
    c = tiny_finetune_config(tmp_path / "run", arm_source(arm_rlds))
    c.data.val_fraction = 0.0
    from experiments.train import train

    summary = train(c)
    assert summary["final_step"] == 3 and all(np.isfinite(summary["losses"]))

    ckpt = Checkpointer(checkpoints_dir(c.workdir))
    (name, artifact), = read_artifacts(ckpt.read_json(3, "normalization")).items()
    ckpt.close()
    assert name == "arm_rlds" and artifact.keys == ("action", "state")
    assert artifact.masks["action"] == (True,) * 6 + (False,)  # the gripper dim is left as it is
    gripper = np.array([[0.0] * 6 + [1.0]], np.float32)
    assert artifact.normalize("action", gripper)[0, 6] == 1.0
    assert artifact.stats["state"]["mean"].__len__() == 7  # joint_state (6) + gripper_state (1)

    runner = PolicyRunner.from_checkpoint(c.workdir)
    assert runner.spec.cameras == ("wrist", "scene") and runner.spec.action_dim == 7 and runner.spec.state_dim == 7
    rng = np.random.default_rng(1)
    raw = {"images": {"wrist": rng.integers(0, 256, (48, 48, 3), np.uint8),
                      "scene": rng.integers(0, 256, (80, 64, 3), np.uint8)},
           "state": rng.normal(size=7).astype(np.float32), "prompt": "stack the cups"}
    actions = runner.infer(raw)
    assert actions.shape == (4, 7) and np.all(np.isfinite(actions))
    # Joint dims come back in the data's units (tens), not in normalized units.
    assert np.abs(actions[:, :6]).max() > 3.0


def test_rlds_camera_map_naming_a_missing_key_lists_the_image_keys(arm_rlds):
    entry = {**arm_source(arm_rlds), "cameras": (("front_rgb", "front"),)}
    with pytest.raises(DataSourceError, match=r"'front_rgb'.*image keys are \['scene_rgb', 'wrist_rgb'\]"):
        open_source(entry)


def test_rlds_cameras_default_to_every_image_feature_when_none_is_named_image_(arm_rlds):
    entry = {k: v for k, v in arm_source(arm_rlds).items() if k != "cameras"}
    source = open_source(entry)
    assert source.image_keys == {"scene_rgb": "scene_rgb", "wrist_rgb": "wrist_rgb"}


def test_model_action_dim_different_from_the_data_is_an_error_before_training(arm_rlds, tmp_path):
    c = tiny_finetune_config(tmp_path / "run", arm_source(arm_rlds))
    c.model.action_dim = 8
    from experiments.train import train

    with pytest.raises(ValueError, match=r"model\.action_dim=8 but the data's action has 7 dims"):
        train(c)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
