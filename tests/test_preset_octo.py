"""Octo preset against Octo's own outputs (tests/fixtures/octo: two tiny random models saved by Octo's code).

``octo_tiny`` (primary + wrist cameras, language embeddings repeated at every timestep, diffusion head) and
``octo_tiny_l1`` (primary camera, 5-D proprio, L1 head with MAP pooling) are imported from Octo's saved format
(config.json, example_batch.msgpack, dataset_statistics.json, 1/default/checkpoint); the stored batch (window 2,
its second example with a padded first timestep and masked goal images) goes through the policy, and every token
group (tokens and masks), the L1 head, the diffusion schedule, every denoiser step and the whole reverse
trajectory under the stored noise are compared with reference.npz.

Tolerance 1e-5 (fp32), absolute for values of order one and relative to ``max |ref|`` above. One argued
exception: the first reverse step (t = 19, beta = 0.999) multiplies the denoiser's output by
``(1 - alpha) / sqrt(1 - abar) / sqrt(alpha)`` = 31.6, so its float32 rounding (2.4e-6 on |eps| = 2.6) becomes
7.5e-5 on x (pre-clip |x| up to 140, i.e. 5e-7 relative); the trajectory is held to 1e-5 x that gain.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, serialization, traverse_util

from experiments.configs.octo import get_config
from vlax.nn import HeadContext
from vlax.nn import noise_schedules as ns
from vlax.policy import PolicySpec
from vlax.presets.octo import build_octo
from vlax.weights.common import CheckpointError
from vlax.weights.octo import action_normalization, load_octo, read_msgpack

FIXTURE = Path(__file__).parent / "fixtures" / "octo"
TOL = 1e-5
FIRST_STEP_GAIN = 31.6  # (1 - alpha_19) / sqrt(1 - abar_19) / sqrt(alpha_19), see the module docstring


def err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.max(np.abs(got - want))) / max(1.0, float(np.max(np.abs(want))))


def octo_obs(r: dict, cameras) -> dict:
    """Octo's observation / task dicts in the preset's names."""
    obs = {"images": {c: r[f"observation/image_{c}"] for c in cameras},
           "goal_images": {c: r[f"task/image_{c}"] for c in cameras},
           "timestep_pad_mask": r["observation/timestep_pad_mask"],
           "pad_mask": {c: r[f"observation/pad_mask_dict/image_{c}"] for c in cameras},
           "task_pad_mask": {"language": r["task/pad_mask_dict/language_instruction"]},
           "language_embeddings": r["task/language_instruction"]}
    if "observation/proprio" in r:
        obs["state"] = r["observation/proprio"]
    return obs


def all_readouts(outputs) -> HeadContext:
    """The readouts of every window timestep as one head context ``[B * T, R, D]``."""
    tokens, mask = outputs["readout_action"]
    return HeadContext(tokens=tokens.reshape(-1, *tokens.shape[2:]), mask=mask.reshape(-1, mask.shape[-1]))


@pytest.fixture(scope="module", params=["octo_tiny", "octo_tiny_l1"])
def model(request):
    name = request.param
    with np.load(FIXTURE / name / "reference.npz") as f:
        r = {k: f[k] for k in f.files}
    policy = load_octo(FIXTURE / name)
    obs = octo_obs(r, policy.spec.cameras)
    outputs = nnx.jit(lambda p, o: p.transformer_outputs(o))(policy, obs)
    return name, policy, r, obs, outputs


def test_checkpoint_layout(model):
    name, policy, _, _, _ = model
    meta = json.loads((FIXTURE / name / "reference_meta.json").read_text())
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(policy, nnx.Param)))
    assert n == meta["num_params"]  # every checkpoint array loaded (strict: none missing, none unexpected)
    assert policy.spec.obs_history == 2 and policy.spec.horizon == 4 and policy.spec.action_dim == 7


def test_token_groups_and_masks_match(model):
    name, _, r, _, outputs = model
    groups = sorted({k.split("/")[1] for k in r if k.startswith("transformer_outputs/")})
    assert sorted(outputs) == groups, (sorted(outputs), groups)
    for group in groups:
        tokens, mask = outputs[group]
        assert err(tokens, r[f"transformer_outputs/{group}/tokens"]) <= TOL, group
        np.testing.assert_array_equal(np.asarray(mask), r[f"transformer_outputs/{group}/mask"].astype(bool))


def test_l1_head_and_sampled_actions(model):
    name, policy, r, obs, outputs = model
    if name != "octo_tiny_l1":
        pytest.skip("the L1 head is octo_tiny_l1's")
    ctx = all_readouts(outputs)
    assert err(policy.head.predict(ctx).reshape(2, 2, 4, 7), r["l1/head_mean_all_timesteps"]) <= TOL
    actions = nnx.jit(lambda p, o: p.sample(o))(policy, obs)
    assert err(actions, r["sample_actions"]) <= TOL
    norm = action_normalization(FIXTURE / name)  # flat statistics (fine-tuning layout)
    assert err(norm.unnormalize("action", np.asarray(actions)), r["sample_actions_unnormalized"]) <= TOL


@pytest.fixture(scope="module")
def diffusion(model):
    name, policy, r, obs, outputs = model
    if name != "octo_tiny":
        pytest.skip("the diffusion head is octo_tiny's")
    head = policy.head
    ctx = all_readouts(outputs)  # every window timestep: [B * T, 1, D]
    cond = head.condition(ctx)
    flat = lambda a: jnp.asarray(a).reshape(*a.shape[:-3], 4, 4, 7) if a.ndim > 3 else jnp.asarray(a).reshape(4, 4, 7)  # noqa: E731
    return policy, head, r, ctx, cond, flat


def test_schedule_and_every_denoiser_step(diffusion):
    """Cosine betas and alpha_hats; teacher-forced, each of the 20 steps from the stored x_t gives the stored
    eps, pre-clip x and clipped x."""
    _, head, r, _, cond, flat = diffusion
    assert err(head.schedule.betas, r["diffusion/betas"]) <= TOL
    assert err(head.schedule.alphas_cumprod, r["diffusion/alpha_hats"]) <= TOL
    step = jax.jit(lambda x, t, z: (lambda e: (e, *ns.ddpm_sample_space_step(head.schedule, e, t, x, z,
                                                                              clip_range=5.0)))(
        head.denoiser(x, jnp.full((4,), t), cond)))
    for i, t in enumerate(range(19, -1, -1)):
        eps, new, pre = step(flat(r["diffusion/traj_x"][i]), t, flat(r["diffusion/step_noise"][i]))
        gain = FIRST_STEP_GAIN if t == 19 else 1.0
        assert err(eps.reshape(2, 2, 28), r["diffusion/traj_eps"][i]) <= TOL, t
        assert err(pre.reshape(2, 2, 28), r["diffusion/traj_preclip"][i]) <= TOL * gain, t
        assert err(new.reshape(2, 2, 28), r["diffusion/traj_x"][i + 1]) <= TOL * gain, t


def test_whole_reverse_trajectory_and_final_actions(diffusion):
    """The head's own sampler from the stored initial and per-step noise: the whole chain, its pre-clip values
    and the final (last-timestep) actions, normalized and un-normalized with the dataset's statistics."""
    policy, head, r, ctx, cond, flat = diffusion
    x = flat(r["diffusion/init_noise"])
    run = jax.jit(lambda x, t, z: ns.ddpm_sample_space_step(head.schedule, head.denoiser(x, jnp.full((4,), t), cond),
                                                            t, x, z, clip_range=5.0))
    for i, t in enumerate(range(19, -1, -1)):
        x, pre = run(x, t, flat(r["diffusion/step_noise"][i]))
        assert err(pre.reshape(2, 2, 28), r["diffusion/traj_preclip"][i]) <= TOL * FIRST_STEP_GAIN, t
        assert err(x.reshape(2, 2, 28), r["diffusion/traj_x"][i + 1]) <= TOL * FIRST_STEP_GAIN, t
    sampled = nnx.jit(lambda h, c, n, s: h.sample(c, rngs=jax.random.key(0), noise=n, step_noise=s))(
        head, ctx, flat(r["diffusion/init_noise"]), flat(r["diffusion/step_noise"]))
    assert err(sampled.reshape(2, 2, 28), r["diffusion/traj_x"][-1]) <= TOL * FIRST_STEP_GAIN
    final = np.asarray(sampled).reshape(2, 2, 4, 7)[:, -1]
    assert err(final, r["sample_actions"]) <= TOL * FIRST_STEP_GAIN
    assert np.mean(np.abs(final) == 5.0) > 0.5  # the README's caveat: most actions sit at the clip
    norm = action_normalization(FIXTURE / "octo_tiny", "tiny_dataset")
    assert err(norm.unnormalize("action", final), r["sample_actions_unnormalized"]) <= TOL * FIRST_STEP_GAIN


