"""Closed-loop Meta-World evaluation: the scripted expert proves the harness, a tiny trained policy runs through
both execution modes, episodes do not depend on the number of workers, and bad inputs fail with one clear error."""

import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from experiments.train import train
from train_helpers import tiny_config
from vlax.envs.metaworld import EVAL_LAYOUT_SEED_START, MT50_TASKS
from vlax.eval import CheckpointError, evaluate, load_results, open_loop_metrics
from vlax.eval.results import DETERMINISTIC_EPISODE_FIELDS
from vlax.inference import PolicyRunner


@pytest.fixture(scope="module")
def flow_policy(tiny_metaworld, tmp_path_factory):
    """A flow-matching policy (its sampling noise makes worker-independence a real check), trained for 2 steps."""
    c = tiny_config(tmp_path_factory.mktemp("eval_flow"), tiny_metaworld, steps=2, save_every=2)
    c.model.head = "flow"
    train(c)
    return c


def test_expert_through_the_harness_reproduces_its_success(tmp_path):
    path = tmp_path / "expert.json"
    results = evaluate("expert", "reach,push,pick-place", episodes_per_task=3, num_workers=2, progress=False,
                       results_path=str(path), video_dir=str(tmp_path / "videos"), video_episodes=1)
    # The scripted experts solve nearly every layout of these tasks (10/10 on the first ten evaluation layouts each).
    for task in ("reach", "push", "pick-place"):
        assert results["per_task"][task]["success_rate"] >= 0.9, results["per_task"][task]
    assert results == load_results(str(path))  # the file validates against the schema and round-trips
    assert results["kind"] == "metaworld_closed_loop" and results["schema_version"] == 1
    assert results["config"]["camera"] == "corner2" and results["config"]["render_size"] == 128
    assert set(results["bucket_success"]) == {"easy", "hard"} and results["bucket_mean"] is None
    assert results["bucket_success"]["hard"] == pytest.approx(
        (results["per_task"]["push"]["success_rate"] + results["per_task"]["pick-place"]["success_rate"]) / 2)
    assert [(e["task"], e["episode"]) for e in results["episodes"]] == [
        (t, j) for t in ("reach", "push", "pick-place") for j in range(3)]
    seeds = [e["layout_seed"] for e in results["episodes"]]
    assert min(seeds) >= EVAL_LAYOUT_SEED_START and len(set(seeds)) == len(seeds)
    for e in results["episodes"]:
        assert e["success"] == (e["first_success_step"] >= 0) and e["steps"] == e["first_success_step"] + 1
        assert e["policy_calls"] == e["steps"]  # the expert acts every step
    assert results["timing"]["episodes_per_s"] > 0
    video = results["episodes"][0]["video"]
    with Image.open(video) as gif:  # one frame per executed step, upright 128 px renders
        assert gif.n_frames == results["episodes"][0]["steps"] and gif.size == (128, 128)
    assert results["episodes"][1]["video"] is None


def test_policy_runs_both_execution_modes_and_ignores_worker_count(flow_policy):
    # One episode per task: with two workers each runs one; with one worker it switches tasks in between.
    common = dict(episodes_per_task=1, max_steps=12, progress=False, seed=3)
    one = evaluate(flow_policy.workdir, "reach,push", execution="receding", replan_every=3, num_workers=1, **common)
    two = evaluate(flow_policy.workdir, "reach,push", execution="receding", replan_every=3, num_workers=2, **common)
    strip = lambda r: [{k: e[k] for k in DETERMINISTIC_EPISODE_FIELDS} for e in r["episodes"]]  # noqa: E731
    assert strip(one) == strip(two)
    horizon = flow_policy.data.action_horizon
    assert one["config"]["horizon"] == horizon and one["config"]["policy_image_size"] == 32
    assert one["config"]["render_size"] == 64  # the dataset's recorded size, from the checkpoint
    for e in one["episodes"]:
        assert e["steps"] == 12 and e["policy_calls"] == 4  # a chunk every 3 executed actions
    # Different tasks get different instructions and noise, so their executed actions differ.
    assert len({e["actions_sha1"] for e in one["episodes"]}) == 2
    assert one["per_task"]["reach"]["trained_on"] is True

    ensemble = evaluate(flow_policy.workdir, "reach", execution="ensemble", ensemble_k=0.01, num_workers=1,
                        episodes_per_task=1, max_steps=6, progress=False)
    episode = ensemble["episodes"][0]
    assert episode["policy_calls"] == episode["steps"] == 6  # a chunk every step, averaged over time
    assert ensemble["timing"]["compile_s"] > 0 and ensemble["timing"]["ms_per_policy_call"] > 0


