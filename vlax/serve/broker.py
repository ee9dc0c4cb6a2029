"""Execute action chunks one action at a time: synchronous re-planning, naive switching, or real-time chunking.

``ActionChunkBroker(policy, execute_steps=s, mode=..., delay_steps=d).act(obs)`` returns the next action ``[A]``.
``policy`` is anything with ``infer(obs) -> {"actions": [H, A]}`` (:class:`vlax.serve.Client`, openpi's
``WebsocketClientPolicy``, or an in-process adapter). Chunk indices count control steps from the observation the
chunk was computed from.

* ``"sync"``: after ``s`` actions, query with the current observation and wait; the new chunk starts at index 0
  (the robot stands still while the policy thinks).
* ``"naive"``: after ``s`` actions, query in the background and keep executing the old chunk; when the reply
  arrives ``e`` steps later, switch to the new chunk at index ``e`` (the actions the world has moved past).
* ``"rtc"``: as ``"naive"``, and the request carries the old chunk's actions not yet executed
  (``vlax/prev_actions``) and the expected delay ``d`` (``vlax/delay_steps``), so the server inpaints them into the
  new chunk's start (a server started with ``--rtc``). Needs ``d <= s <= H - d``.

The background query runs on a thread; with ``simulated_delay=True`` it runs at once but its reply is withheld
for exactly ``delay_steps`` calls of :meth:`act` (closed-loop experiments in simulation).
"""

from __future__ import annotations

import concurrent.futures
from typing import Any, Mapping

import numpy as np

from vlax.serve.keys import DELAY_STEPS, PREV_ACTIONS
from vlax.serve.rtc import check_schedule

MODES = ("sync", "naive", "rtc")


class ActionChunkBroker:
    def __init__(self, policy: Any, execute_steps: int, *, mode: str = "sync", delay_steps: int = 0,
                 simulated_delay: bool = False):
        if mode not in MODES:
            raise ValueError(f"unknown broker mode {mode!r}; known: {list(MODES)}")
        if execute_steps < 1:
            raise ValueError(f"execute_steps must be >= 1, got {execute_steps}")
        if mode != "sync" and delay_steps < 0:
            raise ValueError(f"delay_steps must be >= 0, got {delay_steps}")
        self.policy, self.s, self.mode, self.d = policy, int(execute_steps), mode, int(delay_steps)
        self.simulated = bool(simulated_delay)
        self._executor = None if self.simulated or mode == "sync" else concurrent.futures.ThreadPoolExecutor(1)
        self.reset()

    def reset(self) -> None:
        """Forget the current chunk (call at the start of every episode)."""
        self.chunk: np.ndarray | None = None
        self.index = 0
        self._pending: Any = None
        self._elapsed = 0
        self.switches: list[int] = []  # the step of each chunk switch (for discontinuity metrics)
        self.steps = 0
        self.waits = 0  # control steps spent waiting for a reply (sync mode: each query's delay_steps)

    def _query(self, obs: Mapping[str, Any], remaining: np.ndarray | None) -> np.ndarray:
        request = dict(obs)
        if remaining is not None:
            request[PREV_ACTIONS] = np.asarray(remaining, np.float32)
            request[DELAY_STEPS] = self.d
        chunk = np.asarray(self.policy.infer(request)["actions"], np.float32)
        if chunk.ndim != 2:
            raise ValueError(f"the policy returned actions of shape {list(chunk.shape)}; expected [H, A]")
        return chunk

    def _launch(self, obs: Mapping[str, Any]) -> None:
        remaining = None
        if self.mode == "rtc":
            check_schedule(len(self.chunk), self.d, self.s)
            remaining = self.chunk[self.index:]
        self._elapsed = 0
        if self.simulated:
            self._pending = self._query(obs, remaining)
        else:
            self._pending = self._executor.submit(self._query, obs, remaining)

    def _ready(self) -> bool:
        if self.simulated:
            return self._elapsed >= self.d
        return self._pending.done()

    def _result(self) -> np.ndarray:
        return self._pending if self.simulated else self._pending.result()

    def _switch(self, chunk: np.ndarray, index: int) -> None:
        self.chunk, self.index, self._pending = chunk, index, None
        self.switches.append(self.steps)

    def _maybe_switch(self) -> None:
        if self._pending is None:
            return
        if not self._ready() and self.index >= len(self.chunk):
            if self.simulated:  # the old chunk ran out: wait the rest of the delay
                self.waits += self.d - self._elapsed
                self._elapsed = self.d
            else:
                self._pending.result()
        if self._ready():
            self._switch(self._result(), min(self._elapsed, len(self.chunk) - 1))

    def act(self, obs: Mapping[str, Any]) -> np.ndarray:
        """The action ``[A]`` to execute now."""
        if self.chunk is None:  # first call of an episode: nothing to execute while waiting
            self._switch(self._query(obs, None), 0)
            self.waits += self.d
        elif self.mode == "sync":
            if self.index >= self.s:
                self._switch(self._query(obs, None), 0)
                self.waits += self.d
        else:
            self._maybe_switch()
            if self._pending is None and self.index >= self.s:
                # Right after a switch when d == s: the next query starts from this very step.
                self._launch(obs)
                self._maybe_switch()
        action = self.chunk[min(self.index, len(self.chunk) - 1)]
        self.index += 1
        self.steps += 1
        if self._pending is not None:
            self._elapsed += 1
        return action

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
