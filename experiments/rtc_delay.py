"""Closed-loop Meta-World with a simulated inference delay: synchronous vs naive switching vs real-time chunking.

    python -m experiments.rtc_delay --checkpoint=runs/flow --tasks=window-close,drawer-close \\
        --episodes_per_task=5 --delay_steps=2 --execute_steps=4 --out=rtc_delay.json

One trained flow (or diffusion) policy, three ways of executing its chunks while each query takes ``d`` control
steps (:class:`vlax.serve.ActionChunkBroker` with ``simulated_delay=True``, the same code a robot uses over the
server):

* ``sync``: execute ``s`` actions, then stop and wait ``d`` steps for the next chunk (the world is paused: the
  simulator is not stepped, and the wait counts against the episode's step budget);
* ``naive``: query after ``s`` actions, keep executing the old chunk for ``d`` steps, then jump into the new chunk
  at index ``d``;
* ``rtc``: as naive, with the new chunk guided to inpaint the old chunk's remaining actions (Black et al. 2025).

Fair by construction: the same layouts (unseen in training), the same instruction, and the same noise key per
(task, episode, query) in every mode; actions are clipped to [-1, 1] as in evaluation. Reported per mode: success
rate, steps to success including waits, and the action discontinuity: max_i |a_t - a_{t-1}|_i averaged over chunk
switches vs over steps within a chunk.

What it does not show: wall-clock effects (the delay is counted in control steps, not measured), a robot's
dynamics while waiting (Meta-World simply pauses), or delays longer than ``H - s``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir of a flow or diffusion policy")
_TASKS = flags.DEFINE_string("tasks", "window-close,drawer-close", "comma-separated Meta-World tasks")
_EPISODES = flags.DEFINE_integer("episodes_per_task", 5, "episodes (unseen layouts) per task")
_DELAY = flags.DEFINE_integer("delay_steps", 2, "simulated inference delay d in control steps")
_EXECUTE = flags.DEFINE_integer("execute_steps", 4, "actions s executed per chunk before the next query")
_MODES = flags.DEFINE_list("modes", ["sync", "naive", "rtc"], "execution modes to compare")
_MAX_STEPS = flags.DEFINE_integer("max_steps", 500, "step budget per episode (waits included)")
_SEED = flags.DEFINE_integer("seed", 0, "layouts and the policy's noise")
_GUIDANCE = flags.DEFINE_float("max_guidance", 5.0, "RTC guidance clip beta")
_OUT = flags.DEFINE_string("out", None, "write the results JSON here")
_RENDER = flags.DEFINE_integer("render_size", 128, "frame size when the checkpoint does not record its data's")


class InProcessPolicy:
    """``infer(request) -> {"actions"}`` through the server's own request path, with an explicit key stream."""

    def __init__(self, served):
        self.served, self.key = served, None
        self.calls = 0
        self.ms = []

    def infer(self, request):
        import jax

        started = time.perf_counter()
        prepared = self.served.prepare(request, key=jax.random.fold_in(self.key, self.calls))
        self.calls += 1
        actions = self.served.infer_many([prepared])[0]
        self.ms.append((time.perf_counter() - started) * 1000.0)
        return {"actions": actions}


def discontinuity(actions, switches):
    """Mean of ``max_i |a_t - a_{t-1}|_i`` over switch steps and over the other steps."""
    import numpy as np

    a = np.asarray(actions)
    if len(a) < 2:
        return None, None
    jumps = np.abs(np.diff(a, axis=0)).max(axis=1)  # jumps[t - 1] is the change into step t
    at_switch = np.zeros(len(jumps), bool)
    for t in switches:
        if t >= 1:
            at_switch[t - 1] = True
    mean = lambda x: float(x.mean()) if x.size else None  # noqa: E731
    return mean(jumps[at_switch]), mean(jumps[~at_switch])


def run_episode(env, policy, broker, frame_fn, instruction, state_dim, budget):
    import numpy as np

    obs, _ = env.reset()
    broker.reset()
    actions, success_at = [], -1
    while broker.steps + broker.waits < budget:
        request = {"observation/image": frame_fn(), "observation/state": obs[:state_dim].astype(np.float32),
                   "prompt": instruction}
        action = np.clip(broker.act(request), -1.0, 1.0).astype(np.float32)
        actions.append(action)
        obs, _, _, truncated, info = env.step(action)
        if info["success"]:
            success_at = broker.steps + broker.waits
            break
        if truncated:
            break
    return actions, success_at


