"""SmolVLA preset against LeRobot's own SmolVLAPolicy outputs (tests/fixtures/lerobot_refs/smolvla).

The weights are regenerated from the fixture's numpy recipe into a LeRobot policy directory, imported with
vlax.weights.lerobot_smolvla, and the stored calls (predict_action_chunk / select_action with the stored noise)
are reproduced from the preprocessed inputs and from the raw ones through vlax's ObservationPipeline.

Which reference: vlax installs transformers 5.x, whose SmolVLM vision position ids are 0 .. n-1 on a full image.
reference_outputs_lerobot0.6.1.npz (LeRobot 0.6.1, transformers 5.5.4) has that behaviour and is the one matched;
reference_outputs.npz (LeRobot 0.4.4, transformers 4.57.6, bucketized ids) differs from it by 0.59 and is checked
to stay far from vlax, so a test cannot pass against the wrong version by accident.

Tolerance: 1e-5 (fp32). The measured max |diff| of the normalized chunk is ~1.2e-6, the size of float32 rounding
LeRobot's README reports for this fixture (float64 re-run moved it by 1e-6).
"""

import shutil
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
from lerobot_refs import fixture, policy_dir, recipe_digest, recipe_weights, reference  # noqa: E402
from vlax.weights.common import CheckpointError  # noqa: E402
from vlax.weights.lerobot_smolvla import load_smolvla  # noqa: E402

TOL = 1e-5
CAMERAS = ("top", "wrist")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return policy_dir("smolvla", tmp_path_factory.mktemp("smolvla"))


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_smolvla(ckpt)


@pytest.fixture(scope="module")
def refs():
    inputs, outputs_044, meta = reference("smolvla")
    with np.load(fixture("smolvla") / "reference_outputs_lerobot0.6.1.npz") as f:
        outputs_061 = {k: f[k] for k in f.files}
    return inputs, outputs_061, outputs_044, meta


def preprocessed_obs(inputs):
    pre = {k[len("preprocessed/"):]: v for k, v in inputs.items() if k.startswith("preprocessed/")}
    state = pre["observation.state"]
    return {"images": {c: np.transpose(pre[f"observation.images.{c}"], (0, 2, 3, 1)) for c in CAMERAS},
            "state": np.pad(state, ((0, 0), (0, 8 - state.shape[1]))),
            "text_ids": pre["observation.language.tokens"].astype(np.int32),
            "text_mask": pre["observation.language.attention_mask"].astype(bool)}


def sample(policy, obs, noise):
    """``policy.sample`` with the stored noise, compiled (eager op-by-op dispatch is slower than compiling)."""
    return np.asarray(nnx.jit(lambda m, o, n: m.sample(o, rngs=jax.random.key(0), noise=n))(policy, obs, noise))


def test_recipe_weights_are_lerobots(refs):
    weights = recipe_weights(fixture("smolvla"))
    assert len(weights) == 124
    assert recipe_digest(weights) == "20ec8c09be0d3474a06dfdeb44c447bcfe2ac682ad36a362a56467b377c1f8b2"


def test_chunk_and_select_action_equal_lerobot_from_preprocessed_inputs(loaded, refs):
    policy, pipeline = loaded
    inputs, out_061, out_044, _ = refs
    chunk = sample(policy, preprocessed_obs(inputs), out_061["noise"])
    assert chunk.shape == (2, 8, 8)
    np.testing.assert_allclose(chunk[:, :, :4], out_061["chunk"], rtol=0, atol=TOL)
    np.testing.assert_allclose(chunk[:, 0, :4], out_061["select_action"], rtol=0, atol=TOL)
    # the postprocessor's unnormalization, through the pipeline (padded dims dropped)
    np.testing.assert_allclose(pipeline.actions(chunk), out_061["chunk_unnormalized"], rtol=0, atol=TOL)
    assert np.abs(chunk[:, :, :4] - out_044["chunk"]).max() > 0.1  # transformers 4.57's position ids: not ours


def test_transformers_4_position_ids_reproduce_lerobot_0_4_4(ckpt, refs):
    """The one difference between the two reference files is SmolVLM's vision position ids; with 4.57's
    bucketized ids the same import reproduces LeRobot 0.4.4's outputs."""
    policy, _ = load_smolvla(ckpt, vision_position_ids="bucketized")
    inputs, _, out_044, _ = refs
    chunk = sample(policy, preprocessed_obs(inputs), out_044["noise"])
    np.testing.assert_allclose(chunk[:, :, :4], out_044["chunk"], rtol=0, atol=TOL)


