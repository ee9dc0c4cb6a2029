"""The action-chunk broker's schedules (sync, naive switching, real-time chunking) against a scripted policy."""

from __future__ import annotations

import time

import numpy as np
import pytest

from vlax.serve import ActionChunkBroker

H, A = 8, 2


class Scripted:
    """Chunk k is ``100 k + index`` in every dimension; records what each request carried."""

    def __init__(self, sleep_s: float = 0.0):
        self.requests, self.sleep_s = [], sleep_s

    def infer(self, obs):
        self.requests.append(obs)
        time.sleep(self.sleep_s)
        k = len(self.requests) - 1
        return {"actions": np.repeat((100.0 * k + np.arange(H))[:, None], A, axis=1).astype(np.float32)}


def _run(broker, steps):
    return [float(broker.act({"t": t})[0]) for t in range(steps)]


def test_sync_executes_s_actions_then_waits_for_a_fresh_chunk():
    broker = ActionChunkBroker(Scripted(), execute_steps=4, mode="sync", delay_steps=2)
    assert _run(broker, 10) == [0, 1, 2, 3, 100, 101, 102, 103, 200, 201]
    assert broker.switches == [0, 4, 8] and broker.waits == 6


def test_naive_switches_late_chunks_at_the_delay_index():
    policy = Scripted()
    broker = ActionChunkBroker(policy, execute_steps=4, mode="naive", delay_steps=2, simulated_delay=True)
    # Query at step 4 (obs t=4); its reply arrives at step 6 and is entered at its index 2.
    assert _run(broker, 12) == [0, 1, 2, 3, 4, 5, 102, 103, 104, 105, 202, 203]
    assert [r["t"] for r in policy.requests] == [0, 4, 8]
    assert "vlax/prev_actions" not in policy.requests[1]


def test_rtc_requests_carry_the_actions_still_to_execute_and_the_delay():
    policy = Scripted()
    broker = ActionChunkBroker(policy, execute_steps=4, mode="rtc", delay_steps=2, simulated_delay=True)
    _run(broker, 12)
    second = policy.requests[1]
    np.testing.assert_array_equal(second["vlax/prev_actions"][:, 0], [4, 5, 6, 7])
    assert second["vlax/delay_steps"] == 2
    np.testing.assert_array_equal(policy.requests[2]["vlax/prev_actions"][:, 0], [104, 105, 106, 107])
    with pytest.raises(ValueError, match="delay <= execute_steps"):
        _run(ActionChunkBroker(Scripted(), execute_steps=2, mode="rtc", delay_steps=3, simulated_delay=True), 4)


def test_threaded_broker_keeps_acting_while_the_policy_thinks():
    broker = ActionChunkBroker(Scripted(sleep_s=0.2), execute_steps=2, mode="naive", delay_steps=1)
    broker.act({"t": 0})  # the first chunk is waited for
    started = time.perf_counter()
    actions = [float(broker.act({"t": t})[0]) for t in range(1, 5)]
    assert time.perf_counter() - started < 0.2  # steps 2.. ran from the old chunk during the query
    assert actions[:3] == [1, 2, 3]
    broker.close()


def test_rtc_with_delay_equal_to_the_execution_horizon_queries_at_every_switch():
    policy = Scripted()
    broker = ActionChunkBroker(policy, execute_steps=4, mode="rtc", delay_steps=4, simulated_delay=True)
    assert _run(broker, 13) == [0, 1, 2, 3, 4, 5, 6, 7, 104, 105, 106, 107, 204]
    assert [len(r["vlax/prev_actions"]) for r in policy.requests[1:]] == [4, 4, 4]
