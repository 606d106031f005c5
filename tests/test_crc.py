"""The fast CRC-32 matches zlib's, and the codec works with every backend."""

from __future__ import annotations

import platform
import zlib

import numpy as np
import pytest
from conftest import vector_bytes
from hypothesis import given
from hypothesis import strategies as st

import resonant
from resonant import _codec


@given(st.binary(max_size=5000), st.integers(0, 2**32 - 1))
def test_crc32_matches_zlib(data, start):
    assert resonant.crc32(data) == zlib.crc32(data)
    assert resonant.crc32(data, start) == zlib.crc32(data, start)
    assert resonant.crc32(bytearray(data)) == zlib.crc32(data)
    assert resonant.crc32(memoryview(data)) == zlib.crc32(data)


def test_crc32_of_arrays_and_large_buffers():
    arr = np.random.default_rng(1).standard_normal((64, 512)).astype(np.float16)
    assert resonant.crc32(arr) == zlib.crc32(arr.tobytes())
    big = np.random.default_rng(2).bytes(1 << 20)
    assert resonant.crc32(big) == zlib.crc32(big)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64", "aarch64"), reason="isal wheels")
def test_fast_c_backend_is_active():
    assert resonant.crc32_backend() == "isal-c"


@pytest.mark.parametrize("backend", ["isal", "zlib-ng", "zlib"])
def test_codec_with_fallback_backends(backend):
    if backend == "zlib-ng":
        pytest.importorskip("zlib_ng")
    try:
        assert _codec._select_crc(backend) == backend
        data = vector_bytes("05_cache_kv.bin")
        assert resonant.encode(resonant.decode(data)) == data
        assert resonant.crc32(data) == zlib.crc32(data)
        with pytest.raises(resonant.ChecksumMismatch):
            resonant.decode(data[:-1] + bytes([data[-1] ^ 1]))
    finally:
        _codec._select_crc()
    assert resonant.crc32_backend() == "isal-c"


def test_unknown_backend():
    with pytest.raises(ValueError, match="no CRC-32 backend named 'nope'"):
        _codec._select_crc("nope")
    _codec._select_crc()
