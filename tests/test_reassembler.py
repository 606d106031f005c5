"""resonant.reassembler: bad HEADs and chunks, caller-provided output buffers, the chunk fast
path against the general one, and the output block cache (set_buffer_cache)."""

from __future__ import annotations

import tracemalloc
import zlib

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import resonant
from resonant import (
    Chunk,
    Codec,
    DType,
    Key,
    ObjectReady,
    Reassembler,
    Slice,
    StreamComplete,
    StreamFailed,
    StreamLimits,
    StreamSender,
    StreamStarted,
    Sync,
)
from resonant.reassembler import STREAMING_STORE_BYTES, set_buffer_cache
from resonant.stream_limits import MemoryBudget, committed_bytes

from stream_helpers import deliver, of, assert_bit_exact, head_doc, head_frame


# ------------------------------------------------------------------ bad heads and chunks


@pytest.mark.parametrize(
    "objects, kwargs, detail",
    [
        ([{"dtype": 1, "shape": [4, 4], "nbytes": 30}], {}, "head.objects[0].nbytes: 30, but F16 of shape (4, 4) is 32 bytes"),
        ([{"dtype": 5, "shape": [3], "nbytes": 12}, {"dtype": 1, "shape": [0], "nbytes": 2}], {},
         "head.objects[1].nbytes: 2, but F16 of shape (0,) is 0 bytes"),
        ([{"dtype": 1, "shape": [8], "nbytes": 16}], {"chunk_bytes": 1001},
         "head.chunk_bytes: 1001 is not a multiple of F16's 2-byte elements"),
        ([{"dtype": 2, "shape": [8], "nbytes": 8}, {"dtype": 5, "shape": [8], "nbytes": 32}], {"chunk_bytes": 1002},
         "head.chunk_bytes: 1002 is not a multiple of F32's 4-byte elements"),
        ([{"dtype": 1, "shape": [8], "nbytes": 16}], {"total_bytes": 100}, "head.total_bytes: 100, but the objects add up to 16"),
        ([{"dtype": 1, "shape": [8], "nbytes": 16}], {"v": 2}, "head.v: 2: this receiver speaks V-Stream version 1"),
        ([{"dtype": 1, "shape": [8], "nbytes": 16}], {"msg_type": 9}, "head.msg_type: 9 is not a message type"),
        ([{"dtype": 1, "shape": [8], "nbytes": 16}], {"chunk_bytes": 0}, "head.chunk_bytes: 0 is not in 1..65536"),
        ([{"dtype": 1, "shape": [8], "nbytes": 16}], {"chunk_bytes": 65538}, "head.chunk_bytes: 65538 is not in 1..65536"),
        ([{"dtype": 9, "shape": [8], "nbytes": 16}], {}, "head.objects[0].dtype: 9 is not a dtype"),
        ([{"dtype": 1, "shape": [8]}], {}, "head.objects[0].nbytes: required field is missing"),
        ([{"dtype": 1, "shape": [8], "nbytes": 16}], {"hash": "md5"},
         f"head.hash: 'md5' is not one of {', '.join(resonant.handshake.SCHEMA['head']['hash']['choices'])}"),
    ],
)
def test_bad_head(objects, kwargs, detail):
    r = Reassembler()
    events = r.receive(head_frame(head_doc(objects, **kwargs), stream_id=81), now=0.0)
    assert [(type(e), e.stream_id, e.reason, e.detail) for e in events] == [(StreamFailed, 81, "bad_head", detail)]
    assert (r.open_streams, r.buffered_bytes) == (0, 0)


def test_bad_head_discards_early_frames():
    sender = StreamSender(82, [np.arange(10, dtype=np.float16)])
    frames = list(sender)
    r = Reassembler()
    deliver(r, frames[1:])
    assert r.buffered_bytes > 0
    bad = dict(sender.layout.head_document(), total_bytes=21)
    (failed,) = r.receive(head_frame(bad, 82), 0.0)
    assert (failed.reason, failed.detail) == ("bad_head", "head.total_bytes: 21, but the objects add up to 20")
    assert r.buffered_bytes == 0


def _open_stream(sid: int = 91):
    sender = StreamSender(sid, [np.arange(3000, dtype=np.float16)], max_frame_bytes=1024)  # 980-byte chunks
    frames = list(sender)
    r = Reassembler()
    assert [type(e) for e in deliver(r, frames[:2])] == [StreamStarted]
    return sender, frames, r


