"""Fine-tuning from published checkpoint directories (``finetune.checkpoint``): format detection, the parameters
each importer builds handed to the transplant unchanged, and one training run starting from openpi's layout.

Checkpoints: openpi's own tiny π0 ``params/`` (tests/fixtures/openpi; for training, with its position embeddings
cut to 28 px frames), Octo's own ``save_pretrained`` directory (tests/fixtures/octo), that π0 written in LeRobot's
layout by vlax's exporter, and a RoboFlamingo file with the tiny random state dict of test_weights_roboflamingo.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from experiments.configs import pi0 as pi0_configs
from vlax.build import build_policy, policy_spec
from vlax.weights.common import CheckpointError
from vlax.weights.octo import load_octo
from vlax.weights.openpi import load_norm_stats, load_openpi
from vlax.weights.policy_checkpoint import FORMATS, detect_format, read_policy_params

FIXTURES = Path(__file__).parent / "fixtures"
OPENPI = FIXTURES / "openpi" / "pi0_tiny" / "params"
OCTO = FIXTURES / "octo" / "octo_tiny"
LEROBOT_DS = FIXTURES / "lerobot_ds"


def flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): np.array(v) for p, v in leaves}  # copies: training donates the buffers


def assert_same(got, want) -> None:
    got, want = flat(got), flat(want)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def pi0_tiny():
    """pi0.py:tiny (the openpi fixture's sizes) and the spec it gets on the one-camera LeRobot fixture."""
    config = pi0_configs.get_config("tiny")
    return config, policy_spec(config, cameras=("wrist",), state_dim=8, action_dim=8)


def params_of(policy) -> dict:
    return nnx.to_pure_dict(nnx.state(policy, nnx.Param))


def filled(build, seed: int = 0):
    """``build()``'s policy with random parameter values instead of its initialisers' (an eager init of a tiny
    preset compiles every initialiser: ~10 s on a CPU; what is drawn does not matter to a transplant)."""
    rng = np.random.default_rng(seed)
    policy = nnx.eval_shape(build)
    state = nnx.state(policy, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(
        lambda s: jax.device_put(rng.normal(size=s.shape).astype(s.dtype)), nnx.to_pure_dict(state)))
    nnx.update(policy, state)
    return policy


@pytest.fixture(scope="module")
def lerobot_pi0(tmp_path_factory):
    """openpi's tiny π0 exported as a LeRobot PI0 policy directory, and the kwargs its tiny sizes need."""
    from vlax.tokenizers import ByteTokenizer
    from vlax.weights.lerobot_pi0_export import export_lerobot_pi0, lerobot_sizes

    tmp = tmp_path_factory.mktemp("lerobot_pi0")
    config, spec = pi0_tiny()
    policy, _ = load_openpi(OPENPI, config.model, spec)
    stats = {k: {n: [0.0] * 8 if n != "std" else [1.0] * 8 for n in ("mean", "std", "q01", "q99")}
             for k in ("actions", "state")}
    (tmp / "robot").mkdir()
    (tmp / "robot" / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))
    norm = load_norm_stats(tmp / "robot" / "norm_stats.json", padded_dims={"state": 8, "action": 8})
    path = export_lerobot_pi0(policy, tmp / "policy", normalization=norm)
    return path, dict(sizes=lerobot_sizes(policy), tokenizer=ByteTokenizer()), policy


def test_each_format_is_detected_from_its_files(tmp_path, lerobot_pi0):
    assert detect_format(OPENPI) == detect_format(OPENPI.parent) == "openpi"  # params/ or the step dir holding it
    assert detect_format(OCTO) == "octo"
    assert detect_format(lerobot_pi0[0]) == "lerobot"
    (tmp_path / "openvla").mkdir()
    (tmp_path / "openvla" / "config.json").write_text(json.dumps({"architectures": ["OpenVLAForActionPrediction"]}))
    assert detect_format(tmp_path / "openvla") == "openvla"
    save_file({"module.perceiver.latents": np.zeros((4, 8), np.float32)}, str(tmp_path / "rf.safetensors"))
    assert detect_format(tmp_path / "rf.safetensors") == "roboflamingo"
    (tmp_path / "run" / "checkpoints" / "3" / "state").mkdir(parents=True)
    assert detect_format(tmp_path / "run") == detect_format(tmp_path / "run" / "checkpoints") == "vlax"


