"""openpi's wire encoding: msgpack with numpy arrays as tagged maps (its own scheme, not the msgpack-numpy package).

An array travels as ``{b"__ndarray__": True, b"data": C-order bytes, b"dtype": dtype.str, b"shape": [...]}`` and a
numpy scalar as ``{b"__npgeneric__": True, b"data": value, b"dtype": dtype.str}`` (bytes keys, msgpack >= 1.0
defaults). Decoding builds arrays from plain numbers and bytes only: nothing is ever unpickled, and object, void
(structured or sub-array) and complex dtypes are refused both ways. A decoded array is a read-only view of the
message.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

# Kinds a message may carry: bool, signed/unsigned integers, floats, fixed-width unicode and bytes strings.
ALLOWED_KINDS = frozenset("biufUS")
MAX_NDIM = 8


class ProtocolError(ValueError):
    """A message that is not valid msgpack-numpy, or that carries something this server refuses."""


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if dtype.kind not in ALLOWED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ProtocolError(f"{where}: dtype {dtype.str!r} (kind {dtype.kind!r}) is refused; send bool, integer, "
                            "float or string arrays")


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        _check_dtype(obj.dtype, "packing an array")
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        _check_dtype(obj.dtype, "packing a numpy scalar")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"cannot pack {type(obj).__name__}; send dicts, lists, numbers, strings, bytes or numpy arrays")


def _parse_dtype(value: Any) -> np.dtype:
    if not isinstance(value, str) or len(value) > 16:
        raise ProtocolError(f"array dtype must be a short string such as '<f4', got {value!r:.40}")
    try:
        dtype = np.dtype(value)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"unknown array dtype {value!r}") from e
    _check_dtype(dtype, "array")
    return dtype


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        if set(obj) != {b"__ndarray__", b"data", b"dtype", b"shape"}:
            raise ProtocolError("array map must have exactly the keys __ndarray__, data, dtype, shape")
        dtype = _parse_dtype(obj[b"dtype"])
        shape = obj[b"shape"]
        if (not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM
                or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)):
            raise ProtocolError(f"array shape must be a list of at most {MAX_NDIM} non-negative ints, got "
                                f"{shape!r:.60}")
        data = obj[b"data"]
        if not isinstance(data, bytes):
            raise ProtocolError("array data must be bytes")
        # Checked before anything is allocated: a claimed huge shape with a small buffer is refused, not built.
        expected = math.prod(shape) * dtype.itemsize
        if len(data) != expected:
            raise ProtocolError(f"array of shape {list(shape)} and dtype {dtype.str} needs {expected} bytes, got "
                                f"{len(data)}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if b"__npgeneric__" in obj:
        if set(obj) != {b"__npgeneric__", b"data", b"dtype"}:
            raise ProtocolError("numpy scalar map must have exactly the keys __npgeneric__, data, dtype")
        dtype = _parse_dtype(obj[b"dtype"])
        value = obj[b"data"]
        if not isinstance(value, (bool, int, float, str, bytes)):
            raise ProtocolError(f"numpy scalar data must be a number or string, got {type(value).__name__}")
        try:
            return np.asarray(value, dtype=dtype)[()]
        except (TypeError, ValueError, OverflowError) as e:
            raise ProtocolError(f"numpy scalar {value!r:.40} does not fit dtype {dtype.str}") from e
    return obj


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is refused")


def packb(obj: Any) -> bytes:
    """Encode ``obj`` (dicts, lists, numbers, strings, bytes, numpy arrays and scalars)."""
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """Decode one message; any malformation is a :class:`ProtocolError`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected a binary frame, got {type(data).__name__}")
    try:
        return msgpack.unpackb(bytes(data), object_hook=_decode, ext_hook=_refuse_ext, raw=False,
                               strict_map_key=True)
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        # ExtraData, truncated input, bad UTF-8, unhashable keys, nesting too deep: one short reason.
        raise ProtocolError(f"not a valid msgpack message ({type(e).__name__})") from None
