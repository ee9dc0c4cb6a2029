"""The websocket policy server: openpi's own client against vlax's sampling, concurrency, the API key, loopback
bind, error replies, and real-time chunking through the server."""

from __future__ import annotations

import threading
import time
import urllib.request

import jax
import numpy as np
import pytest
from websockets.exceptions import InvalidStatus

from test_serve_support import ACTION_DIM, make_checkpoint, observation, raw
from vlax.inference import PolicyRunner
from vlax.serve import Client, PolicyServer, ServedPolicy, ServerError, ServerThread, packb



@pytest.fixture(scope="module")
def openpi_client():
    """openpi's PyPI client, installed without its numpy<2 pin (the Makefile's test set-up does it)."""
    return pytest.importorskip("openpi_client.websocket_client_policy",
                               reason="pip install --no-deps openpi-client==0.1.2")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serve_flow"))


def _policy(checkpoint, cls=ServedPolicy, **kwargs) -> ServedPolicy:
    return cls(PolicyRunner.from_checkpoint(checkpoint, seed=0), **kwargs)


@pytest.fixture(scope="module")
def server(checkpoint):
    with ServerThread(PolicyServer(_policy(checkpoint), port=0)) as running:
        yield running


def test_openpi_client_gets_vlax_in_process_actions(checkpoint, openpi_client):
    """openpi-client 0.1.2 from PyPI: metadata first, then actions equal to in-process sampling (same seed)."""
    with ServerThread(PolicyServer(_policy(checkpoint), port=0)) as running:
        client = openpi_client.WebsocketClientPolicy("127.0.0.1", running.port)
        meta = client.get_server_metadata()
        assert meta["action_horizon"] == 8 and meta["action_dim"] == ACTION_DIM and meta["state_dim"] == 4
        assert meta["cameras"] == {"corner2": [32, 32, 3]} and len(meta["normalization_hash"]) == 16
        replies = [client.infer(observation(i)) for i in range(2)]
    reference = PolicyRunner.from_checkpoint(checkpoint, seed=0)  # request n samples with fold_in(key(0), n)
    for i, reply in enumerate(replies):
        expected = reference.infer(raw(observation(i)))
        assert reply["actions"].shape == (8, ACTION_DIM) and reply["actions"].dtype == np.float32
        np.testing.assert_array_equal(reply["actions"], expected)
        assert reply["server_timing"]["infer_ms"] > 0
    assert "prev_total_ms" in replies[1]["server_timing"]


def test_vlax_client_and_healthz(server):
    assert server.server.warmup_s > 0  # compiled before the port opened
    with Client("127.0.0.1", server.port) as client:
        assert client.metadata["head"] == "FlowHead"
        actions = client.infer(observation(3))["actions"]
        assert actions.shape == (8, ACTION_DIM) and np.isfinite(actions).all()
        # The checkpoint's own camera name and a CHW float image are accepted as well.
        obs = observation(3)
        other = {"observation/corner2": obs["observation/image"].transpose(2, 0, 1) / 255.0,
                 "state": obs["observation/state"], "prompt": obs["prompt"]}
        assert client.infer(other)["actions"].shape == (8, ACTION_DIM)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as r:
        assert r.status == 200 and r.read() == b"OK\n"


class SlowPolicy(ServedPolicy):
    """Sleeps inside inference for the prompt "slow", like a policy with a long forward."""

    def infer_many(self, batch):
        if any(p.prompt == "slow" for p in batch):
            time.sleep(2.0)
        return super().infer_many(batch)


def test_second_client_is_served_during_a_long_inference(checkpoint):
    with ServerThread(PolicyServer(_policy(checkpoint, SlowPolicy), port=0, workers=2)) as running:
        slow, fast = Client(port=running.port), Client(port=running.port)
        done = {}

        def ask_slow():
            slow.infer(observation(0, prompt="slow"))
            done["slow"] = time.perf_counter()

        thread = threading.Thread(target=ask_slow)
        started = time.perf_counter()
        thread.start()
        time.sleep(0.3)  # the slow request is inside inference now
        fast.infer(observation(1))
        done["fast"] = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{running.port}/healthz", timeout=5) as r:
            assert r.status == 200
        healthz_at = time.perf_counter()
        thread.join()
        assert done["fast"] - started < 1.5, "the fast client waited for the slow one"
        assert healthz_at < done["slow"], "the event loop was blocked by the slow inference"
        assert done["slow"] - started >= 2.0
        slow.close(), fast.close()


