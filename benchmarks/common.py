"""What the benchmarks share; the timing and FLOP tools themselves live in :mod:`vlax.train.metrics` and
:mod:`vlax.train.flops` (the trainer reports utilisation with the same code)."""

from __future__ import annotations

import jax

from vlax.train.flops import count_flops
from vlax.train.metrics import block, compiled_flops, matmul_peak, time_call

time_fn = time_call


def flops_of(jitted, *args) -> float:
    """XLA cost-analysis FLOPs of one call (counts a scanned loop body once: prefer :func:`count_flops`)."""
    return compiled_flops(jitted.lower(*args).compile())


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}"


__all__ = ["block", "count_flops", "device_name", "flops_of", "matmul_peak", "time_fn"]


def call_times(fn, calls: int) -> list[float]:
    """Seconds of ``calls`` blocking calls of ``fn()``, after one call that compiles and warms up (excluded)."""
    import time

    import jax

    jax.block_until_ready(fn())
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - start)
    return out
