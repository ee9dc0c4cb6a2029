"""Real-time chunking (Black, Galliker, Levine 2025): what the next chunk is guided toward, and how strongly.

While chunk ``k`` executes, chunk ``k + 1`` is generated from the observation taken ``s`` actions into chunk ``k``
(the execution horizon); it arrives ``d`` control steps later (the inference delay). The ``H - s`` actions of chunk
``k`` not yet executed when the request is made are aligned with the start of the new chunk: its first ``d``
will execute anyway while the new chunk is computed (weight 1, frozen), the rest of the overlap is inpainted with
exponentially decaying weight, and the last ``s`` actions are free (weight 0). Requires ``d <= s <= H - d``.

Host-side numpy; the guidance itself is an option of the flow and diffusion heads' ``sample``
(``guide_actions``, ``guide_weights``, ``max_guidance``).
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_MAX_GUIDANCE = 5.0  # the paper's clip beta of the guidance weight


def soft_mask(horizon: int, delay: int, execute_steps: int) -> np.ndarray:
    """Guidance weights ``[H]``: 1 for ``i < d``, ``c_i (e^{c_i} - 1) / (e - 1)`` with
    ``c_i = (H - s - i) / (H - s - d + 1)`` for ``d <= i < H - s``, 0 from ``H - s`` on."""
    check_schedule(horizon, delay, execute_steps)
    h, d, s = int(horizon), int(delay), int(execute_steps)
    i = np.arange(h, dtype=np.float64)
    c = (h - s - i) / (h - s - d + 1)
    decay = c * np.expm1(c) / (math.e - 1.0)
    weights = np.where(i < d, 1.0, np.where(i < h - s, decay, 0.0))
    return weights.astype(np.float32)


def check_schedule(horizon: int, delay: int, execute_steps: int) -> None:
    """One clear error unless ``0 <= d <= s <= H - d`` and ``s >= 1``."""
    h, d, s = int(horizon), int(delay), int(execute_steps)
    if not (0 <= d and 1 <= s and d <= s <= h - d):
        raise ValueError(f"real-time chunking needs 0 <= delay <= execute_steps <= horizon - delay; got delay={d}, "
                         f"execute_steps={s}, horizon={h} (use a smaller delay or execute fewer steps per chunk)")


def guide_from_remaining(remaining: np.ndarray, horizon: int, delay: int) -> tuple[np.ndarray, np.ndarray]:
    """``(target [H, A], weights [H])`` from the previous chunk's ``remaining [H - s, A]`` actions (those not yet
    executed when the new observation was taken), aligned with the start of the new chunk; ``s = H - len``."""
    remaining = np.asarray(remaining, np.float32)
    if remaining.ndim != 2 or not 1 <= remaining.shape[0] < horizon:
        raise ValueError(f"the previous chunk's remaining actions have shape {tuple(remaining.shape)}; expected "
                         f"[n, A] with 1 <= n < horizon={horizon}")
    n, a = remaining.shape
    target = np.zeros((horizon, a), np.float32)
    target[:n] = remaining
    return target, soft_mask(horizon, delay, horizon - n)
