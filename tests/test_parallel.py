"""Sealed and compressed V-Streams encoded on a pool of threads (resonant.parallel), and the zstd
auto-skip rule (the compression rule of the V-Stream spec): the same frames, in the same wire
order, as the serial path; tags recorded in wire order; zstd skipped where it does not pay."""

from __future__ import annotations

import struct
import threading
import time

import numpy as np
import pytest

from resonant import Key, parallel
from resonant._spec import Flags
from resonant.handshake import ZSTD_MIN_SAVING_PERMILLE, ZSTD_PROBE_CHUNKS
from resonant.session import Session
from resonant.stream import Reassembler, StreamComplete, StreamSender
from resonant.transforms import Codec

FRAME = 4096  # small frames: many chunks (about 4 KiB each) in a small tensor
KEY = Key(bytes(range(32)))


def flags(frame: bytes) -> int:
    return struct.unpack_from("<H", frame, 2)[0]


def frame_seq(frame: bytes) -> int:
    return struct.unpack_from("<Q", frame, 8)[0]


def compressible(n: int, seed: int = 0) -> np.ndarray:
    """float16 activations-like values: zstd saves well over the threshold."""
    return (np.random.default_rng(seed).standard_normal(n) * 0.05).astype(np.float16)


def incompressible(n: int, seed: int = 1) -> np.ndarray:
    """Random float16 bits: zstd saves nothing."""
    return np.frombuffer(np.random.default_rng(seed).bytes(2 * n), np.float16).copy()


@pytest.fixture(autouse=True)
def _threads():
    yield
    parallel.set_threads(None)


def frames_with(threads: int, objects, codec: Codec, **kw) -> list[bytes]:
    parallel.set_threads(threads)
    return list(StreamSender(5, objects, codec=codec, max_frame_bytes=FRAME, **kw))


def same(got, want) -> bool:
    """The same bytes (random float16 bits hold NaNs, which array_equal calls unequal)."""
    return len(got) == len(want) and all(np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(got, want))


def reassemble(frames, codec: Codec) -> StreamComplete:
    r = Reassembler(codec=codec)
    events = []
    for f in frames:
        events += r.receive(f, 0.0)
    done = events[-1]
    assert isinstance(done, StreamComplete)
    return done


OBJECTS = [compressible(400_000), incompressible(300_000), compressible(7, seed=3), compressible(20_000, seed=4)]


@pytest.mark.parametrize("threads", [2, 4])
def test_parallel_zstd_frames_are_the_serial_frames(threads):
    serial = frames_with(1, OBJECTS, Codec(3))
    pooled = frames_with(threads, OBJECTS, Codec(3))
    assert len(serial) > 8 * 16  # many batches
    assert pooled == serial  # byte for byte (zstd without a key is deterministic), in the same order


@pytest.mark.parametrize("level", [None, 3])
def test_parallel_sealed_frames_decode_to_the_serial_frames_in_order(level):
    serial = frames_with(1, OBJECTS, Codec(level, key=KEY))
    pooled = frames_with(3, OBJECTS, Codec(level, key=KEY))
    assert [frame_seq(f) for f in pooled] == [frame_seq(f) for f in serial] == list(range(len(serial)))
    assert [flags(f) for f in pooled] == [flags(f) for f in serial]
    dec = Codec(key=KEY)
    for a, b in zip(serial, pooled):
        fa, fb = dec.decode(a), dec.decode(b)
        assert [s.payload.tobytes() for s in fa.slices] == [s.payload.tobytes() for s in fb.slices]
    for frames in (serial, pooled):
        done = reassemble(frames, Codec(key=KEY))
        assert same(done.objects, OBJECTS)


def test_sent_tags_are_recorded_in_wire_order():
    codec = Codec(3, key=KEY, record_tags=4096)
    frames = frames_with(2, OBJECTS, codec)
    tags = list(codec.sent_tags)
    del tags[1]  # the TAIL StreamSender encodes once to check that it fits, before the chunks (never sent)
    assert tags == [f[-20:-4] for f in frames]  # every frame's tag (HEAD, chunks, TAIL), in wire order


def test_keyed_zstd_stream_round_trips_through_a_session_pair_on_the_pool():
    parallel.set_threads(2)
    c = Session(role="client", key=KEY, compress=("zstd",))
    s = Session(role="server", key=KEY, compress=("zstd",))
    c.initiate(0.0)
    for d in c.datagrams_to_send():
        s.receive_datagram(d, 0.0)
    for d in s.datagrams_to_send():
        c.receive_datagram(d, 0.0)
    assert c.agreement.compress == "zstd" and c.agreement.crypto == "xchacha20poly1305"
    objs = [compressible(300_000), incompressible(200_000)]
    for data in c.stream(c.new_stream_id(), objs):
        c.send_encoded(data)
    sent = c.datagrams_to_send()
    events = [e for d in sent for e in s.receive_datagram(d, 0.0)]
    done = events[-1]
    assert isinstance(done, StreamComplete)
    assert same(done.objects, objs)
    tags = list(c._encoder.sent_tags)  # (after HEAD, the TAIL encoded once to check its size)
    assert tags[-len(sent) + 1:] == [d[-20:-4] for d in sent[1:]] and tags[-len(sent) - 1] == sent[0][-20:-4]
    zstd = [bool(flags(d) & Flags.ZSTD) for d in sent]
    assert any(zstd) and not all(zstd)  # the compressible object compressed, the random one not


