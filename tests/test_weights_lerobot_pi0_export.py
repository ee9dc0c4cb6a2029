"""π0 / π0.5 written in LeRobot's PI0 / PI05 layout and read back: the two checkpoint formats cross-checked.

openpi's own tiny checkpoints (tests/fixtures/openpi) are imported, exported as LeRobot policy directories and
re-imported with the LeRobot importer: every parameter comes back bit-identical and the re-imported π0 still
samples openpi's stored chunk. LeRobot's own reference directories (tests/fixtures/lerobot_refs) go the other way:
imported, exported, and compared tensor by tensor with the file LeRobot wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlax.tokenizers import ByteTokenizer
from vlax.weights.common import CheckpointError, read_safetensors, to_numpy_flat
from vlax.weights.lerobot_pi0 import load_lerobot_pi0
from vlax.weights.lerobot_pi0_export import export_lerobot_pi0, lerobot_sizes
from vlax.weights.openpi import load_norm_stats, load_openpi

OPENPI = Path(__file__).parent / "fixtures" / "openpi"
CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


def _spec(name: str):
    from vlax.policy import PolicySpec

    return PolicySpec(cameras=CAMERAS, image_size=224, state_dim=8, action_dim=8, horizon=10, max_text_len=16,
                      state_input="none" if name.startswith("pi05") else "head")


def _norm_stats(tmp_path: Path, kind: str):
    rs = np.random.RandomState(0)
    stats = {k: {"mean": rs.normal(size=6).tolist(), "std": rs.uniform(0.5, 2, 6).tolist(),
                 "q01": rs.uniform(-2, -1, 6).tolist(), "q99": rs.uniform(1, 2, 6).tolist()}
             for k in ("actions", "state")}
    path = tmp_path / "assets" / "robot" / "norm_stats.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"norm_stats": stats}))
    return load_norm_stats(path, kind=kind, padded_dims={"state": 8, "action": 8})


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    out = {}
    for name in ("pi0_tiny", "pi05_tiny"):
        tmp = tmp_path_factory.mktemp(name)
        policy, _ = load_openpi(OPENPI / name / "params", {}, _spec(name))
        norm = _norm_stats(tmp, "bounds" if name.startswith("pi05") else "normal")
        exported = export_lerobot_pi0(policy, tmp / "lerobot", normalization=norm)
        back, pipeline = load_lerobot_pi0(exported, sizes=lerobot_sizes(policy), tokenizer=ByteTokenizer())
        out[name] = (policy, norm, exported, back, pipeline)
    return out


@pytest.mark.parametrize("name", ["pi0_tiny", "pi05_tiny"])
def test_openpi_to_lerobot_layout_and_back_is_bit_identical(round_trips, name):
    policy, norm, exported, back, pipeline = round_trips[name]
    config = json.loads((exported / "config.json").read_text())
    assert config["type"] == ("pi05" if name.startswith("pi05") else "pi0")
    assert (config["chunk_size"], config["max_action_dim"], config["tokenizer_max_length"]) == (10, 8, 16)
    assert config["input_features"]["observation.state"]["shape"] == [6]  # the real dims, padded by LeRobot
    ours, theirs = to_numpy_flat(policy), to_numpy_flat(back)
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_array_equal(theirs[key], ours[key], err_msg=key)
    assert type(back.head).__name__ == type(policy.head).__name__ and back.sizes.pi05 == policy.sizes.pi05
    # the statistics travel through LeRobot's processor files
    artifact = next(iter(pipeline.artifacts.values()))
    assert artifact.type == norm.type and artifact.padded_dims == {"state": 8, "action": 8}
    x = np.random.RandomState(1).normal(size=(3, 6)).astype(np.float32)
    for key in ("state", "action"):
        np.testing.assert_allclose(artifact.normalize(key, x), norm.normalize(key, x), rtol=1e-6, atol=1e-6)


def test_reimported_pi0_samples_what_the_openpi_import_samples(round_trips):
    policy, _, _, back, _ = round_trips["pi0_tiny"]
    ref = dict(np.load(OPENPI / "pi0_tiny" / "reference.npz"))
    obs = {"images": {c: ref[f"obs/image/{c}"] for c in CAMERAS},
           "image_masks": {c: ref[f"obs/image_mask/{c}"] for c in CAMERAS},
           "state": ref["obs/state"], "text_ids": ref["obs/tokenized_prompt"],
           "text_mask": ref["obs/tokenized_prompt_mask"]}
    # LeRobot's importer computes the sampling loop's time features in float64 (as LeRobot does on CPU), openpi's
    # in float32 (1.2e-5 apart after 10 steps); with openpi's choice the two imports are the same program
    assert back.head.float64_time_features
    back.head.float64_time_features = False
    sample = nnx.jit(lambda p, o, n: p.sample(o, rngs=jax.random.key(0), noise=n))
    noise = jnp.asarray(ref["sample_noise"])
    chunk, chunk_back = np.asarray(sample(policy, obs, noise)), np.asarray(sample(back, obs, noise))
    np.testing.assert_array_equal(chunk_back, chunk)
    diff = np.abs(chunk_back - ref["float32/sample_actions"]).max()
    assert diff <= 1e-5, f"max |LeRobot-layout round trip - openpi sample_actions| = {diff:.3g}"


@pytest.mark.parametrize("name", ["pi0", "pi05"])
def test_lerobot_reference_exports_to_its_own_tensors(tmp_path, name):
    from lerobot_refs import policy_dir
    from test_preset_pi0_lerobot import _tiny_sizes

    source = policy_dir(name, tmp_path)
    policy, pipeline = load_lerobot_pi0(source, sizes=_tiny_sizes(name))
    artifact = next(iter(pipeline.artifacts.values()))
    exported = export_lerobot_pi0(policy, tmp_path / "export", normalization=artifact, tokenizer=source / "tokenizer")
    theirs, ours = read_safetensors(source / "model.safetensors"), read_safetensors(exported / "model.safetensors")
    assert theirs.keys() == ours.keys()
    unused = ("model.paligemma_with_expert.paligemma.lm_head.weight",
              "model.paligemma_with_expert.gemma_expert.lm_head.weight")  # never read by PI0 / PI05
    for key in sorted(set(theirs) - set(unused)):
        assert ours[key].shape == theirs[key].shape, key
        if "gemma_expert" in key and (key.endswith("layernorm.weight") or key.endswith("model.norm.weight")):
            # stored as 1 + w on import (w ~ 1 here): (1 + w) - 1 is w rounded to float32's spacing at 2
            np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=2.4e-7, err_msg=key)
        else:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    config, original = (json.loads((d / "config.json").read_text()) for d in (exported, source))
    for field in ("type", "input_features", "output_features", "chunk_size", "max_state_dim", "max_action_dim",
                  "num_inference_steps", "image_resolution", "normalization_mapping", "paligemma_variant",
                  "action_expert_variant"):
        assert config[field] == original[field], field
    # the statistics LeRobot reads
    pre = json.loads((exported / "policy_preprocessor.json").read_text())
    step = next(s for s in pre["steps"] if s["registry_name"] == "normalizer_processor")
    stats = read_safetensors(exported / step["state_file"])
    original_pre = json.loads((source / "policy_preprocessor.json").read_text())
    original_step = next(s for s in original_pre["steps"] if s["registry_name"] == "normalizer_processor")
    original_stats = read_safetensors(source / original_step["state_file"])
    for key in ("observation.state.mean", "observation.state.std", "action.q01", "action.q99"):
        np.testing.assert_allclose(stats[key], original_stats[key], rtol=1e-7, err_msg=key)
    assert step["state_file"] == original_step["state_file"]  # LeRobot's step order
    assert (exported / "tokenizer" / "tokenizer.json").is_file()


def test_what_the_layout_cannot_hold_is_refused(round_trips, tmp_path):
    from experiments.configs import pi0 as configs
    from vlax.build import build_policy, policy_spec

    policy, norm, _, _, _ = round_trips["pi0_tiny"]
    config = configs.get_config("tiny")
    config.model.head = "chunk"
    config.model.head_kwargs = {"width": 32, "num_heads": 2, "mlp_dim": 64}
    config.data.image_size = config.model.pi0.vision.image_size = 28
    chunk = nnx.eval_shape(lambda: build_policy(config.model, policy_spec(config, cameras=("top",)), 0,
                                                nnx.Rngs(0)))
    with pytest.raises(CheckpointError, match="flow head.*ChunkHead"):
        export_lerobot_pi0(chunk, tmp_path / "x", normalization=norm)
    lora = configs.get_config("tiny_lora")
    lora.data.image_size = lora.model.pi0.vision.image_size = 28
    adapted = nnx.eval_shape(lambda: build_policy(lora.model, policy_spec(lora, cameras=("top",)), 0, nnx.Rngs(0)))
    with pytest.raises(CheckpointError, match="LoRA adapters .*merge_lora"):
        export_lerobot_pi0(adapted, tmp_path / "z", normalization=norm)
    import dataclasses

    with pytest.raises(CheckpointError, match="normalization type 'none'"):
        export_lerobot_pi0(policy, tmp_path / "y", normalization=dataclasses.replace(norm, type="none"))
