"""When a run stops early: SIGTERM / SIGINT or the time budget, agreed by every host.

Each host notes its own reasons (a signal reached it, its clock passed the deadline); :meth:`StopPolicy.should_stop`
combines them across processes at fixed steps, so every host leaves the loop after the same step and enters the
collective save together. With one process the check runs every step at no cost; with several, every
``check_every`` steps (one tiny all-gather).
"""

from __future__ import annotations

import signal
import time
from typing import Any

import jax
import numpy as np

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopPolicy:
    """Install with ``with StopPolicy(...) as stop:``; the previous signal handlers come back on exit."""

    def __init__(self, *, max_minutes: float = 0.0, check_every: int = 10):
        self.deadline = time.time() + 60 * max_minutes if max_minutes > 0 else None
        self.check_every = 1 if jax.process_count() == 1 else max(1, int(check_every))
        self.signal_name: str | None = None
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopPolicy":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        del frame
        self.signal_name = signal.Signals(signum).name

    def _local_reason(self) -> int:
        """0: go on; 1: a signal; 2: the time budget."""
        if self.signal_name:
            return 1
        if self.deadline is not None and time.time() > self.deadline:
            return 2
        return 0

    def should_stop(self, step: int) -> bool:
        """Whether every host stops after ``step`` (the same answer on every host)."""
        if step % self.check_every:
            return False
        local = self._local_reason()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            reasons = np.asarray(multihost_utils.process_allgather(np.asarray([local], np.int32))).reshape(-1)
            local = int(reasons.max())
            if local == 1 and not self.signal_name:
                self.signal_name = "a signal on another host"
        if local:
            self.reason = self.signal_name if local == 1 else "time budget"
        return bool(local)