@pytest.mark.parametrize("variant,without_t5", [("small", 27_042_060), ("base", 92_830_092)])
def test_published_sizes(variant, without_t5):
    """Octo-small / Octo-base built abstractly: 27.0M / 92.8M without the frozen T5-base encoder (Octo's README:
    27M / 93M params; T5-base's encoder adds 109,628,544)."""
    spec = PolicySpec(cameras=("primary", "wrist"), image_size=256, state_dim=0, action_dim=7, horizon=4,
                      max_text_len=16, state_input="none", obs_history=2)
    m = nnx.eval_shape(lambda: build_octo(get_config(variant).model.to_dict(), spec, 0, nnx.Rngs(0)))
    count = lambda x: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nnx.state(x, nnx.Param)))  # noqa: E731
    assert count(m.t5) == 109_628_544
    assert count(m) - count(m.t5) == without_t5
    assert m.obs_pos_embeddings["primary"].shape == (10, 256, get_config(variant).model.octo.width)


def test_missing_unexpected_keys_and_statistics_errors(tmp_path):
    src = FIXTURE / "octo_tiny"
    for name in ("config.json", "example_batch.msgpack"):
        shutil.copy(src / name, tmp_path / name)
    params = read_msgpack(src / "1" / "default" / "checkpoint")
    params.pop("octo_transformer/obs_wrist_projection/bias")
    params["heads_action/extra/kernel"] = np.zeros((2, 2), np.float32)
    (tmp_path / "1" / "default").mkdir(parents=True)
    tree = traverse_util.unflatten_dict(params, sep="/")
    (tmp_path / "1" / "default" / "checkpoint").write_bytes(serialization.msgpack_serialize(tree))
    with pytest.raises(CheckpointError, match=r"(?s)missing keys.*obs_projections\.wrist\.bias.*unexpected.*"
                                              r"heads_action/extra/kernel"):
        load_octo(tmp_path)
    with pytest.raises(CheckpointError, match="dataset_statistics.json not found.*copy"):
        action_normalization(tmp_path, "tiny_dataset")
    with pytest.raises(ValueError, match=r"dataset='bridge'.*known keys: \['tiny_dataset'\]"):
        action_normalization(src, "bridge")


