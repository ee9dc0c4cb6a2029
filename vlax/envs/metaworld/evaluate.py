"""Closed-loop evaluation of a policy in Meta-World 3.1.1 on layouts never used for training.

    from vlax.eval import evaluate
    results = evaluate("runs/flow", "mt10", episodes_per_task=10, num_workers=2, results_path="results.json")
    results = evaluate("expert", "reach,push,pick-place", episodes_per_task=5)   # the harness, no policy

``policy`` is a checkpoint (a training workdir or its ``checkpoints`` directory; each worker loads it with
:class:`vlax.inference.PolicyRunner`) or ``"expert"`` (Meta-World's scripted experts, run through the same
environment, camera, rendering and success rule: it proves the harness independent of any policy). Everything a
checkpoint was trained with comes from the checkpoint: its cameras, render size (the dataset's), the policy's image
size, the state and action dims, the chunk length ``H``. Frames reach the policy as training frames did: rendered
upright, stored with the dataset's encoding (JPEG), decoded and resized by the training pipeline's function.

Protocol:
  * Layouts: episode ``j`` of task ``t`` uses layout seed
    ``EVAL_LAYOUT_SEED_START + seed * SEED_STRIDE + MT50_TASKS.index(t) * TASK_STRIDE + j``; the training range
    lies below ``EVAL_LAYOUT_SEED_START``, so no evaluated layout was seen in training.
  * Instruction: the task's paraphrase number ``instruction_paraphrase`` (0, the canonical one, by default).
  * Execution: ``"receding"`` predicts a chunk of ``H`` actions, executes the first ``replan_every`` (default
    ``H``) and re-plans; ``"ensemble"`` predicts every step and executes ACT's temporal ensemble with weights
    ``exp(-ensemble_k * i)`` (``i = 0`` the oldest prediction). The expert predicts one action per step.
  * An episode succeeds if any step reports ``info["success"]`` (it stops there); it lasts at most the env's
    ``max_path_length`` (500) steps, or ``max_steps`` if smaller.
  * Dual rate: a policy with a slow plan step (Helix's S2, see :mod:`vlax.dual_rate`) plans every
    ``plan_every`` control steps (default: the policy's own period) and acts with the latest plan whenever it
    acts (``replan_every=1``: every step). ``plan_mode="sync"`` plans before the act step that needs it
    (deterministic); ``"async"`` plans on a background thread while the act steps go on (timing-dependent).
  * Determinism: episodes depend only on (policy, task, episode index, seed), never on which worker ran them
    (policy noise is ``fold_in(key(seed), task_index, episode, call)``): any ``num_workers`` gives the same
    records apart from timings.

Results (returned, and written to ``results_path`` as JSON), schema version 1::

    schema_version    int     1
    kind              str     "metaworld_closed_loop"
    policy            str     "expert" or the absolute checkpoint directory
    checkpoint_step   int | null
    config            {tasks: [str], episodes_per_task, seed, execution: "receding"|"ensemble", replan_every,
                       ensemble_k, max_steps: int|null, num_workers, camera (the rendered cameras,
                       comma-joined), render_size, policy_image_size: int|null, horizon, obs_history,
                       instruction_paraphrase, layout_seed_start,
                       video_dir: str|null,
                       video_episodes, plan_every: int|null, plan_mode}
    versions          {metaworld, mujoco, jax, python}
    date              str     ISO 8601, UTC
    per_task          {task: {success_rate: float in [0, 1], successes, episodes, mean_steps, bucket:
                       "easy"|"medium"|"hard"|"very_hard", trained_on: bool|null (null for the expert)}}
    mean_success      float   unweighted mean of the per-task success rates
    bucket_success    {bucket: mean success of the evaluated tasks in it}   (buckets with an evaluated task)
    bucket_mean       float | null   mean of the four bucket means (the published MT50 figure); null unless all
                                     four buckets were evaluated
    timing            {wall_s, episodes_per_s, env_steps_per_s, policy_calls, ms_per_policy_call: float|null,
                       ms_per_action: float|null (per-call time amortized over executed steps),
                       compile_s: float|null (mean first-call time per worker, kept out of ms_per_policy_call),
                       dual_rate: null | {act_calls, plan_calls, acts_per_plan (the act rate / plan rate ratio
                       run), ms_per_act_call, ms_per_plan_call, act_hz, plan_hz, plans_late, max_plan_age}}
    episodes          [{task, episode, layout_seed, instruction, success: bool, first_success_step (-1 if none),
                        steps, return, policy_calls, actions_sha1 (of the executed float32 actions), video:
                        str|null, wall_s, policy_s, compile_s: float|null, dual_rate: null | {plan_every, mode,
                        act_calls, plan_calls, plans_late, timed_act_calls, timed_plan_calls, act_s, plan_s,
                        max_plan_age}}]   ordered by task, then episode

:func:`vlax.eval.results.validate_results` checks a dict against this schema.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import logging
import math
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from vlax.envs.metaworld import instructions, task_sets
from vlax.envs.metaworld.sim import RolloutSettings
from vlax.eval import results as results_lib
from vlax.envs.metaworld.checkpoint_info import CheckpointError, read_checkpoint_info
from vlax.envs.metaworld.episode import (EXECUTIONS, EXPERT, PLAN_MODES, EpisodeJob, init_worker, run_episode,
                                         worker_environment)
from vlax.eval.video import VIDEO_FORMATS

TASK_STRIDE = 1_000  # layout seeds per task and seed: at most this many episodes per task
SEED_STRIDE = len(task_sets.MT50_TASKS) * TASK_STRIDE
GL_BACKENDS = ("egl", "osmesa")


def layout_seed(task: str, episode: int, seed: int = 0) -> int:
    """The evaluation layout seed of ``episode`` of ``task`` under ``seed`` (see the module docstring)."""
    return (task_sets.EVAL_LAYOUT_SEED_START + seed * SEED_STRIDE
            + task_sets.MT50_TASKS.index(task) * TASK_STRIDE + episode)


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("metaworld", "mujoco", "jax"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    versions["python"] = platform.python_version()
    return versions


@contextlib.contextmanager
def _environment(variables: dict[str, str]) -> Iterator[None]:
    """Sets ``variables`` while worker processes start (they inherit them before importing anything)."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _check_arguments(execution: str, episodes_per_task: int, seed: int, num_workers: int, ensemble_k: float,
                     video_format: str, video_episodes: int, max_steps: int | None, gl_backend: str,
                     instruction_paraphrase: int) -> None:
    if execution not in EXECUTIONS:
        raise ValueError(f"execution={execution!r}; use one of {EXECUTIONS}")
    if not 1 <= episodes_per_task <= TASK_STRIDE:
        raise ValueError(f"episodes_per_task={episodes_per_task}; use 1 .. {TASK_STRIDE}")
    if seed < 0:
        raise ValueError(f"seed={seed}; use a seed >= 0")
    if num_workers < 0:
        raise ValueError(f"num_workers={num_workers}; use 0 (this process) or more worker processes")
    if not (ensemble_k >= 0 and math.isfinite(ensemble_k)):
        raise ValueError(f"ensemble_k={ensemble_k}; use a finite value >= 0 (ACT uses 0.01)")
    if video_format not in VIDEO_FORMATS:
        raise ValueError(f"video_format={video_format!r}; use one of {VIDEO_FORMATS}")
    if video_episodes < 0:
        raise ValueError(f"video_episodes={video_episodes}; use 0 or more")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps={max_steps}; use None (the env's limit) or a positive number")
    if gl_backend not in GL_BACKENDS:
        raise ValueError(f"gl_backend={gl_backend!r}; use one of {GL_BACKENDS}")
    if instruction_paraphrase < 0:
        raise ValueError(f"instruction_paraphrase={instruction_paraphrase}; use 0 (canonical) or more")


def evaluate(
    policy: str | os.PathLike,
    tasks: str | Sequence[str] = "mt10",
    *,
    episodes_per_task: int = 10,
    seed: int = 0,
    execution: str = "receding",
    replan_every: int | None = None,
    ensemble_k: float = 0.01,
    num_workers: int = 1,
    video_dir: str | None = None,
    video_episodes: int = 1,
    video_format: str = "gif",
    max_steps: int | None = None,
    progress: bool = True,
    results_path: str | None = None,
    checkpoint_step: int | None = None,
    camera: str | None = None,
    image_size: int | None = None,
    instruction_paraphrase: int = 0,
    gl_backend: str = "egl",
    plan_every: int | None = None,
    plan_mode: str = "sync",
) -> dict[str, Any]:
    """Runs ``policy`` closed-loop on ``tasks`` and returns the results (schema in the module docstring).

    Args:
      policy: a checkpoint (training workdir or checkpoints directory) or ``"expert"``.
      tasks: ``"mt10"``, ``"mt50"``, ``"reach,push"`` or a list of task names.
      episodes_per_task: episodes (layouts) per task.
      seed: picks the layouts and the policy's noise.
      execution: ``"receding"`` or ``"ensemble"``.
      replan_every: actions executed per predicted chunk with ``"receding"`` (default: the whole chunk ``H``).
      ensemble_k: temporal-ensembling coefficient (weights ``exp(-k * i)``, oldest first).
      num_workers: worker processes (one environment and one policy copy each); 0 runs in this process.
      video_dir: where to write videos of the first ``video_episodes`` episodes of every task (None: no videos).
      video_format: ``"gif"`` or ``"mp4"``.
      max_steps: a step limit below the env's ``max_path_length``.
      progress: show a progress bar.
      results_path: also write the results there as JSON.
      checkpoint_step: evaluate this step instead of the newest.
      camera / image_size: for a checkpoint, must equal what it was trained with (None takes them from it);
        for the expert they choose the rendering (defaults: ``corner2``, 128).
      instruction_paraphrase: which of the task's instruction paraphrases the policy is given.
      gl_backend: ``"egl"`` or ``"osmesa"``.
      plan_every: control steps between plan steps of a dual-rate policy (None: the policy's own period).
      plan_mode: ``"sync"`` or ``"async"`` (see the module docstring); ignored for policies without a plan step.

    Raises:
      ValueError: an unknown task (listing the known ones) or a bad argument, naming the value.
      CheckpointError: the checkpoint is missing, lacks config / normalization / tokenizer, or does not match the
        requested camera / image size.
    """
    task_names = task_sets.resolve_tasks(tasks)
    _check_arguments(execution, episodes_per_task, seed, num_workers, ensemble_k, video_format, video_episodes,
                     max_steps, gl_backend, instruction_paraphrase)
    if plan_mode not in PLAN_MODES:
        raise ValueError(f"plan_mode={plan_mode!r}; use one of {PLAN_MODES}")
    if plan_every is not None and plan_every < 1:
        raise ValueError(f"plan_every={plan_every}; use None (the policy's own period) or a positive number")
    if str(policy) == EXPERT:
        settings = RolloutSettings(image_size=image_size or 128, cameras=(camera or "corner2",))
        policy_name, step, horizon, policy_image_size, trained = EXPERT, None, 1, None, None
        camera_names = ()
        obs_history = 1
        replan = 1  # the expert acts every step
    else:
        info = read_checkpoint_info(policy, step=checkpoint_step)
        trained_cameras = ",".join(info.settings.cameras)
        if camera is not None and camera != trained_cameras:
            raise CheckpointError(f"camera {camera!r} is not one the checkpoint was trained with "
                                  f"({trained_cameras!r}); leave camera unset to use {trained_cameras!r}")
        camera_names = info.camera_names
        if image_size is not None and image_size != info.settings.image_size:
            raise CheckpointError(f"image_size={image_size} differs from the {info.settings.image_size} px frames "
                                  f"the checkpoint's data was recorded at; leave image_size unset")
        settings, step, horizon, obs_history = info.settings, info.step, info.horizon, info.obs_history
        policy_name, policy_image_size, trained = str(Path(info.directory).absolute()), info.policy_image_size, \
            info.trained_tasks
        replan = horizon if replan_every is None else replan_every
        if execution == "receding" and not 1 <= replan <= horizon:
            raise ValueError(f"replan_every={replan} must be between 1 and the checkpoint's chunk length H={horizon}")
        unseen = [t for t in task_names if t not in trained]
        if unseen:
            logging.warning("tasks %s are not in the checkpoint's training data (%s)", unseen, list(trained))
    if execution == "ensemble":
        replan = 1
    jobs = []
    for task in task_names:
        paraphrases = instructions.INSTRUCTIONS[task]
        if instruction_paraphrase >= len(paraphrases):
            raise ValueError(f"instruction_paraphrase={instruction_paraphrase}, but {task} has "
                             f"{len(paraphrases)} paraphrases")
        for episode in range(episodes_per_task):
            video = None
            if video_dir is not None and episode < video_episodes:
                video = os.path.join(os.path.abspath(video_dir), f"{task}_episode{episode:03d}.{video_format}")
            jobs.append(EpisodeJob(
                policy=policy_name, checkpoint_step=step, task=task,
                task_index=task_sets.MT50_TASKS.index(task), episode=episode,
                layout_seed=layout_seed(task, episode, seed), seed=seed,
                instruction=instructions.instruction(task, instruction_paraphrase), settings=settings,
                execution=execution, replan_every=replan, ensemble_k=float(ensemble_k), max_steps=max_steps,
                video_path=video, plan_every=plan_every, plan_mode=plan_mode, camera_names=camera_names))
    started = time.perf_counter()
    episodes = _run(jobs, num_workers, gl_backend, progress)
    wall_s = time.perf_counter() - started
    order = {task: i for i, task in enumerate(task_names)}
    episodes.sort(key=lambda e: (order[e["task"]], e["episode"]))
    results = {
        "schema_version": results_lib.SCHEMA_VERSION,
        "kind": results_lib.KIND,
        "policy": policy_name,
        "checkpoint_step": step,
        "config": {
            "tasks": list(task_names), "episodes_per_task": episodes_per_task, "seed": seed,
            "execution": execution, "replan_every": replan, "ensemble_k": float(ensemble_k), "max_steps": max_steps,
            "num_workers": num_workers, "camera": ",".join(settings.cameras), "render_size": settings.image_size,
            "policy_image_size": policy_image_size, "horizon": horizon, "obs_history": obs_history,
            "instruction_paraphrase": instruction_paraphrase,
            "layout_seed_start": task_sets.EVAL_LAYOUT_SEED_START,
            "video_dir": None if video_dir is None else os.path.abspath(video_dir), "video_episodes": video_episodes,
            "plan_every": _plan_every(episodes, plan_every), "plan_mode": plan_mode,
        },
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **results_lib.summarize(episodes, task_names, trained),
        "timing": results_lib.timing(episodes, wall_s),
        "episodes": episodes,
    }
    results_lib.validate_results(results)
    if results_path:
        results_lib.write_results(results, results_path)
    return results


def _plan_every(episodes: list[dict], requested: int | None) -> int | None:
    """The plan period the episodes ran with (the policy's own unless requested); None without a plan step."""
    periods = {e["dual_rate"]["plan_every"] for e in episodes if e.get("dual_rate")}
    return periods.pop() if len(periods) == 1 else requested


def _run(jobs: list[EpisodeJob], num_workers: int, gl_backend: str, progress: bool) -> list[dict]:
    """Runs the jobs (in worker processes unless ``num_workers == 0``) behind a progress bar."""
    from tqdm import tqdm

    if num_workers == 0:
        if "tensorflow" in sys.modules:
            raise RuntimeError("num_workers=0 renders in this process, which has imported TensorFlow: TensorFlow "
                               "and Mesa EGL rendering crash together. Use num_workers >= 1.")
        if "mujoco" not in sys.modules:  # the GL backend is fixed when mujoco is imported
            os.environ.setdefault("MUJOCO_GL", gl_backend)
    bar = tqdm(total=len(jobs), desc="Meta-World eval", unit="ep", disable=not progress, dynamic_ncols=True)
    episodes, successes = [], 0
    executor = None
    try:
        if num_workers == 0:
            results = map(run_episode, jobs)
        else:
            environment = worker_environment(gl_backend)
            # A process pool that notices dead workers (a crashed renderer raises BrokenProcessPool, not a hang).
            executor = concurrent.futures.ProcessPoolExecutor(
                min(num_workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                initializer=init_worker, initargs=(environment,))
            with _environment(environment):
                futures = [executor.submit(run_episode, job) for job in jobs]
            results = (f.result() for f in concurrent.futures.as_completed(futures))
        for episode in results:
            episodes.append(episode)
            successes += episode["success"]
            bar.update(1)
            bar.set_postfix(success=f"{successes / len(episodes):.0%}")
    finally:
        bar.close()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return episodes
