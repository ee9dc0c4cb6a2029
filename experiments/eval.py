"""Evaluate a checkpoint closed-loop in Meta-World on unseen layouts and print a results table.

    python -m experiments.eval --checkpoint=runs/metaworld --tasks=mt10 --episodes_per_task=10 \\
        --execution=receding --replan_every=4 --num_workers=2 --out=results.json [--video_dir=videos]
    python -m experiments.eval --checkpoint=expert --tasks=reach,push --episodes_per_task=5   # the harness alone

The results file follows the schema in :mod:`vlax.envs.metaworld.evaluate`.
"""

from __future__ import annotations

# Kept light at import time: spawned evaluation workers re-import this module before setting their environment.
from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir or checkpoints directory, or 'expert'")
_TASKS = flags.DEFINE_string("tasks", "mt10", "'mt10', 'mt50' or comma-separated task names")
_EPISODES = flags.DEFINE_integer("episodes_per_task", 10, "episodes (unseen layouts) per task")
_SEED = flags.DEFINE_integer("seed", 0, "picks the layouts and the policy's noise")
_EXECUTION = flags.DEFINE_enum("execution", "receding", ["receding", "ensemble"], "how chunks are executed")
_REPLAN = flags.DEFINE_integer("replan_every", None, "actions executed per chunk (receding); default: the chunk")
_ENSEMBLE_K = flags.DEFINE_float("ensemble_k", 0.01, "temporal ensembling weight exp(-k * i), oldest first")
_WORKERS = flags.DEFINE_integer("num_workers", 2, "worker processes (one environment each)")
_OUT = flags.DEFINE_string("out", None, "write the results JSON here")
_VIDEO_DIR = flags.DEFINE_string("video_dir", None, "write videos of the first --video_episodes episodes per task")
_VIDEO_EPISODES = flags.DEFINE_integer("video_episodes", 1, "episodes per task to record when --video_dir is set")
_VIDEO_FORMAT = flags.DEFINE_enum("video_format", "gif", ["gif", "mp4"], "video container")
_MAX_STEPS = flags.DEFINE_integer("max_steps", None, "step limit below the environment's (500)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
_CAMERA = flags.DEFINE_string("camera", None, "must match the checkpoint's camera (default: taken from it)")
_PROGRESS = flags.DEFINE_boolean("progress", True, "show a progress bar")
_PLAN_EVERY = flags.DEFINE_integer("plan_every", None, "a dual-rate policy (Helix): control steps between its slow "
                                   "plan steps (default: the policy's own period)")
_PLAN_MODE = flags.DEFINE_enum("plan_mode", "sync", ["sync", "async"], "plan before the act step that needs it, or "
                               "on a background thread")


def main(argv):
    del argv
    from vlax.eval import evaluate, format_table

    results = evaluate(
        _CHECKPOINT.value, _TASKS.value, episodes_per_task=_EPISODES.value, seed=_SEED.value,
        execution=_EXECUTION.value, replan_every=_REPLAN.value, ensemble_k=_ENSEMBLE_K.value,
        num_workers=_WORKERS.value, video_dir=_VIDEO_DIR.value, video_episodes=_VIDEO_EPISODES.value,
        video_format=_VIDEO_FORMAT.value, max_steps=_MAX_STEPS.value, progress=_PROGRESS.value,
        results_path=_OUT.value, checkpoint_step=_STEP.value, camera=_CAMERA.value, plan_every=_PLAN_EVERY.value,
        plan_mode=_PLAN_MODE.value)
    print(format_table(results))
    if _OUT.value:
        print(f"results written to {_OUT.value}")


if __name__ == "__main__":
    flags.mark_flag_as_required("checkpoint")
    app.run(main)