def tiny_model(head: str = "diffusion", head_kwargs=None) -> dict:
    model = get_config("tiny").model.to_dict()
    model["head"] = head
    model["head_kwargs"] = head_kwargs if head_kwargs is not None else model["head_kwargs"]
    return model


def random_obs(rng, batch: int = 2, size: int = 32, text: int = 16) -> dict:
    return {"images": {"primary": rng.integers(0, 256, (batch, 2, size, size, 3), dtype=np.uint8)},
            "text_ids": rng.integers(3, 259, (batch, text)).astype(np.int32), "text_mask": np.ones((batch, text), bool),
            "timestep_pad_mask": np.array([[True, True]] + [[False, True]] * (batch - 1))}


def test_head_swap_to_chunk_samples_a_chunk():
    spec = PolicySpec(cameras=("primary",), image_size=32, state_dim=0, action_dim=7, horizon=4, max_text_len=16,
                      state_input="none", obs_history=2)
    policy = build_octo(tiny_model("chunk", {"width": 32, "mlp_dim": 64, "num_heads": 2}), spec, 259, nnx.Rngs(0))
    obs = random_obs(np.random.default_rng(0))
    out, loss = nnx.jit(lambda p, o: (p.sample(o, rngs=jax.random.key(1)),  # a chunk per window step below
                                      p.loss(o, jnp.zeros((2, 2, 4, 7)), rngs=jax.random.key(0))[0]))(policy, obs)
    assert out.shape == (2, 4, 7) and bool(jnp.all(jnp.isfinite(out)))
    assert np.isfinite(float(loss))


