"""V-Stream: StreamSender and Reassembler (schema/handshake.yaml `streams`, messages `head` and `tail`).

Round trips in any order with duplicates, gaps reported as exact byte ranges, the stream hash,
a 1 GiB stream under a memory bound, HEADs in parts. The limits are in test_stream_limits.py,
the sender alone in test_stream_sender.py, the Reassembler's other paths in test_reassembler.py.
"""

from __future__ import annotations

import hashlib
import json
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

import resonant
from resonant import (
    Chunk,
    Codec,
    DType,
    Flags,
    Key,
    MsgType,
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
from resonant.errors import DecodeError, EncodeError, HandshakeError
from resonant.stream import StreamLayout, StreamObject

from stream_helpers import (
    BF16,
    GRACE,
    IDLE,
    deliver,
    of,
    assert_bit_exact,
    random_array,
    kv_cache,
    head_doc,
    head_frame,
    chunk_range,
    expected_missing,
    byte_mask,
    stream_objects,
)

KEY = Key.generate()


# ------------------------------------------------------------------ round trips


def test_kv_cache_of_32_layers_round_trips_bit_exact():
    objs, names, layers = kv_cache()
    sender = StreamSender(7, objs, msg_type=MsgType.CACHE, names=names, layers=layers, max_frame_bytes=8192)
    r = Reassembler()
    events = deliver(r, sender)

    assert isinstance(events[0], StreamStarted) and events[0].stream_id == 7
    layout = events[0].layout
    assert layout == sender.layout
    assert (layout.msg_type, layout.total_bytes, len(layout.objects)) == (MsgType.CACHE, 64 * 16384, 64)
    assert layout.chunk_bytes == 8148  # (8192 - 43) rounded down to whole float16 elements
    assert layout.chunks == 64 * 3     # 16384 bytes = 2 full chunks + 88 bytes

    ready = of(events, ObjectReady)
    assert [e.index for e in ready] == list(range(64))  # in order: each object completes before the next starts
    assert [(e.name, e.layer) for e in ready] == list(zip(names, layers))
    for e in ready:
        assert e.stream_id == 7
        assert_bit_exact(e.array, objs[e.index])

    assert isinstance(events[-1], StreamComplete)
    assert [type(e) for e in events].count(StreamComplete) == 1
    assert not of(events, StreamFailed)
    done = events[-1]
    source = b"".join(o.tobytes() for o in objs)
    assert done.stream_id == 7
    assert done.nbytes == len(source) == 1 << 20
    assert done.xxh3_64 == xxhash.xxh3_64_intdigest(source)
    assert len(done.objects) == 64
    for got, want in zip(done.objects, objs):
        assert_bit_exact(got, want)
    assert (r.open_streams, r.buffered_bytes, r.dropped_frames) == (0, 0, 0)


def test_frames_follow_the_wire_rules():
    """HEAD at frame_seq 0, chunk k at k + 1 with the object's dtype and (elements,), TAIL at chunks + 1."""
    objs, names, layers = kv_cache(layers=2, shape=(4, 100))
    sender = StreamSender(3, objs, names=names, layers=layers, max_frame_bytes=1024, space_hash32=99)
    frames = [resonant.decode(f) for f in sender]
    layout = sender.layout
    head, chunks, tail = frames[0], frames[1:-1], frames[-1]

    assert isinstance(head, Sync) and head.frame_seq == 0 and head.space_hash32 == 99
    assert resonant.handshake.parse(head.json.payload) == layout.head_document()
    assert layout.head_document()["objects"][0] == {"name": "layer0.keys", "layer": 0, "dtype": 1,
                                                    "shape": [4, 100], "nbytes": 800}
    assert len(chunks) == layout.chunks
    source = b"".join(o.tobytes() for o in objs)
    for k, c in enumerate(chunks):
        assert isinstance(c, Chunk) and c.frame_seq == k + 1 and c.stream_id == 3
        a, b = chunk_range(layout, k)
        assert c.data.dtype == DType.F16 and c.data.shape == ((b - a) // 2,)
        assert c.data.tobytes() == source[a:b]
    assert isinstance(tail, Sync) and tail.frame_seq == layout.chunks + 1
    assert tail.flags & Flags.STRONG_TAIL
    assert resonant.handshake.parse(tail.json.payload) == {
        "method": "tail", "chunks": layout.chunks, "total_bytes": len(source),
        "xxh3_64": f"{xxhash.xxh3_64_intdigest(source):016x}"}
    heart = resonant.decode(sender.heart())
    assert isinstance(heart, Sync) and heart.json is None and heart.frame_seq == layout.chunks + 2


@pytest.mark.parametrize("dtype", [BF16, np.dtype(np.float32), np.dtype(np.int8), np.dtype(np.float16)],
                         ids=["bf16", "f32", "i8", "f16"])
def test_each_dtype_round_trips(dtype):
    arr = random_array(np.random.default_rng(5), dtype, (3, 1000))
    r = Reassembler()
    events = deliver(r, StreamSender(1, [arr], max_frame_bytes=1000))
    (done,) = of(events, StreamComplete)
    assert_bit_exact(done.objects[0], arr)
    assert done.xxh3_64 == xxhash.xxh3_64_intdigest(arr.tobytes())


def test_mixed_dtypes_share_a_chunk_size_that_fits_every_element():
    objs = [np.arange(1000, dtype=np.int8), np.linspace(-1, 1, 700, dtype=np.float32),
            np.ones(501, BF16), np.arange(333, dtype=np.float16)]
    sender = StreamSender(2, objs, max_frame_bytes=512)
    assert sender.layout.chunk_bytes == 468  # 512 - 43 = 469, rounded down to a multiple of lcm(1, 4, 2) = 4
    (done,) = of(deliver(Reassembler(), sender), StreamComplete)
    for got, want in zip(done.objects, objs):
        assert_bit_exact(got, want)


def test_q4_and_sparse_slices_travel_as_i8_chunks_and_come_back_as_bytes():
    rng = np.random.default_rng(9)
    q4 = Slice(DType.Q4, (1001,), rng.bytes(501))        # ceil(1001 * 4 / 8) bytes
    sparse = Slice(DType.SPARSE_COO, (64, 64), rng.bytes(700))
    f16 = np.arange(50, dtype=np.float16)
    sender = StreamSender(4, [q4, f16, sparse], names=["q", "h", "s"], max_frame_bytes=512)
    frames = list(sender)
    layout = sender.layout
    assert [(o.dtype, o.shape, o.nbytes) for o in layout.objects] == [
        (DType.Q4, (1001,), 501), (DType.F16, (50,), 100), (DType.SPARSE_COO, (64, 64), 700)]
    for k, data in enumerate(frames[1:-1]):
        c = resonant.decode(data)
        obj, start, length = layout.chunk(k)
        want = DType.F16 if obj.dtype == DType.F16 else DType.I8
        assert (c.data.dtype, c.data.shape) == (want, (length // (2 if want == DType.F16 else 1),))
    assert layout.objects[0].chunks == 2 and layout.objects[2].chunks == 2  # 468-byte chunks

    events = deliver(Reassembler(), frames)
    started = of(events, StreamStarted)[0]
    assert started.layout.objects[0].dtype == DType.Q4 and started.layout.objects[0].shape == (1001,)
    (done,) = of(events, StreamComplete)
    got_q4, got_f16, got_sparse = done.objects
    assert got_q4.dtype == np.uint8 and got_q4.shape == (501,) and got_q4.tobytes() == q4.tobytes()
    assert got_sparse.dtype == np.uint8 and got_sparse.shape == (700,) and got_sparse.tobytes() == sparse.tobytes()
    assert_bit_exact(got_f16, f16)
    assert done.xxh3_64 == xxhash.xxh3_64_intdigest(q4.tobytes() + f16.tobytes() + sparse.tobytes())


def test_empty_objects_take_one_empty_chunk():
    empty = np.zeros((0, 16), np.float16)
    only = StreamSender(5, [empty])
    assert (only.layout.total_bytes, only.layout.chunks) == (0, 1)
    frames = list(only)
    assert resonant.decode(frames[1]).data.nbytes == 0
    events = deliver(Reassembler(), frames)
    assert [type(e) for e in events] == [StreamStarted, ObjectReady, StreamComplete]
    assert_bit_exact(events[-1].objects[0], empty)
    assert events[-1].xxh3_64 == xxhash.xxh3_64_intdigest(b"") and events[-1].nbytes == 0

    a, b = np.arange(10, dtype=np.int8), np.arange(6, dtype=np.float32)
    mixed = StreamSender(6, [a, empty, b])
    assert [(o.offset, o.first_chunk, o.chunks) for o in mixed.layout.objects] == [(0, 0, 1), (10, 1, 1), (10, 2, 1)]
    frames = list(mixed)
    r = Reassembler()
    events = deliver(r, [frames[0], frames[3], frames[2], frames[-1], frames[1]])  # out of order
    (done,) = of(events, StreamComplete)
    for got, want in zip(done.objects, [a, empty, b]):
        assert_bit_exact(got, want)
    assert sorted(e.index for e in of(events, ObjectReady)) == [0, 1, 2]


def test_sources_are_converted_to_contiguous_little_endian():
    big = np.arange(12, dtype=">f2").reshape(3, 4)
    strided = np.arange(24, dtype=np.float32).reshape(4, 6).T  # not C-contiguous
    sender = StreamSender(8, [big, strided])
    (done,) = of(deliver(Reassembler(), sender), StreamComplete)
    assert done.objects[0].dtype == np.dtype("<f2") and np.array_equal(done.objects[0], big)
    assert done.objects[1].shape == (6, 4) and np.array_equal(done.objects[1], strided)


def test_legacy_md5_travels_and_is_checked():
    arr = np.arange(5000, dtype=np.float16)
    sender = StreamSender(9, [arr], legacy_md5=True, max_frame_bytes=2048)
    frames = list(sender)
    tail = resonant.handshake.parse(resonant.decode(frames[-1]).json.payload)
    assert tail["md5"] == hashlib.md5(arr.tobytes()).hexdigest()
    assert of(deliver(Reassembler(), frames), StreamComplete)

    bad = dict(tail, md5="0" * 32)
    events = deliver(Reassembler(), frames[:-1] + [resonant.encode(Sync(bad, stream_id=9, frame_seq=len(frames) - 1))])
    (failed,) = of(events, StreamFailed)
    assert failed.reason == "hash_mismatch"
    assert failed.detail == f"MD5 of the received bytes is {tail['md5']}, TAIL says {'0' * 32}"


# ------------------------------------------------------------------ any order, duplicates, gaps


@given(objs=stream_objects(), max_frame_bytes=st.integers(512, 65536), rnd=st.randoms(use_true_random=False),
       head_last=st.booleans())
def test_any_order_with_duplicates_completes_once_bit_exact(objs, max_frame_bytes, rnd, head_last):
    sender = StreamSender(21, objs, max_frame_bytes=max_frame_bytes, names=[f"o{i}" for i in range(len(objs))])
    frames = list(sender)
    head = frames[0]
    order = frames + [rnd.choice(frames) for _ in range(rnd.randint(0, len(frames)))]  # any frame, repeated
    rnd.shuffle(order)
    if head_last:  # every copy of HEAD after everything else
        order = [f for f in order if f is not head] + [f for f in order if f is head]

    r = Reassembler()
    events, completed_at = [], None
    for i, data in enumerate(order):
        evs = r.receive(data, now=i * 1e-4)
        if of(evs, StreamComplete):
            completed_at = i
        events += evs
        assert r.buffered_bytes <= StreamLimits().max_early_bytes + sender.layout.total_bytes

    assert [type(e) for e in events].count(StreamStarted) == 1
    assert isinstance(events[0], StreamStarted) and events[0].layout == sender.layout
    assert not of(events, StreamFailed)
    (done,) = of(events, StreamComplete)
    assert events[-1] is done  # nothing after completion
    assert sorted(e.index for e in of(events, ObjectReady)) == list(range(len(objs)))
    assert done.xxh3_64 == xxhash.xxh3_64_intdigest(b"".join(o.tobytes() for o in objs))
    for got, want in zip(done.objects, objs):
        assert_bit_exact(got, want)
    assert (r.open_streams, r.buffered_bytes) == (0, 0)
    assert r.dropped_frames == len(order) - 1 - completed_at  # every frame after completion, and only those


@given(objs=stream_objects(), max_frame_bytes=st.integers(512, 65536), rnd=st.randoms(use_true_random=False))
def test_dropped_chunks_fail_after_tail_with_their_exact_byte_ranges(objs, max_frame_bytes, rnd):
    sender = StreamSender(22, objs, max_frame_bytes=max_frame_bytes)
    layout = sender.layout
    frames = list(sender)
    n = layout.chunks
    dropped = set(rnd.sample(range(n), min(n, rnd.choice([1, 1, 2, 3, rnd.randint(1, n)]))))
    kept = [frames[0], frames[-1]] + [frames[1 + k] for k in range(n) if k not in dropped]
    order = kept + [rnd.choice(kept) for _ in range(rnd.randint(0, len(kept) // 2))]
    rnd.shuffle(order)

    r = Reassembler()
    times = [i / len(order) for i in range(len(order))]
    events = []
    for t, data in zip(times, order):
        events += r.receive(data, now=t)
    assert not of(events, StreamComplete) and not of(events, StreamFailed)
    whole = {o.index for o in layout.objects if not dropped & set(range(o.first_chunk, o.first_chunk + o.chunks))}
    assert {e.index for e in of(events, ObjectReady)} == whole

    # TAIL counts from when the stream had both TAIL and HEAD (an early TAIL waits for HEAD)
    t_tail = max(times[order.index(frames[0])], times[order.index(frames[-1])])
    assert r.tick(t_tail + GRACE - 0.01) == []
    assert r.open_streams == 1
    (failed,) = r.tick(t_tail + GRACE + 1)
    assert isinstance(failed, StreamFailed) and failed.stream_id == 22
    assert failed.reason == "gap_after_tail"
    assert failed.detail == f"{len(dropped)} of {n} chunks never arrived after TAIL"
    assert failed.missing == expected_missing(layout, dropped)
    want = byte_mask(layout.total_bytes, [chunk_range(layout, k) for k in dropped])
    assert np.array_equal(byte_mask(layout.total_bytes, failed.missing), want)
    assert all(a < b for a, b in failed.missing)
    assert (r.open_streams, r.buffered_bytes) == (0, 0)
    assert r.tick(t_tail + GRACE + 2) == []


def test_missing_ranges_join_across_objects():
    objs = [np.zeros(938, dtype=np.int8), np.zeros(938, dtype=np.int8)]
    sender = StreamSender(23, objs, max_frame_bytes=512)  # 469-byte chunks: 2 per object
    frames = list(sender)
    assert sender.layout.chunk_bytes == 469
    r = Reassembler()
    deliver(r, [frames[0], frames[1], frames[4], frames[-1]])  # chunks 1 and 2 dropped: bytes 469..1407
    (failed,) = r.tick(GRACE + 1)
    assert failed.missing == [(469, 1407)]
    assert failed.detail == "2 of 4 chunks never arrived after TAIL"


# ------------------------------------------------------------------ frame sizes and codecs


CODEC_CHOICES = {
    "plain": (None, None),
    "zstd": (Codec(3), Codec(3)),
    "xchacha": (Codec(key=KEY), Codec(key=KEY)),
    "zstd+xchacha": (Codec(3, key=KEY), Codec(key=KEY)),
}


@given(objs=stream_objects(max_total=120_000), max_frame_bytes=st.integers(512, 65536),
       codec=st.sampled_from(sorted(CODEC_CHOICES)), rnd=st.randoms(use_true_random=False))
def test_every_chunk_and_tail_fits_max_frame_bytes_with_any_codec(objs, max_frame_bytes, codec, rnd):
    send_codec, recv_codec = CODEC_CHOICES[codec]
    sender = StreamSender(31, objs, max_frame_bytes=max_frame_bytes, codec=send_codec)
    frames = list(sender)
    for data in frames[1:]:
        assert len(data) <= max_frame_bytes
    if max_frame_bytes >= 2048:  # HEAD has no room to shrink; with a handful of objects it fits here
        assert len(frames[0]) <= max_frame_bytes
    if send_codec is not None and send_codec.keyring is not None:
        assert all(data[0] == 2 for data in frames)  # every frame encrypted
    rnd.shuffle(frames)
    (done,) = of(deliver(Reassembler(codec=recv_codec), frames), StreamComplete)
    for got, want in zip(done.objects, objs):
        assert_bit_exact(got, want)


@pytest.mark.parametrize("max_frame_bytes", [1024, 2000, 8192, 65536])
@pytest.mark.parametrize("codec", sorted(CODEC_CHOICES))
def test_kv_cache_frames_fit_and_reassemble_with_codec(codec, max_frame_bytes):
    send_codec, recv_codec = CODEC_CHOICES[codec]
    objs, _, _ = kv_cache(layers=4)
    sender = StreamSender(32, objs, max_frame_bytes=max_frame_bytes, codec=send_codec)
    frames = list(sender)
    assert max(len(f) for f in frames[1:]) <= max_frame_bytes  # chunks and TAIL
    if max_frame_bytes >= 1000:
        assert len(frames[0]) <= max_frame_bytes  # HEAD of 8 unnamed objects
    (done,) = of(deliver(Reassembler(codec=recv_codec), frames), StreamComplete)
    for got, want in zip(done.objects, objs):
        assert_bit_exact(got, want)


def test_encrypted_stream_needs_the_key():
    frames = list(StreamSender(33, [np.arange(100, dtype=np.float16)], codec=Codec(key=KEY)))
    with pytest.raises(DecodeError):
        Reassembler().receive(frames[0], 0.0)
    with pytest.raises(DecodeError):
        Reassembler(codec=Codec(key=Key.generate())).receive(frames[0], 0.0)
    plain = StreamSender(33, [np.arange(100, dtype=np.float16)]).head()
    with pytest.raises(resonant.NotEncrypted):
        Reassembler(codec=Codec(key=KEY)).receive(plain, 0.0)


# ------------------------------------------------------------------ hash and TAIL


def tamper(data: bytes) -> bytes:
    """Flip the last payload byte of a plain Chunk frame and recompute its CRC, so it still decodes."""
    body = bytearray(data[:-4])
    body[-1] ^= 0xFF
    return bytes(body) + struct.pack("<I", zlib.crc32(body))


@pytest.mark.parametrize("reverse", [False, True], ids=["in_order", "reversed"])
def test_tampered_chunk_with_valid_crc_fails_the_hash(reverse):
    arr = np.arange(3000, dtype=np.float16)
    sender = StreamSender(41, [arr], max_frame_bytes=1024)
    frames = list(sender)
    frames[3] = tamper(frames[3])
    c = resonant.decode(frames[3])  # the CRC holds
    a, b = chunk_range(sender.layout, 2)
    assert c.data.tobytes() != arr.tobytes()[a:b]
    chunks = frames[1:-1][::-1] if reverse else frames[1:-1]

    r = Reassembler()
    events = deliver(r, [frames[0], *chunks, frames[-1]])
    (failed,) = of(events, StreamFailed)
    assert not of(events, StreamComplete)
    received = bytearray(arr.tobytes())
    received[b - 1] ^= 0xFF
    got, want = xxhash.xxh3_64_intdigest(bytes(received)), xxhash.xxh3_64_intdigest(arr.tobytes())
    assert failed.reason == "hash_mismatch" and failed.stream_id == 41
    assert failed.detail == f"xxh3_64 of the received bytes is {got:016x}, TAIL says {want:016x}"
    assert failed.missing == []
    assert (r.open_streams, r.buffered_bytes) == (0, 0)


@pytest.mark.parametrize(
    "change, detail",
    [
        (dict(chunks=8), "TAIL says 8 chunks of 6000 bytes, HEAD said 7 of 6000"),
        (dict(chunks=6), "TAIL says 6 chunks of 6000 bytes, HEAD said 7 of 6000"),
        (dict(total_bytes=6002), "TAIL says 7 chunks of 6002 bytes, HEAD said 7 of 6000"),
        (dict(xxh3_64="ABCDEF0123456789"), "xxh3_64 'ABCDEF0123456789' is not 16 lowercase hex digits"),
        (dict(xxh3_64="abc"), "xxh3_64 'abc' is not 16 lowercase hex digits"),
    ],
)
def test_bad_tail(change, detail):
    sender = StreamSender(42, [np.arange(3000, dtype=np.float16)], max_frame_bytes=1024)
    frames = list(sender)
    doc = {"method": "tail", "chunks": 7, "total_bytes": 6000, "xxh3_64": f"{sender.digest()[0]:016x}", **change}
    r = Reassembler()
    events = deliver(r, [frames[0], *frames[1:4], resonant.encode(Sync(doc, stream_id=42, frame_seq=8))])
    (failed,) = of(events, StreamFailed)
    assert (failed.reason, failed.detail) == ("bad_tail", detail)
    assert failed.missing == [(chunk_range(sender.layout, 3)[0], 6000)]
    assert (r.open_streams, r.buffered_bytes) == (0, 0)
    assert deliver(r, frames[4:]) == []  # the rest is dropped as late frames of a closed stream
    assert r.dropped_frames == 5


def test_schema_invalid_tail_is_bad_tail():
    sender = StreamSender(43, [np.arange(10, dtype=np.float16)])
    frames = list(sender)
    doc = {"method": "tail", "chunks": 1, "xxh3_64": f"{sender.digest()[0]:016x}"}
    events = deliver(Reassembler(), [frames[0], frames[1], resonant.encode(Sync(doc, stream_id=43, frame_seq=2))])
    assert [(e.reason, e.detail) for e in of(events, StreamFailed)] == [
        ("bad_tail", "tail.total_bytes: required field is missing")]


# ------------------------------------------------------------------ 1 GiB


@pytest.mark.slow
@pytest.mark.pure_skip  # the memory bound of the fast path (one extra copy of 1 GiB)
def test_one_gib_stream_with_one_extra_copy():
    n = 1 << 29
    src = np.empty(n, np.float16)
    u = src.view(np.uint16)
    base = np.random.default_rng(1).integers(0, 0x7C00, size=1 << 19, dtype=np.uint16)  # finite halves
    for i in range(n >> 19):  # 1024 blocks, each distinct (the mantissa's low bits xor the block number)
        np.bitwise_xor(base, np.uint16(i), out=u[i << 19:(i + 1) << 19])
    del u, base

    tracemalloc.start()
    try:
        sender = StreamSender(101, [src], names=["all"], layers=[0])
        r = Reassembler()
        ready, done, other = [], [], []
        now = 0.0
        for data in sender:
            for e in r.receive(data, now):
                (ready if isinstance(e, ObjectReady) else done if isinstance(e, StreamComplete) else other).append(e)
            del data
            now += 1e-6
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert sender.layout.chunks == -(-(1 << 30) // 65492)
    assert [type(e) for e in other] == [StreamStarted]
    assert len(ready) == 1 and len(done) == 1
    assert (1 << 30) <= peak <= 1.1 * (1 << 30)  # the output buffer (traced by numpy) and little else
    assert current >= 1 << 30  # held by the events
    (out,) = done[0].objects
    assert ready[0].array.shape == (n,) and (ready[0].name, ready[0].layer) == ("all", 0)
    assert done[0].nbytes == 1 << 30
    assert done[0].xxh3_64 == xxhash.xxh3_64_intdigest(src)
    assert np.array_equal(out, src)
    assert (r.open_streams, r.buffered_bytes) == (0, 0)


# ------------------------------------------------------------------ known bugs (strict: fixing one flips it)


def test_head_fits_max_frame_bytes_or_sender_refuses():
    objs, names, layers = kv_cache(layers=2, shape=(4, 8))
    try:
        sender = StreamSender(112, objs, names=names, layers=layers, max_frame_bytes=512)
    except EncodeError as exc:
        assert exc.path == "max_frame_bytes"
        return
    assert len(sender.head()) <= 512


def test_head_over_max_json_bytes_goes_in_parts():
    objs = [np.full(3, i % 100, np.int8) for i in range(1000)]
    names = [f"layer{i:04d}.keys.abcdefghijklmnop" for i in range(1000)]
    sender = StreamSender(113, objs, names=names)  # its HEAD JSON is over 60,000 bytes: two parts
    assert len(sender.heads()) == 2 and all(len(h) <= 65536 for h in sender.heads())
    with pytest.raises(EncodeError, match="use heads"):
        sender.head()
    (done,) = of(deliver(Reassembler(), sender), StreamComplete)
    assert all(np.array_equal(a, b) for a, b in zip(done.objects, objs))


def kv_heads(max_frame_bytes=1200, layers=24):
    objs, names, layer_ids = kv_cache(layers=layers, shape=(2, 16))
    return StreamSender(120, objs, names=names, layers=layer_ids, max_frame_bytes=max_frame_bytes), objs


def test_a_head_too_large_for_small_frames_goes_in_parts_in_any_order():
    sender, objs = kv_heads()
    heads = sender.heads()
    assert len(heads) > 3 and all(len(h) <= 1200 for h in heads)
    for order in (heads, heads[::-1]):
        r = Reassembler()
        frames = list(sender.chunks()) + [sender.tail()]
        events = [e for f in frames[:5] + order + order[:2] + frames[5:] for e in r.receive(f, 0.0)]  # dups too
        started = [e for e in events if isinstance(e, StreamStarted)]
        assert len(started) == 1 and len(started[0].layout.objects) == len(objs)
        (done,) = of(events, StreamComplete)
        assert all(np.array_equal(a, b) for a, b in zip(done.objects, objs))
        assert r.buffered_bytes == 0


def _part_docs(sender):
    return [json.loads(resonant.decode(h).json.tobytes()) for h in sender.heads()]


@pytest.mark.parametrize("edit,message", [
    (lambda docs: docs[1].update(chunk_bytes=docs[1]["chunk_bytes"] - 2), "part 1 disagrees with part 0 on chunk_bytes"),
    (lambda docs: docs[1].update(first_object=docs[1]["first_object"] + 1), "part 1 starts at object"),
    (lambda docs: [d.update(object_count=3) for d in docs], "object_count says 3"),
    (lambda docs: docs[0].pop("first_object"), "first_object missing"),
    (lambda docs: docs[0].update(part=docs[0]["parts"]), "parts must be 1..4096 and part below it"),
])
def test_inconsistent_head_parts_fail_as_bad_head(edit, message):
    sender, _ = kv_heads()
    docs = _part_docs(sender)
    edit(docs)
    r = Reassembler()
    events = [e for d in docs for e in r.receive(resonant.encode(Sync(json.dumps(d).encode(), stream_id=120)), 0.0)]
    (failed,) = of(events, StreamFailed)
    assert failed.reason == "bad_head" and message in failed.detail
    r.tick(IDLE + 1)  # parts that came after the failure are held until the idle timeout
    assert r.buffered_bytes == 0


def test_incomplete_head_parts_time_out_and_are_released():
    sender, _ = kv_heads()
    r = Reassembler()
    for h in sender.heads()[:-1]:
        assert r.receive(h, 0.0) == []
    assert r.buffered_bytes > 0
    (failed,) = r.tick(IDLE + 1)
    assert failed.reason == "timeout" and "HEAD never completed" in failed.detail and r.buffered_bytes == 0


def test_oversized_head_json_fails_as_bad_head():
    doc = head_doc([{"name": "x" * 200, "dtype": 2, "shape": [1], "nbytes": 1}] * 240)
    payload = json.dumps(doc).encode()
    assert 60_000 < len(payload) < 65_000
    (failed,) = Reassembler().receive(resonant.encode(Sync(payload, stream_id=114)), 0.0)
    assert failed.reason == "bad_head"


def test_zero_dimensional_object_keeps_its_shape():
    scalar = np.array(1.5, np.float16)
    sender = StreamSender(115, [scalar])
    assert sender.layout.objects[0].shape == ()
    (done,) = of(deliver(Reassembler(), sender), StreamComplete)
    assert_bit_exact(done.objects[0], scalar)


def test_q4_head_with_wrong_nbytes_is_bad_head():
    doc = head_doc([{"dtype": int(DType.Q4), "shape": [10], "nbytes": 1000}])
    (event,) = Reassembler().receive(head_frame(doc, 117), 0.0)
    assert isinstance(event, StreamFailed) and event.reason == "bad_head"


@pytest.mark.parametrize("objects, total", [
    ([{"dtype": int(DType.SPARSE_COO), "shape": [1], "nbytes": 2**64 - 1}], 2**64 - 1),
    ([{"dtype": int(DType.SPARSE_COO), "shape": [1], "nbytes": 2**62}] * 4, 2**64 - 1),
])
def test_head_whose_objects_add_up_past_any_stream_is_bad_head(objects, total):
    """An opaque dtype's size is free: sizes a peer announces are kept in range before any sum
    (a HandshakeError naming the object, never an OverflowError or a wrapped total)."""
    doc = head_doc(objects)
    doc["total_bytes"] = total
    with pytest.raises(HandshakeError, match=r"head\.objects\[\d\]\.nbytes: .* more than any stream can hold"):
        StreamLayout.from_head(doc)
    (event,) = Reassembler().receive(head_frame(doc, 118), 0.0)
    assert isinstance(event, StreamFailed) and event.reason == "bad_head"


def test_stream_objects_and_ready_events_read_like_records():
    sender = StreamSender(119, [np.zeros((2, 3), np.float16), np.ones(5, np.int8)], names=["a", "b"], layers=[0, 1])
    a, b = sender.layout.objects
    assert (a.index, a.dtype, a.shape, a.nbytes, a.offset, a.first_chunk, a.chunks, a.name, a.layer) == \
        (0, DType.F16, (2, 3), 12, 0, 0, 1, "a", 0)
    assert (b.offset, b.first_chunk, b.name, b.layer) == (12, 1, "b", 1)
    assert a == StreamObject(0, DType.F16, (2, 3), 12, 0, 0, 1, "a", 0) and a != b and len({a, b, a}) == 2
    assert repr(a) == ("StreamObject(index=0, dtype=<DType.F16: 1>, shape=(2, 3), nbytes=12, offset=0, "
                       "first_chunk=0, chunks=1, name='a', layer=0)")
    with pytest.raises(AttributeError):
        a.nbytes = 3  # (immutable)
    ready = of(deliver(Reassembler(), sender), ObjectReady)
    assert [(e.stream_id, e.index, e.name, e.layer) for e in ready] == [(119, 0, "a", 0), (119, 1, "b", 1)]
    assert ready[1].array.tolist() == [1] * 5 and repr(ready[0]).startswith("ObjectReady(stream_id=119, index=0")


def test_head_nested_as_deep_as_orjson_reads_is_bad_head():
    """A HEAD whose field nests past json.loads's depth (orjson reads up to 1024) fails as
    bad_head, not with a RecursionError out of receive."""
    raw = b'{"method":"head","v":' + b"[" * 1010 + b"]" * 1010 + b"}"
    (event,) = Reassembler().receive(resonant.encode(Sync(raw, stream_id=120, frame_seq=0)), 0.0)
    assert isinstance(event, StreamFailed) and event.reason == "bad_head"


@pytest.mark.parametrize("obj", [StreamObject(0, DType.F16, (10_000_000,), 2, 0, 0, 1),  # shape past its nbytes
                                 StreamObject(0, DType.F16, (1,), 2, -16, 0, 1),          # before the buffer
                                 StreamObject(0, DType.Q4, (4,), -2, 4, 0, 1)])            # negative size
def test_object_views_refuse_an_object_outside_its_bytes(obj):
    """The C views trust nothing of a StreamObject made by hand (the numpy constructor they replace
    checked the buffer's bounds): a view past the buffer is a ValueError, not a read of other memory."""
    from resonant import _codec
    with pytest.raises(ValueError):
        _codec.object_views(np.zeros(8, np.uint8), (obj,), 1)