@pytest.mark.parametrize("threads", [1, 2])
def test_zstd_is_skipped_on_incompressible_data_and_kept_on_compressible(threads):
    for key in (None, KEY):
        rand = frames_with(threads, [incompressible(300_000)], Codec(3, key=key))[1:-1]
        comp = frames_with(threads, [compressible(200_000)], Codec(3, key=key))[1:-1]
        assert len(rand) > 2 * ZSTD_PROBE_CHUNKS
        assert not any(flags(f) & Flags.ZSTD for f in rand)
        assert all(flags(f) & Flags.ZSTD for f in comp)
        if key is None:  # skipped chunks are plain version 1 frames
            assert {f[0] for f in rand} == {1}


def test_zstd_decision_is_per_run_of_probe_chunks():
    """An object whose bytes turn compressible part-way: runs of ZSTD_PROBE_CHUNKS chunks are
    compressed from the first run whose first chunk pays, and not before."""
    parallel.set_threads(2)
    sender = StreamSender(5, [np.zeros(1, np.float16)], codec=Codec(3), max_frame_bytes=FRAME)
    per_chunk = sender.layout.chunk_bytes // 2
    k = 2 * ZSTD_PROBE_CHUNKS + ZSTD_PROBE_CHUNKS // 2  # random for two and a half runs, then compressible
    obj = np.concatenate([incompressible(k * per_chunk), compressible(2 * ZSTD_PROBE_CHUNKS * per_chunk)])
    frames = frames_with(2, [obj], Codec(3))[1:-1]
    zstd = [bool(flags(f) & Flags.ZSTD) for f in frames]
    assert not any(zstd[:3 * ZSTD_PROBE_CHUNKS])  # the third run's probe (its first chunk) is random
    assert all(zstd[3 * ZSTD_PROBE_CHUNKS:])
    assert same(reassemble(frames_with(2, [obj], Codec(3)), Codec()).objects, [obj])


def test_probe_threshold_is_the_spec_figure():
    codec = Codec(3)
    sender = StreamSender(5, [compressible(10)], codec=codec)
    assert ZSTD_MIN_SAVING_PERMILLE == 50  # documented as 5% in the compression rule (schema/handshake.yaml)
    from resonant._codec import Chunk, Slice
    from resonant._spec import DType
    rand, comp = incompressible(30_000), compressible(30_000)
    hdr = {"stream_id": 1, "frame_seq": 1}
    assert codec.zstd_saving(Chunk(Slice(DType.F16, (30_000,), memoryview(rand.view(np.uint8))), **hdr)) < 0.01
    assert codec.zstd_saving(Chunk(Slice(DType.F16, (30_000,), memoryview(comp.view(np.uint8))), **hdr)) > 0.1
    assert Codec().zstd_saving(Chunk(Slice(DType.F16, (30_000,), memoryview(comp.view(np.uint8))), **hdr)) == 0.0
    del sender


# ------------------------------------------------------------------ the pool itself


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_ordered_map_keeps_the_order_and_bounds_what_is_in_flight(threads):
    started = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.001 * ((i * 7) % 3))  # finish out of order
        return i * i

    def jobs():
        for i in range(40):
            yield i

    out = []
    for r in parallel.ordered_map(work, jobs(), threads, depth=3):
        out.append(r)
        with lock:
            assert len(started) <= len(out) + 3  # never more than depth ahead of what was handed out
    assert out == [i * i for i in range(40)]


def test_ordered_map_raises_at_the_failing_jobs_place():
    def work(i: int) -> int:
        if i == 5:
            raise ValueError("job 5")
        return i

    got = []
    with pytest.raises(ValueError, match="job 5"):
        for r in parallel.ordered_map(work, range(20), 3):
            got.append(r)
    assert got == [0, 1, 2, 3, 4]


def test_thread_count_from_the_environment(monkeypatch):
    monkeypatch.setenv(parallel.ENV_THREADS, "3")
    assert parallel.threads() == 3
    parallel.set_threads(1)
    assert parallel.threads() == 1
    parallel.set_threads(None)
    monkeypatch.setenv(parallel.ENV_THREADS, "zero")
    with pytest.raises(ValueError, match="RESONANT_THREADS"):
        parallel.threads()
    monkeypatch.delenv(parallel.ENV_THREADS)
    assert parallel.threads() >= 1
    with pytest.raises(ValueError, match="1..256"):
        parallel.set_threads(0)


def test_a_forked_child_encodes_on_a_pool_of_its_own():
    """The parent's pool threads do not survive fork(): the child makes its own (it hung before)."""
    import multiprocessing

    parallel.set_threads(2)
    frames_with(2, OBJECTS[:1], Codec(3))  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe()

    def child(pipe) -> None:
        pipe.send(frames_with(2, OBJECTS[:1], Codec(3)) == expected)

    expected = frames_with(1, OBJECTS[:1], Codec(3))
    p = ctx.Process(target=child, args=(there,))
    p.start()
    try:
        assert here.poll(60) and here.recv() is True
        p.join(10)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
