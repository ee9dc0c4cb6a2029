"""OpenVLA preset against the HF OpenVLA code's own outputs (tests/fixtures/openvla, a tiny random checkpoint).

The checkpoint (OpenVLAForActionPrediction's safetensors layout, config.json, dataset_statistics.json, the
processor config and tokenizer.json) is imported with vlax.weights.openvla; the stored raw images and
instructions go through vlax's ObservationPipeline and the policy, and every stage is compared with
reference.npz: pixel values, token ids, fused patch features, projector output, the LLM's last hidden state,
the full logits at the text positions, the KV-cached logits of all 7 decoding steps, the 7 greedy action tokens
and predict_action's un-normalized actions.

Tolerance: 1e-5 (fp32) relative to each array's scale (``max |ref|``, at least 1): the fused features reach
|x| = 14, where one float32 ulp is ~1e-6 and two ViT blocks accumulate 1.8e-5 of absolute rounding (1.3e-6
relative); the hidden states and logits (|x| < 6) meet 1e-5 absolute.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs.openvla import get_config
from vlax.encoders.preprocess import normalize
from vlax.nn import unpack_decode
from vlax.observation import ObservationPipeline
from vlax.policy import PolicySpec
from vlax.presets.openvla import PROMPT_TEMPLATE, build_openvla
from vlax.tokenizers import HFTokenizer
from vlax.weights.common import CheckpointError
from vlax.weights.openvla import (action_normalization, load_openvla, sizes_from_checkpoint, unused_tensor_names)

FIXTURE = Path(__file__).parent / "fixtures" / "openvla"
TOL = 1e-5


def close(got, want, tol=TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    err = float(np.max(np.abs(got - want)))
    assert err <= tol * max(1.0, float(np.max(np.abs(want)))), err


@pytest.fixture(scope="module")
def refs():
    with np.load(FIXTURE / "reference.npz") as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads((FIXTURE / "reference_meta.json").read_text())


@pytest.fixture(scope="module")
def policy():
    return load_openvla(FIXTURE)


@pytest.fixture(scope="module")
def pipeline(policy, refs):
    _, meta = refs
    spec = PolicySpec(cameras=("image",), image_size=224, state_dim=0, action_dim=7, horizon=1, max_text_len=16,
                      state_input="none")
    return ObservationPipeline(spec, HFTokenizer.from_file(FIXTURE),
                               {meta["unnorm_key"]: action_normalization(FIXTURE, meta["unnorm_key"])},
                               prompt=PROMPT_TEMPLATE)


@pytest.fixture(scope="module")
def run(policy, pipeline, refs):
    """Both reference samples in one padded batch, raw images and instructions through the pipeline."""
    arrays, meta = refs
    inputs = pipeline.model_inputs({"images": {"image": arrays["images_uint8"]}, "prompt": meta["instructions"]})
    obs = {"images": inputs["images"], "text_ids": inputs["text_ids"], "text_mask": inputs["text_mask"]}

    @jax.jit
    def forward(obs):
        features = policy.vision_features(obs)
        embeds, mask = policy.embed_prefix(obs)
        out = policy.backbone(embeds=embeds, input_mask=mask, cache_size=embeds.shape[1] + 7)
        return features, policy.projector(features), out.hidden, policy.backbone.logits(out.hidden), mask, out.cache

    features, projected, hidden, logits, mask, cache = forward(obs)
    actions = nnx.jit(lambda p, o: p.sample(o, rngs=jax.random.key(0)))(policy, obs)
    return dict(inputs=inputs, features=features, projected=projected, hidden=hidden, logits=logits, mask=mask,
                cache=cache, actions=actions)


def test_checkpoint_layout_and_unused_tensors(policy):
    """Every one of the 130 tensors is loaded; the 43 that cannot affect an output are exactly the last block
    and final norm of each tower plus SigLIP's attention pool, and they are present in the checkpoint."""
    from safetensors.numpy import load_file

    names = set(load_file(FIXTURE / "model.safetensors"))
    assert len(names) == 130
    unused = unused_tensor_names(policy.sizes)
    assert len(unused) == 43 and set(unused) <= names
    params = nnx.state(policy, nnx.Param)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == 4_633_708  # the reference's n_params


def test_pixels_and_prompt_tokens_through_the_pipeline(run, refs, policy):
    arrays, _ = refs
    images = run["inputs"]["images"]["image"]
    for i in range(2):
        pixels = arrays[f"s{i}_pixel_values"].transpose(0, 2, 3, 1)
        # the processor's bicubic resize of a 224 px image is the identity up to 4e-7 (reference README)
        close(normalize(images[i:i + 1], *policy.vision.dino_norm), pixels[..., :3], 1e-6)
        close(normalize(images[i:i + 1], *policy.vision.siglip_norm), pixels[..., 3:], 1e-6)
        want = arrays[f"s{i}_input_ids"][0]
        ids, mask = run["inputs"]["text_ids"][i], run["inputs"]["text_mask"][i]
        np.testing.assert_array_equal(ids[mask], want)


