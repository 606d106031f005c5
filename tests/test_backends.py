"""The CRC-32, xxh3_64 and AEAD backends: which route each takes, and that a route that fails
(a symbol missing after a package upgrade, simulated here) falls back, says so, and gives
identical results. docs/backends.md describes the routes."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import subprocess
import sys
import zlib

import numpy as np
import pytest
import xxhash
from conftest import vector_bytes

import resonant
from resonant import Codec, Key, Reassembler, StreamComplete, StreamSender, Think, _codec, transforms

SEAL = "crypto_aead_xchacha20poly1305_ietf_encrypt"
OPEN = "crypto_aead_xchacha20poly1305_ietf_decrypt"
KEY = Key(bytes(range(32)), key_id=3)
DATA = np.random.default_rng(11).bytes((1 << 20) + 77)


@pytest.fixture
def restore():
    """Put the default backends back, whatever the test did."""
    yield
    _codec._select_crc()
    _codec._select_xxh3()
    _codec._select_aead()
    assert _codec.xxh3_backend() == "xxhash-c" and _codec.aead_backend() == "sodium-c"


def test_default_routes_are_reported():
    crc = _codec.crc32_backend(route=True)
    assert crc.startswith(_codec.crc32_backend() + " (")
    if _codec.crc32_backend().startswith("isal-c"):
        assert "dlsym crc32_gzip_refl in isal.isal_zlib" in crc
    assert _codec.xxh3_backend(route=True).startswith("xxhash-c (vendored xxHash 0.8.")
    assert _codec.aead_backend(route=True) == (
        "sodium-c (cffi ffi.addressof(nacl._sodium.lib, crypto_aead_xchacha20poly1305_ietf_*))")
    report = _codec.backends()
    assert report["crc32"] == crc and report["xxh3_64"].startswith("xxhash-c")
    assert set(report["versions"]) == {"isal", "PyNaCl", "cffi", "xxhash"}


def test_vendored_xxhash_is_compiled_in_and_hidden():
    """xxh3 does not reach into python-xxhash's shared object, and our copy exports nothing."""
    lib = ctypes.CDLL(_codec.__file__)
    for name in ("XXH3_64bits", "XXH3_64bits_update", "XXH3_64bits_dispatch", "XXH3_createState"):
        assert not hasattr(lib, name), name
    for buf in (DATA, b"", DATA[:5], bytearray(DATA[:70_000]), memoryview(DATA)[3:40_000],
                np.frombuffer(DATA[:4096], np.float16)):
        assert _codec.xxh3_64(buf) == xxhash.xxh3_64_intdigest(memoryview(buf).cast("B").tobytes())


def test_crc_falls_back_when_the_isal_symbol_is_missing(restore, caplog):
    with caplog.at_level(logging.WARNING, logger="resonant"):
        assert _codec._select_crc(missing={"crc32_gzip_refl"}) == "isal"
    assert "crc32_gzip_refl missing" in caplog.text
    assert _codec.crc32_backend(route=True) == (
        "isal (python isal.isal_zlib.crc32 (fallback: symbol crc32_gzip_refl missing from isal.isal_zlib (simulated)))")
    for piece in (b"", b"123456789", DATA[:4095], DATA):
        assert resonant.crc32(piece) == zlib.crc32(piece)
        assert resonant.crc32(memoryview(piece), 0xDEADBEEF) == zlib.crc32(piece, 0xDEADBEEF)
    wire = vector_bytes("05_cache_kv.bin")
    assert resonant.encode(resonant.decode(wire)) == wire
    with pytest.raises(resonant.ChecksumMismatch):
        resonant.decode(wire[:-1] + bytes([wire[-1] ^ 1]))


def test_crc_falls_back_to_zlib_without_isal(restore, monkeypatch):
    monkeypatch.setitem(sys.modules, "isal.isal_zlib", None)  # import fails
    monkeypatch.setitem(sys.modules, "zlib_ng.zlib_ng", None)
    assert _codec._select_crc() == "zlib"
    assert "fallback: isal is not importable" in _codec.crc32_backend(route=True)
    assert resonant.crc32(DATA) == zlib.crc32(DATA)


