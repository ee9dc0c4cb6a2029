"""The msgpack-numpy codec against openpi-client's own, and what it refuses."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from vlax.serve.codec import ProtocolError, packb, unpackb


SAMPLE = {"observation/image": np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3),
          "state": np.linspace(0, 1, 5, dtype=np.float32), "mask": np.array([True, False]),
          "ids": np.arange(3, dtype=np.int64), "names": np.array(["ab", "c"]), "prompt": "open",
          "nested": {"x": [1, 2.5, "y"], "t": np.float32(0.5)}}


def _equal(a, b):
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _equal(x, y)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def test_bytes_equal_openpi_and_round_trip_both_ways():
    openpi_codec = pytest.importorskip("openpi_client.msgpack_numpy",
                                       reason="pip install --no-deps openpi-client==0.1.2")
    assert packb(SAMPLE) == openpi_codec.packb(SAMPLE)
    _equal(unpackb(openpi_codec.packb(SAMPLE)), SAMPLE)
    _equal(openpi_codec.unpackb(packb(SAMPLE)), SAMPLE)
    assert not unpackb(packb(SAMPLE))["state"].flags.writeable  # a view of the message: copy before writing


@pytest.mark.parametrize("array", [np.array([object()], dtype=object), np.zeros(2, np.complex64),
                                   np.zeros(2, dtype=[("a", "<f4")])])
def test_packing_refuses_object_complex_and_void(array):
    with pytest.raises(ProtocolError, match="is refused"):
        packb({"x": array})


@pytest.mark.parametrize("dtype,shape,data,match", [
    ("|O", [1], b"\x00" * 8, "kind 'O'"), ("<c8", [1], b"\x00" * 8, "kind 'c'"),
    ("(2,)f4", [1], b"\x00" * 8, "is refused"), ("f4,i4", [1], b"\x00" * 8, "is refused"),
    ("nope", [1], b"", "unknown array dtype"), ("<f4", [2 ** 40, 2 ** 40], b"\x00" * 4, "needs"),
    ("<f4", [-1], b"", "non-negative"), ("<f4", [1] * 9, b"\x00" * 4, "at most 8"),
    ("<f4", [2], "notbytes", "must be bytes"),
])
def test_decoding_refuses_bad_arrays_before_allocating(dtype, shape, data, match):
    frame = msgpack.packb({"x": {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}})
    with pytest.raises(ProtocolError, match=match):
        unpackb(frame)


@pytest.mark.parametrize("frame", [b"", b"\xc1", packb(SAMPLE)[:-3], packb(SAMPLE) + b"\x00",
                                   b"\x91" * 5000 + b"\x00", msgpack.packb({1: 2}), msgpack.ExtType(1, b"x")])
def test_malformed_msgpack_is_one_protocol_error(frame):
    if isinstance(frame, msgpack.ExtType):
        frame = msgpack.packb(frame)
    with pytest.raises(ProtocolError):
        unpackb(frame)