def test_api_key_refused_without_served_with(checkpoint, openpi_client):
    with ServerThread(PolicyServer(_policy(checkpoint), port=0, api_key="s3cret", warmup=False)) as running:
        for key in (None, "wrong"):
            with pytest.raises(InvalidStatus, match="401"):
                Client(port=running.port, api_key=key)
            with pytest.raises(InvalidStatus, match="401"):
                openpi_client.WebsocketClientPolicy("127.0.0.1", running.port, api_key=key)
        client = openpi_client.WebsocketClientPolicy("127.0.0.1", running.port, api_key="s3cret")
        assert client.infer(observation(0))["actions"].shape == (8, ACTION_DIM)
        with urllib.request.urlopen(f"http://127.0.0.1:{running.port}/healthz", timeout=5) as r:
            assert r.status == 200  # health checks need no key


def test_default_bind_is_loopback(server):
    assert PolicyServer.__init__.__kwdefaults__["host"] == "127.0.0.1"
    assert server.server.host == "127.0.0.1"
    assert {s.getsockname()[0] for s in server.server._server.sockets} == {"127.0.0.1"}
    from experiments import serve as cli

    assert cli._HOST.default == "127.0.0.1"


def _raw_frame(dtype: str, shape: list, data: bytes) -> bytes:
    import msgpack

    array = {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}
    return msgpack.packb({"observation/image": array, "observation/state": [0.0] * 4, "prompt": "x"})


@pytest.mark.parametrize("message,expected", [
    (b"\xc1 not msgpack", "not a valid msgpack message"),
    (packb({"observation/state": np.zeros(4, np.float32), "prompt": "x"}), "missing camera 'corner2'"),
    (packb({**observation(), "observation/image": np.zeros((32, 32), np.uint8)}), "has shape [32, 32]"),
    (packb({**observation(), "observation/image": np.zeros((32, 32, 3), np.int64)}), "has dtype int64"),
    (packb({**observation(), "observation/state": np.array([0, np.nan, 0, 0], np.float32)}), "non-finite"),
    (packb({**observation(), "observation/state": np.zeros(3, np.float32)}), "expects [4]"),
    (packb({**observation(), "prompt": 7}), "missing 'prompt'"),
    (_raw_frame("|O", [1], b"\x00" * 8), "dtype '|O' (kind 'O') is refused"),
    (_raw_frame("<c8", [32, 32, 3], b"\x00" * 8 * 32 * 32 * 3), "dtype '<c8' (kind 'c') is refused"),
    (_raw_frame("|u1", [100000, 100000, 3], b"\x00" * 10), "needs 30000000000 bytes"),
    (packb({**observation(), "vlax/prev_actions": np.zeros((4, ACTION_DIM), np.float32)}), "without real-time"),
    (packb([1, 2, 3]), "must be a msgpack map"),
])
def test_malformed_request_gets_an_error_and_the_connection_keeps_serving(server, message, expected):
    with Client(port=server.port) as client:
        client._ws.send(message)
        reply = client._ws.recv(10)
        assert isinstance(reply, str) and reply.startswith("error: ") and expected in reply, reply
        assert not any(leak in reply for leak in ("Traceback", ".py", "/work", "site-packages")), reply
        assert client.infer(observation(0))["actions"].shape == (8, ACTION_DIM)
        client._ws.send("a text frame")
        assert client._ws.recv(10).startswith("error: expected a binary")
        with pytest.raises(ServerError, match="missing camera"):
            client.infer({"prompt": "x"})


def test_rtc_through_the_server_inpaints_the_actions_still_to_execute(checkpoint):
    policy = _policy(checkpoint, rtc=True, delay_steps=2)
    with ServerThread(PolicyServer(policy, port=0)) as running, Client(port=running.port) as client:
        assert client.metadata["rtc"] is True and client.metadata["delay_steps"] == 2
        previous = client.infer(observation(0))["actions"]
        remaining = previous[4:]  # executed 4 of 8 when the next observation was taken
        guided = client.infer({**observation(1), "vlax/prev_actions": remaining})["actions"]
        free = client.infer(observation(1))["actions"]
        err = lambda a: np.abs(a[:2] - remaining[:2]).mean()  # noqa: E731 - the frozen part (delay 2)
        assert err(guided) < 0.2 * err(free), (err(guided), err(free))
        with pytest.raises(ServerError, match="delay <= execute_steps"):
            client.infer({**observation(1), "vlax/prev_actions": previous[1:], "vlax/delay_steps": 3})


