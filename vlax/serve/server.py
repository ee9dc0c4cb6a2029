"""A websocket policy server speaking openpi's protocol (see ``docs`` in the README's Serving section).

* Binds ``127.0.0.1`` unless told otherwise. With an API key, a connection whose ``Authorization: Api-Key <key>``
  header differs is refused at the handshake (HTTP 401); ``GET /healthz`` answers ``OK`` without a key.
* On connect the server sends the msgpack metadata frame; then each binary observation frame gets one binary
  reply ``{"actions": float32 [H, A], "server_timing": {...}, "policy_timing": {...}}``.
* A malformed request gets a one-line text frame ``error: <what and how to fix it>`` (openpi's client raises it
  as ``RuntimeError``) and the connection stays open; nothing else is affected.
* Decoding, validation and sampling run in a thread pool, so the event loop keeps answering handshakes, pings and
  other clients during a long inference; with ``max_batch > 1`` concurrent requests are sampled together.
* Bounded memory: at most ``max_connections`` connections, each in lockstep with at most ``max_queue`` frames of
  at most ``max_message_bytes`` buffered.
* Per-connection state (:class:`vlax.serve.engine.Connection`): a policy with ``obs_history > 1`` keeps each
  connection's window of observation steps, a dual-rate policy its plan. Both start afresh on a new connection and
  on a control frame ``{"__ctrl__": "episode_start"}`` (or ``"reset"``), answered ``{"__ack__": ...}``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import http
import logging
import threading
import time
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from vlax.serve.codec import packb
from vlax.serve.engine import CONTROL_KEY, Connection, Prepared, ServedPolicy
from vlax.serve.keys import RequestError

log = logging.getLogger("vlax.serve")

DEFAULT_HOST = "127.0.0.1"
API_KEY_ENV = "VLAX_API_KEY"


class MicroBatcher:
    """Collects requests arriving within ``window_s`` of the first (up to ``max_batch``) into one sampling call;
    at most ``concurrency`` calls run at once. A batch is sent without waiting out the window once every open
    connection has a request in it or in flight (lockstep clients cannot send more), so one client pays nothing."""

    def __init__(self, policy: ServedPolicy, executor: concurrent.futures.Executor, *, window_s: float,
                 concurrency: int, connections: Any = None):
        self.policy, self.executor, self.window_s = policy, executor, window_s
        self.connections = connections or (lambda: policy.max_batch)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.slots = asyncio.Semaphore(concurrency)
        self.in_flight = 0
        self.batch_sizes: list[int] = []

    async def submit(self, item: Prepared) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.window_s
            while len(batch) < self.policy.max_batch and len(batch) + self.in_flight < self.connections():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            await self.slots.acquire()
            self.in_flight += len(batch)
            asyncio.create_task(self._run(batch))

    async def _run(self, batch: list) -> None:
        try:
            self.batch_sizes.append(len(batch))
            items = [item for item, _ in batch]
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self.policy.infer_many, items)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
        except Exception as e:  # noqa: BLE001 - every waiting request must learn of it
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
        finally:
            self.in_flight -= len(batch)
            self.slots.release()


class PolicyServer:
    """Serve a :class:`ServedPolicy`; :meth:`run` blocks, :class:`ServerThread` runs it in the background."""

    def __init__(self, policy: ServedPolicy, *, host: str = DEFAULT_HOST, port: int = 8000,
                 api_key: str | None = None, workers: int = 2, batch_window_ms: float = 2.0,
                 max_message_bytes: int = 16 << 20, max_connections: int = 32, max_queue: int = 2,
                 warmup: bool = True):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.policy, self.host, self.port, self.api_key = policy, host, int(port), api_key or None
        self.workers, self.window_s = int(workers), float(batch_window_ms) / 1000.0
        self.max_message_bytes, self.max_connections, self.max_queue = max_message_bytes, max_connections, max_queue
        self.do_warmup = warmup
        self.metadata = policy.metadata()
        self.connections = 0
        self.served = 0
        self.errors = 0
        self.warmup_s: float | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._batcher: MicroBatcher | None = None
        self._server = None

    # ---- handshake -------------------------------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Any):
        if request.path.split("?")[0] == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if self.api_key is not None:
            header = request.headers.get("Authorization", "")
            if not hmac.compare_digest(header.encode(), f"Api-Key {self.api_key}".encode()):
                log.warning("refused a connection from %s: missing or wrong API key", connection.remote_address)
                return connection.respond(http.HTTPStatus.UNAUTHORIZED,
                                          "missing or wrong 'Authorization: Api-Key <key>' header\n")
        if self.connections >= self.max_connections:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      f"server busy: {self.max_connections} connections open\n")
        return None

    # ---- one connection --------------------------------------------------------------------------------------------

    def _prepare(self, message: bytes, connection: Connection) -> Any:
        """A decoded request -> :class:`Prepared`, or the reply to a control frame (a dict)."""
        request = self.policy.decode(message)
        if CONTROL_KEY in request:
            return self.policy.control(request, connection)
        return self.policy.prepare(request, history=connection.history)

    async def _infer(self, message: bytes, connection: Connection) -> tuple[Any, float | None]:
        """``(actions, infer_ms)``, or ``(control reply, None)`` for a control frame."""
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self._executor, self._prepare, message, connection)
        if isinstance(prepared, dict):
            return prepared, None
        started = time.perf_counter()
        if connection.plan is not None:  # a dual-rate policy: the connection's own plan, never micro-batched
            actions = await loop.run_in_executor(self._executor, connection.plan.infer, prepared)
        elif self._batcher is not None:  # each request brings its own window: batching mixes connections safely
            actions = await self._batcher.submit(prepared)
        else:
            actions = (await loop.run_in_executor(self._executor, self.policy.infer_many, [prepared]))[0]
        return actions, (time.perf_counter() - started) * 1000.0

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        connection = self.policy.connection()
        try:
            await ws.send(packb(self.metadata))
            prev_total_ms = None
            async for message in ws:
                started = time.perf_counter()
                if isinstance(message, str):
                    self.errors += 1
                    await ws.send("error: expected a binary msgpack frame, got a text frame")
                    continue
                try:
                    actions, infer_ms = await self._infer(message, connection)
                except RequestError as e:
                    self.errors += 1
                    await ws.send(f"error: {e}")
                    continue
                except Exception:  # noqa: BLE001 - one request failed; the server keeps serving
                    self.errors += 1
                    log.exception("inference failed")
                    await ws.send("error: internal server error during inference (see the server log)")
                    continue
                if infer_ms is None:  # a control frame's acknowledgement
                    await ws.send(packb(actions))
                    continue
                timing = {"infer_ms": infer_ms}
                if prev_total_ms is not None:
                    timing["prev_total_ms"] = prev_total_ms
                await ws.send(packb({"actions": actions, "server_timing": timing,
                                     "policy_timing": {"infer_ms": infer_ms}}))
                self.served += 1
                prev_total_ms = (time.perf_counter() - started) * 1000.0
        except ConnectionClosed:
            pass
        finally:
            self.connections -= 1
            await asyncio.get_running_loop().run_in_executor(self._executor, connection.close)

    # ---- lifecycle -------------------------------------------------------------------------------------------------

    async def serve(self, ready: threading.Event | None = None, stop: asyncio.Event | None = None) -> None:
        """Warm up (compile), then open the port and serve until ``stop`` is set (forever by default)."""
        if self.do_warmup:
            self.warmup_s = self.policy.warmup()
            log.info("warm-up compiled in %.1f s", self.warmup_s)
        self._executor = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix="vlax-serve")
        batch_task = None
        if self.policy.max_batch > 1:
            self._batcher = MicroBatcher(self.policy, self._executor, window_s=self.window_s,
                                         concurrency=self.workers, connections=lambda: self.connections)
            batch_task = asyncio.create_task(self._batcher.run())
        try:
            async with serve(self._handle, self.host, self.port, process_request=self._process_request,
                             compression=None, max_size=self.max_message_bytes, max_queue=self.max_queue) as server:
                self._server = server
                self.port = server.sockets[0].getsockname()[1]
                log.info("serving on ws://%s:%d (healthz: http://%s:%d/healthz)", self.host, self.port, self.host,
                         self.port)
                if ready is not None:
                    ready.set()
                await (stop.wait() if stop is not None else asyncio.get_running_loop().create_future())
        finally:
            if batch_task is not None:
                batch_task.cancel()
            self._executor.shutdown(wait=False, cancel_futures=True)

    def run(self) -> None:
        asyncio.run(self.serve())


class ServerThread:
    """Run a :class:`PolicyServer` on a background thread (tests, benchmarks, notebooks)::

        with ServerThread(PolicyServer(policy, port=0)) as server:
            client = Client(port=server.port)
    """

    def __init__(self, server: PolicyServer, timeout_s: float = 300.0):
        self.server, self.timeout_s = server, timeout_s
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="vlax-serve-loop", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    def _main(self) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await self.server.serve(self._ready, self._stop)

        try:
            asyncio.run(main())
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
            self._ready.set()

    def start(self) -> "ServerThread":
        self._thread.start()
        if not self._ready.wait(self.timeout_s):
            raise TimeoutError(f"the policy server did not start within {self.timeout_s} s")
        if self._error is not None:
            raise RuntimeError(f"the policy server failed to start: {self._error}") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
