"""Batches per second of the Meta-World data pipeline (batch 64, 128 px, augmentation on).

    python -m benchmarks.bench_data [--tasks=reach,push,door-open] [--episodes_per_task=4] [--batches=40]

Generates (or reuses) a small Meta-World RLDS dataset under ``data_cache/bench_metaworld``, then times the full
pipeline: read -> trajectory transforms -> shuffle -> JPEG decode -> augmentation -> batch -> numpy.
"""

from __future__ import annotations

import os
import tempfile
import time

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

TASKS = flags.DEFINE_string("tasks", "reach,push,door-open", "Meta-World tasks of the benchmark dataset.")
EPISODES = flags.DEFINE_integer("episodes_per_task", 4, "Episodes per task.")
OUT_DIR = flags.DEFINE_string("out_dir", "data_cache/bench_metaworld", "Where the benchmark dataset lives.")
BATCHES = flags.DEFINE_integer("batches", 40, "Timed batches (after warm-up).")
BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Batch size.")
IMAGE_SIZE = flags.DEFINE_integer("image_size", 128, "Image size.")
HORIZON = flags.DEFINE_integer("action_horizon", 4, "Action chunk length.")


def main(argv):
    del argv
    import tensorflow as tf

    from vlax.data import DataConfig, build_pipeline
    from vlax.envs.metaworld import generate_metaworld_dataset, metaworld_source

    path = generate_metaworld_dataset(
        OUT_DIR.value, tasks=TASKS.value, episodes_per_task=EPISODES.value, image_size=IMAGE_SIZE.value
    )
    print(f"dataset {path}")
    print(f"CPU cores {os.cpu_count()}  tf.data threads: AUTOTUNE")
    for augment in (True, False):
        config = DataConfig(
            batch_size=BATCH_SIZE.value,
            image_size=IMAGE_SIZE.value,
            action_horizon=HORIZON.value,
            augment=augment,
            shuffle_buffer=2_000,
            stats_cache_dir=os.path.join(tempfile.gettempdir(), "vlax_bench_stats"),
        )
        pipeline = build_pipeline([metaworld_source(path)], config, process_index=0, process_count=1)
        iterator = iter(pipeline)
        for _ in range(5):  # warm-up: fills the shuffle buffer, starts the tf.data threads
            next(iterator)
        start = time.perf_counter()
        for _ in range(BATCHES.value):
            batch = next(iterator)
        elapsed = time.perf_counter() - start
        rate = BATCHES.value / elapsed
        shape = batch["observation"]["image_corner2"].shape
        print(
            f"augment={str(augment):5s} batch {BATCH_SIZE.value} images {shape}: {rate:6.2f} batches/s "
            f"({rate * BATCH_SIZE.value:7.1f} frames/s)"
        )
    del tf


if __name__ == "__main__":
    app.run(main)