def test_an_unknown_directory_is_one_error_naming_every_format_and_pickles_are_refused(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.npz").write_bytes(b"")
    with pytest.raises(CheckpointError) as e:
        detect_format(tmp_path / "other")
    message = str(e.value)
    assert "weights.npz" in message and "--config.finetune.checkpoint" in message
    assert all(f"{fmt}: " in message for fmt in FORMATS)
    assert "example_batch.msgpack" in message and "_METADATA" in message and "model.safetensors" in message
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "checkpoint_4.pth").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=r"refusing to load pickle.*experiments.convert_torch_checkpoint"):
        detect_format(tmp_path / "torch")
    with pytest.raises(CheckpointError, match="does not exist"):
        detect_format(tmp_path / "missing")


def test_openpi_params_are_the_importers_in_the_presets_layout():
    config, spec = pi0_tiny()
    got = read_policy_params(OPENPI, config.model, spec)
    assert_same(got, params_of(load_openpi(OPENPI, config.model, spec)[0]))
    # the very tree the trainer builds from pi0.py:tiny: same paths, shapes and dtypes
    built = nnx.eval_shape(lambda: build_policy(config.model, spec, 0, nnx.Rngs(0)))
    leaves = jax.tree_util.tree_flatten_with_path(params_of(built))[0]
    assert {jax.tree_util.keystr(p): (tuple(v.shape), v.dtype) for p, v in leaves} == {
        k: (v.shape, v.dtype) for k, v in flat(got).items()}


def test_lerobot_params_are_the_importers(lerobot_pi0):
    from vlax.weights.lerobot import load_lerobot

    path, kwargs, openpi_policy = lerobot_pi0
    got = read_policy_params(path, {}, None, **kwargs)
    assert_same(got, params_of(load_lerobot(path, **kwargs)[0]))
    assert_same(got, params_of(openpi_policy))  # the same π0 through either layout


def test_roboflamingo_file_gives_the_parts_it_trains(tmp_path):
    """A converted RoboFlamingo file (its names, ``module.`` prefix) read for roboflamingo.py:tiny: exactly the
    parameters :func:`load_roboflamingo` writes, nothing for CLIP or the LM's decoder layers."""
    from safetensors.torch import save_file as save_torch

    from experiments.configs import roboflamingo
    from test_weights_roboflamingo import SPEC, VOCAB, _random_state_dict
    from vlax.weights.roboflamingo import load_roboflamingo

    state_dict, _ = _random_state_dict()
    save_torch({f"module.{k}": v.contiguous() for k, v in state_dict.items()}, str(tmp_path / "rf.safetensors"))
    assert detect_format(tmp_path / "rf.safetensors") == detect_format(tmp_path) == "roboflamingo"
    model = roboflamingo.get_config("tiny").model.to_dict()
    got = flat(read_policy_params(tmp_path, model, SPEC))
    assert {k.split("']")[0][2:] for k in got} == {"resampler", "lm", "head"}
    assert not any(k.startswith(("['vision']", "['lm']['lm']['layers']")) for k in got)
    policy = load_roboflamingo(filled(lambda: build_policy(model, SPEC, VOCAB, nnx.Rngs(0))),
                               tmp_path / "rf.safetensors")
    want = flat(params_of(policy))
    for key, value in got.items():
        np.testing.assert_array_equal(value, want[key], err_msg=key)
    written = {k for k in want if k.startswith(("['resampler']", "['lm']['gated_cross_attn_layers']",
                                                "['lm']['lm']['embed_tokens']", "['head']"))}
    assert got.keys() == written