@pytest.mark.parametrize(
    "data, seq, detail",
    [
        (Slice(DType.F16, (489,), bytes(978)), 2, "chunk 1 is F16 of 978 bytes, HEAD says F16 of 980 bytes"),
        (Slice(DType.F16, (491,), bytes(982)), 2, "chunk 1 is F16 of 982 bytes, HEAD says F16 of 980 bytes"),
        (Slice(DType.F32, (245,), bytes(980)), 2, "chunk 1 is F32 of 980 bytes, HEAD says F16 of 980 bytes"),
        (Slice(DType.I8, (980,), bytes(980)), 2, "chunk 1 is I8 of 980 bytes, HEAD says F16 of 980 bytes"),
        (Slice(DType.F16, (60,), bytes(120)), 7, "chunk 6 is F16 of 120 bytes, HEAD says F16 of 120 bytes"),
        (Slice(DType.F16, (60,), bytes(120)), 8, "frame_seq 8 is not a chunk of this stream (chunks are 1..7)"),
        (Slice(DType.F16, (60,), bytes(120)), 0, "frame_seq 0 is not a chunk of this stream (chunks are 1..7)"),
        (Slice(DType.F16, (60,), bytes(120)), 2**40, f"frame_seq {2**40} is not a chunk of this stream (chunks are 1..7)"),
    ],
)
def test_bad_chunk(data, seq, detail):
    sender, frames, r = _open_stream()
    events = r.receive(resonant.encode(Chunk(data, stream_id=91, frame_seq=seq)), now=0.0)
    if seq == 7:  # the last chunk, with the right size and dtype: accepted (a control case)
        assert events == [] and r.open_streams == 1
        return
    (failed,) = events
    assert (failed.stream_id, failed.reason, failed.detail) == (91, "bad_chunk", detail)
    assert failed.missing == [(980, 6000)]
    assert (r.open_streams, r.buffered_bytes) == (0, 0)


def test_bad_chunk_held_before_head_fails_at_head():
    sender = StreamSender(92, [np.arange(10, dtype=np.float16)])
    bogus = resonant.encode(Chunk(Slice(DType.F16, (3,), bytes(6)), stream_id=92, frame_seq=5))
    r = Reassembler()
    assert r.receive(bogus, 0.0) == []
    events = r.receive(sender.head(), 0.0)
    assert [type(e) for e in events] == [StreamStarted, StreamFailed]
    assert (events[1].reason, events[1].detail) == ("bad_chunk", "frame_seq 5 is not a chunk of this stream (chunks are 1..1)")


def test_control_and_other_frames_are_ignored():
    sender, frames, r = _open_stream(93)
    before = (r.open_streams, r.buffered_bytes, r.dropped_frames)
    others = [
        Sync({"method": "ping", "ts": 1730616000}, stream_id=93),
        Sync(resonant.handshake.EXAMPLES["capability"], stream_id=93),
        Sync(resonant.handshake.EXAMPLES["error"], stream_id=93),
        Sync({"method": "ping"}, stream_id=0),
        Sync(resonant.handshake.EXAMPLES["capability"], stream_id=12345),
        Sync(stream_id=12345, frame_seq=3),  # a HEART of an unknown stream
        resonant.Think(np.zeros((1, 8), np.float16), stream_id=93, frame_seq=1),
        resonant.Cache(np.zeros(4, np.float16), np.zeros(4, np.float16), stream_id=93, frame_seq=2),
    ]
    for frame in others:
        assert r.receive(resonant.encode(frame), now=1.0) == []
        assert r.receive(frame, now=1.0) == []  # decoded frames are taken as well
    assert (r.open_streams, r.buffered_bytes, r.dropped_frames) == before
    (done,) = of(deliver(r, frames[2:], now=2.0), StreamComplete)
    assert_bit_exact(done.objects[0], np.arange(3000, dtype=np.float16))


# ------------------------------------------------------------------ caller-provided output buffers


