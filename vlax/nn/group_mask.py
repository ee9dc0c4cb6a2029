"""Attention masks over named token groups laid out in time (Octo's block-causal layout).

The sequence is ``[prefix groups..., (timestep groups of t = 0)..., (timestep groups of t = 1)..., ...]``.
Every group has a ``kind``:

* ``"task"`` (prefix, timestep -1): sees every task token, nothing later;
* ``"obs"`` (per timestep): sees the task and every ``obs`` token of its own or an earlier timestep;
* ``"readout"`` (per timestep): sees the task, ``obs`` tokens up to its timestep, and its *own* group up to its
  timestep. No other group sees a readout, so readouts read the sequence without changing it, and two readout
  groups never see each other.

Padding hides keys only (a padded token still attends, its output is ignored): the layout mask is and-ed with the
key mask ``[B, N]``.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("task", "obs", "readout")


@dataclasses.dataclass(frozen=True)
class Group:
    name: str
    num_tokens: int
    kind: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"group {self.name!r}: kind={self.kind!r}; known: {list(KINDS)}")


def token_groups(prefix: Sequence[Group], timestep: Sequence[Group], horizon: int, *,
                 correct_boundaries: bool = True) -> list[tuple[Group, int]]:
    """``(group, timestep)`` of every token position, in sequence order.

    ``correct_boundaries=False`` reproduces the attribution of Octo's first released models
    (``use_correct_attention=False``): the last token of each group is counted as the next group's.
    """
    side = "right" if correct_boundaries else "left"

    def owner(i: int, groups: Sequence[Group]) -> Group:
        return groups[min(int(np.searchsorted(np.cumsum([g.num_tokens for g in groups]), i, side=side)),
                          len(groups) - 1)]

    n_prefix = sum(g.num_tokens for g in prefix)
    per_step = sum(g.num_tokens for g in timestep)
    out = [(owner(i, prefix), -1) for i in range(n_prefix)]
    for t in range(horizon):
        out += [(owner(i, timestep), t) for i in range(per_step)]
    return out


def group_layout_mask(prefix: Sequence[Group], timestep: Sequence[Group], horizon: int, *,
                      correct_boundaries: bool = True) -> np.ndarray:
    """Boolean ``[N, N]`` (query, key) of the rules in the module docstring."""
    tokens = token_groups(prefix, timestep, horizon, correct_boundaries=correct_boundaries)
    kind = np.asarray([KINDS.index(g.kind) for g, _ in tokens])
    name = np.unique([g.name for g, _ in tokens], return_inverse=True)[1]
    step = np.asarray([t for _, t in tokens])
    task, obs, readout = (kind == KINDS.index(k) for k in KINDS)
    earlier = step[None, :] <= step[:, None]
    same_readout = readout[:, None] & (name[:, None] == name[None, :])
    return np.where(task[:, None], task[None, :],
                    task[None, :] | (obs[None, :] & earlier) | (same_readout & earlier))


def group_attention_mask(layout: np.ndarray, key_mask: jax.Array) -> jax.Array:
    """``[B, N, N]``: ``layout [N, N]`` and-ed with the real keys ``key_mask [B, N]``."""
    return jnp.asarray(layout)[None] & jnp.asarray(key_mask, bool)[:, None, :]


__all__ = ["Group", "KINDS", "token_groups", "group_layout_mask", "group_attention_mask"]
