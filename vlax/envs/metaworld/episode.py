"""One closed-loop Meta-World episode, run inside an evaluation worker process.

A worker owns one environment at a time (built by the dataset generator's :func:`ensure_env`, so the camera, its
pose, the render settings and the upright rotation are the recorded data's) and one policy, loaded once and jitted
once for a batch of one. The policy is called only when it must act: once per chunk with receding-horizon
execution, every step with temporal ensembling; the camera is rendered only for those calls (and for video). A
policy that sees an observation history (``obs_history = T > 1``) was trained on windows of T consecutive control
steps, so it observes every step: the camera is rendered and the step recorded in its window even while the
action queue still runs, and it acts on the window ending at the current step. Chunks go through the policy's
``executed`` hook (:meth:`vlax.inference.PolicyRunner.executed`) before they are queued or ensembled.

Nothing here imports JAX at module level: a worker sets its thread and GL environment first. TensorFlow is never
imported: it segfaults in a process that renders with Mesa's EGL (measured with tensorflow-cpu 2.21, mujoco 3.3.0,
either import order), so frames are resized with JAX's equivalent of the pipeline's resize.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import os
import time
import warnings
from typing import Any

import numpy as np

from vlax.envs.metaworld import sim
from vlax.envs.metaworld.sim import RolloutSettings

EXPERT = "expert"
EXECUTIONS = ("receding", "ensemble")
PLAN_MODES = ("sync", "async")

# Set in every worker before anything is imported: one XLA thread so that N workers use N cores, no GPU memory
# preallocation (several workers may share one accelerator).
WORKER_ENVIRONMENT = {
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
    "OMP_NUM_THREADS": "1",
    "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
}


def worker_environment(gl_backend: str) -> dict[str, str]:
    """Environment variables of an evaluation worker (thread limits and the headless GL backend).

    Workers see one CPU device whatever the parent forces: checkpoints restore onto one device whatever topology
    saved them.
    """
    return {**WORKER_ENVIRONMENT, "MUJOCO_GL": gl_backend, "PYOPENGL_PLATFORM": gl_backend}


def init_worker(environment: dict[str, str]) -> None:
    """Pool initializer (the variables are also in the spawned process's environment from its start)."""
    os.environ.update(environment)


@dataclasses.dataclass(frozen=True)
class EpisodeJob:
    """Everything one episode depends on; equal jobs give equal episodes in any worker.

    ``task_index`` (the task's position in ``MT50_TASKS``) and ``episode`` pick the policy's random stream, so
    stochastic heads draw the same noise however episodes are spread over workers.
    """

    policy: str
    checkpoint_step: int | None
    task: str
    task_index: int
    episode: int
    layout_seed: int
    seed: int
    instruction: str
    settings: RolloutSettings
    execution: str
    replan_every: int
    ensemble_k: float
    max_steps: int | None
    video_path: str | None = None
    video_fps: int = 30
    # policies with a slow plan step (vlax.dual_rate): its period in control steps (None: the policy's own) and
    # whether it runs before the act step that needs it ("sync") or on a background thread ("async")
    plan_every: int | None = None
    plan_mode: str = "sync"
    camera_names: tuple[str, ...] = ()  # the policy's name of each rendered camera (empty: its own, in order)


class _ExpertActor:
    """Meta-World's scripted expert as a policy with chunks of one action (it reads the simulator state)."""

    horizon = chunk_horizon = 1
    compiles = False
    dual = None
    observes_every_step = False

    def __init__(self):
        self.expert, self.calls = None, 0

    def start_episode(self, job: "EpisodeJob") -> None:
        del job

    def act(self, frame: np.ndarray, sim_obs: np.ndarray, instruction: str, key: Any, step: int = 0) -> np.ndarray:
        del frame, instruction, key, step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the experts warn that their gains exceed [-1, 1]
            # Some experts edit the observation they are given in place.
            action = self.expert.get_action(sim_obs.copy())
        return np.clip(action, -1.0, 1.0).astype(np.float32)[None]


class _CheckpointActor:
    """A trained policy, fed frames the way its training data reached it (without TensorFlow, see below).

    ``runner`` (a :class:`vlax.inference.PolicyRunner` built in this process) replaces loading ``path``; its
    pipeline must resize with ``resize_backend="jax"`` in a rendering worker.
    """

    compiles = True  # its first call traces and compiles

    def __init__(self, path: str | None, step: int | None, settings: RolloutSettings, *, runner: Any = None,
                 camera_names: tuple[str, ...] = ()):
        from vlax.inference import PolicyRunner

        self.calls = 0
        # TensorFlow cannot share this process with EGL rendering: the pipeline resizes with JAX's equal kernel.
        self.runner = runner if runner is not None else \
            PolicyRunner.from_checkpoint(path, step=step, resize_backend="jax")
        self.pipeline = self.runner.pipeline
        self.chunk_horizon = int(self.runner.spec.horizon)
        self.horizon = int(self.runner.executed_horizon)  # the actions queued / ensembled per call
        self.settings = settings
        self.state_dim = self.pipeline.metadata()["state_dim"]
        # Rendered camera i reaches the policy as its camera names[i] (training's dataset -> policy mapping).
        names = tuple(camera_names) or tuple(self.runner.spec.cameras[:len(settings.cameras)])
        missing = sorted(set(self.runner.spec.cameras) - set(names))
        if len(names) != len(settings.cameras) or missing:
            raise ValueError(f"the policy sees cameras {list(self.runner.spec.cameras)} but the environment renders "
                             f"{list(settings.cameras)} as {list(names)}")
        self.cameras = dict(zip(settings.cameras, names))
        # The policy's window of the last obs_history steps; a pass-through when it sees one step.
        self.session = self.runner.session()
        self.observes_every_step = self.runner.spec.obs_history > 1
        self.dual, self._duals = None, {}  # a dual-rate executor per (plan_every, mode), kept across episodes

    def start_episode(self, job: "EpisodeJob") -> None:
        """A new episode starts with an empty observation history and, for a planning policy, without a plan
        (its executor's compile state kept)."""
        self.session.reset()
        if not self.runner.plans:
            return
        if job.plan_mode not in PLAN_MODES:
            raise ValueError(f"plan_mode={job.plan_mode!r}; use one of {PLAN_MODES}")
        key = (job.plan_every or self.runner.plan_every, job.plan_mode)
        if key not in self._duals:
            self._duals[key] = self.runner.dual_rate(plan_every=key[0], asynchronous=key[1] == "async")
        self.dual = self._duals[key]
        self.dual.reset()

    def _image(self, frame: np.ndarray) -> np.ndarray:
        """``uint8 [S, S, 3]`` render -> ``uint8 [1, S, S, 3]``, compressed as the dataset stored it."""
        if self.settings.image_encoding == "jpeg":
            import io

            from PIL import Image

            encoded = sim.encode_frame(frame, self.settings)
            frame = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
        return frame[None]

    def _raw(self, frame: np.ndarray | dict, sim_obs: np.ndarray, instruction: str) -> dict:
        """One control step as a batched raw observation (batch of one); ``frame`` is the render of the one camera
        or ``{rendered camera: frame}``."""
        frames = frame if isinstance(frame, dict) else {next(iter(self.cameras)): frame}
        images = {self.cameras[camera]: self._image(f) for camera, f in frames.items()}
        return {"images": images, "state": sim_obs[None, :self.state_dim], "prompt": [instruction]}

    def observe(self, frame: np.ndarray, sim_obs: np.ndarray, instruction: str) -> None:
        """Record a control step at which the policy does not act (a history policy sees every step)."""
        self.session.observe(self._raw(frame, sim_obs, instruction))

    def inputs(self, frame: np.ndarray, sim_obs: np.ndarray, instruction: str) -> dict:
        """Model inputs for this frame, state and instruction, through the policy's observation pipeline (the
        window ending with this step when the policy sees a history; the step is recorded in it)."""
        return self.session.model_inputs(self._raw(frame, sim_obs, instruction))

    def act(self, frame: np.ndarray, sim_obs: np.ndarray, instruction: str, key: Any, step: int = 0) -> np.ndarray:
        inputs = self.inputs(frame, sim_obs, instruction)
        if self.dual is not None:  # the act step with the latest plan, the plan step when due
            normalized = self.dual.act(inputs, key, step)
        else:
            normalized = self.runner.sample_normalized(inputs, key)
        chunk = self.pipeline.actions(self.runner.executed(normalized))[0]  # [n, A]
        return np.clip(chunk, -1.0, 1.0)


# Per process: the loaded policy (kept across episodes and tasks) and the jitted ensembling update.
_worker: dict[str, Any] = {}


def _actor(job: EpisodeJob, expert: Any):
    if job.policy == EXPERT:
        actor = _worker.setdefault("expert", _ExpertActor())
        actor.expert = expert
        return actor
    key = (job.policy, job.checkpoint_step)
    if _worker.get("checkpoint_key") != key:
        _worker["checkpoint"] = _CheckpointActor(job.policy, job.checkpoint_step, job.settings,
                                                 camera_names=job.camera_names)
        _worker["checkpoint_key"] = key
    return _worker["checkpoint"]


def _ensembler(horizon: int, coeff: float):
    import jax

    from vlax.heads.execution import TemporalEnsembler

    key = (horizon, coeff)
    if key not in _worker.setdefault("ensemblers", {}):
        ensembler = TemporalEnsembler(horizon, coeff)
        _worker["ensemblers"][key] = (ensembler, jax.jit(ensembler.update))
    return _worker["ensemblers"][key]


def _frame(task: str, layout_seed: int, step: int, cameras: tuple[str, ...]) -> np.ndarray | dict:
    """The upright render of the one camera, or ``{camera: frame}`` of several."""
    frames = {}
    for i, camera in enumerate(cameras):
        frame = sim.render_upright(i)
        if int(frame.max()) <= sim.BLACK_FRAME_MAX_VALUE:
            raise sim.BlackFrameError(
                f"All-black frame from camera {camera!r} (task {task}, layout seed {layout_seed}, step {step}): a GL "
                "context was lost. Use one environment per process and close + delete + gc.collect() an environment "
                "before building the next one.")
        frames[camera] = frame
    return frames[cameras[0]] if len(cameras) == 1 else frames


def run_episode(job: EpisodeJob) -> dict[str, Any]:
    """Runs one episode; success if any step reports it (the episode stops there), at most the env's step limit.

    Returns:
      The episode record of the results schema (see :mod:`vlax.envs.metaworld.evaluate`); ``compile_s`` is set when this
      episode made the worker's first (compiling) policy call and that call's time is kept out of ``policy_s``.
    """
    started = time.perf_counter()
    env, expert = sim.ensure_env(job.task, job.settings)
    actor = _actor(job, expert)
    rollout = run_rollout(env, actor, job, lambda t: _frame(job.task, job.layout_seed, t,
                                                                       job.settings.cameras))
    if not _worker.get("close_at_exit"):
        # After the first render mujoco has registered its display teardown; hooks run last-in first-out, so the
        # environment's GL context is freed before the display goes.
        atexit.register(sim.close_env)
        _worker["close_at_exit"] = True
    if job.video_path:
        from vlax.eval.video import write_video

        write_video(job.video_path, rollout.pop("frames"), fps=job.video_fps)
    actions = rollout.pop("actions")
    return {
        "task": job.task,
        "episode": job.episode,
        "layout_seed": job.layout_seed,
        "instruction": job.instruction,
        "success": rollout["first_success"] >= 0,
        "first_success_step": rollout["first_success"],
        "steps": len(actions),
        "return": rollout["return"],
        "policy_calls": rollout["calls"],
        "actions_sha1": hashlib.sha1(actions.tobytes()).hexdigest(),
        "video": job.video_path,
        "wall_s": time.perf_counter() - started,
        "policy_s": rollout["policy_s"],
        "compile_s": rollout["compile_s"],
        "dual_rate": rollout["dual_rate"],
    }


def _replan_every(job: EpisodeJob, actor: Any) -> int:
    """Actions executed per chunk: the job's, where "the whole chunk" (the evaluator's default, ``H``) means the
    actions the policy's ``executed`` hook keeps."""
    replan = job.replan_every
    if job.execution == "receding" and replan > actor.horizon:
        if replan == actor.chunk_horizon:
            return actor.horizon
        raise ValueError(f"replan_every={replan} exceeds the {actor.horizon} actions the policy executes per chunk "
                         f"(of the {actor.chunk_horizon} it predicts); use replan_every <= {actor.horizon}")
    return replan


def run_rollout(env: Any, actor: Any, job: EpisodeJob, render: Any) -> dict[str, Any]:
    """The control loop of one episode on a built environment (``seed``, ``reset``, ``step``,
    ``max_path_length``); ``render(t)`` returns the camera frame ``uint8 [S, S, 3]`` of control step ``t``.

    Returns ``actions`` (float32 ``[T, A]``), ``frames`` (the rendered frames when ``job.video_path`` is set),
    ``calls``, ``policy_s``, ``compile_s``, ``return``, ``first_success`` (-1: none) and ``dual_rate``.
    """
    import jax

    from vlax.heads.execution import ActionQueue

    replan = _replan_every(job, actor)
    actor.start_episode(job)
    dual_before = None if actor.dual is None else dataclasses.replace(actor.dual.stats)
    env.seed(job.layout_seed)
    obs, _ = env.reset()
    limit = env.max_path_length if job.max_steps is None else min(job.max_steps, env.max_path_length)
    episode_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(job.seed), job.task_index), job.episode)
    queue = ActionQueue(replan) if job.execution == "receding" else None
    if queue is None:
        ensembler, update = _ensembler(actor.horizon, job.ensemble_k)
        ensemble_state = ensembler.init(1, sim.ACTION_DIM)
    observes_every_step = bool(getattr(actor, "observes_every_step", False))
    frames, actions = [], []
    calls, policy_s, compile_s, episode_return, first_success = 0, 0.0, None, 0.0, -1
    for t in range(limit):
        must_act = queue is None or len(queue) == 0
        needs_frame = must_act or observes_every_step
        frame = render(t) if needs_frame or job.video_path else None
        if job.video_path:  # several cameras side by side
            frames.append(np.concatenate(list(frame.values()), axis=1) if isinstance(frame, dict) else frame)
        if must_act:
            call_started = time.perf_counter()
            chunk = actor.act(frame, obs, job.instruction, jax.random.fold_in(episode_key, calls), step=t)
            elapsed = time.perf_counter() - call_started
            if actor.compiles and actor.calls == 0:
                compile_s = elapsed  # kept out of the inference time
            else:
                policy_s += elapsed
            calls += 1
            actor.calls += 1
        elif observes_every_step:  # the window holds consecutive steps, as in training
            actor.observe(frame, obs, job.instruction)
        if queue is not None:
            if must_act:
                queue.push(chunk[None])
            action = np.asarray(queue.pop()[0], np.float32)
        else:
            action, ensemble_state = update(ensemble_state, chunk[None])
            action = np.asarray(action[0], np.float32)
        actions.append(action)
        obs, reward, _, truncated, info = env.step(action)
        episode_return += float(reward)
        if info["success"]:
            first_success = t
            break
        if truncated:
            break
    dual_rate = None if actor.dual is None else _dual_rate_record(actor.dual, dual_before)
    return {"actions": np.asarray(actions, np.float32), "frames": frames, "calls": calls, "policy_s": policy_s,
            "compile_s": compile_s, "return": episode_return, "first_success": first_success,
            "dual_rate": dual_rate}


def _dual_rate_record(dual: Any, before: Any) -> dict[str, Any]:
    """This episode's share of a dual-rate executor's counters (they accumulate over the worker's episodes)."""
    if dual.asynchronous:
        dual.reset()  # a plan still running belongs to this episode
    now = dual.stats
    counts = {f: getattr(now, f) - getattr(before, f) for f in (
        "act_calls", "plan_calls", "plans_late", "timed_act_calls", "timed_plan_calls", "act_s", "plan_s")}
    return {"plan_every": dual.plan_every, "mode": "async" if dual.asynchronous else "sync", **counts,
            "max_plan_age": now.max_plan_age}