def test_allocate_hook_receives_into_the_callers_buffer():
    k = np.random.default_rng(11).standard_normal((4, 1000)).astype(np.float16)
    v = np.arange(3000, dtype=np.int8)
    slot = np.full(k.nbytes + v.nbytes, 0xAA, np.uint8)
    seen = []

    def allocate(stream_id, layout):
        seen.append((stream_id, layout.total_bytes, [o.nbytes for o in layout.objects]))
        return slot

    budget = MemoryBudget(1 << 30)
    r = Reassembler(allocate=allocate, budget=budget)
    frames = list(StreamSender(5, [k, v], max_frame_bytes=1024))
    events = r.receive(frames[0], 0.0)
    assert seen == [(5, slot.nbytes, [k.nbytes, v.nbytes])]
    # only the chunk bitmap and the bookkeeping are ours
    assert r.buffered_bytes == budget.used == committed_bytes(StreamSender(5, [k, v], max_frame_bytes=1024).layout, False)
    for f in frames[1:-1][::-1] + frames[-1:]:
        events += r.receive(f, 0.0)
    done = events[-1]
    assert isinstance(done, StreamComplete)
    assert np.array_equal(done.objects[0], k) and np.array_equal(done.objects[1], v)
    assert np.shares_memory(done.objects[0], slot) and np.shares_memory(done.objects[1], slot)
    assert slot.tobytes() == k.tobytes() + v.tobytes()
    assert budget.used == 0 and r.buffered_bytes == 0


def test_allocate_hook_may_decline_and_reuse_a_slot_across_streams():
    x = np.arange(5000, dtype=np.float16)
    slot = bytearray(x.nbytes)
    r = Reassembler(allocate=lambda sid, layout: slot if sid % 2 else None)
    for sid in (1, 2, 3):
        events = [e for f in StreamSender(sid, [x * sid], max_frame_bytes=2048) for e in r.receive(f, 0.0)]
        done = events[-1]
        assert isinstance(done, StreamComplete) and np.array_equal(done.objects[0], x * sid)
        assert np.shares_memory(done.objects[0], np.frombuffer(slot, np.uint8)) == bool(sid % 2)
    assert np.array_equal(np.frombuffer(slot, np.float16), x * 3)


@pytest.mark.parametrize("buffer, message", [
    (lambda n: np.zeros(n + 1, np.uint8), r"allocate returned \d+ bytes; the stream needs exactly \d+"),
    (lambda n: bytes(n), "writable, C-contiguous"),
    (lambda n: np.zeros((n, 2), np.uint8)[:, 0], "writable, C-contiguous"),
    (lambda n: 12345, "allocate returned a int, not a buffer"),
])
def test_allocate_hook_mistakes_are_value_errors(buffer, message):
    x = np.ones(1000, np.float16)
    r = Reassembler(allocate=lambda sid, layout: buffer(layout.total_bytes))
    with pytest.raises(ValueError, match=message):
        r.receive(StreamSender(1, [x]).head(), 0.0)
    assert r.open_streams == 0 and r.buffered_bytes == 0


def test_allocate_hook_is_not_asked_for_a_stream_over_the_limits():
    asked = []
    r = Reassembler(StreamLimits(max_stream_bytes=1000), allocate=lambda sid, layout: asked.append(sid))
    (failed,) = r.receive(StreamSender(1, [np.ones(1000, np.float16)]).head(), 0.0)
    assert failed.reason == "limit" and asked == []


def test_copy_payload_with_streaming_stores_at_every_alignment():
    from resonant import _codec
    src = np.random.default_rng(12).integers(0, 256, 5000, np.uint8)
    for length in (0, 1, 255, 256, 257, 1000, 4999):
        s = Slice(DType.I8, (length,), src[:length])
        for offset in (0, 1, 15, 16, 33):
            dest = np.full(length + 64, 7, np.uint8)
            h = _codec.Xxh3()
            assert _codec.copy_payload(s, dest, offset, h, True) == length
            assert dest[offset:offset + length].tobytes() == src[:length].tobytes()
            assert (dest[:offset] == 7).all() and (dest[offset + length:] == 7).all()
            assert h.intdigest() == xxhash.xxh3_64_intdigest(src[:length].tobytes())


def test_large_stream_out_of_order_uses_streaming_stores_and_verifies():
    n = STREAMING_STORE_BYTES // 2 + 777  # f16 elements: just over the threshold in bytes
    x = np.random.default_rng(13).standard_normal(n).astype(np.float16)
    frames = list(StreamSender(3, [x]))
    body = frames[1:-1]
    order = body[1::2] + body[::2]  # every second chunk first: the hash is taken at the end
    r = Reassembler()
    events = [e for f in frames[:1] + order + frames[-1:] for e in r.receive(f, 0.0)]
    done = events[-1]
    assert isinstance(done, StreamComplete) and done.xxh3_64 == xxhash.xxh3_64_intdigest(x.tobytes())
    assert np.array_equal(done.objects[0], x)


# ------------------------------------------------------------------ the chunk fast path