def test_features_hidden_states_and_logits_match(run, refs):
    arrays, _ = refs
    for i in range(2):
        close(run["features"][i:i + 1], arrays[f"s{i}_vision_features"])
        close(run["projected"][i:i + 1], arrays[f"s{i}_projector_features"])
        length = arrays[f"s{i}_last_hidden_state"].shape[0]
        # the mask drops the padding; the trailing 29871 comes after the stored positions (causal: no effect)
        hidden = np.asarray(run["hidden"][i])[np.asarray(run["mask"][i])][:length]
        close(hidden, arrays[f"s{i}_last_hidden_state"])
        logits = np.asarray(run["logits"][i])[np.asarray(run["mask"][i])][:length]
        close(logits[arrays[f"s{i}_logits_text_positions"]], arrays[f"s{i}_logits_text"])
        np.testing.assert_array_equal(logits.argmax(-1), arrays[f"s{i}_logits_argmax"])


def test_kv_cached_decoding_gives_the_generate_scores_and_tokens(run, refs, policy, pipeline):
    """Teacher-forcing the reference action tokens through the KV cache reproduces every step's logits; greedy
    decoding picks the same 7 tokens and the pipeline un-normalizes them to predict_action's actions."""
    arrays, _ = refs
    mask = np.asarray(run["mask"])
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    first = np.asarray(run["logits"])[np.arange(2), last]
    tokens = np.stack([arrays[f"s{i}_action_token_ids"].reshape(-1) for i in range(2)]).astype(np.int32)
    rest, _ = unpack_decode(policy.backbone.decode_step(jnp.asarray(tokens[:, :-1]), run["cache"]))
    steps = np.concatenate([first[:, None], np.asarray(rest)], axis=1)  # [2, 7, V]
    actions = np.asarray(run["actions"])  # [2, 1, 7] bin centres
    tokenizer = policy.head.tokenizer
    decoded = np.asarray(tokenizer.encode(jnp.asarray(actions)))[:, 0]
    unnormalized = pipeline.actions(actions)  # q01/q99 of unnorm_key, the gripper dimension left as is
    for i in range(2):
        close(steps[i], arrays[f"s{i}_generate_scores"].reshape(7, -1))
        np.testing.assert_array_equal(decoded[i], tokens[i])
        close(actions[i, 0], arrays[f"s{i}_normalized_actions"].reshape(-1))
        close(unnormalized[i, 0], arrays[f"s{i}_actions"].reshape(-1))


