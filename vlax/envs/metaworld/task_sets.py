"""Meta-World task lists, difficulty buckets and layout-seed ranges.

Task names are written without the ``-v3`` suffix (``"pick-place"``); :func:`env_name` adds it for Meta-World 3.1.1.

Layout seeds: a layout (object and goal positions) is picked by ``env.seed(k)`` after unfreezing the random vector.
Training data uses seeds from :data:`TRAIN_LAYOUT_SEED_START` upwards, evaluation uses seeds from
:data:`EVAL_LAYOUT_SEED_START` upwards; the two ranges never meet, so an evaluated layout is never a training one.
"""

from __future__ import annotations

# The first seed of the training-layout range; episode ``i`` of a task tries seed ``TRAIN_LAYOUT_SEED_START + i``
# (failed expert layouts are skipped, so later seeds may be used).
TRAIN_LAYOUT_SEED_START = 0
# The first seed of the evaluation-layout range. Training generation refuses seeds at or above it.
EVAL_LAYOUT_SEED_START = 1_000_000

MT10_TASKS: tuple[str, ...] = (
    "reach", "push", "pick-place", "door-open", "drawer-open", "drawer-close", "button-press-topdown",
    "peg-insert-side", "window-open", "window-close",
)

# Difficulty buckets of the published MT50 protocol (28 / 11 / 6 / 5 tasks).
MT50_BUCKETS: dict[str, tuple[str, ...]] = {
    "easy": (
        "button-press", "button-press-topdown", "button-press-topdown-wall", "button-press-wall", "coffee-button",
        "dial-turn", "door-close", "door-lock", "door-open", "door-unlock", "drawer-close", "drawer-open",
        "faucet-close", "faucet-open", "handle-press", "handle-press-side", "handle-pull", "handle-pull-side",
        "lever-pull", "plate-slide", "plate-slide-back", "plate-slide-back-side", "plate-slide-side", "reach",
        "reach-wall", "window-close", "window-open", "peg-unplug-side",
    ),
    "medium": (
        "basketball", "bin-picking", "box-close", "coffee-pull", "coffee-push", "hammer", "peg-insert-side",
        "push-wall", "soccer", "sweep", "sweep-into",
    ),
    "hard": ("assembly", "hand-insert", "pick-out-of-hole", "pick-place", "push", "push-back"),
    "very_hard": ("shelf-place", "disassemble", "stick-pull", "stick-push", "pick-place-wall"),
}

MT50_TASKS: tuple[str, ...] = tuple(sorted(t for bucket in MT50_BUCKETS.values() for t in bucket))

TASK_SETS: dict[str, tuple[str, ...]] = {"mt10": MT10_TASKS, "mt50": MT50_TASKS}


def env_name(task: str) -> str:
    """Meta-World 3.1.1 environment name of a task: ``"reach"`` -> ``"reach-v3"``."""
    return task if task.endswith("-v3") else f"{task}-v3"


def task_bucket(task: str) -> str:
    """Difficulty bucket (``easy``/``medium``/``hard``/``very_hard``) of an MT50 task."""
    task = task.removesuffix("-v3")
    for bucket, tasks in MT50_BUCKETS.items():
        if task in tasks:
            return bucket
    raise ValueError(f"Unknown Meta-World task {task!r}; known tasks: {', '.join(MT50_TASKS)}")


def resolve_tasks(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Turns ``"mt10"``, ``"mt50"``, ``"reach,push"`` or a list of names into a tuple of task names.

    Raises:
      ValueError: naming the unknown task and listing the known ones.
    """
    if isinstance(spec, str):
        if spec.lower() in TASK_SETS:
            return TASK_SETS[spec.lower()]
        spec = [s for s in spec.split(",") if s.strip()]
    tasks = tuple(s.strip().removesuffix("-v3") for s in spec)
    unknown = [t for t in tasks if t not in MT50_TASKS]
    if unknown:
        raise ValueError(
            f"Unknown Meta-World task(s) {unknown}; use 'mt10', 'mt50' or names from: {', '.join(MT50_TASKS)}"
        )
    if not tasks:
        raise ValueError("Empty Meta-World task list; use 'mt10', 'mt50' or a comma-separated list of task names.")
    return tasks
