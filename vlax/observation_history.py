"""The window of the last ``obs_history`` raw observations, for running a policy one control step at a time.

A policy with ``PolicySpec.obs_history = T > 1`` was trained on windows of T consecutive observation steps, oldest
first, an episode's start padded by repeating its first step (the data pipeline's ``chunk``). On a robot, in the
simulator or behind the server, observations arrive one step at a time; :class:`ObservationHistory` keeps the last
T of them and hands out the window::

    history = ObservationHistory(2)
    history.reset()                                   # at every episode start
    window = history.push({"images": {"top": frame}, "state": state, "prompt": "pick up the cube"})
    # window["images"]["top"]: [2, h, w, 3] (a batched step [B, h, w, 3] gives [B, 2, h, w, 3]); "state": [2, S]

The first step after :meth:`reset` fills the whole window with copies of itself, as LeRobot's ``n_obs_steps``
queues do (``populate_queues``: an empty queue is filled with the first observation) and as Octo's
``HistoryWrapper`` does. Octo also marks those copies as padding with a ``timestep_pad_mask`` (False for the
``T - min(steps seen, T)`` oldest entries); :meth:`pad_mask` gives the same mask, and the runner passes it to a
policy that declares it reads one (:func:`reads_timestep_pad_mask`, Octo's preset), as its training batches
carried the data pipeline's mask (``ObservationPipeline.from_batch``); other policies are fed no mask.

With ``T = 1`` the history is a pass-through: :meth:`push` returns the very observation it was given.
"""

from __future__ import annotations

import collections
from typing import Any, Mapping

import numpy as np

# The model-input key of Octo's timestep padding mask ([B, T], True: a real observation step).
PAD_MASK_KEY = "timestep_pad_mask"


def reads_timestep_pad_mask(model: Any) -> bool:
    """Whether a policy asks for ``timestep_pad_mask`` in its inputs (a class attribute the policy declares)."""
    return bool(getattr(model, "reads_timestep_pad_mask", False))


class ObservationHistory:
    """The last ``steps`` raw observation steps; :meth:`push` one step, get the window back (oldest first).

    A step is a raw observation as :meth:`vlax.observation.ObservationPipeline.model_inputs` takes it, one control
    step of it: ``{"images": {camera: uint8 [h, w, 3] or [B, h, w, 3]}, "state": [S] or [B, S] (optional),
    "prompt": ...}``. The window has a step axis right after the batch axis (if any): images ``[T, h, w, 3]`` /
    ``[B, T, h, w, 3]``, state ``[T, S]`` / ``[B, T, S]``; the prompt and every other key are the latest step's.
    """

    def __init__(self, steps: int):
        if int(steps) < 1:
            raise ValueError(f"an observation history holds at least 1 step, got {steps}")
        self.steps = int(steps)
        self._window: collections.deque = collections.deque(maxlen=self.steps)
        self._layout: tuple | None = None
        self.count = 0  # steps pushed since the last reset

    def reset(self) -> None:
        """Forget every step: the next push starts a new episode (and fills the window with itself)."""
        self._window.clear()
        self._layout = None
        self.count = 0

    def snapshot(self) -> tuple:
        """The history's state, for :meth:`restore` (undo a push whose request then failed)."""
        return list(self._window), self._layout, self.count

    def restore(self, snapshot: tuple) -> None:
        window, self._layout, self.count = snapshot
        self._window.clear()
        self._window.extend(window)

    def pad_mask(self) -> np.ndarray:
        """``bool [T]`` (``[B, T]`` for batched steps): False for window entries that repeat the episode's first
        step because fewer than T steps were seen (Octo's ``timestep_pad_mask``)."""
        if self._layout is None:
            raise ValueError("the observation history is empty: push an observation step first")
        real = min(self.count, self.steps)
        mask = np.arange(self.steps) >= self.steps - real
        batch = self._layout[0]
        return mask if batch is None else np.broadcast_to(mask, (batch, self.steps)).copy()

    def push(self, raw: Mapping[str, Any]) -> Mapping[str, Any]:
        """Add one observation step and return the window ending with it (see the class docstring)."""
        if self.steps == 1:
            self.count += 1
            return raw
        images = raw.get("images")
        if not isinstance(images, Mapping) or not images:
            raise KeyError(f"an observation step needs 'images': {{camera: uint8 [h, w, 3] or [B, h, w, 3]}}; it "
                           f"has {sorted(raw)}")
        step = {"images": {c: np.array(v, copy=True) for c, v in images.items()}}
        if raw.get("state") is not None:
            step["state"] = np.array(raw["state"], np.float32, copy=True)
        layout = self._check(step)
        if self._layout is not None and layout != self._layout:
            raise ValueError(f"this observation step's layout {_describe(layout)} differs from the history's "
                             f"{_describe(self._layout)}; call reset() at an episode start (and keep the cameras, "
                             "image sizes, state size and batch size fixed within an episode)")
        if not self._window:
            self._window.extend([step] * self.steps)
        else:
            self._window.append(step)
        self._layout = layout
        self.count += 1
        axis = 0 if layout[0] is None else 1
        window = {k: v for k, v in raw.items() if k not in ("images", "state")}
        window["images"] = {c: np.stack([s["images"][c] for s in self._window], axis) for c in step["images"]}
        if "state" in step:
            window["state"] = np.stack([s["state"] for s in self._window], axis)
        return window

    def _check(self, step: dict) -> tuple:
        """``(batch or None, ((camera, shape, dtype), ...), state shape or None)`` of one step, checked."""
        batch = None
        cameras = []
        for camera, frames in step["images"].items():
            if frames.ndim not in (3, 4) or frames.shape[-1] != 3:
                raise ValueError(f"camera {camera!r}: one observation step is an image [h, w, 3] or a batch "
                                 f"[B, h, w, 3], got shape {list(frames.shape)}")
            b = frames.shape[0] if frames.ndim == 4 else None
            if cameras and b != batch:
                raise ValueError(f"camera {camera!r} has shape {list(frames.shape)}, batched differently from "
                                 f"camera {cameras[0][0]!r} {list(cameras[0][1])}")
            batch = b
            cameras.append((camera, frames.shape, frames.dtype.str))
        state = step.get("state")
        if state is not None:
            want = 1 if batch is None else 2
            if state.ndim != want or (batch is not None and state.shape[0] != batch):
                shape = "[S]" if batch is None else f"[{batch}, S]"
                raise ValueError(f"state has shape {list(state.shape)}; with these images one step's state is "
                                 f"{shape}")
        return batch, tuple(cameras), None if state is None else state.shape


def _describe(layout: tuple) -> str:
    batch, cameras, state = layout
    parts = [f"{c} {list(s)} {d}" for c, s, d in cameras] + [f"state {list(state) if state else None}"]
    return ("unbatched" if batch is None else f"batch {batch}") + ": " + ", ".join(parts)
