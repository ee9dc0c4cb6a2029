"""Scripted-expert rollouts in Meta-World 3.1.1, run inside worker processes.

This module imports neither TensorFlow nor JAX, so spawned workers start fast. Each worker owns one environment at a
time and closes it (close + del + gc) before building the next one: a closed environment collected after a new one
made its GL context makes every later frame black without an error.
"""

from __future__ import annotations

import dataclasses
import gc
import io
import os
import warnings
from typing import Any

import numpy as np

from vlax.envs.metaworld import instructions, task_sets

# The camera pose of the published MT50 protocol (the Masked World Models setting) for ``corner2``.
PUBLISHED_CORNER2_POSITION = (0.75, 0.075, 0.7)
# A frame whose brightest pixel is at most this is treated as black (the GL-context trap).
BLACK_FRAME_MAX_VALUE = 5
STATE_DIM = 4
PRIVILEGED_STATE_DIM = 39
ACTION_DIM = 4


class BlackFrameError(RuntimeError):
    """An all-black frame was rendered: the known headless GL-context trap."""


class RenderBackendError(RuntimeError):
    """The headless GL backend could not create a context or render."""


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """How episodes are recorded (all fields are part of the dataset's identity)."""

    image_size: int = 128
    cameras: tuple[str, ...] = ("corner2",)
    max_steps: int = 500
    steps_after_success: int = 5
    image_encoding: str = "jpeg"
    jpeg_quality: int = 95
    published_camera_pose: bool = True
    # > 0: each training episode starts the hand at a seeded uniform offset of up to this many metres per axis from
    # the task's start (clipped to the reachable box). With one fixed start, where the arm already is says where it
    # is going, and a policy learns to continue its own motion instead of looking at the goal; evaluation keeps the
    # task's start.
    hand_start_noise: float = 0.0


def set_gl_backend(backend: str) -> None:
    """Selects the headless GL backend; must run before ``mujoco`` is imported in this process."""
    os.environ["MUJOCO_GL"] = backend
    if backend in ("egl", "osmesa"):
        os.environ["PYOPENGL_PLATFORM"] = backend


_current: dict[str, Any] = {}


def _close_current() -> None:
    env = _current.pop("env", None)
    _current.clear()
    if env is not None:
        env.close()
        del env
        gc.collect()


