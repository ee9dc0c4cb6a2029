"""The ACT preset equals LeRobot's ACTPolicy (0.4.4) on its reference fixture, from the preprocessed inputs and
from the raw ones through vlax's ObservationPipeline (normalization and un-normalization included); the default
preset has LeRobot's layout key by key; the head swaps; the tiny preset trains through experiments/train.py.

The weights are the published numpy recipe (tests/lerobot_refs.py) written as model.safetensors next to copies of
the fixture's config and processor files. Tolerance 1e-5 (fp32): the fixture README measured LeRobot's own
float32-vs-float64 spread of this output at 6e-7; we measured at most 1.1e-6 here.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import lerobot_refs
from vlax.build import build_policy
from vlax.heads import ActionQueue, TemporalEnsembler
from vlax.nn import HeadContext, count_params
from vlax.observation import ObservationPipeline
from vlax.policy import PolicySpec
from vlax.tokenizers import ByteTokenizer
from vlax.weights.common import CheckpointError, param_shapes, rename_tensors
from vlax.weights.lerobot_act import act_rules, load_lerobot_act, split_in_proj

ATOL = 1e-5
DEFAULT_PARAMS = 51_613_582  # LeRobot's default ACT, counted from its meta-device key listing
FIXTURE = lerobot_refs.fixture("act")


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return lerobot_refs.policy_dir("act", tmp_path_factory.mktemp("act"))


@pytest.fixture(scope="module")
def imported(policy_dir):
    return load_lerobot_act(policy_dir)


@pytest.fixture(scope="module")
def reference():
    return lerobot_refs.reference("act")


def nhwc(x: np.ndarray) -> np.ndarray:
    return np.transpose(x, (0, 2, 3, 1))


def preprocessed_obs(inputs: dict, cameras) -> dict:
    return {"images": {c: jnp.asarray(nhwc(inputs[f"preprocessed/observation.images.{c}"])) for c in cameras},
            "state": jnp.asarray(inputs["preprocessed/observation.state"])}


def chunk_from_preprocessed(policy, obs: dict) -> np.ndarray:
    tokens, pos = policy.encode(obs, pixels_normalized=True)
    ctx = HeadContext(tokens=tokens, mask=jnp.ones(tokens.shape[:2], bool))
    return np.asarray(policy.head.predict(ctx, pos))


def test_preprocessed_inputs_reproduce_lerobot(imported, reference):
    inputs, outputs, meta = reference
    policy, _ = imported
    assert policy.spec.cameras == ("top", "wrist") and policy.spec.horizon == 8 and policy.spec.action_dim == 4
    assert count_params(nnx.state(policy, nnx.Param)) == meta["weights"]["n_parameters"]  # 11,215,092
    # experiments/configs/act.py:tiny is the fixture's architecture
    tiny = nnx.eval_shape(lambda: build_policy(act_model(), policy.spec, 0, nnx.Rngs(0)))
    assert param_shapes(tiny) == param_shapes(policy)
    obs = preprocessed_obs(inputs, policy.spec.cameras)
    chunk = chunk_from_preprocessed(policy, obs)
    np.testing.assert_allclose(chunk, outputs["chunk"], rtol=0, atol=ATOL)
    # select_action: the first of the n_action_steps (= chunk_size) queued actions
    queue = ActionQueue(8)
    np.testing.assert_allclose(np.asarray(queue.select(lambda: jnp.asarray(chunk))), outputs["select_action"],
                               rtol=0, atol=ATOL)
    # normalized dataset-mean images: the state path dominates (README caveat 4)
    zero = {"images": {c: jnp.zeros_like(v) for c, v in obs["images"].items()}, "state": obs["state"]}
    zero_chunk = chunk_from_preprocessed(policy, zero)
    np.testing.assert_allclose(zero_chunk, outputs["chunk_zero_images"], rtol=0, atol=ATOL)
    # the references are far apart, so matching both is not an accident of a constant output
    assert np.abs(outputs["chunk"] - outputs["chunk_zero_images"]).max() > 0.1


def test_raw_inputs_through_the_observation_pipeline(imported, reference):
    inputs, outputs, _ = reference
    policy, artifact = imported
    assert artifact.type == "normal" and set(artifact.keys) == {"state", "action"}  # MEAN_STD for both
    # the VISUAL MEAN_STD statistics sit in the preset's image path, one pair per camera
    assert [s is not None for s in policy.pixel_stats] == [True, True]
    pipeline = ObservationPipeline(policy.spec, ByteTokenizer(), {"lerobot": artifact})
    images = {}
    for camera in policy.spec.cameras:
        frames = nhwc(inputs[f"raw/observation.images.{camera}"])
        # LeRobot's decoders return uint8 / 255: the stored floats are exactly such values
        as_uint8 = np.round(frames * 255).astype(np.uint8)
        np.testing.assert_array_equal(as_uint8.astype(np.float32) / 255, frames)
        images[camera] = as_uint8
    raw = {"images": images, "state": inputs["raw/observation.state"], "prompt": list(inputs["raw/task"])}
    model_inputs = pipeline.model_inputs(raw)
    np.testing.assert_allclose(model_inputs["state"], inputs["preprocessed/observation.state"], rtol=0, atol=1e-6)
    chunk = np.asarray(policy.sample(model_inputs, rngs=jax.random.key(0)))
    np.testing.assert_allclose(chunk, outputs["chunk"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(pipeline.actions(chunk), outputs["chunk_unnormalized"], rtol=1e-5, atol=ATOL)
    np.testing.assert_allclose(pipeline.actions(chunk)[:, 0], outputs["select_action_unnormalized"], rtol=1e-5,
                               atol=ATOL)
    # temporal ensembling (ACT's coefficient 0.01): the first step executes the chunk's first action
    ensembler = TemporalEnsembler(8, 0.01)
    action, state = ensembler.update(ensembler.init(2, 4), jnp.asarray(chunk))
    np.testing.assert_allclose(np.asarray(action), chunk[:, 0], rtol=0, atol=1e-7)
    action, _ = ensembler.update(state, jnp.asarray(chunk))
    w = np.exp(-0.01 * np.arange(2))
    np.testing.assert_allclose(np.asarray(action), (w[0] * chunk[:, 1] + w[1] * chunk[:, 0]) / w.sum(), atol=1e-6)


def act_model(variant: str = "tiny", **overrides) -> dict:
    from experiments.configs import act

    model = act.get_config(variant).model.to_dict()
    model.update(overrides)
    return model


def test_default_preset_has_lerobots_layout_and_parameter_count():
    spec = PolicySpec(cameras=("top",), image_size=480, state_dim=14, action_dim=14, horizon=100, max_text_len=0,
                      state_input="head")
    policy = nnx.eval_shape(lambda: build_policy(act_model("default"), spec, 0, nnx.Rngs(0)))
    assert count_params(nnx.state(policy, nnx.Param)) == DEFAULT_PARAMS
    # key by key: LeRobot's published listing, through the importer's key map, gives exactly our variables
    listing = {}
    for line in (FIXTURE / "params_act_default.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        _, key, shape, _ = line.split("\t")
        listing[key] = np.broadcast_to(np.float32(0), tuple(json.loads(shape.replace("(", "[").replace(")", "]")
                                                                        .replace(",]", "]"))))
    listing.pop("model.vae_encoder_pos_enc")  # recomputed by the preset, checked by the importer
    renamed, _ = rename_tensors(split_in_proj(listing), act_rules())
    ours = {**{k: tuple(v.shape) for k, v in param_shapes(policy).items()},
            **{".".join(map(str, p)): tuple(v.get_value().shape)
               for p, v in nnx.to_flat_state(nnx.state(policy, nnx.BatchStat))}}
    assert {k: tuple(v.shape) for k, v in renamed.items()} == ours


def test_head_swaps_on_the_act_encoder():
    spec = PolicySpec(cameras=("top",), image_size=32, state_dim=3, action_dim=2, horizon=4, max_text_len=0,
                      state_input="head")
    obs = {"images": {"top": jnp.zeros((2, 32, 32, 3), jnp.uint8)}, "state": jnp.ones((2, 3))}
    model = act_model("tiny", head="diffusion", act={**act_model()["act"], "backbone_widths": (16, 16, 16, 16)},
                      head_kwargs={"num_steps": 2, "denoiser_kwargs": {"hidden_dim": 8, "num_blocks": 1}})
    policy = build_policy(model, spec, 0, nnx.Rngs(0))
    assert type(policy.head).__name__ == "DiffusionHead"
    actions = policy.sample(obs, rngs=jax.random.key(0))
    assert actions.shape == (2, 4, 2) and np.all(np.isfinite(np.asarray(actions)))
    loss, _ = policy.loss(obs, jnp.zeros((2, 4, 2)), rngs=jax.random.key(1))
    assert np.isfinite(float(loss))


@pytest.mark.parametrize("pre_norm", [False, True])
def test_act_layers_without_positions_equal_torch_transformer_layers(pre_norm):
    """With no position embedding, ACT's encoder / decoder layers are torch's TransformerEncoderLayer /
    TransformerDecoderLayer (norm_first = pre_norm), whose state-dict names ACT shares."""
    import torch

    from vlax.heads.chunk import ACTDecoderHead, ACTEncoder
    from vlax.weights.common import assign_params

    torch.manual_seed(0)
    kw = dict(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True, norm_first=pre_norm)
    torch_enc, torch_dec = torch.nn.TransformerEncoderLayer(**kw).eval(), torch.nn.TransformerDecoderLayer(**kw).eval()
    with torch.no_grad():  # non-trivial norms
        for layer in (torch_enc, torch_dec):
            for name, p in layer.named_parameters():
                if "norm" in name:
                    p.add_(0.3 * torch.randn_like(p))

    class Holder(nnx.Module):
        def __init__(self, rngs):
            self.encoder = ACTEncoder(16, 1, 2, 32, pre_norm=pre_norm, rngs=rngs)
            self.head = ACTDecoderHead(3, 4, 16, num_heads=2, mlp_dim=32, pre_norm=pre_norm, dropout=0.0, rngs=rngs)

    holder = Holder(nnx.Rngs(0))
    state = {f"model.encoder.layers.0.{k}": v.numpy() for k, v in torch_enc.state_dict().items()}
    state |= {f"model.decoder.layers.0.{k}": v.numpy() for k, v in torch_dec.state_dict().items()}
    flat, sources = rename_tensors(split_in_proj(state), act_rules())
    assert set(flat) <= set(param_shapes(holder)), sorted(set(flat) - set(param_shapes(holder)))
    assert len(flat) == len(state) + 4 * 3  # each in_proj weight and bias became three pieces
    assign_params(holder, flat, strict=False, sources=sources)
    rng = np.random.default_rng(0)
    x, memory = rng.standard_normal((2, 5, 16), np.float32), rng.standard_normal((2, 7, 16), np.float32)
    with torch.no_grad():
        want_enc = torch_enc(torch.from_numpy(x)).numpy()
        want_dec = torch_dec(torch.from_numpy(x), torch.from_numpy(memory)).numpy()
    ours_enc = holder.encoder.layers[0](jnp.asarray(x), None)
    ours_dec = holder.head.layers[0](jnp.asarray(x), None, jnp.asarray(memory), None, None)
    np.testing.assert_allclose(np.asarray(ours_enc), want_enc, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours_dec), want_dec, rtol=0, atol=1e-5)


def test_training_loss_adds_the_kl_of_the_vae_posterior(imported, reference):
    inputs, outputs, _ = reference
    policy, _ = imported
    obs = {"images": {c: jnp.zeros((2, 64, 64, 3), jnp.uint8) for c in policy.spec.cameras},
           "state": jnp.asarray(inputs["preprocessed/observation.state"])}
    actions = jnp.asarray(outputs["chunk_zero_images"])
    eval_loss, eval_metrics = policy.loss(obs, actions, rngs=jax.random.key(0), train=False)
    expected_l1 = np.abs(np.asarray(policy.sample(obs)) - outputs["chunk_zero_images"]).mean()
    np.testing.assert_allclose(float(eval_loss), expected_l1, rtol=1e-5)
    train_loss, metrics = policy.loss(obs, actions, rngs=jax.random.key(0), train=True)
    assert float(metrics["kl"]) > 0
    np.testing.assert_allclose(float(train_loss), float(metrics["l1"]) + 10.0 * float(metrics["kl"]), rtol=1e-5)
    # padded steps are hidden from the posterior: changing them does not change the loss
    mask = jnp.ones((2, 8, 1), bool).at[:, 6:].set(False)
    a, _ = policy.loss(obs, actions, action_mask=mask, rngs=jax.random.key(0))
    b, _ = policy.loss(obs, actions.at[:, 6:].set(5.0), action_mask=mask, rngs=jax.random.key(0))
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    # LeRobot's L1: padded entries zeroed, the mean taken over all B * H * A entries
    masked_eval, _ = policy.loss(obs, actions, action_mask=mask, rngs=jax.random.key(0), train=False)
    pred = np.asarray(policy.sample(obs))
    expected = (np.abs(pred - outputs["chunk_zero_images"]) * np.asarray(mask)).mean()
    np.testing.assert_allclose(float(masked_eval), expected, rtol=1e-5)


def test_tiny_act_trains_on_the_lerobot_fixture(tmp_path):
    from experiments.train import train
    from train_helpers import tiny_finetune_config

    dataset = Path(__file__).parent / "fixtures" / "lerobot_ds"
    cameras = (("observation.images.top", "top"), ("observation.images.wrist", "wrist"))
    c = tiny_finetune_config(tmp_path / "run", {"path": str(dataset), "cameras": cameras}, steps=8)
    tiny = act_model()
    for key in ("preset", "head", "head_kwargs", "state_input", "act"):
        c.model[key] = tiny[key]
    c.model.act.backbone_widths = (16, 16, 32, 32)  # keeps the CPU step short; the layout is unchanged
    c.optim.learning_rate = 3e-3
    summary = train(c)
    losses = summary["losses"]
    assert summary["final_step"] == 8 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:2]), losses
    # the checkpoint acts through the one observation pipeline (as evaluation and serving do)
    from vlax.inference import PolicyRunner

    runner = PolicyRunner.from_checkpoint(c.workdir)
    rng = np.random.default_rng(0)
    raw = {"images": {"top": rng.integers(0, 256, (64, 64, 3), np.uint8),
                      "wrist": rng.integers(0, 256, (48, 80, 3), np.uint8)},
           "state": rng.normal(size=4).astype(np.float32), "prompt": "pick up the red cube"}
    actions = runner.infer(raw, rng=jax.random.key(1))
    assert actions.shape == (4, 4) and np.all(np.isfinite(actions))


# ---------------------------------------------------------------------------------------------- bad input


def test_a_policy_of_another_type_is_named(policy_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in policy_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    config = json.loads((bad / "config.json").read_text())
    config["type"] = "diffusion"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"type 'diffusion'.*\['act'\]"):
        load_lerobot_act(bad)


def test_missing_processor_files_and_weights_are_named(policy_dir, tmp_path):
    bad = tmp_path / "noproc"
    bad.mkdir()
    for f in policy_dir.iterdir():
        if f.name != "policy_preprocessor.json":
            (bad / f.name).write_bytes(f.read_bytes())
    with pytest.raises(CheckpointError, match="policy_preprocessor.json"):
        load_lerobot_act(bad)
    # a state dict missing one entry and carrying a stray one names both
    (bad / "policy_preprocessor.json").write_bytes((policy_dir / "policy_preprocessor.json").read_bytes())
    tensors = load_file(str(policy_dir / "model.safetensors"))
    tensors["model.extra.weight"] = tensors.pop("model.action_head.weight")
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*head\.action_out\.kernel.*unexpected.*model\.extra"):
        load_lerobot_act(bad)


def test_a_camera_the_data_lacks_is_named(policy_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"camera\(s\) \['wrist'\].*camera_map"):
        load_lerobot_act(policy_dir, data_cameras=["top", "side"])
    # named before any weight is read: a directory without weights gives the same error
    (tmp_path / "config.json").write_bytes((policy_dir / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match=r"camera\(s\) \['wrist'\]"):
        load_lerobot_act(tmp_path, data_cameras=["top", "side"])
    policy, _ = load_lerobot_act(policy_dir, camera_map={"observation.images.wrist": "side"},
                                 data_cameras=["top", "side"])
    assert policy.spec.cameras == ("top", "side")
    with pytest.raises(CheckpointError, match="observation.images.left"):
        load_lerobot_act(policy_dir, camera_map={"observation.images.left": "top"})