def _summary(events) -> list:
    out = []
    for e in events:
        if isinstance(e, StreamComplete):
            out.append(("complete", e.stream_id, e.xxh3_64, [a.tobytes() for a in e.objects]))
        elif isinstance(e, StreamFailed):
            out.append(("failed", e.stream_id, e.reason, e.missing))
        elif isinstance(e, ObjectReady):
            out.append(("ready", e.stream_id, e.index, e.array.tobytes()))
        elif isinstance(e, tuple):  # ("error", exception class name)
            out.append(e)
        else:
            out.append((type(e).__name__, e.stream_id))
    return out


def _both_paths(frames, **kwargs):
    slow, fast = Reassembler(**kwargs), Reassembler(**kwargs)
    slow_events, fast_events, taken = [], [], 0
    for i, f in enumerate(frames):
        try:
            slow_events += slow.receive(resonant.decode(f), float(i))  # decoded first: the general path only
        except resonant.DecodeError as exc:
            slow_events.append(("error", type(exc).__name__))
        ev = fast.receive_chunk(f, float(i))
        if ev is None:
            try:
                ev = fast.receive(resonant.decode(f), float(i))
            except resonant.DecodeError as exc:
                ev = [("error", type(exc).__name__)]
        else:
            taken += 1
        fast_events += ev
    return slow_events, fast_events, taken, slow, fast


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_chunk_fast_path_gives_the_general_paths_events(data):
    """Fed the same frames (reordered, duplicated, corrupted), receive_chunk-then-receive and
    receive alone give the same events, the same bytes and the same state."""
    rnd = data.draw(st.randoms(use_true_random=False))
    objs = [np.arange(n, dtype=np.float16) * (i + 1) for i, n in enumerate(data.draw(st.lists(st.integers(0, 900), min_size=1, max_size=4)))]
    objs.append(np.arange(data.draw(st.integers(1, 200)), dtype=np.int8))
    frames = list(StreamSender(4, objs, max_frame_bytes=data.draw(st.sampled_from([512, 700, 1500]))))
    body = frames[1:-1]
    rnd.shuffle(body)
    body += [rnd.choice(frames) for _ in range(data.draw(st.integers(0, 4)))]  # duplicates
    for _ in range(data.draw(st.integers(0, 4))):  # corruption: a byte changed, the CRC sometimes fixed up
        i = rnd.randrange(len(body))
        f = bytearray(body[i])
        pos = rnd.randrange(len(f))
        f[pos] ^= rnd.choice([1, 0x80, 0xFF])
        if rnd.random() < 0.5 and len(f) > 4:
            f[-4:] = zlib.crc32(bytes(f[:-4])).to_bytes(4, "little")
        body[i] = bytes(f)
    order = frames[:1] + body + frames[-1:] if data.draw(st.booleans()) else body[:3] + frames[:1] + body[3:] + frames[-1:]
    slow_events, fast_events, taken, slow, fast = _both_paths(order)
    assert _summary(fast_events) == _summary(slow_events)
    assert slow.open_streams == fast.open_streams and slow.buffered_bytes == fast.buffered_bytes
    assert slow.dropped_frames == fast.dropped_frames


@pytest.mark.fast_paths
def test_chunk_fast_path_takes_the_bulk_of_a_clean_stream():
    x = np.random.default_rng(21).standard_normal(50_000).astype(np.float16)
    frames = list(StreamSender(8, [x, x[:333]], max_frame_bytes=4096))
    slow_events, fast_events, taken, _, _ = _both_paths(frames)
    assert taken == len(frames) - 2  # every chunk; HEAD and TAIL go the general way
    assert _summary(fast_events) == _summary(slow_events)
    assert isinstance(fast_events[-1], StreamComplete) and np.array_equal(fast_events[-1].objects[0], x)
    r = Reassembler()  # receive() of bytes takes the fast path itself
    events = [e for f in frames for e in r.receive(f, 0.0)]
    assert _summary(events) == _summary(slow_events)


def test_receive_of_bytes_keeps_encryption_required():
    key = Key.generate()
    x = np.ones(5000, np.float16)
    plain = list(StreamSender(2, [x], max_frame_bytes=2048))
    r = Reassembler(codec=Codec(key=key))  # requires encryption: a plain chunk is refused by decode
    r.receive(list(StreamSender(2, [x], max_frame_bytes=2048, codec=Codec(key=key)))[0], 0.0)
    with pytest.raises(resonant.NotEncrypted):
        r.receive(plain[1], 0.0)


