"""A client for vlax's (and openpi's) websocket policy server, for users without ``openpi-client``.

    client = Client("127.0.0.1", 8000, api_key=None)
    client.metadata            # cameras, state/action dims, horizon, normalization hash, ...
    reply = client.infer({"observation/image": frame, "observation/state": state, "prompt": "open the drawer"})
    reply["actions"]           # float32 [H, A] in the dataset's units
"""

from __future__ import annotations

from typing import Any, Mapping

from websockets.sync.client import connect

from vlax.serve.codec import packb, unpackb


class ServerError(RuntimeError):
    """The server refused a request (its one-line reason is the message)."""


class Client:
    """One lockstep connection: :meth:`infer` sends one observation and waits for its reply."""

    def __init__(self, host: str = "127.0.0.1", port: int | None = 8000, *, api_key: str | None = None,
                 open_timeout: float = 10.0, max_message_bytes: int = 64 << 20):
        uri = host if host.startswith("ws") else f"ws://{host}"
        if port is not None:
            uri += f":{port}"
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
        self.uri = uri
        self._ws = connect(uri, compression=None, max_size=max_message_bytes, additional_headers=headers,
                           open_timeout=open_timeout).__enter__()  # closed by close()
        self.metadata: dict = unpackb(self._ws.recv())

    def infer(self, observation: Mapping[str, Any], timeout: float | None = None) -> dict:
        """The reply map (``actions``, ``server_timing``, ``policy_timing``); :class:`ServerError` on refusal."""
        self._ws.send(packb(dict(observation)))
        reply = self._ws.recv(timeout)
        if isinstance(reply, str):
            raise ServerError(reply)
        return unpackb(reply)

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
