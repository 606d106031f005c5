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


_C_BACKENDS = ("isal-c", "isal-c+vpclmulqdq")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64", "aarch64"), reason="isal wheels")
def test_fast_c_backend_is_active():
    want = "isal-c+vpclmulqdq" if {"avx2", "vpclmulqdq"} <= _cpu_flags() else "isal-c"
    assert resonant.crc32_backend() == want


def _xpow_mod(e: int) -> int:
    """x^e mod P over GF(2), P = x^32 + ... the IEEE 802.3 polynomial (0x104C11DB7)."""
    r = 1
    for _ in range(e):
        r <<= 1
        if r >> 32:
            r ^= 0x104C11DB7
    return r


def _fold_constant(e: int) -> int:
    return int(f"{_xpow_mod(e):032b}"[::-1], 2) << 1


def test_fold_constants_are_the_polynomial_powers():
    """The constants in _bulk.pxi are bitreflect32(x^e mod P) << 1 for distance D, e = D +/- 32."""
    with open(__file__.replace("tests/test_crc.py", "resonant/_bulk.pxi")) as f:
        text = f.read()
    for d in (1024, 256, 128):
        for e in (d + 32, d - 32):
            assert f"{_fold_constant(e):#x}" in text.lower(), (d, e)
    # and the ones the Linux kernel's crc32-pclmul uses for its 512- and 128-bit folds
    assert (_fold_constant(544), _fold_constant(480), _fold_constant(160), _fold_constant(96)) == (
        0x154442BD4, 0x1C6E41596, 0x1751997D0, 0xCCAA009E)


@pytest.mark.parametrize("backend", _C_BACKENDS)
def test_c_backends_agree_with_zlib_on_every_length_and_alignment(backend):
    data = np.random.default_rng(5).bytes(4096 + 64)
    try:
        try:
            _codec._select_crc(backend)
        except ValueError:
            pytest.skip(f"{backend} is not available on this CPU")
        for n in [*range(0, 700), 1023, 1024, 1025, 4095, 4096]:
            for start in (0, 1, 7, 31):
                piece = data[start:start + n]
                assert resonant.crc32(piece) == zlib.crc32(piece), (n, start)
        for init in (0, 1, 0xFFFFFFFF, 0xDEADBEEF):
            assert resonant.crc32(data, init) == zlib.crc32(data, init)
        big = np.random.default_rng(6).bytes((8 << 20) + 13)
        assert resonant.crc32(big) == zlib.crc32(big)
        assert resonant.crc32(memoryview(big)[5:]) == zlib.crc32(big[5:])
    finally:
        _codec._select_crc()


@given(st.binary(min_size=256, max_size=3000), st.integers(0, 2**32 - 1))
def test_vpclmulqdq_fold_matches_zlib(data, start):
    assert resonant.crc32(data, start) == zlib.crc32(data, start)


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
    assert resonant.crc32_backend() in _C_BACKENDS


def test_unknown_backend():
    with pytest.raises(ValueError, match="no CRC-32 backend named 'nope'"):
        _codec._select_crc("nope")
    assert resonant.crc32_backend() in _C_BACKENDS  # a working backend is left in place