def test_published_openvla_7b_size():
    """openvla-7b: DINOv2-L/14-reg4 + SigLIP So400m/14 + projector + Llama-2-7B (32064 ids), built abstractly."""
    c = get_config("openvla_7b")
    spec = PolicySpec(cameras=("image",), image_size=224, state_dim=0, action_dim=7, horizon=1, max_text_len=32,
                      state_input="none")
    model = nnx.eval_shape(lambda: build_openvla(c.model.to_dict(), spec, 0, nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == 7_541_237_184


def small_policy(head: str, head_kwargs: dict, horizon: int, image_size: int = 28):
    """The tiny preset at a 2 x 2 patch grid (compile time) with another head."""
    model = get_config("tiny").model.to_dict()
    model["openvla"]["image_size"] = image_size
    model["head"], model["head_kwargs"] = head, head_kwargs
    spec = PolicySpec(cameras=("image",), image_size=image_size, state_dim=0, action_dim=7, horizon=horizon,
                      max_text_len=8, state_input="none")
    return build_openvla(model, spec, 0, nnx.Rngs(0))


def random_obs(rng, batch: int, image_size: int = 28):
    ids = rng.integers(3, 300, (batch, 6)).astype(np.int32)
    ids[:, 0] = 1
    mask = np.ones((batch, 6), bool)
    mask[0, 4:] = False  # one padded row
    return {"images": {"image": rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)},
            "text_ids": ids, "text_mask": mask}


def test_head_swap_to_flow_samples_a_chunk():
    policy = small_policy("flow", {"width": 32, "mlp_dim": 64, "num_steps": 2}, horizon=4)
    out = nnx.jit(lambda p, obs: p.sample(obs, rngs=jax.random.key(1)))(policy, random_obs(np.random.default_rng(0), 2))
    assert out.shape == (2, 4, 7) and bool(jnp.all(jnp.isfinite(out)))


def test_oft_parallel_l1_head_trains_and_samples_a_chunk():
    """OpenVLA-OFT: 8 x 7 action slots after the prompt, one pass, L1 loss; a few Adam steps lower the loss on a
    fixed random batch, and sampling gives [B, H, A]."""
    import optax

    policy = small_policy("l1_mlp", {"num_blocks": 2}, horizon=8)
    assert policy.num_action_slots == 56
    rng = np.random.default_rng(0)
    obs = random_obs(rng, 2)
    actions = jnp.asarray(rng.uniform(-1, 1, (2, 8, 7)), jnp.float32)
    optimizer = nnx.Optimizer(policy, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(policy, optimizer):
        def loss_fn(p):
            return p.loss(obs, actions, rngs=jax.random.key(0))[0]

        loss, grads = nnx.value_and_grad(loss_fn)(policy)
        optimizer.update(policy, grads)
        return loss

    losses = [float(step(policy, optimizer)) for _ in range(6)]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    out = nnx.jit(lambda p, o: p.sample(o, rngs=jax.random.key(1)))(policy, obs)
    assert out.shape == (2, 8, 7)
    # the slots attend to each other and to the prompt: changing the image changes the chunk
    other = dict(obs, images={"image": np.zeros_like(obs["images"]["image"])})
    assert float(jnp.max(jnp.abs(out - policy.sample(other, rngs=jax.random.key(1))))) > 1e-4


def test_missing_statistics_unknown_key_and_pickle_only(tmp_path):
    bare = tmp_path / "no_stats"
    bare.mkdir()
    config = json.loads((FIXTURE / "config.json").read_text())
    config.pop("norm_stats")
    (bare / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="dataset_statistics.json"):
        action_normalization(bare, "vlax_tiny_synthetic")
    with pytest.raises(ValueError, match=r"unnorm_key='bridge_orig'.*known keys: \['vlax_tiny_synthetic'\]"):
        action_normalization(FIXTURE, "bridge_orig")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(FIXTURE / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="refusing to load pickle-based weights.*safe_serialization"):
        load_openvla(pickled)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(FIXTURE / "model.safetensors")
    tensors.pop("projector.fc2.bias")
    tensors["projector.fc4.weight"] = np.zeros((2, 2), np.float32)
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(FIXTURE / name, tmp_path / name)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*projector\.fc2\.bias.*projector\.fc4\.weight"):
        load_openvla(tmp_path)
    assert sizes_from_checkpoint(FIXTURE).siglip.mlp_dim == 179


def test_tiny_preset_trains_on_the_lerobot_fixture(tmp_path):
    """experiments/train.py with the tiny config (a 2 x 2 patch grid, one camera) on LeRobot's own v3 fixture:
    OpenVLA's action tokens through the LM head, teacher-forced, finite losses."""
    from experiments.train import train

    c = get_config("tiny")
    c.workdir = str(tmp_path / "run")
    c.data.sources[0].path = str(Path(__file__).parent / "fixtures" / "lerobot_ds")
    c.data.sources[0].cameras = (("observation.images.wrist", "wrist"),)
    c.data.image_size = c.model.openvla.image_size = 28  # compiling the train step dominates this test
    c.data.batch_size, c.data.shuffle_buffer, c.data.val_fraction = 8, 16, 0.0
    # byte tokenizer and a 512-id vocabulary whose last 256 ids are the bins: the 32064-row LM head's gradient
    # and compile time would dominate
    c.model.tokenizer = "byte"
    c.model.openvla.text.vocab_size = c.model.openvla.action_vocab_size = 512
    c.model.openvla.append_trailing_token = False  # 29871 is Llama-2's id
    # 2 blocks per tower (the second-to-last one is read: one runs) and 1 LM layer: about 16% less CPU time
    # (train() measured at 41-51 s against 51-61 s); multi-layer stacks are trained by the OFT test above
    c.model.openvla.dino.depth = c.model.openvla.siglip.depth = 2
    c.model.openvla.text.depth = 1
    c.model.max_text_len = 24
    c.train.steps = c.train.save_every = 2
    c.train.log_every, c.train.progress, c.train.tensorboard = 1, False, False
    summary = train(c)
    assert summary["final_step"] == 2 and all(np.isfinite(summary["losses"]))


def test_trains_on_metaworld_and_runs_closed_loop(tiny_metaworld, tmp_path):
    """The ablation's OpenVLA row on the Meta-World RLDS data, then closed-loop in MuJoCo: 4 action tokens decoded
    with the KV cache per control step."""
    from experiments.train import train
    from train_helpers import preset_row_config
    from vlax.eval import evaluate

    c = preset_row_config("openvla", tmp_path / "mw", tiny_metaworld)
    c.data.action_horizon = 1  # OpenVLA's one step per call
    summary = train(c)
    assert summary["final_step"] == 2 and all(np.isfinite(summary["losses"]))
    results = evaluate(c.workdir, "reach", episodes_per_task=1, max_steps=3, num_workers=1, progress=False)
    episode = results["episodes"][0]
    assert episode["steps"] == 3 and episode["policy_calls"] == 3
    assert results["config"]["policy_image_size"] == 56
    with pytest.raises(ValueError, match=r"data.image_size=32 but the OpenVLA towers take 56 px"):
        build_openvla(dict(c.model), PolicySpec(cameras=("corner2",), image_size=32, state_dim=0, action_dim=4,
                                                horizon=1, max_text_len=16), 64, nnx.Rngs(0))
