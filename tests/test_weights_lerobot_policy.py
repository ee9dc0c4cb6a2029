"""LeRobot policy directories: the processor statistics read into vlax's normalization reproduce LeRobot's own
preprocessed batch, for every normalization mode the references use, and bad directories are one clear error."""

import json
import shutil

import numpy as np
import pytest

from lerobot_refs import fixture, policy_dir, reference
from vlax.weights.common import CheckpointError
from vlax.weights.lerobot_policy import normalize_pixels, read_normalization, read_policy_dir

# fixture -> (vlax normalization type, images normalized)
MODES = {"act": ("normal", True), "diffusion": ("min_max", True), "smolvla": ("normal", False),
         "pi0": ("normal", False), "pi05": ("bounds", False)}


@pytest.mark.parametrize("name", sorted(MODES))
def test_statistics_reproduce_lerobots_preprocessed_batch(name):
    artifact, pixel_stats = read_normalization(fixture(name))
    inputs, _, _ = reference(name)
    kind, images_normalized = MODES[name]
    assert artifact.type == kind
    for key, feature in (("state", "observation.state"), ("action", "action")):
        got = artifact.normalize(key, inputs[f"raw/{feature}"])
        np.testing.assert_allclose(got, inputs[f"preprocessed/{feature}"], rtol=0, atol=2e-6, err_msg=key)
        back = artifact.unnormalize(key, inputs[f"preprocessed/{feature}"])
        np.testing.assert_allclose(back, inputs[f"raw/{feature}"], rtol=0, atol=2e-6, err_msg=key)
    for feature, stats in pixel_stats.items():
        assert (stats is not None) == images_normalized
        raw = np.moveaxis(inputs[f"raw/{feature}"], 1, -1)  # LeRobot stores [B, 3, h, w]
        got = np.moveaxis(normalize_pixels(raw, stats), -1, 1)
        np.testing.assert_allclose(got, inputs[f"preprocessed/{feature}"], rtol=0, atol=1e-5, err_msg=feature)
        # LeRobot's decoded frames are exact uint8 levels: the uint8 path gives the same values
        levels = np.round(raw * 255).astype(np.uint8)
        np.testing.assert_array_equal(levels.astype(np.float32) / 255, raw)


def test_policy_dir_reads_config_weights_and_cameras(tmp_path):
    policy = read_policy_dir(policy_dir("act", tmp_path), supported=["act"])
    assert policy.type == "act"
    assert policy.camera_names() == ["top", "wrist"]
    assert policy.tensors["model.action_head.weight"].shape == (4, 32)
    assert policy.normalization.padded_dims == {"state": 4, "action": 4}


def test_unsupported_type_lists_the_supported_ones(tmp_path):
    with pytest.raises(CheckpointError, match=r"type 'act'.*\['diffusion', 'pi0'\]"):
        read_policy_dir(policy_dir("act", tmp_path), supported=["pi0", "diffusion"])


def test_missing_processor_files_are_named(tmp_path):
    path = policy_dir("act", tmp_path)
    (path / "policy_postprocessor.json").unlink()
    with pytest.raises(CheckpointError, match="policy_postprocessor.json not found"):
        read_policy_dir(path)
    shutil.copy(fixture("act") / "policy_postprocessor.json", path)
    next(path.glob("policy_preprocessor_step_*_normalizer_processor.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="names the statistics file"):
        read_policy_dir(path)


def test_mixed_normalization_modes_are_refused(tmp_path):
    path = policy_dir("act", tmp_path)
    pre = json.loads((path / "policy_preprocessor.json").read_text())
    for step in pre["steps"]:
        if step["registry_name"] == "normalizer_processor":
            step["config"]["norm_map"]["ACTION"] = "MIN_MAX"
    (path / "policy_preprocessor.json").write_text(json.dumps(pre))
    with pytest.raises(CheckpointError, match="state as MEAN_STD and actions as MIN_MAX"):
        read_policy_dir(path)


def test_a_directory_without_weights_says_so(tmp_path):
    path = policy_dir("act", tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors not found"):
        read_policy_dir(path)
