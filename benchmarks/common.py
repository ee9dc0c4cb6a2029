"""Timing helpers shared by the benchmarks: compiled-step timing, matmul peak, XLA cost analysis."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp


def block(x: Any) -> Any:
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def time_fn(fn: Callable, *args, warmup: int = 2, iters: int = 10, min_time: float = 0.5) -> float:
    """Median seconds per call of an already-jitted ``fn`` (compile excluded)."""
    for _ in range(warmup):
        block(fn(*args))
    times = []
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * iters:
            break
    times.sort()
    return times[len(times) // 2]


def flops_of(jitted: Callable, *args) -> float:
    """FLOPs of one call from XLA's cost analysis of the compiled executable."""
    compiled = jitted.lower(*args).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", 0.0))


def matmul_peak(dtype=jnp.float32, n: int | None = None) -> float:
    """Measured FLOP/s of a large square matmul: the machine's practical peak for this dtype."""
    if n is None:
        n = 4096 if jax.default_backend() == "gpu" else 1536
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    return 2 * n**3 / time_fn(f, a, b)


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}"