def main(argv):
    del argv
    from vlax.envs.metaworld import sim

    sim.set_gl_backend("egl")
    import jax
    import numpy as np

    from vlax.envs.metaworld import instructions, task_sets
    from vlax.envs.metaworld.checkpoint_info import CheckpointError, read_checkpoint_info
    from vlax.envs.metaworld.evaluate import layout_seed
    from vlax.inference import PolicyRunner
    from vlax.serve import ActionChunkBroker, ServedPolicy

    runner = PolicyRunner.from_checkpoint(_CHECKPOINT.value, seed=_SEED.value, resize_backend="jax")
    try:
        settings = read_checkpoint_info(_CHECKPOINT.value).settings  # the recorded data's camera and rendering
    except CheckpointError as e:  # a checkpoint from before data sources were recorded in the config
        print(f"{e}; rendering {_RENDER.value} px frames from camera {runner.spec.cameras[0]}", flush=True)
        settings = sim.RolloutSettings(image_size=_RENDER.value, cameras=(runner.spec.cameras[0],))
    served = ServedPolicy(runner, rtc="rtc" in _MODES.value, delay_steps=_DELAY.value,
                          max_guidance=_GUIDANCE.value)
    print(f"warm-up {served.warmup((settings.image_size, settings.image_size)):.1f} s", flush=True)
    policy = InProcessPolicy(served)
    state_dim = served.state_dim

    def frame():
        import io

        from PIL import Image

        raw = sim.render_upright(0)
        if settings.image_encoding == "jpeg":  # as the dataset stored it
            raw = np.asarray(Image.open(io.BytesIO(sim.encode_frame(raw, settings))).convert("RGB"))
        return raw

    tasks = task_sets.resolve_tasks(_TASKS.value)
    rows, episodes = {}, []
    started = time.perf_counter()
    for mode in _MODES.value:
        broker = ActionChunkBroker(policy, _EXECUTE.value, mode=mode, delay_steps=_DELAY.value,
                                   simulated_delay=True)
        for task in tasks:
            env, _ = sim.ensure_env(task, settings)
            for episode in range(_EPISODES.value):
                env.seed(layout_seed(task, episode, _SEED.value))
                policy.key = jax.random.fold_in(jax.random.fold_in(jax.random.key(_SEED.value),
                                                                   task_sets.MT50_TASKS.index(task)), episode)
                policy.calls = 0
                actions, success_at = run_episode(env, policy, broker, frame, instructions.instruction(task, 0),
                                                  state_dim, _MAX_STEPS.value)
                at_switch, within = discontinuity(actions, broker.switches)
                episodes.append({"mode": mode, "task": task, "episode": episode, "success": success_at >= 0,
                                 "time_to_success": success_at, "steps": len(actions), "waits": broker.waits,
                                 "jump_at_switch": at_switch, "jump_within": within})
                print(json.dumps(episodes[-1]), flush=True)
    for mode in _MODES.value:
        mine = [e for e in episodes if e["mode"] == mode]
        done = [e["time_to_success"] for e in mine if e["success"]]
        mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
        rows[mode] = {
            "success": mean([e["success"] for e in mine]),
            "per_task": {t: mean([e["success"] for e in mine if e["task"] == t]) for t in tasks},
            "time_to_success": mean(done),
            "jump_at_switch": mean([e["jump_at_switch"] for e in mine if e["jump_at_switch"] is not None]),
            "jump_within": mean([e["jump_within"] for e in mine if e["jump_within"] is not None]),
        }
    results = {"checkpoint": os.path.abspath(_CHECKPOINT.value), "tasks": list(tasks),
               "episodes_per_task": _EPISODES.value, "delay_steps": _DELAY.value, "execute_steps": _EXECUTE.value,
               "horizon": served.spec.horizon, "max_steps": _MAX_STEPS.value, "seed": _SEED.value,
               "max_guidance": _GUIDANCE.value, "policy_ms_median": float(np.median(policy.ms)),
               "wall_s": time.perf_counter() - started, "modes": rows, "episodes": episodes}
    print("| mode | success | time to success (steps incl. waits) | jump at switch | jump within chunk |")
    print("|---|---|---|---|---|")
    for mode, r in rows.items():
        fmt = lambda x, f: "-" if x is None else f.format(x)  # noqa: E731
        print(f"| {mode} | {fmt(r['success'], '{:.0%}')} | {fmt(r['time_to_success'], '{:.0f}')} | "
              f"{fmt(r['jump_at_switch'], '{:.3f}')} | {fmt(r['jump_within'], '{:.3f}')} |")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=1)
    sim.close_env()  # free the GL context before the interpreter tears the display down


if __name__ == "__main__":
    flags.mark_flag_as_required("checkpoint")
    app.run(main)
