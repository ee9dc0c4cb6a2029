"""OpenVLA tiny preset on CPU: actions/s at batch 1 (7 greedy action tokens through the KV cache).

    python -m benchmarks.bench_openvla [--calls=30] [--checkpoint=tests/fixtures/openvla]

The policy is the tiny reference checkpoint (DINOv2-reg4 64 wide + SigLIP 48 wide, 3 blocks each at 224 px;
Llama 64 wide, 2 layers, the real 32064-id vocabulary), loaded with ``vlax.weights.openvla.load_openvla``. One
call is the jitted ``policy.sample`` (vision towers, projector, the 270-token prefix, then 6 cached decode steps)
on one image and one prompt; the first (compiling) call is excluded and the median of ``--calls`` calls is
reported, with p10 / p90. Also reported: the prefix alone (vision + LLM forward) to show what decoding costs.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--checkpoint", default="tests/fixtures/openvla")
    args = parser.parse_args(argv)

    import jax
    from flax import nnx

    from benchmarks.common import call_times
    from vlax.weights.openvla import load_openvla

    policy = load_openvla(args.checkpoint)
    rng = np.random.default_rng(0)
    ids = np.concatenate([[1], rng.integers(3, 300, 13)]).astype(np.int32)[None]
    obs = {"images": {"image": rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)}, "text_ids": ids,
           "text_mask": np.ones_like(ids, bool)}
    sample = nnx.jit(lambda p, o, k: p.sample(o, rngs=k))
    prefix = nnx.jit(lambda p, o: p.context(o).tokens)

    def timed(fn) -> list[float]:
        return call_times(fn, args.calls)

    key = jax.random.key(0)
    full = timed(lambda: sample(policy, obs, key))
    ctx = timed(lambda: prefix(policy, obs))
    p10, p50, p90 = np.percentile(full, [10, 50, 90])
    result = {
        "device": jax.devices()[0].device_kind, "calls": args.calls,
        "sample_ms_p50": round(1e3 * p50, 2), "sample_ms_p10": round(1e3 * p10, 2),
        "sample_ms_p90": round(1e3 * p90, 2), "actions_per_s": round(1.0 / p50, 2),
        "prefix_ms_p50": round(1e3 * float(np.median(ctx)), 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