def test_bad_inputs_fail_with_one_clear_error(flow_policy, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown Meta-World task\(s\) \['pick-and-place'\].*pick-place"):
        evaluate("expert", "reach,pick-and-place", episodes_per_task=1)
    with pytest.raises(CheckpointError, match="camera 'corner3' is not one the checkpoint was trained with "
                                              r"\('corner2'\)"):
        evaluate(flow_policy.workdir, "reach", camera="corner3", episodes_per_task=1)
    horizon = flow_policy.data.action_horizon
    with pytest.raises(ValueError, match=f"replan_every={horizon + 1} must be between 1 and the checkpoint's chunk "
                                         f"length H={horizon}"):
        evaluate(flow_policy.workdir, "reach", replan_every=horizon + 1, episodes_per_task=1)
    with pytest.raises(ValueError, match="execution='chunked'"):
        evaluate(flow_policy.workdir, "reach", execution="chunked")
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(str(tmp_path / "nowhere"), "reach")
    for item in ("normalization", "tokenizer", "config"):
        broken = tmp_path / f"no_{item}"
        shutil.copytree(flow_policy.workdir, broken)
        shutil.rmtree(broken / "checkpoints" / "2" / item)
        with pytest.raises(CheckpointError, match=f"has no '{item}' item"):
            evaluate(str(broken), "reach", episodes_per_task=1)


def test_open_loop_metric_of_a_checkpoint_matches_the_runner(flow_policy):
    from vlax.data import DataConfig, build_pipeline
    from vlax.envs.metaworld import metaworld_source

    runner = PolicyRunner.from_checkpoint(flow_policy.workdir)
    config = DataConfig(batch_size=4, action_horizon=runner.spec.horizon, image_size=32, train=False)
    from vlax.data.source_config import rlds_version_dir

    data = build_pipeline([metaworld_source(rlds_version_dir(f"{flow_policy.data.sources[0].path}/metaworld_experts"))],
                          config)
    batches = list(zip(range(1), iter(data)))
    metrics = open_loop_metrics(runner, (b for _, b in batches), num_batches=1, rng=jax.random.key(5))
    # The same numbers through the runner's public path: raw state in, un-normalized actions out.
    art = runner.artifact
    squared = absolute = count = 0.0
    for i, batch in batches:
        obs = batch["observation"]
        text = [t.decode() for t in batch["task"]["language_instruction"]]
        raw = {"images": {"corner2": obs["image_corner2"][:, -1]},
               "state": art.unnormalize("state", obs["state"][:, -1]), "prompt": text}
        predicted = runner.infer(raw, rng=jax.random.fold_in(jax.random.key(5), i))
        target = art.unnormalize("action", batch["action"][:, -1])
        mask = batch["action_mask"][:, -1]
        squared += np.sum(mask * (predicted - target) ** 2)
        absolute += np.sum(mask * np.abs(predicted - target))
        count += mask.sum()
    assert metrics["num_batches"] == 1 and metrics["num_values"] == count
    np.testing.assert_allclose(metrics["action_mse"], squared / count, rtol=1e-5)
    np.testing.assert_allclose(metrics["action_l1"], absolute / count, rtol=1e-5)


def test_worker_inputs_equal_the_runners(flow_policy):
    from vlax.envs.metaworld.sim import RolloutSettings
    from vlax.envs.metaworld.episode import _CheckpointActor

    actor = _CheckpointActor(flow_policy.workdir, None, RolloutSettings(image_size=64))
    rs = np.random.RandomState(0)
    frame = rs.randint(0, 256, (64, 64, 3)).astype(np.uint8)
    sim_obs = rs.uniform(-0.5, 0.5, 39)
    got = actor.inputs(frame, sim_obs, "reach the goal")
    assert got["images"]["corner2"].shape == (1, 32, 32, 3)
    raw = {"images": {"corner2": got["images"]["corner2"]}, "state": sim_obs[None, :4], "prompt": ["reach the goal"]}
    want = actor.runner.pipeline.model_inputs(raw)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(g, w)


def test_layout_seeds_are_unseen_and_distinct():
    from vlax.eval import layout_seed

    seeds = {layout_seed(t, j, s) for t in MT50_TASKS for j in (0, 999) for s in (0, 1)}
    assert len(seeds) == 50 * 2 * 2 and min(seeds) == EVAL_LAYOUT_SEED_START
