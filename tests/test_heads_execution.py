"""Executing chunks: ACT's temporal ensembling against its brute-force definition, and the receding-horizon queue."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from vlax.heads import ActionQueue, TemporalEnsembler

B, H, A = 2, 4, 3


def act_reference(chunks: np.ndarray, k: float) -> np.ndarray:
    """ACT's definition: at step t, average every prediction made for t (chunk s predicts steps s .. s + H - 1),
    oldest first, with weights exp(-k * i) normalised to sum to one. ``chunks [T, B, H, A]`` -> ``[T, B, A]``."""
    steps, out = chunks.shape[0], []
    for t in range(steps):
        preds = [chunks[s][:, t - s] for s in range(max(0, t - H + 1), t + 1)]  # oldest first
        w = np.exp(-k * np.arange(len(preds)))
        out.append(sum(wi * p for wi, p in zip(w, preds)) / w.sum())
    return np.stack(out)


@pytest.mark.parametrize("k", [0.01, 0.5, 0.0])
def test_temporal_ensemble_equals_acts_weighted_average(k):
    chunks = np.asarray(jax.random.normal(jax.random.key(0), (9, B, H, A)))
    ens = TemporalEnsembler(H, coeff=k)
    update = jax.jit(ens.update)
    state, got = ens.init(B, A), []
    for chunk in chunks:
        action, state = update(state, chunk)
        got.append(np.asarray(action))
    np.testing.assert_allclose(np.stack(got), act_reference(chunks, k), rtol=1e-5, atol=1e-6)


def test_ensembler_refuses_a_chunk_of_the_wrong_shape():
    ens = TemporalEnsembler(H)
    with pytest.raises(ValueError, match=r"chunk of shape \(2, 5, 3\) does not match the ensembler's \(2, 4, 3\)"):
        ens.update(ens.init(B, A), np.zeros((B, H + 1, A), np.float32))


def sample_chunk_step(offset: int, step: int) -> np.ndarray:
    return (np.arange(B * H * A, dtype=np.float32).reshape(B, H, A) + offset)[:, step]


def test_action_queue_replans_every_n_action_steps():
    queue, calls = ActionQueue(n_action_steps=3), []

    def sample():
        calls.append(len(calls))
        return np.arange(B * H * A, dtype=np.float32).reshape(B, H, A) + 100 * len(calls)

    executed = [np.asarray(queue.select(sample)) for _ in range(7)]
    assert len(calls) == 3  # sampled at steps 0, 3 and 6
    np.testing.assert_array_equal(executed[4], sample_chunk_step(200, 1))
    queue.reset()
    assert len(queue) == 0
    with pytest.raises(IndexError, match="the action queue is empty"):
        queue.pop()
    with pytest.raises(ValueError, match=r"chunk of shape \(2, 2, 3\) has fewer than n_action_steps=3 steps"):
        queue.push(np.zeros((B, 2, A)))