def test_octo_params_transplant_with_a_fresh_head():
    """Octo's fine-tuning recipe through the trainer's own function: the transformer and tokenizers from the
    checkpoint, a new 3-D L1 head (``finetune.reinit='^head/'``); without the regex every head mismatch is named."""
    from experiments.train import load_finetune_params

    pretrained = load_octo(OCTO)
    got = read_policy_params(OCTO, {}, None)
    assert_same(got, params_of(pretrained))
    spec = type(pretrained.spec)(**{**pretrained.spec.__dict__, "action_dim": 3})
    target = filled(lambda: type(pretrained)(spec, pretrained.sizes, head_name="l1_map", rngs=nnx.Rngs(1)))
    fresh = jax.tree.map(np.asarray, params_of(target))
    cfg = ml_collections.ConfigDict({"finetune": {"checkpoint": str(OCTO), "reinit": ""}, "model": {}})
    with pytest.raises(ValueError, match=r"finetune\.reinit") as e:
        load_finetune_params(cfg, types.SimpleNamespace(params=nnx.state(target, nnx.Param)), spec)
    assert "head/" in str(e.value) and "is not in the checkpoint" in str(e.value)
    cfg.finetune.reinit = "^head/"
    cfg.finetune.importer = {"stpe": 1}  # the importer's arguments come from the config, checked before reading
    with pytest.raises(CheckpointError, match=r"load_octo takes no argument \['stpe'\] \(it takes \['step', 'dtype'\]\)"):
        load_finetune_params(cfg, types.SimpleNamespace(params=nnx.state(target, nnx.Param)), spec)
    cfg.finetune.importer = {"step": 1}
    state = load_finetune_params(cfg, types.SimpleNamespace(params=nnx.state(target, nnx.Param)), spec)
    out = flat(nnx.to_pure_dict(state.params))
    heads = {k for k in out if k.startswith("['head']")}
    assert heads and heads == {k for k in flat(fresh) if k.startswith("['head']")}
    want, kept = flat(got), flat(fresh)
    for key, value in out.items():
        np.testing.assert_array_equal(value, kept[key] if key in heads else want[key], err_msg=key)


@pytest.fixture(scope="module")
def openpi_28px(tmp_path_factory):
    """openpi's tiny π0 ``params/`` with SigLIP's position embeddings cut to a 2 x 2 patch grid (28 px frames), so
    the training step below compiles and runs in seconds; written by orbax in openpi's layout."""
    import orbax.checkpoint as ocp
    from flax import traverse_util

    from vlax.weights.openpi import read_params

    tree = read_params(OPENPI)
    tree["PaliGemma/img/pos_embedding"] = tree["PaliGemma/img/pos_embedding"][:, :4]
    path = tmp_path_factory.mktemp("openpi_28px") / "params"
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(path, {"params": traverse_util.unflatten_dict(tree, sep="/")})
    return path


def test_training_starts_from_openpi_params(tmp_path, monkeypatch, capsys, openpi_28px):
    """experiments/train.py from openpi's π0 ``params/`` on the LeRobot fixture: the step-0 parameters are the
    imported ones except the re-initialised output projection (the trainer's fresh one), then a finite step."""
    import experiments.train as trainer

    c, _ = pi0_tiny()
    c.workdir = str(tmp_path / "run")
    c.data.sources[0].path = str(LEROBOT_DS)
    c.data.sources[0].cameras = (("observation.images.wrist", "wrist"),)
    c.data.image_size = c.model.pi0.vision.image_size = 28
    c.data.batch_size, c.data.shuffle_buffer, c.data.val_fraction, c.data.action_horizon = 8, 16, 0.0, 4
    c.train.steps = c.train.save_every = 1
    c.train.log_every, c.train.progress, c.train.tensorboard = 1, False, False
    c.finetune.checkpoint = str(openpi_28px)
    c.finetune.reinit = "^head/action_out_proj/"
    fresh, step0 = {}, {}

    def capture(cfg, state, spec):
        fresh.update(flat(nnx.to_pure_dict(state.params)))  # the trainer's own initialisation
        state = load_finetune_params(cfg, state, spec)
        step0.update(flat(nnx.to_pure_dict(state.params)))
        specs.append(spec)
        return state

    load_finetune_params, specs = trainer.load_finetune_params, []
    monkeypatch.setattr(trainer, "load_finetune_params", capture)
    summary = trainer.train(c)
    assert summary["final_step"] == 1 and all(np.isfinite(summary["losses"]))
    assert (f"fine-tuning from {openpi_28px} (openpi checkpoint): re-initialised 2 parameters "
            "['head/action_out_proj/bias', 'head/action_out_proj/kernel']") in capsys.readouterr().out
    imported = flat(params_of(load_openpi(openpi_28px, c.model, specs[0])[0]))
    assert step0.keys() == imported.keys()
    reinit = {k for k in step0 if k.startswith("['head']['action_out_proj']")}
    assert len(reinit) == 2
    for key, value in step0.items():
        np.testing.assert_array_equal(value, fresh[key] if key in reinit else imported[key], err_msg=key)
    assert not np.array_equal(fresh["['head']['action_out_proj']['kernel']"],
                              imported["['head']['action_out_proj']['kernel']"])
