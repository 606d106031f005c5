"""The stream hash fed from C equals python-xxhash's xxh3_64, with either backend."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from resonant import Reassembler, StreamComplete, StreamSender, _codec


@pytest.fixture(params=["xxhash-c", "xxhash"])
def backend(request):
    try:
        assert _codec._select_xxh3(request.param) == request.param
        yield request.param
    finally:
        _codec._select_xxh3()
    assert _codec.xxh3_backend() == "xxhash-c"


@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 5000), max_size=6))
def test_incremental_matches_xxhash(data, cuts):
    h = _codec.Xxh3()
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    for a, b in zip(bounds, bounds[1:]):
        h.update(data[a:b])
    assert h.intdigest() == xxhash.xxh3_64_intdigest(data)
    assert _codec.xxh3_64(data) == xxhash.xxh3_64_intdigest(data)


def test_both_backends_agree_on_large_buffers(backend):
    big = np.random.default_rng(3).bytes(3 << 20)
    h = _codec.Xxh3()
    h.update(big[:17])
    h.update(memoryview(big)[17:])
    assert h.intdigest() == _codec.xxh3_64(big) == xxhash.xxh3_64_intdigest(big)
    assert _codec.xxh3_64(b"") == xxhash.xxh3_64_intdigest(b"")


def test_stream_hash_with_each_backend(backend):
    arr = np.random.default_rng(4).standard_normal(300_000).astype(np.float16)
    frames = list(StreamSender(9, [arr], max_frame_bytes=4096))
    r = Reassembler()
    events = [e for f in frames[:1] + frames[1:-1][::-1] + frames[-1:] for e in r.receive(f, 0.0)]  # out of order
    done = events[-1]
    assert isinstance(done, StreamComplete)
    assert done.xxh3_64 == xxhash.xxh3_64_intdigest(arr.tobytes())
    assert np.array_equal(done.objects[0], arr)


def test_encode_chunk_feeds_the_hasher():
    src = np.arange(70_000, dtype=np.uint8) * 7
    h = _codec.Xxh3()
    frame = _codec.encode_chunk(1, 1, 0, 0, 0x02, 40_000, src, 1000, 40_000, h)
    assert h.intdigest() == xxhash.xxh3_64_intdigest(src[1000:41_000].tobytes())
    assert _codec.decode(frame).data.tobytes() == src[1000:41_000].tobytes()


def test_unknown_backend():
    with pytest.raises(ValueError, match="no xxh3 backend named 'nope'"):
        _codec._select_xxh3("nope")
    _codec._select_xxh3()