@pytest.mark.fast_paths
def test_chunk_fast_path_leaves_other_frames_alone():
    x = np.ones(3000, np.float16)
    sender = StreamSender(8, [x], max_frame_bytes=1024)
    frames = list(sender)
    r = Reassembler()
    assert r.receive_chunk(frames[1], 0.0) is None  # no HEAD yet: the general path holds it
    r.receive(frames[0], 0.0)
    assert r.receive_chunk(frames[0], 0.0) is None  # a HEAD
    assert r.receive_chunk(resonant.encode(resonant.Think(np.ones(4, np.float16))), 0.0) is None
    assert r.receive_chunk(b"", 0.0) is None and r.receive_chunk(b"\x01", 0.0) is None
    assert r.receive_chunk(frames[2], 0.0, expected_space_hash=12345) is None  # another space
    assert r.receive_chunk(frames[2], 0.0) == []
    assert r.receive_chunk(frames[2], 0.0) is None  # a duplicate
    bad = bytearray(frames[3])
    bad[-1] ^= 1
    assert r.receive_chunk(bytes(bad), 0.0) is None  # a bad CRC: decode() reports it
    with pytest.raises(resonant.ChecksumMismatch):
        r.receive(bytes(bad), 0.0)


# ------------------------------------------------------------------ the output block cache


def _one_stream(sid: int, x: np.ndarray) -> StreamComplete:
    r = Reassembler()
    return [e for f in StreamSender(sid, [x]) for e in r.receive(f, 0.0)][-1]


def test_released_stream_buffers_are_reused_up_to_the_cache_limit():
    from resonant import _codec
    previous = set_buffer_cache(64 << 20)
    try:
        set_buffer_cache(0)  # start empty
        set_buffer_cache(64 << 20)
        x = np.random.default_rng(41).standard_normal(5 << 20).astype(np.float16)  # 10 MiB
        done = _one_stream(1, x)
        assert isinstance(done, StreamComplete) and np.array_equal(done.objects[0], x)
        first = done.objects[0].ctypes.data
        assert first % (2 << 20) == 0 and _codec.block_cache_bytes() == 0  # in use
        del done
        assert _codec.block_cache_bytes() == 10 << 20  # released: kept
        y = x[::-1].copy()
        done = _one_stream(2, y)
        assert done.objects[0].ctypes.data == first and np.array_equal(done.objects[0], y)  # the same block, rewritten
        assert _codec.block_cache_bytes() == 0
        view = done.objects[0][10:20]
        del done
        assert _codec.block_cache_bytes() == 0  # a view still holds it
        del view
        assert _codec.block_cache_bytes() == 10 << 20
        assert set_buffer_cache(0) == 64 << 20 and _codec.block_cache_bytes() == 0  # freed
        done = _one_stream(3, x)
        del done
        assert _codec.block_cache_bytes() == 0  # limit 0: freed at once
    finally:
        set_buffer_cache(previous)


def test_block_cache_matches_sizes_and_tracks_memory():
    from resonant import _codec
    previous = set_buffer_cache(256 << 20)
    try:
        set_buffer_cache(0)
        set_buffer_cache(256 << 20)
        a, b = _codec.output_block(4 << 20), _codec.output_block(40 << 20)
        pa, pb = np.frombuffer(a, np.uint8).ctypes.data, np.frombuffer(b, np.uint8).ctypes.data
        del a, b
        assert _codec.block_cache_bytes() == 44 << 20
        c = _codec.output_block(3 << 20)  # 3 MiB takes a 4 MiB block: the cached one
        assert np.frombuffer(c, np.uint8).ctypes.data == pa and len(c) == 3 << 20
        d = _codec.output_block(5 << 20)  # a 6 MiB block: none cached, a new one
        assert np.frombuffer(d, np.uint8).ctypes.data != pb
        tracemalloc.start()
        try:
            e = _codec.output_block((39 << 20) + 1)  # the 40 MiB block reused, and shown while in use
            assert tracemalloc.get_traced_memory()[0] >= 40 << 20
            del e
            assert tracemalloc.get_traced_memory()[0] < 1 << 20
        finally:
            tracemalloc.stop()
        with pytest.raises(ValueError):
            _codec.output_block(-1)
        with pytest.raises(ValueError):
            set_buffer_cache(-1)
        assert len(_codec.output_block(0)) == 0
        mv = memoryview(_codec.output_block(10))
        assert (mv.nbytes, mv.readonly, mv.format, mv.ndim) == (10, False, "B", 1)
    finally:
        set_buffer_cache(previous)