def test_xxh3_falls_back_when_the_vendored_code_is_off(restore, caplog):
    before = _codec.Xxh3()  # a C state made before the switch stays usable
    before.update(DATA[:1000])
    with caplog.at_level(logging.WARNING, logger="resonant"):
        assert _codec._select_xxh3(missing={"xxh3-vendored"}) == "xxhash"
    assert "xxh3_64 fast path unavailable" in caplog.text
    assert _codec.xxh3_backend(route=True) == (
        "xxhash (python xxhash.xxh3_64 (fallback: the vendored xxHash is switched off (simulated)))")
    h = _codec.Xxh3()
    h.update(DATA[:17])
    h.update(memoryview(DATA)[17:])
    before.update(DATA[1000:])
    want = xxhash.xxh3_64_intdigest(DATA)
    assert h.intdigest() == before.intdigest() == _codec.xxh3_64(DATA) == want
    arr = np.random.default_rng(4).standard_normal(100_000).astype(np.float16)
    r = Reassembler()
    events = [e for f in StreamSender(9, [arr], max_frame_bytes=4096) for e in r.receive(f, 0.0)]
    assert isinstance(events[-1], StreamComplete)
    assert events[-1].xxh3_64 == xxhash.xxh3_64_intdigest(arr.tobytes())
    with pytest.raises(ValueError, match="xxhash-c backend is not available"):
        _codec._select_xxh3("xxhash-c", missing={"xxh3-vendored"})
    assert _codec.xxh3_backend() == "xxhash"  # a working backend is left in place


@pytest.mark.parametrize("symbol", [SEAL, OPEN])
def test_aead_falls_back_when_a_sodium_symbol_is_missing(restore, monkeypatch, caplog, symbol):
    nonce = bytes(range(24))
    monkeypatch.setattr(transforms, "_urandom", lambda n: nonce)
    frame = Think(np.arange(3000, dtype=np.float16).reshape(1, 3000), stream_id=4)
    fast = Codec(key=KEY).encode(frame)
    with caplog.at_level(logging.WARNING, logger="resonant"):
        assert _codec._select_aead(missing={symbol}) == "pynacl"
    assert f"{symbol} missing" in caplog.text
    assert _codec.aead_backend(route=True) == (
        f"pynacl (python nacl.bindings (fallback: symbol {symbol} missing from nacl._sodium.lib (simulated)))")
    slow = Codec(key=KEY).encode(frame)
    assert slow == fast  # same nonce, same bytes
    assert Codec(key=KEY).decode(fast) == frame
    with pytest.raises(ValueError, match="sodium-c backend is not available"):
        _codec._select_aead("sodium-c", missing={symbol})
    assert _codec.aead_backend() == "pynacl"


def test_aead_falls_back_when_pynacl_has_no_cffi_lib(restore, monkeypatch):
    monkeypatch.setitem(sys.modules, "nacl._sodium", None)
    assert _codec._select_aead() == "pynacl"
    assert "PyNaCl's cffi module is not importable" in _codec.aead_backend(route=True)


def test_unknown_backend_names():
    for select in (_codec._select_xxh3, _codec._select_aead):
        with pytest.raises(ValueError, match="no .* backend named 'nope'"):
            select("nope")


_CHILD = r"""
import json, sys, zlib
import numpy as np
import resonant
from resonant import Codec, Key, Reassembler, StreamSender, _codec, transforms
data = bytes(range(256)) * 4099
transforms._urandom = lambda n: bytes(range(n))
frame = resonant.Think(np.arange(3000, dtype=np.float16).reshape(1, 3000), stream_id=4)
key = Key(bytes(range(32)), key_id=3)
wire = Codec(key=key).encode(frame)
assert Codec(key=key).decode(wire) == frame
arr = np.arange(50_000, dtype=np.float16)
r = Reassembler()
done = [e for f in StreamSender(9, [arr], max_frame_bytes=4096) for e in r.receive(f, 0.0)][-1]
print(json.dumps({"backends": _codec.backends(), "crc": resonant.crc32(data), "xxh3": _codec.xxh3_64(data),
                  "stream": done.xxh3_64, "wire": wire.hex()}))
"""


def _child(missing: str) -> tuple[dict, str]:
    env = dict(os.environ, RESONANT_SIMULATE_MISSING=missing)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def test_missing_symbols_at_import_fall_back_and_agree():
    """RESONANT_SIMULATE_MISSING, read at import: the module imports, warns once per backend,
    and every result equals the fast paths' byte for byte."""
    fast, err = _child("")
    assert err == ""
    slow, err = _child(f"crc32_gzip_refl,xxh3-vendored,{OPEN}")
    assert slow["backends"]["crc32"].startswith("isal (python isal.isal_zlib.crc32 (fallback: symbol crc32_gzip_refl")
    assert slow["backends"]["xxh3_64"].startswith("xxhash (python xxhash.xxh3_64 (fallback:")
    assert slow["backends"]["aead"].startswith(f"pynacl (python nacl.bindings (fallback: symbol {OPEN} missing")
    assert err.count("fast path unavailable") == 3, err
    for k in ("crc", "xxh3", "stream", "wire"):
        assert slow[k] == fast[k], k
    data = bytes(range(256)) * 4099
    assert fast["crc"] == zlib.crc32(data) and fast["xxh3"] == xxhash.xxh3_64_intdigest(data)
