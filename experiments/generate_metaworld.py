"""Records Meta-World scripted-expert episodes into an RLDS dataset (tfds format).

    python -m experiments.generate_metaworld --tasks=mt10 --episodes_per_task=50 --out_dir=data_cache/metaworld

Prints the dataset directory (``<out_dir>/metaworld_experts/1.0.0``); re-running with the same flags reuses it.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # before anything imports mujoco

from absl import app, flags  # noqa: E402

TASKS = flags.DEFINE_string("tasks", "mt10", "mt10, mt50 or a comma-separated list of task names (e.g. reach,push).")
EPISODES = flags.DEFINE_integer("episodes_per_task", 50, "Successful expert episodes per task (distinct layouts).")
OUT_DIR = flags.DEFINE_string("out_dir", "data_cache/metaworld", "Root directory of the dataset.")
IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Square image size in pixels.")
CAMERAS = flags.DEFINE_list("cameras", ["corner2"], "Meta-World camera names to record.")
NUM_WORKERS = flags.DEFINE_integer("num_workers", None, "Rollout processes (default: CPU cores; 0: in-process).")
MAX_STEPS = flags.DEFINE_integer("max_steps", 500, "Step limit per episode.")
AFTER_SUCCESS = flags.DEFINE_integer("steps_after_success", 5, "Steps recorded after the first success.")
ENCODING = flags.DEFINE_enum("image_encoding", "jpeg", ["jpeg", "png"], "How frames are stored.")
KEEP_FAILURES = flags.DEFINE_bool("keep_failures", False, "Keep failed expert episodes instead of dropping them.")
NUM_SHARDS = flags.DEFINE_integer("num_shards", None, "TFRecord files to write (hosts read disjoint files).")
GL_BACKEND = flags.DEFINE_enum("gl_backend", "egl", ["egl", "osmesa"], "Headless GL backend (egl falls back).")
PUBLISHED_POSE = flags.DEFINE_bool(
    "published_camera_pose", True, "Move corner2 to the published MT50 protocol's pose [0.75, 0.075, 0.7]."
)
HAND_START_NOISE = flags.DEFINE_float(
    "hand_start_noise", 0.0, "Start each episode's hand up to this many metres per axis from the task's start."
)
OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a dataset generated with other arguments.")


def main(argv):
    del argv
    from vlax.envs.metaworld.dataset import generate_metaworld_dataset

    path = generate_metaworld_dataset(
        OUT_DIR.value,
        tasks=TASKS.value,
        episodes_per_task=EPISODES.value,
        image_size=IMAGE_SIZE.value,
        cameras=tuple(CAMERAS.value),
        max_steps=MAX_STEPS.value,
        steps_after_success=AFTER_SUCCESS.value,
        image_encoding=ENCODING.value,
        published_camera_pose=PUBLISHED_POSE.value,
        hand_start_noise=HAND_START_NOISE.value,
        keep_failures=KEEP_FAILURES.value,
        num_shards=NUM_SHARDS.value,
        num_workers=NUM_WORKERS.value,
        gl_backend=GL_BACKEND.value,
        overwrite=OVERWRITE.value,
    )
    print(path)


if __name__ == "__main__":
    app.run(main)