def test_raw_inputs_through_the_observation_pipeline(loaded, refs):
    policy, pipeline = loaded
    inputs, out_061, _, _ = refs
    frames = {}
    for c in CAMERAS:
        unit = np.transpose(inputs[f"raw/observation.images.{c}"], (0, 2, 3, 1))
        frames[c] = np.round(unit * 255).astype(np.uint8)
        assert np.array_equal(frames[c].astype(np.float32) / 255.0, unit)  # LeRobot's frames are uint8 / 255
    raw = {"images": frames, "state": inputs["raw/observation.state"], "prompt": list(inputs["raw/task"])}
    obs = pipeline.model_inputs(raw)
    tokens = inputs["preprocessed/observation.language.tokens"]
    mask = inputs["preprocessed/observation.language.attention_mask"]
    length = tokens.shape[1]
    assert np.array_equal(obs["text_ids"][:, :length][mask], tokens[mask])  # task + "\n", the VLM's tokenizer
    assert np.array_equal(obs["text_mask"][:, :length], mask) and not obs["text_mask"][:, length:].any()
    np.testing.assert_allclose(obs["state"][:, :4], inputs["preprocessed/observation.state"], rtol=0, atol=1e-6)
    assert not obs["state"][:, 4:].any()
    chunk = sample(policy, obs, out_061["noise"])
    np.testing.assert_allclose(chunk[:, :, :4], out_061["chunk"], rtol=0, atol=TOL)
    np.testing.assert_allclose(pipeline.actions(chunk), out_061["chunk_unnormalized"], rtol=0, atol=TOL)


def test_pixel_shuffle_connector_equals_transformers():
    from transformers import SmolVLMConfig
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector

    from vlax.encoders.pixel_shuffle import PixelShuffleConnector

    cfg = SmolVLMConfig(vision_config=dict(hidden_size=8, num_attention_heads=2),
                        text_config=dict(hidden_size=16, num_attention_heads=4, num_key_value_heads=2), scale_factor=2)
    torch.manual_seed(0)
    ref = SmolVLMConnector(cfg).eval()
    ours = PixelShuffleConnector(8, 16, 2, rngs=nnx.Rngs(0))
    ours.proj.kernel.set_value(ref.modality_projection.proj.weight.detach().numpy().T)
    x = np.random.default_rng(0).normal(size=(2, 36, 8)).astype(np.float32)  # a 6 x 6 grid
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ours(x)), want, rtol=0, atol=1e-5)


def test_resize_with_pad_equals_lerobots_torch_ops():
    import torch.nn.functional as F

    from vlax.presets.smolvla import resize_with_pad

    img = np.random.default_rng(1).uniform(size=(2, 3, 48, 80)).astype(np.float32)  # [B, C, h, w]
    t = torch.from_numpy(img)
    # LeRobot: ratio = max(w / W, h / H); bilinear (align_corners=False) to (int(h / r), int(w / r)); pad left/top
    resized = F.interpolate(t, size=(38, 64), mode="bilinear", align_corners=False)
    want = F.pad(resized, (0, 0, 26, 0), value=0).numpy()
    got = np.asarray(resize_with_pad(np.transpose(img, (0, 2, 3, 1)), 64, 64))
    np.testing.assert_allclose(np.transpose(got, (0, 3, 1, 2)), want, rtol=0, atol=1e-5)


def _param_count(module) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(module, nnx.Param)))


def test_parameter_counts_tiny_equals_lerobot_published_is_smolvla_base():
    from experiments.configs import smolvla
    from vlax.build import policy_spec
    from vlax.presets.smolvla import build_smolvla

    def abstract(variant):
        c = smolvla.get_config(variant)
        spec = policy_spec(c, cameras=CAMERAS, state_dim=c.model.state_dim, action_dim=c.model.action_dim)
        return nnx.eval_shape(lambda: build_smolvla(c.model, spec, 0, nnx.Rngs(0)))

    # tiny: the fixture's own LeRobot state dict (params.txt header: 416872 numbers, every one a parameter)
    assert _param_count(abstract("tiny")) == 416_872
    m = abstract("published")
    # The published VLM numbers (published_layouts/README.md): vision 768 wide, 12 layers, patch 16 at 512, MLP
    # 3072; pixel shuffle 4; text 960 wide, 15 heads / 5 KV heads of 64, MLP 2560, vocabulary 49280, untied head;
    # SmolVLA keeps 16 text layers and adds a 720-wide expert (MLP 2048) with state/action dims 32.
    d, v = 960, 768
    vision = 3 * 16 * 16 * v + v + 1024 * v + 12 * (4 * (v * v + v) + 2 * (v * 3072) + 3072 + v + 4 * v) + 2 * v
    connector = v * 16 * d
    text_layer = d * d * 2 + 2 * d * 320 + 3 * d * 2560 + 2 * d
    text = 2 * 49280 * d + 16 * text_layer + d
    e = 720
    expert_self = e * d + 2 * e * 320 + d * e + 3 * e * 2048 + 2 * e  # q, k, v from the expert's width
    expert_cross = e * d + 2 * 320 * 320 + d * e + 3 * e * 2048 + 2 * e  # k, v from the VLM's 320-wide keys
    head = 8 * expert_self + 8 * expert_cross + e + (32 * e + e) + (e * 32 + 32) + (2 * e * e + e) + (e * e + e)
    assert _param_count(m.vision) == vision and _param_count(m.connector) == connector
    assert _param_count(m.backbone) == text and _param_count(m.head) == head
    assert _param_count(m) == vision + connector + text + head + 32 * d + d == 450_046_176  # SmolVLA's "450M"


