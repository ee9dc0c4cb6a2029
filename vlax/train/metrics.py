"""Training metrics: FLOPs from XLA's cost analysis, the machine's measured matmul peak, and a writer that sends
scalars to stdout, a JSON-lines file and TensorBoard."""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath


def block(x: Any) -> Any:
    return jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x)


def time_call(fn: Callable, *args, warmup: int = 2, iters: int = 10, min_time: float = 0.5) -> float:
    """Median seconds per call of a jitted ``fn`` (compilation excluded)."""
    for _ in range(warmup):
        block(fn(*args))
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * iters:
            break
    return sorted(times)[len(times) // 2]


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a compiled executable (``jitted.lower(...).compile()``), from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float((cost or {}).get("flops", 0.0))


@functools.cache
def matmul_peak(dtype=jnp.float32, n: int | None = None) -> float:
    """Measured FLOP/s of a large square matmul on the default device: the practical peak for ``dtype``. Measured
    once per process (about a second of matmuls): a machine's peak does not change between runs it hosts."""
    n = n or (8192 if jax.default_backend() == "gpu" else 1536)
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    return 2 * n**3 / time_call(jax.jit(jnp.matmul), a, b)


def memory_report(compiled, state: Any) -> str:
    """Per-device memory of a compiled train step: parameters, optimizer state and activations/temporaries."""

    def local_bytes(tree) -> int:
        total = 0
        for x in jax.tree.leaves(tree):
            shards = getattr(x, "addressable_shards", None)
            total += shards[0].data.nbytes if shards else np.asarray(x).nbytes
        return total

    mib = 2**20
    params = local_bytes(state.params) / mib
    opt = local_bytes(state.opt_state) / mib
    analysis = compiled.memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", 0) / mib if analysis is not None else float("nan")
    return f"memory per device: params {params:.1f} MiB, optimizer {opt:.1f} MiB, activations+temporaries {temp:.1f} MiB"


def _path(workdir: str | os.PathLike) -> epath.Path:
    """``workdir`` as an ``epath.Path``: ``gs://`` and other URLs stay URLs (``pathlib`` would make ``gs:/b/r``)."""
    return epath.Path(os.fspath(workdir))


class MetricWriter:
    """Scalars to stdout (every call), ``metrics.jsonl`` and TensorBoard (process 0 only).

    ``workdir`` may be a URL (``gs://...``): object stores cannot append, so there the file is rewritten whole at
    each write (a few hundred lines per run); local files are appended to.
    """

    def __init__(self, workdir: str | os.PathLike, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = _path(workdir) / "metrics.jsonl"
        self._url = "://" in os.fspath(workdir)
        self._lines: list[str] | None = None
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                import tensorflow as tf

                self._tb = tf.summary.create_file_writer(os.fspath(_path(workdir) / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        line = json.dumps({"step": step, **scalars}) + "\n"
        if self._url:
            if self._lines is None:  # a resumed run keeps the lines written before it
                self._lines = [self.path.read_text()] if self.path.exists() else []
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
        else:
            with self.path.open("a") as f:
                f.write(line)
        if self._tb is not None:
            import tensorflow as tf

            with self._tb.as_default(step=step):
                for k, v in scalars.items():
                    tf.summary.scalar(k, v)
            self._tb.flush()


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    path = _path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