def test_micro_batching_gives_each_request_its_own_answer(checkpoint):
    policy = _policy(checkpoint, max_batch=4)
    keys = [jax.random.key(i) for i in range(3)]
    alone = [policy.infer_many([policy.prepare(observation(i), key=k)])[0] for i, k in enumerate(keys)]
    together = policy.infer_many([policy.prepare(observation(i), key=k) for i, k in enumerate(keys)])
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a, b, atol=1e-5)  # batching changes float reassociation only
    with ServerThread(PolicyServer(policy, port=0, batch_window_ms=50, workers=1)) as running:
        clients = [Client(port=running.port) for _ in range(4)]
        results = [None] * 4

        def ask(i):
            results[i] = clients[i].infer(observation(i))["actions"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert all(r.shape == (8, ACTION_DIM) for r in results)
        assert max(running.server._batcher.batch_sizes) > 1
        [c.close() for c in clients]


def _fuzz_messages(rs: np.random.RandomState, n: int) -> list:
    """Random bytes, truncated requests, wrong keys and values, bad arrays, deep nesting, text frames."""
    import msgpack

    good = packb(observation(0))
    values = [7, "x", None, [1, 2], {"a": 1}, b"\x00" * 5, np.zeros((2, 2), np.float64), np.zeros(4, np.bool_),
              np.zeros((32, 32, 4), np.uint8), np.full(4, np.inf, np.float32), np.array(["a", "b"])]
    out = []
    for i in range(n):
        kind = i % 7
        if kind == 0:
            out.append(rs.bytes(rs.randint(0, 2000)))
        elif kind == 1:
            out.append(good[:rs.randint(0, len(good))])
        elif kind == 2:
            obs = observation(i)
            key = list(obs)[rs.randint(len(obs))]
            obs[key if rs.rand() < 0.7 else f"junk{i}"] = values[rs.randint(len(values))]
            if rs.rand() < 0.3:
                obs.pop(list(obs)[rs.randint(len(obs))])
            out.append(packb(obs))
        elif kind == 3:
            shape = [int(s) for s in rs.choice([0, 1, 3, 10 ** 6, 2 ** 40, -1], size=rs.randint(0, 10))]
            dtype = ["|u1", "<f4", "|O", "<c16", "|V8", "(2,)f4", "f4,i4", "zz", "<M8[s]", 5][rs.randint(10)]
            array = {b"__ndarray__": True, b"data": rs.bytes(rs.randint(0, 64)), b"dtype": dtype, b"shape": shape}
            out.append(msgpack.packb({"observation/image": array, "observation/state": [0.0] * 4, "prompt": "x"}))
        elif kind == 4:
            out.append(b"\x91" * rs.randint(100, 5000) + b"\x00")  # arrays nested thousands deep
        elif kind == 5:
            out.append(msgpack.packb({"prompt": "x", "observation/image": {b"__npgeneric__": True, b"data": [1],
                                                                           b"dtype": "<f4"}}))
        else:
            out.append("text " * rs.randint(1, 50))
    return out


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20


def test_fuzz_small_server_survives_and_memory_stays_bounded(checkpoint):
    """A few hundred malformed messages (and oversized ones that close their connection); then a good client."""
    from websockets.exceptions import ConnectionClosed

    limit = 256 << 10
    with ServerThread(PolicyServer(_policy(checkpoint), port=0, max_message_bytes=limit)) as running:
        rs = np.random.RandomState(0)

        def blast(messages) -> tuple[int, int]:
            client, errors, closes = Client(port=running.port), 0, 0
            for message in messages:
                try:
                    client._ws.send(message)
                    reply = client._ws.recv(10)
                    errors += isinstance(reply, str)
                except ConnectionClosed:
                    closes += 1
                    client = Client(port=running.port)
            client.close()
            return errors, closes

        blast(_fuzz_messages(rs, 100))  # warm: every code path has run once
        before = _rss_mib()
        errors, closes = blast(_fuzz_messages(rs, 300) + [b"\x00" * (limit + 1)] * 3)
        grown = _rss_mib() - before
        assert errors >= 280 and closes == 3, (errors, closes)  # oversized frames close only their connection
        assert grown < 64, f"resident memory grew {grown:.0f} MiB over 300 malformed messages"
        with Client(port=running.port) as client:
            assert client.infer(observation(0))["actions"].shape == (8, ACTION_DIM)
        assert running.server.connections <= 1
