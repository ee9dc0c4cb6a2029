"""Serving policies to robots over openpi's websocket protocol, with real-time chunking for flow/diffusion heads.

    python -m experiments.serve --checkpoint=runs/flow --port=8000 [--api_key=...] [--rtc --delay_steps=2]

* :mod:`vlax.serve.codec`: msgpack-numpy frames exactly as openpi-client packs them (no pickle, ever).
* :mod:`vlax.serve.keys`: the observation key table (openpi layouts or the checkpoint's camera names).
* :mod:`vlax.serve.engine`: :class:`ServedPolicy`, validation and (micro-batched) jitted sampling.
* :mod:`vlax.serve.server`: :class:`PolicyServer` (asyncio websockets; inference in a thread pool).
* :mod:`vlax.serve.client`: :class:`Client`; :mod:`vlax.serve.broker`: :class:`ActionChunkBroker`.
* :mod:`vlax.serve.rtc`: real-time chunking's soft mask and guide targets.
"""

from vlax.serve.broker import ActionChunkBroker
from vlax.serve.client import Client, ServerError
from vlax.serve.codec import ProtocolError, packb, unpackb
from vlax.serve.engine import ServedPolicy
from vlax.serve.keys import RequestError
from vlax.serve.server import DEFAULT_HOST, PolicyServer, ServerThread

__all__ = ["ActionChunkBroker", "Client", "ServerError", "ProtocolError", "packb", "unpackb", "ServedPolicy",
           "RequestError", "DEFAULT_HOST", "PolicyServer", "ServerThread"]