def test_finetune_a_new_head_from_an_octo_checkpoint():
    """Octo's recipe: keep the pretrained transformer and tokenizers, re-initialise the action head (here a new
    L1 head for a 3-D action space) -- the transplant behind ``finetune.reinit='^head/'``."""
    from vlax.train.finetune import transplant

    pretrained = load_octo(FIXTURE / "octo_tiny")
    spec = PolicySpec(**{**pretrained.spec.__dict__, "action_dim": 3})
    target = type(pretrained)(spec, pretrained.sizes, head_name="l1_map", rngs=nnx.Rngs(1))
    old, new = nnx.to_pure_dict(nnx.state(pretrained, nnx.Param)), nnx.to_pure_dict(nnx.state(target, nnx.Param))
    with pytest.raises(ValueError, match="finetune.reinit"):
        transplant(new, old)
    params, reinit, unused = transplant(new, old, reinit="^head/")
    assert reinit and all(n.startswith("head/") for n in reinit)
    assert unused and all(n.startswith("head/") for n in unused)
    state = nnx.state(target, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(target, state)
    np.testing.assert_array_equal(np.asarray(target.transformer.final_norm.scale[...]),
                                  np.asarray(pretrained.transformer.final_norm.scale[...]))
    r = dict(np.load(FIXTURE / "octo_tiny" / "reference.npz"))
    assert nnx.jit(lambda p, o: p.sample(o))(target, octo_obs(r, spec.cameras)).shape == (2, 4, 3)


def test_tiny_preset_trains_on_the_lerobot_fixture(tmp_path):
    """experiments/train.py with the tiny config on LeRobot's v3 fixture: window 2, a tiny T5 over byte ids,
    the diffusion head; finite losses."""
    from experiments.train import train

    c = get_config("tiny")
    c.workdir = str(tmp_path / "run")
    c.data.sources[0].path = str(Path(__file__).parent / "fixtures" / "lerobot_ds")
    c.data.sources[0].cameras = (("observation.images.wrist", "wrist"),)
    c.data.image_size = 32
    c.data.batch_size, c.data.shuffle_buffer, c.data.val_fraction = 8, 16, 0.0
    c.train.steps = c.train.save_every = 2
    c.train.log_every, c.train.progress, c.train.tensorboard = 1, False, False
    summary = train(c)
    assert summary["final_step"] == 2 and all(np.isfinite(summary["losses"]))


def test_trains_on_metaworld_and_runs_closed_loop_with_its_window(tiny_metaworld, tmp_path):
    """The ablation's Octo row on the Meta-World RLDS data (window 2, every window step's readout on its own chunk,
    the state as proprio tokens), then closed-loop in MuJoCo with the evaluator keeping the 2-step window."""
    from experiments.train import train
    from train_helpers import preset_row_config
    from vlax.eval import evaluate

    c = preset_row_config("octo", tmp_path / "mw", tiny_metaworld)
    c.data.action_horizon = 2
    summary = train(c)
    assert summary["final_step"] == 2 and all(np.isfinite(summary["losses"]))
    results = evaluate(c.workdir, "reach", episodes_per_task=1, max_steps=4, num_workers=1, progress=False)
    episode = results["episodes"][0]
    assert results["config"]["obs_history"] == 2
    assert episode["steps"] == 4 and episode["policy_calls"] == 2  # a 2-step chunk per call


def test_embodiment_action_dim_holds_padded_dims_at_their_training_noise(diffusion):
    """Octo's ``predict_action(embodiment_action_dim=k)``: after each reverse step, dims >= k are replaced by
    ``sqrt(1 - alpha_hat_t) * z_t``. Reference: that loop in float64 numpy from Octo's equations and its stored
    schedule, with the (separately proven) denoiser as the only vlax piece, under the stored noise."""
    _, head, r, ctx, cond, flat = diffusion
    k = 5
    betas = r["diffusion/betas"].astype(np.float64)
    alphas, alpha_hats = 1.0 - betas, r["diffusion/alpha_hats"].astype(np.float64)
    denoise = jax.jit(lambda x, t: head.denoiser(x, jnp.full((4,), t), cond))
    real = np.arange(7) < k
    x = np.asarray(flat(r["diffusion/init_noise"]), np.float64)
    for i, t in enumerate(range(19, -1, -1)):
        z = np.asarray(flat(r["diffusion/step_noise"][i]), np.float64)
        eps = np.asarray(denoise(jnp.asarray(x, jnp.float32), t), np.float64)
        x = (x - (1 - alphas[t]) / np.sqrt(1 - alpha_hats[t]) * eps) / np.sqrt(alphas[t])
        x = np.clip(x + (t > 0) * np.sqrt(betas[t]) * z, -5.0, 5.0)
        x = np.where(real, x, np.sqrt(1 - alpha_hats[t]) * z)
    run = nnx.jit(lambda h, c, n, s, d: h.sample(c, rngs=jax.random.key(0), noise=n, step_noise=s,
                                                 embodiment_action_dim=d), static_argnums=4)
    noise, steps = flat(r["diffusion/init_noise"]), flat(r["diffusion/step_noise"])
    sampled = np.asarray(run(head, ctx, noise, steps, k))
    assert err(sampled, x) <= TOL * FIRST_STEP_GAIN
    last_z = np.asarray(steps[-1])
    # the head's float32 alpha_hat against Octo's stored one: one float32 rounding of sqrt(1 - alpha_hat) * z
    np.testing.assert_allclose(sampled[..., k:], np.sqrt(1 - alpha_hats[0]) * last_z[..., k:], rtol=0, atol=1e-6)
    assert not np.allclose(sampled[..., :k], np.asarray(run(head, ctx, noise, steps, 7))[..., :k], atol=1e-4)
    # all dims real is the unmasked sampler
    np.testing.assert_array_equal(np.asarray(run(head, ctx, noise, steps, 7)),
                                  np.asarray(head.sample(ctx, rngs=jax.random.key(0), noise=noise, step_noise=steps)))


def test_embodiment_action_dim_bad_values():
    from vlax.heads import get_head
    from vlax.nn import ContextSpec
    with pytest.raises(ValueError, match="outside 1..7"):
        get_head("diffusion", action_dim=7, horizon=4, context=ContextSpec(width=8), sampler="octo",
                 embodiment_action_dim=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs sampler='octo'"):
        get_head("diffusion", action_dim=7, horizon=4, context=ContextSpec(width=8), sampler="ddpm",
                 embodiment_action_dim=5, rngs=nnx.Rngs(0))