def _make_env(task: str, settings: RolloutSettings):
    import metaworld
    import mujoco
    from metaworld.policies import ENV_POLICY_MAP

    name = task_sets.env_name(task)
    bench = metaworld.MT1(name, seed=0)
    try:
        env = bench.train_classes[name](
            render_mode="rgb_array",
            camera_name=settings.cameras[0],
            width=settings.image_size,
            height=settings.image_size,
        )
    except Exception as e:  # mujoco raises plain errors when the GL backend is missing
        raise RenderBackendError(f"Could not build {name} with MUJOCO_GL={os.environ.get('MUJOCO_GL')}: {e}") from e
    # No multisampling: ~7x faster 128 px renders (must be set before the first render).
    env.model.vis.quality.offsamples = 0
    camera_ids = []
    for camera in settings.cameras:
        cid = mujoco.mj_name2id(env.model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if cid < 0:
            names = [mujoco.mj_id2name(env.model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(env.model.ncam)]
            raise ValueError(f"Unknown Meta-World camera {camera!r}; cameras in {name}: {names}")
        camera_ids.append(cid)
        if camera == "corner2" and settings.published_camera_pose:
            env.model.cam_pos[cid] = PUBLISHED_CORNER2_POSITION
    env.set_task(bench.train_tasks[0])
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    policy = ENV_POLICY_MAP[name]()
    _current.update(task=task, settings=settings, env=env, policy=policy, camera_ids=camera_ids, fast=False)


def place_hand_start(env: Any, layout_seed: int, noise: float) -> None:
    """Sets where the next ``env.reset()`` puts the hand: the task's start, moved by a uniform offset in
    ``[-noise, noise]`` per axis drawn from ``layout_seed`` when ``noise`` > 0."""
    start = _current.setdefault("hand_start", np.array(env.hand_init_pos, np.float64))
    if noise > 0:
        offset = np.random.default_rng([int(layout_seed), 1]).uniform(-noise, noise, 3)
        env.hand_init_pos = np.clip(start + offset, env.mocap_low, env.mocap_high)
    else:
        env.hand_init_pos = start.copy()


def _render(camera_index: int) -> np.ndarray:
    import mujoco

    env = _current["env"]
    env.mujoco_renderer.camera_id = _current["camera_ids"][camera_index]
    try:
        frame = env.render()
    except Exception as e:
        raise RenderBackendError(f"Rendering failed with MUJOCO_GL={os.environ.get('MUJOCO_GL')}: {e}") from e
    if not _current["fast"]:
        # Shadows and reflections cost most of the remaining render time; the scene exists after the first render.
        flags = env.mujoco_renderer.viewer.scn.flags
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        _current["fast"] = True
        frame = env.render()
    # corner cameras are rolled by 180 degrees: rotating both axes (not flipping one) makes the image upright.
    return np.ascontiguousarray(frame[::-1, ::-1])


def ensure_env(task: str, settings: RolloutSettings) -> tuple[Any, Any]:
    """This process's ``(env, scripted_expert)`` for ``task``, built on first use and reused while the task and
    settings stay the same (the previous environment is closed first). Pick a layout with ``env.seed(k)``."""
    if _current.get("task") != task or _current.get("settings") != settings:
        _close_current()
        _make_env(task, settings)
    return _current["env"], _current["policy"]


def close_env() -> None:
    """Closes this process's environment; register it with ``atexit`` in workers (a GL context still open when the
    interpreter tears down its modules fails noisily)."""
    _close_current()


def render_upright(camera_index: int = 0) -> np.ndarray:
    """``uint8 [S, S, 3]`` upright frame of ``settings.cameras[camera_index]`` from the :func:`ensure_env` env."""
    return _render(camera_index)


def encode_frame(frame: np.ndarray, settings: RolloutSettings) -> bytes:
    """A frame as stored in the dataset (JPEG or PNG bytes per ``settings``)."""
    from PIL import Image

    buffer = io.BytesIO()
    if settings.image_encoding == "jpeg":
        Image.fromarray(frame).save(buffer, format="JPEG", quality=settings.jpeg_quality)
    else:
        Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def record_episode(task: str, layout_seed: int, settings: RolloutSettings) -> dict[str, Any]:
    """Runs the scripted expert on one layout and returns the recorded episode.

    Recording stops ``settings.steps_after_success`` steps after the first success, or at ``max_steps``.
    Step ``t`` holds the observation before action ``t``; ``success[t]`` is the flag after action ``t``.

    Returns:
      dict with ``images`` ({camera: list of T encoded frames}), ``state`` [T, 4], ``privileged_state`` [T, 39],
      ``action`` [T, 4] (clipped to [-1, 1]), ``reward`` [T], ``success`` [T] and episode metadata.
    """
    if layout_seed >= task_sets.EVAL_LAYOUT_SEED_START:
        raise ValueError(
            f"layout seed {layout_seed} is in the evaluation range (>= {task_sets.EVAL_LAYOUT_SEED_START}); "
            "training data must use seeds below it"
        )
    env, policy = ensure_env(task, settings)
    env.seed(layout_seed)
    place_hand_start(env, layout_seed, settings.hand_start_noise)
    obs, _ = env.reset()
    max_steps = min(settings.max_steps, env.max_path_length)
    images = {camera: [] for camera in settings.cameras}
    states, privileged, actions, rewards, successes = [], [], [], [], []
    first_success = None
    for t in range(max_steps):
        for i, camera in enumerate(settings.cameras):
            frame = _render(i)
            if int(frame.max()) <= BLACK_FRAME_MAX_VALUE:
                raise BlackFrameError(
                    f"All-black frame from camera {camera!r} (task {task}, layout seed {layout_seed}, step {t}): "
                    "a GL context was lost. Use one environment per process and close + delete + gc.collect() an "
                    "environment before building the next one."
                )
            images[camera].append(encode_frame(frame, settings))
        states.append(obs[:STATE_DIM].copy())
        privileged.append(obs.copy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the experts warn that their gains exceed [-1, 1]
            # Some experts edit the observation they are given in place (door-open shifts the handle position).
            action = np.clip(policy.get_action(obs.copy()), -1.0, 1.0).astype(np.float32)
        obs, reward, _, truncated, info = env.step(action)
        actions.append(action)
        rewards.append(reward)
        successes.append(bool(info["success"]))
        if successes[-1] and first_success is None:
            first_success = t
        if first_success is not None and t >= first_success + settings.steps_after_success:
            break
        if truncated:
            break
    paraphrase = layout_seed % len(instructions.INSTRUCTIONS[task])
    return {
        "task": task,
        "layout_seed": layout_seed,
        "expert_success": first_success is not None,
        "first_success_step": -1 if first_success is None else first_success,
        "instruction": instructions.instruction(task, paraphrase),
        "images": images,
        "state": np.asarray(states, np.float32),
        "privileged_state": np.asarray(privileged, np.float32),
        "action": np.asarray(actions, np.float32),
        "reward": np.asarray(rewards, np.float32),
        "success": np.asarray(successes, bool),
    }


def init_worker(backend: str) -> None:
    """Pool initializer: picks the GL backend before anything imports mujoco."""
    set_gl_backend(backend)


def run_job(job: tuple[str, tuple[int, ...], RolloutSettings]) -> list[dict[str, Any]]:
    """Records the episodes of one task for the given layout seeds (a pool job)."""
    task, seeds, settings = job
    return [record_episode(task, seed, settings) for seed in seeds]
