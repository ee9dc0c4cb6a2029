"""π0 / π0.5 chunk latency at batch 1: 3 cameras, 10 Euler steps, a chunk of 50 actions.

    python -m benchmarks.bench_pi0 [--variant=tiny] [--calls=30] [--dtype=float32]
    python -m benchmarks.bench_pi0 --variant=published --dtype=bfloat16      # on a GPU

The policy is built from ``experiments/configs/pi0.py:<variant>`` (random weights: latency does not depend on
their values) with the chunk set to 50 and actions padded to 32, as openpi's stock configs: ``tiny`` is the size
of the openpi reference fixtures (SigLIP 32 wide, Gemma 64 wide, expert 32 wide, 2 layers, 224 px, 256 tokens
per camera), ``published`` is SigLIP So400m + Gemma-2B + Gemma-300M. One call is the jitted ``policy.sample``
(three SigLIP passes, the 768 image tokens and the prompt through Gemma into its KV cache, then 10 expert passes
over the 51-token suffix) on one observation; the first (compiling) call is excluded and the median of ``--calls``
calls is reported with p10 / p90, and the prefix alone (vision + LM forward) to split the cost.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tiny", help="a variant of experiments/configs/pi0.py")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--steps", type=int, default=10, help="Euler steps")
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--action_dim", type=int, default=32)
    parser.add_argument("--dtype", default="float32", help="compute dtype (float32 or bfloat16)")
    args = parser.parse_args(argv)

    import jax
    from flax import nnx

    from benchmarks.common import call_times, device_name
    from experiments.configs import pi0 as configs
    from vlax.build import build_policy, policy_spec

    config = configs.get_config(args.variant)
    config.data.action_horizon = args.chunk
    config.model.state_dim = config.model.action_dim = args.action_dim
    config.model.dtype = args.dtype
    config.model.pi0.num_steps = args.steps
    spec = policy_spec(config, cameras=CAMERAS)
    policy = build_policy(config.model, spec, 0, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    size, length = spec.image_size, spec.max_text_len
    obs = {"images": {c: rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8) for c in CAMERAS},
           "state": rng.normal(size=(1, spec.state_dim)).astype(np.float32),
           "text_ids": rng.integers(0, 200, (1, length)).astype(np.int32), "text_mask": np.ones((1, length), bool)}
    obs = jax.device_put(obs)
    sample = nnx.jit(lambda p, o, k: p.sample(o, rngs=k))
    prefix = nnx.jit(lambda p, o: p.context(o).cache)

    def timed(fn) -> list[float]:
        return call_times(fn, args.calls)

    key = jax.random.key(0)
    chunk = sample(policy, obs, key)
    assert chunk.shape == (1, args.chunk, args.action_dim), chunk.shape
    full = timed(lambda: sample(policy, obs, key))
    ctx = timed(lambda: prefix(policy, obs))
    p10, p50, p90 = np.percentile(full, [10, 50, 90])
    prefix_ms = 1e3 * float(np.median(ctx))
    result = {
        "device": device_name(), "variant": args.variant, "dtype": args.dtype, "calls": args.calls,
        "params_m": round(sum(x.size for x in jax.tree.leaves(nnx.state(policy, nnx.Param))) / 1e6, 3),
        "chunk_ms_p50": round(1e3 * p50, 2), "chunk_ms_p10": round(1e3 * p10, 2), "chunk_ms_p90": round(1e3 * p90, 2),
        "prefix_ms_p50": round(prefix_ms, 2), "per_step_ms": round((1e3 * p50 - prefix_ms) / args.steps, 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
