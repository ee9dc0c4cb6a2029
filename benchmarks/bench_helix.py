"""Helix tiny preset on CPU: how fast S2 (plan) and S1 (act with the latest latent) run at batch 1, and what
rates the dual-rate executor sustains when S2 runs on a background thread.

    python -m benchmarks.bench_helix [--calls=30] [--steps=200] [--plan_every=4] [--image_size=64]

The policy is ``experiments/configs/helix.py:tiny`` (random weights; one 64 px camera, 4-dim state and actions,
chunk 8, an 8-token prompt). Step times: the median (p10 / p90) of ``--calls`` jitted calls, the compiling first
call excluded; a rate is ``1 / median``. Then ``--steps`` act steps through
:class:`vlax.dual_rate.DualRateExecutor` with S2 due every ``--plan_every`` steps, asynchronously: the act steps'
wall-clock rate, the plans that finished, and the act steps per finished plan (the S1 / S2 rate ratio achieved:
``plan_every`` when S2 keeps up, more when it does not).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--plan_every", type=int, default=4)
    parser.add_argument("--image_size", type=int, default=64)
    args = parser.parse_args(argv)

    import jax
    from flax import nnx

    from experiments.configs.helix import get_config
    from benchmarks.common import call_times
    from vlax.dual_rate import DualRateExecutor
    from vlax.policy import PolicySpec
    from vlax.presets.helix import build_helix

    side = args.image_size
    spec = PolicySpec(cameras=("image",), image_size=side, state_dim=4, action_dim=4, horizon=8, max_text_len=8,
                      state_input="head")
    policy = build_helix(get_config("tiny").model.to_dict(), spec, 259, nnx.Rngs(0))
    graphdef, state = nnx.split(policy)
    rng = np.random.default_rng(0)
    obs = {"images": {"image": rng.integers(0, 256, (1, side, side, 3), dtype=np.uint8)},
           "state": rng.normal(size=(1, 4)).astype(np.float32),
           "text_ids": rng.integers(3, 259, (1, 8)).astype(np.int32), "text_mask": np.ones((1, 8), bool)}
    plan = jax.jit(lambda s, o: nnx.merge(graphdef, s).plan(o))
    act = jax.jit(lambda s, o, latent, k: nnx.merge(graphdef, s).sample(o, rngs=k, plan=latent))
    key = jax.random.key(0)

    def timed(fn) -> list[float]:
        return call_times(fn, args.calls)

    latent = plan(state, obs)
    s2 = timed(lambda: plan(state, obs))
    s1 = timed(lambda: act(state, obs, latent, key))
    executor = DualRateExecutor(lambda o: plan(state, o), lambda o, lat, k: act(state, o, lat, k),
                                plan_every=args.plan_every, asynchronous=True)
    executor.act(obs, key)  # the first plan (compiled above)
    started = time.perf_counter()
    for _ in range(args.steps):
        executor.act(obs, key)
    wall = time.perf_counter() - started
    stats = executor.stats
    finished_plans, acts = stats.plan_calls - 1, args.steps  # the steps timed above, after the first plan
    executor.close()

    def summary(times: list[float]) -> dict:
        p10, p50, p90 = np.percentile(times, [10, 50, 90])
        return {"ms_p50": round(1e3 * p50, 2), "ms_p10": round(1e3 * p10, 2), "ms_p90": round(1e3 * p90, 2),
                "hz": round(1.0 / p50, 1)}

    result = {
        "device": jax.devices()[0].device_kind, "image_size": side, "calls": args.calls,
        "s2_plan": summary(s2), "s1_act": summary(s1),
        "s1_s2_speed_ratio": round(float(np.median(s2) / np.median(s1)), 2),
        "async": {"plan_every": args.plan_every, "act_steps": acts, "act_hz": round(acts / wall, 1),
                  "plans_finished": finished_plans, "plans_late": stats.plans_late,
                  "acts_per_plan": round(acts / max(finished_plans, 1), 2)},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