@pytest.mark.parametrize("head", ["chunk"])  # diffusion builds the same way; one head keeps the file fast
def test_smolvla_prefix_with_another_head_builds_and_samples(ckpt, head):
    from vlax.weights.common import to_numpy_flat

    policy, pipeline = load_smolvla(ckpt, head=head, rngs=nnx.Rngs(1))
    inputs, _, _ = reference("smolvla")
    obs = preprocessed_obs(inputs)
    actions = np.asarray(nnx.jit(lambda m, o, k: m.sample(o, rngs=k))(policy, obs, jax.random.key(0)))
    assert actions.shape == (2, 8, 8) and np.all(np.isfinite(actions))
    loss, _ = nnx.jit(lambda m, o, a, k: m.loss(o, a, rngs=k))(policy, obs, np.zeros((2, 8, 8), np.float32),
                                                             jax.random.key(1))
    assert np.isfinite(float(loss))
    # the SmolVLM weights and the state projection are the checkpoint's, whichever head sits on them
    flow, _ = load_smolvla(ckpt)
    for part in ("vision", "connector", "backbone", "state_proj"):
        ours, theirs = to_numpy_flat(getattr(policy, part)), to_numpy_flat(getattr(flow, part))
        assert ours.keys() == theirs.keys() and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_tiny_preset_trains_on_the_lerobot_fixture(tmp_path):
    from experiments.configs import smolvla
    from experiments.train import train

    c = smolvla.get_config("tiny")
    c.workdir = str(tmp_path / "run")
    c.data.sources[0].path = str(Path(__file__).parent / "fixtures" / "lerobot_ds")
    # one camera and half the layers of the tiny sizes: compiling the train step dominates this test
    c.data.sources[0].cameras = (("observation.images.wrist", "wrist"),)
    c.model.smolvla.num_vlm_layers, c.model.smolvla.vision.depth = 2, 1
    c.data.batch_size, c.data.shuffle_buffer, c.data.val_fraction = 8, 16, 0.0
    c.model.tokenizer = str(fixture("smolvla") / "vlm")
    c.train.steps = c.train.save_every = 2
    c.train.log_every, c.train.progress, c.train.tensorboard = 1, False, False
    summary = train(c)
    assert summary["final_step"] == 2 and all(np.isfinite(summary["losses"]))


def test_missing_camera_names_the_cameras(loaded):
    _, pipeline = loaded
    frames = np.zeros((1, 64, 64, 3), np.uint8)
    with pytest.raises(KeyError, match=r"lacks camera\(s\) \['wrist'\].*\['side', 'top'\]"):
        pipeline.model_inputs({"images": {"top": frames, "side": frames}, "state": np.zeros((1, 4)),
                               "prompt": ["go"]})


def test_data_without_the_configured_camera_is_named(tmp_path):
    from experiments.configs import smolvla
    from experiments.train import train
    from vlax.data.source_config import DataSourceError

    c = smolvla.get_config("tiny")
    c.workdir = str(tmp_path / "run")
    c.data.sources[0].path = str(Path(__file__).parent / "fixtures" / "lerobot_ds")
    c.data.sources[0].cameras = (("observation.images.side", "side"),)
    with pytest.raises(DataSourceError, match=r"observation\.images\.side.*observation\.images\.top"):
        train(c)


@pytest.mark.parametrize("remove, message", [
    ("policy_preprocessor.json", r"policy_preprocessor\.json not found"),
    ("policy_preprocessor_step_5_normalizer_processor.safetensors", r"names the statistics file"),
    ("vlm", r"vlm_model_name='vlm'.*does not exist"),
])
def test_missing_processor_or_vlm_files_are_named(ckpt, tmp_path, remove, message):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    target = broken / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CheckpointError, match=message):
        load_smolvla(broken)


@pytest.mark.parametrize("change, message", [
    ("drop", r"lacks expert tensors.*lm_expert\.layers\.1\.self_attn\.k_proj\.weight"),
    ("add", r"no place for.*model\.extra_proj\.weight"),
])
def test_missing_and_unexpected_tensors_are_named(ckpt, tmp_path, change, message):
    from safetensors.numpy import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    if change == "drop":
        tensors.pop("model.vlm_with_expert.lm_expert.layers.1.self_attn.k_proj.weight")
    else:
        tensors["model.extra_proj.weight"] = np.zeros((2, 2), np.float32)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        load_smolvla(broken)
