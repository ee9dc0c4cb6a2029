"""Closed-loop results: aggregation of episode records, the results-file schema check, JSON I/O and a table.

The schema itself is documented in :mod:`vlax.envs.metaworld.evaluate`; :data:`SCHEMA` below is its machine-checked form.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from vlax.envs.metaworld import task_sets

SCHEMA_VERSION = 1
KIND = "metaworld_closed_loop"
_NUMBER = (int, float)
_OPTIONAL_INT = (int, type(None))
_OPTIONAL_NUMBER = (int, float, type(None))

# field -> accepted types, per level of the results file.
SCHEMA: dict[str, dict[str, Any]] = {
    "top": {
        "schema_version": int, "kind": str, "policy": str, "checkpoint_step": _OPTIONAL_INT, "config": dict,
        "versions": dict, "date": str, "per_task": dict, "mean_success": _NUMBER, "bucket_success": dict,
        "bucket_mean": _OPTIONAL_NUMBER, "timing": dict, "episodes": list,
    },
    "config": {
        "tasks": list, "episodes_per_task": int, "seed": int, "execution": str, "replan_every": int,
        "ensemble_k": _NUMBER, "max_steps": _OPTIONAL_INT, "num_workers": int, "camera": str, "render_size": int,
        "policy_image_size": _OPTIONAL_INT, "horizon": int, "instruction_paraphrase": int,
        "layout_seed_start": int, "video_dir": (str, type(None)), "video_episodes": int,
    },
    "per_task": {
        "success_rate": _NUMBER, "successes": int, "episodes": int, "mean_steps": _NUMBER, "bucket": str,
        "trained_on": (bool, type(None)),
    },
    "timing": {
        "wall_s": _NUMBER, "episodes_per_s": _NUMBER, "env_steps_per_s": _NUMBER, "policy_calls": int,
        "ms_per_policy_call": _OPTIONAL_NUMBER, "ms_per_action": _OPTIONAL_NUMBER, "compile_s": _OPTIONAL_NUMBER,
    },
    "episode": {
        "task": str, "episode": int, "layout_seed": int, "instruction": str, "success": bool,
        "first_success_step": int, "steps": int, "return": _NUMBER, "policy_calls": int, "actions_sha1": str,
        "video": (str, type(None)), "wall_s": _NUMBER, "policy_s": _NUMBER, "compile_s": _OPTIONAL_NUMBER,
    },
}

# Episode fields fixed by (policy, task, episode, seed): equal under any number of workers.
DETERMINISTIC_EPISODE_FIELDS = ("task", "episode", "layout_seed", "instruction", "success", "first_success_step",
                                "steps", "return", "policy_calls", "actions_sha1")


def _check(obj: Any, level: str, where: str) -> None:
    if not isinstance(obj, dict):
        raise ValueError(f"results {where} is a {type(obj).__name__}, expected an object")
    for key, types in SCHEMA[level].items():
        if key not in obj:
            raise ValueError(f"results {where} lacks {key!r} (schema version {SCHEMA_VERSION})")
        value = obj[key]
        # bool is an int in Python: only accept it where the schema says bool.
        bad_bool = isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
        if bad_bool or not isinstance(value, types):
            raise ValueError(f"results {where}[{key!r}] = {value!r} has type {type(value).__name__}; "
                             f"expected {types}")


def validate_results(results: dict) -> None:
    """Raises ``ValueError`` naming the first field that does not follow the schema."""
    _check(results, "top", "")
    if results["schema_version"] != SCHEMA_VERSION or results["kind"] != KIND:
        raise ValueError(f"results are {results['kind']!r} v{results['schema_version']}; this reader knows "
                         f"{KIND!r} v{SCHEMA_VERSION}")
    _check(results["config"], "config", "['config']")
    _check(results["timing"], "timing", "['timing']")
    for task, entry in results["per_task"].items():
        _check(entry, "per_task", f"['per_task'][{task!r}]")
    for i, episode in enumerate(results["episodes"]):
        _check(episode, "episode", f"['episodes'][{i}]")
    if set(results["per_task"]) != set(results["config"]["tasks"]):
        raise ValueError(f"results per_task has {sorted(results['per_task'])} but config.tasks is "
                         f"{results['config']['tasks']}")


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def summarize(episodes: list[dict], tasks: Sequence[str], trained_tasks: Sequence[str] | None) -> dict:
    """``per_task``, ``mean_success``, ``bucket_success`` and ``bucket_mean`` from episode records."""
    per_task = {}
    for task in tasks:
        mine = [e for e in episodes if e["task"] == task]
        successes = sum(bool(e["success"]) for e in mine)
        per_task[task] = {
            "success_rate": successes / len(mine) if mine else 0.0,
            "successes": successes,
            "episodes": len(mine),
            "mean_steps": _mean([e["steps"] for e in mine]),
            "bucket": task_sets.task_bucket(task),
            "trained_on": None if trained_tasks is None else task in trained_tasks,
        }
    buckets = {}
    for bucket in task_sets.MT50_BUCKETS:
        rates = [entry["success_rate"] for entry in per_task.values() if entry["bucket"] == bucket]
        if rates:
            buckets[bucket] = _mean(rates)
    return {
        "per_task": per_task,
        "mean_success": _mean([entry["success_rate"] for entry in per_task.values()]),
        "bucket_success": buckets,
        # The published MT50 figure: the unweighted mean of the four bucket means (needs all four).
        "bucket_mean": _mean(list(buckets.values())) if len(buckets) == len(task_sets.MT50_BUCKETS) else None,
    }


def timing(episodes: list[dict], wall_s: float) -> dict:
    """Throughput and inference cost; the compiling first call of each worker is kept out of the per-call time."""
    calls = sum(e["policy_calls"] for e in episodes)
    compiles = [e["compile_s"] for e in episodes if e["compile_s"] is not None]
    timed_calls = calls - len(compiles)
    policy_s = sum(e["policy_s"] for e in episodes)
    steps = sum(e["steps"] for e in episodes)
    ms_per_call = 1000 * policy_s / timed_calls if timed_calls > 0 else None
    return {
        "wall_s": wall_s,
        "episodes_per_s": len(episodes) / wall_s if wall_s > 0 else 0.0,
        "env_steps_per_s": steps / wall_s if wall_s > 0 else 0.0,
        "policy_calls": calls,
        "ms_per_policy_call": ms_per_call,
        # Amortized over executed actions (a chunk serves several steps under receding-horizon execution).
        "ms_per_action": ms_per_call * calls / steps if ms_per_call is not None and steps else None,
        "compile_s": _mean(compiles) if compiles else None,
        "dual_rate": dual_rate_timing(episodes),
    }


def dual_rate_timing(episodes: list[dict]) -> dict | None:
    """Rates of a dual-rate policy's act and plan steps over the episodes (None for other policies): calls, their
    ratio, milliseconds per call and the rate each step could sustain alone (``1000 / ms``)."""
    records = [e["dual_rate"] for e in episodes if e.get("dual_rate")]
    if not records:
        return None
    total = {k: sum(r[k] for r in records) for k in (
        "act_calls", "plan_calls", "plans_late", "timed_act_calls", "timed_plan_calls", "act_s", "plan_s")}
    act_ms = 1000 * total["act_s"] / total["timed_act_calls"] if total["timed_act_calls"] else None
    plan_ms = 1000 * total["plan_s"] / total["timed_plan_calls"] if total["timed_plan_calls"] else None
    return {
        "act_calls": total["act_calls"], "plan_calls": total["plan_calls"],
        "acts_per_plan": total["act_calls"] / total["plan_calls"] if total["plan_calls"] else None,
        "ms_per_act_call": act_ms, "ms_per_plan_call": plan_ms,
        "act_hz": 1000 / act_ms if act_ms else None, "plan_hz": 1000 / plan_ms if plan_ms else None,
        "plans_late": total["plans_late"], "max_plan_age": max(r["max_plan_age"] for r in records),
    }


def write_results(results: dict, path: str) -> str:
    """Validates and writes ``results`` as JSON (atomically: a partial file never replaces a good one)."""
    validate_results(results)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)
    return path


def load_results(path: str) -> dict:
    """Reads and validates a results file."""
    with open(path) as f:
        results = json.load(f)
    validate_results(results)
    return results


def format_table(results: dict) -> str:
    """A plain-text table: success per task, the mean, bucket means and throughput."""
    lines = [f"{'task':<28} {'bucket':<10} {'success':>8} {'episodes':>9} {'mean steps':>11}"]
    for task, entry in results["per_task"].items():
        seen = "" if entry["trained_on"] in (None, True) else "  (not in training data)"
        lines.append(f"{task:<28} {entry['bucket']:<10} {entry['success_rate']:>8.1%} "
                     f"{entry['successes']:>4}/{entry['episodes']:<4} {entry['mean_steps']:>11.1f}{seen}")
    lines.append(f"{'mean over tasks':<39} {results['mean_success']:>8.1%}")
    for bucket, rate in results["bucket_success"].items():
        lines.append(f"{'bucket ' + bucket:<39} {rate:>8.1%}")
    if results["bucket_mean"] is not None:
        lines.append(f"{'MT50 mean of bucket means':<39} {results['bucket_mean']:>8.1%}")
    t, c = results["timing"], results["config"]
    per_call = "" if t["ms_per_policy_call"] is None else (
        f", {t['ms_per_policy_call']:.1f} ms per policy call ({t['ms_per_action']:.1f} ms per action)")
    lines.append(f"{len(results['episodes'])} episodes in {t['wall_s']:.1f} s ({t['episodes_per_s']:.2f} episodes/s, "
                 f"{t['env_steps_per_s']:.0f} steps/s, {c['num_workers']} workers){per_call}; "
                 f"execution {c['execution']}" + (f" every {c['replan_every']}" if c["execution"] == "receding" else
                                                  f" k={c['ensemble_k']}"))
    dual = t.get("dual_rate")
    if dual and dual["acts_per_plan"] is not None:
        lines.append(f"dual rate: {dual['act_calls']} act steps / {dual['plan_calls']} plan steps = "
                     f"{dual['acts_per_plan']:.1f} (plan every {c.get('plan_every')}, {c.get('plan_mode')})"
                     + ("" if dual["ms_per_plan_call"] is None or dual["ms_per_act_call"] is None else
                        f"; {dual['ms_per_act_call']:.1f} ms per act step, {dual['ms_per_plan_call']:.1f} ms per "
                        "plan step"))
    return "\n".join(lines)
