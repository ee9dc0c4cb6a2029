"""Dual-rate execution of a policy with a slow plan step and a fast act step (Helix's S2 / S1).

A policy that plans exposes ``plan(obs) -> plan`` and takes ``sample(obs, ..., plan=plan)``; the executor calls
the plan step every ``plan_every`` control steps and the act step at every step with the most recent plan::

    executor = DualRateExecutor(runner.plan_normalized, act, plan_every=25, asynchronous=True)
    for t in range(steps):
        chunk = executor.act(inputs_t, key_t)      # never waits for S2 once a first plan exists

* ``asynchronous=False``: a due plan is computed before the act step that needs it (deterministic: the act step
  at control step ``t`` always sees the plan of step ``plan_every * (t // plan_every)``).
* ``asynchronous=True``: a due plan is started on a background thread and the act step goes on with the plan it
  has; the new plan is used from the first act step after it is ready. Only the very first act step waits (there
  is no plan before it). A plan still running when the next one falls due is not doubled: the next starts when it
  is done (counted in ``plans_late``). Which act steps see which plan then depends on timing.

:attr:`stats` counts both steps and their time (the first call of each, which compiles, is kept out of the time).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from typing import Any, Callable


@dataclasses.dataclass
class DualRateStats:
    """What ran: act / plan calls, seconds in each (first, compiling call excluded), and plan freshness."""

    act_calls: int = 0
    plan_calls: int = 0          # plans finished
    plans_late: int = 0          # control steps at which a plan was due while the previous one still ran
    act_s: float = 0.0
    plan_s: float = 0.0
    timed_act_calls: int = 0
    timed_plan_calls: int = 0
    max_plan_age: int = 0        # most control steps between a plan's observation and an act step using it

    @property
    def act_ms(self) -> float | None:
        return 1000 * self.act_s / self.timed_act_calls if self.timed_act_calls else None

    @property
    def plan_ms(self) -> float | None:
        return 1000 * self.plan_s / self.timed_plan_calls if self.timed_plan_calls else None

    @property
    def acts_per_plan(self) -> float | None:
        """The S1 rate / S2 rate ratio actually run (act calls per finished plan)."""
        return self.act_calls / self.plan_calls if self.plan_calls else None


def _ready(tree: Any) -> Any:
    import jax

    return jax.block_until_ready(tree)


class DualRateExecutor:
    """Runs ``plan_fn(inputs) -> plan`` every ``plan_every`` control steps and ``act_fn(inputs, plan, key)`` every
    step (see the module docstring). One executor serves one episode / robot at a time; :meth:`reset` starts the
    next one."""

    def __init__(self, plan_fn: Callable[[Any], Any], act_fn: Callable[[Any, Any, Any], Any], *, plan_every: int,
                 asynchronous: bool = False):
        if int(plan_every) < 1:
            raise ValueError(f"plan_every={plan_every}; the plan step runs every plan_every >= 1 control steps")
        self.plan_fn, self.act_fn = plan_fn, act_fn
        self.plan_every, self.asynchronous = int(plan_every), bool(asynchronous)
        self.stats = DualRateStats()
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vlax-plan") \
            if self.asynchronous else None
        self._compiled_plan = self._compiled_act = False
        self.reset()

    def reset(self) -> None:
        """Forget the plan (a new episode); waits for a plan still running."""
        pending = getattr(self, "_pending", None)
        if pending is not None:
            pending[0].result()
        self._plan, self._plan_step, self._pending = None, None, None
        self._next_due, self._step = 0, 0
        self.stats.max_plan_age = 0  # per episode; the counters accumulate

    def close(self) -> None:
        self.reset()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    @property
    def plan(self) -> Any:
        """The plan the next act step uses (None before the first)."""
        return self._plan

    def _timed_plan(self, inputs: Any) -> Any:
        started = time.perf_counter()
        plan = _ready(self.plan_fn(inputs))
        elapsed = time.perf_counter() - started
        with self._lock:
            self.stats.plan_calls += 1
            if self._compiled_plan:
                self.stats.plan_s += elapsed
                self.stats.timed_plan_calls += 1
            self._compiled_plan = True
        return plan

    def _collect(self, wait: bool) -> None:
        """Adopt a finished background plan (waiting for it when ``wait``)."""
        if self._pending is None:
            return
        future, step = self._pending
        if wait or future.done():
            self._plan, self._plan_step, self._pending = future.result(), step, None

    def act(self, inputs: Any, key: Any, step: int | None = None) -> Any:
        """The act step's output at control step ``step`` (default: one more than the last call's)."""
        t = self._step if step is None else int(step)
        self._step = t + 1
        due = t >= self._next_due
        if not self.asynchronous:
            if due:
                self._plan, self._plan_step = self._timed_plan(inputs), t
                self._next_due = t + self.plan_every
        else:
            self._collect(wait=False)
            if due and self._pending is None:
                self._pending = (self._pool.submit(self._timed_plan, inputs), t)
                self._next_due = t + self.plan_every
            elif due:
                self.stats.plans_late += 1
            self._collect(wait=self._plan is None)  # nothing to act on before the first plan
        started = time.perf_counter()
        out = _ready(self.act_fn(inputs, self._plan, key))
        elapsed = time.perf_counter() - started
        self.stats.act_calls += 1
        if self._compiled_act:
            self.stats.act_s += elapsed
            self.stats.timed_act_calls += 1
        self._compiled_act = True
        self.stats.max_plan_age = max(self.stats.max_plan_age, t - self._plan_step)
        return out


__all__ = ["DualRateExecutor", "DualRateStats"]
