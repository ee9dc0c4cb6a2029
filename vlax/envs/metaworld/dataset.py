"""Meta-World scripted experts -> an RLDS dataset in tfds format.

``generate_metaworld_dataset`` records episodes in worker processes (one environment per process, headless GL) and
writes them with a tfds ``GeneratorBasedBuilder``. Read the result back with ``tfds.builder_from_directory`` (see
:mod:`vlax.data.rlds_reader`).

RLDS layout of one episode::

    steps/observation/image_<camera>  uint8 [T, S, S, 3]  (stored JPEG/PNG, upright)
    steps/observation/state           float32 [T, 4]      hand xyz + gripper opening (what a policy sees)
    steps/observation/privileged_state float32 [T, 39]    full simulator observation (never fed by default)
    steps/action                      float32 [T, 4]      clipped to [-1, 1]
    steps/reward, steps/discount      float32 [T]
    steps/is_first, is_last, is_terminal, success   bool [T]
    steps/language_instruction        string [T]          one paraphrase per episode
    episode_metadata/{task, layout_seed, expert_success, first_success_step, instruction, num_steps}
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import shutil
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from vlax.envs.metaworld import instructions, sim, task_sets

DATASET_NAME = "metaworld_experts"
DATASET_VERSION = "1.0.0"
ARGS_FILE = "generation_args.json"
REPORT_FILE = "generation_report.json"
GL_BACKENDS = ("egl", "osmesa")


class MetaworldExperts(tfds.core.GeneratorBasedBuilder):
    """tfds builder of recorded Meta-World expert episodes (see the module docstring for the layout)."""

    VERSION = tfds.core.Version(DATASET_VERSION)
    RELEASE_NOTES = {DATASET_VERSION: "Scripted-expert episodes of Meta-World 3.1.1."}

    def __init__(
        self,
        *,
        settings: sim.RolloutSettings,
        episodes: Callable[[], Iterator[dict[str, Any]]],
        **kwargs,
    ):
        self._settings = settings
        self._episodes = episodes
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self._settings.image_size
        observation = {
            f"image_{camera}": tfds.features.Image(
                shape=(size, size, 3), dtype=np.uint8, encoding_format=self._settings.image_encoding
            )
            for camera in self._settings.cameras
        }
        observation["state"] = tfds.features.Tensor(
            shape=(sim.STATE_DIM,), dtype=np.float32, doc="hand xyz and gripper opening"
        )
        observation["privileged_state"] = tfds.features.Tensor(
            shape=(sim.PRIVILEGED_STATE_DIM,), dtype=np.float32, doc="full simulator observation"
        )
        steps = tfds.features.Dataset(
            {
                "observation": tfds.features.FeaturesDict(observation),
                "action": tfds.features.Tensor(shape=(sim.ACTION_DIM,), dtype=np.float32),
                "reward": tfds.features.Scalar(dtype=np.float32),
                "discount": tfds.features.Scalar(dtype=np.float32),
                "is_first": tfds.features.Scalar(dtype=np.bool_),
                "is_last": tfds.features.Scalar(dtype=np.bool_),
                "is_terminal": tfds.features.Scalar(dtype=np.bool_),
                "success": tfds.features.Scalar(dtype=np.bool_),
                "language_instruction": tfds.features.Text(),
            }
        )
        metadata = tfds.features.FeaturesDict(
            {
                "task": tfds.features.Text(),
                "layout_seed": tfds.features.Scalar(dtype=np.int64),
                "expert_success": tfds.features.Scalar(dtype=np.bool_),
                "first_success_step": tfds.features.Scalar(dtype=np.int64),
                "instruction": tfds.features.Text(),
                "num_steps": tfds.features.Scalar(dtype=np.int64),
            }
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description="Meta-World 3.1.1 scripted-expert episodes with upright camera images.",
            features=tfds.features.FeaturesDict({"steps": steps, "episode_metadata": metadata}),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for episode in self._episodes():
            yield f"{episode['task']}_{episode['layout_seed']}", _to_rlds_example(episode)


def _to_rlds_example(episode: dict[str, Any]) -> dict[str, Any]:
    length = len(episode["action"])
    is_last = np.zeros(length, bool)
    is_last[-1] = True
    steps = []
    for t in range(length):
        observation = {f"image_{cam}": frames[t] for cam, frames in episode["images"].items()}
        observation["state"] = episode["state"][t]
        observation["privileged_state"] = episode["privileged_state"][t]
        steps.append(
            {
                "observation": observation,
                "action": episode["action"][t],
                "reward": episode["reward"][t],
                "discount": np.float32(1.0),
                "is_first": t == 0,
                "is_last": bool(is_last[t]),
                "is_terminal": bool(is_last[t] and episode["expert_success"]),
                "success": bool(episode["success"][t]),
                "language_instruction": episode["instruction"],
            }
        )
    metadata = {key: episode[key] for key in ("task", "layout_seed", "expert_success", "first_success_step")}
    metadata.update(instruction=episode["instruction"], num_steps=length)
    return {"steps": steps, "episode_metadata": metadata}


@dataclasses.dataclass
class _Collector:
    """Runs rollout rounds until every task has enough successful episodes (or its attempt budget is spent)."""

    tasks: tuple[str, ...]
    episodes_per_task: int
    settings: sim.RolloutSettings
    num_workers: int
    backend: str
    keep_failures: bool
    max_attempts_per_task: int
    report: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def __call__(self) -> Iterator[dict[str, Any]]:
        from tqdm import tqdm

        self.report = {t: {"kept": 0, "failed": 0, "seeds": []} for t in self.tasks}
        next_seed = {t: task_sets.TRAIN_LAYOUT_SEED_START for t in self.tasks}
        progress = tqdm(total=len(self.tasks) * self.episodes_per_task, desc="Meta-World episodes", unit="ep")
        pool = self._pool()
        try:
            while True:
                wanted = {}
                for task in self.tasks:
                    missing = self.episodes_per_task - self.report[task]["kept"]
                    budget = self.max_attempts_per_task - (next_seed[task] - task_sets.TRAIN_LAYOUT_SEED_START)
                    if missing > 0 and budget > 0:
                        wanted[task] = min(missing, budget)
                if not wanted:
                    break
                jobs = self._jobs(wanted, next_seed)
                for task, count in wanted.items():
                    next_seed[task] += count
                results = pool.imap_unordered(sim.run_job, jobs) if pool else map(
                    sim.run_job, jobs
                )
                for episodes in results:
                    for episode in episodes:
                        entry = self.report[episode["task"]]
                        if episode["expert_success"]:
                            entry["kept"] += 1
                            entry["seeds"].append(episode["layout_seed"])
                            progress.update(1)
                            yield episode
                        else:
                            entry["failed"] += 1
                            if self.keep_failures:
                                entry["seeds"].append(episode["layout_seed"])
                                progress.update(1)
                                yield episode
                if self.keep_failures:
                    break
        finally:
            progress.close()
            if pool:
                pool.terminate()
                pool.join()
        for task, entry in self.report.items():
            entry["seeds"].sort()
            if entry["kept"] < self.episodes_per_task and not self.keep_failures:
                logging.warning(
                    "%s: only %d of %d expert episodes succeeded within %d layouts",
                    task, entry["kept"], self.episodes_per_task, self.max_attempts_per_task,
                )

    def _pool(self):
        if self.num_workers <= 0:
            sim.set_gl_backend(self.backend)
            return None
        context = multiprocessing.get_context("spawn")
        return context.Pool(self.num_workers, initializer=sim.init_worker, initargs=(self.backend,))

    def _jobs(self, wanted: dict[str, int], next_seed: dict[str, int]) -> list[tuple]:
        total = sum(wanted.values())
        per_job = max(1, min(10, math.ceil(total / (4 * max(1, self.num_workers)))))
        jobs = []
        for task, count in wanted.items():
            seeds = list(range(next_seed[task], next_seed[task] + count))
            for i in range(0, count, per_job):
                jobs.append((task, tuple(seeds[i : i + per_job]), self.settings))
        return jobs


def _versions() -> dict[str, str]:
    from importlib import metadata

    return {name: metadata.version(name) for name in ("metaworld", "mujoco")}


def generate_metaworld_dataset(
    out_dir: str,
    *,
    tasks: str | list[str] | tuple[str, ...] = "mt10",
    episodes_per_task: int = 50,
    image_size: int = 128,
    cameras: tuple[str, ...] | list[str] = ("corner2",),
    max_steps: int = 500,
    steps_after_success: int = 5,
    image_encoding: str = "jpeg",
    published_camera_pose: bool = True,
    hand_start_noise: float = 0.0,
    keep_failures: bool = False,
    max_attempts_per_task: int | None = None,
    num_shards: int | None = None,
    num_workers: int | None = None,
    gl_backend: str = "egl",
    overwrite: bool = False,
) -> str:
    """Records Meta-World expert episodes into an RLDS dataset and returns its directory.

    Re-running with the same arguments reuses the existing dataset. Failed expert episodes are dropped (and
    counted in ``generation_report.json``) unless ``keep_failures``; a task whose expert fails on a layout tries the
    next training seed, up to ``max_attempts_per_task`` layouts (default ``2 * episodes_per_task + 10``).

    Args:
      out_dir: root directory; the dataset goes to ``out_dir/metaworld_experts/1.0.0``.
      tasks: ``"mt10"``, ``"mt50"``, a comma-separated string or a list of task names.
      steps_after_success: steps recorded after the first success (evaluation stops at the first success; the
        extra steps show the policy the held goal state).
      hand_start_noise: > 0 starts each episode's hand at a seeded offset of up to this many metres per axis
        (:class:`~vlax.envs.metaworld.sim.RolloutSettings`); evaluation always starts at the task's start.
      num_shards: TFRecord files to write (default ``min(16, max(1, episodes // 4))``); hosts read disjoint files.
      num_workers: rollout processes (default: the number of CPU cores; 0 runs in this process).
      gl_backend: ``"egl"`` (falls back to ``"osmesa"`` if EGL cannot render) or ``"osmesa"``.

    Returns:
      The dataset directory, for ``tfds.builder_from_directory``.
    """
    task_names = task_sets.resolve_tasks(tasks)
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
    if image_encoding not in ("jpeg", "png"):
        raise ValueError(f"image_encoding must be 'jpeg' or 'png', got {image_encoding!r}")
    if gl_backend not in GL_BACKENDS:
        raise ValueError(f"gl_backend must be one of {GL_BACKENDS}, got {gl_backend!r}")
    if hand_start_noise < 0:
        raise ValueError(f"hand_start_noise={hand_start_noise}; use 0 (the task's start) or metres, e.g. 0.1")
    settings = sim.RolloutSettings(
        image_size=image_size,
        cameras=tuple(cameras),
        max_steps=max_steps,
        steps_after_success=steps_after_success,
        image_encoding=image_encoding,
        published_camera_pose=published_camera_pose,
        hand_start_noise=float(hand_start_noise),
    )
    max_attempts = max_attempts_per_task or 2 * episodes_per_task + 10
    total = len(task_names) * episodes_per_task
    shards = num_shards or min(16, max(1, total // 4))
    args = {
        "tasks": list(task_names),
        "episodes_per_task": episodes_per_task,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()},
        "keep_failures": keep_failures,
        "max_attempts_per_task": max_attempts,
        "num_shards": shards,
        "train_layout_seed_start": task_sets.TRAIN_LAYOUT_SEED_START,
        **_versions(),
    }
    if not hand_start_noise:  # datasets recorded before the option existed keep their identity
        args.pop("hand_start_noise")
    dataset_dir = os.path.join(out_dir, DATASET_NAME, DATASET_VERSION)
    args_path = os.path.join(dataset_dir, ARGS_FILE)
    if os.path.exists(args_path) and not overwrite:
        with open(args_path) as f:
            previous = json.load(f)
        if previous == args and os.path.exists(os.path.join(dataset_dir, "dataset_info.json")):
            logging.info("Reusing the Meta-World dataset in %s", dataset_dir)
            return dataset_dir
        differing = sorted(k for k in set(previous) | set(args) if previous.get(k) != args.get(k))
        raise ValueError(
            f"{dataset_dir} holds a dataset generated with other arguments (differing: "
            + ", ".join(f"{k}: {previous.get(k)!r} there vs {args.get(k)!r} now" for k in differing)
            + "); pass another out_dir or overwrite=True (--overwrite)."
        )
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    workers = min(workers, math.ceil(total / 2)) if workers > 0 else 0
    backends = [gl_backend] + [b for b in GL_BACKENDS if b != gl_backend and gl_backend == "egl"]
    for attempt, backend in enumerate(backends):
        if os.path.exists(dataset_dir):
            shutil.rmtree(dataset_dir)
        collector = _Collector(task_names, episodes_per_task, settings, workers, backend, keep_failures, max_attempts)
        builder = MetaworldExperts(settings=settings, episodes=collector, data_dir=out_dir)
        try:
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=shards))
            break
        except sim.RenderBackendError as e:
            if attempt + 1 == len(backends):
                raise RuntimeError(
                    f"No headless GL backend could render ({e}). Install Mesa EGL (libegl1) or OSMesa "
                    "(apt-get install libosmesa6) and retry."
                ) from e
            logging.warning("MUJOCO_GL=%s failed (%s); retrying with %s", backend, e, backends[attempt + 1])
    with open(os.path.join(dataset_dir, REPORT_FILE), "w") as f:
        json.dump(collector.report, f, indent=1)
    with open(args_path, "w") as f:
        json.dump(args, f, indent=1)
    return dataset_dir


def metaworld_source(data_dir: str, *, name: str = DATASET_NAME, include_privileged_state: bool = False, **kwargs):
    """An :class:`~vlax.data.rlds_reader.RLDSSource` for a generated Meta-World dataset.

    Cameras keep their names (``image_corner2``); the 39-value simulator state is delivered (as
    ``privileged/sim_state``) only with ``include_privileged_state=True``. The gripper (last action dim) is left
    unnormalized by default.
    """
    from vlax.data.rlds_reader import RLDSSource

    return RLDSSource(
        data_dir,
        name=name,
        privileged_state_key="privileged_state" if include_privileged_state else None,
        gripper_last=True,
        **kwargs,
    )


def open_source(entry: dict) -> Any:
    """A ``kind: metaworld`` data source entry (see :mod:`vlax.data.source_config`): the dataset under
    ``entry["path"]`` is generated on first use (by process 0 of a multi-host run) and reused afterwards.

    The entry's ``cameras`` keys are the cameras to render (``image_<camera>`` in the data); ``tasks``,
    ``episodes_per_task``, ``image_size``, ``hand_start_noise`` and ``num_workers`` say what to generate.
    """
    import jax

    camera_map = {_strip_image(k): v for k, v in (entry.get("cameras") or {"corner2": "corner2"}).items()}
    cameras = tuple(camera_map)

    def generate() -> str:
        return generate_metaworld_dataset(entry["path"] or "data_cache/metaworld", tasks=entry["tasks"],
                                          episodes_per_task=int(entry["episodes_per_task"]),
                                          image_size=int(entry["image_size"]), cameras=cameras,
                                          num_workers=int(entry["num_workers"]),
                                          hand_start_noise=float(entry.get("hand_start_noise") or 0.0))

    if jax.process_index() == 0:
        path = generate()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("metaworld dataset ready")
        path = generate()  # every host now finds it and reuses it
    image_keys = {policy_camera: f"image_{camera}" for camera, policy_camera in camera_map.items()}
    source = metaworld_source(path, name=entry.get("name") or DATASET_NAME, image_keys=image_keys,
                              ignore_errors=bool(entry.get("ignore_errors")))
    # Every template of the tasks, not only those recorded: evaluation layouts pick other paraphrases.
    templates = sorted({text for task in task_sets.resolve_tasks(entry["tasks"])
                        for text in instructions.INSTRUCTIONS[task]})
    source.instructions = lambda: templates
    return source


def _strip_image(key: str) -> str:
    return key[len("image_"):] if key.startswith("image_") else key
