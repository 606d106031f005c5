"""Forward error correction for V-Streams (resonant.fec, StreamSender(fec=), the Reassembler's
parity chunks): recovery of every loss pattern, round trips with random loss, limits, malformed
parity, HEADs a receiver cannot do."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("zfec")

from resonant import _codec, fec, handshake  # noqa: E402
from resonant._codec import Chunk, Slice  # noqa: E402
from resonant._spec import DType  # noqa: E402
from resonant.errors import EncodeError  # noqa: E402
from resonant.reassembler import Reassembler, StreamComplete, StreamFailed, StreamStarted  # noqa: E402
from resonant.stream_limits import PARITY_BLOCK_BYTES, PARITY_CHUNK_BYTES, MemoryBudget, StreamLimits  # noqa: E402
from resonant.stream_sender import StreamSender  # noqa: E402

from stream_helpers import assert_bit_exact, deliver, head_doc, of  # noqa: E402


# ------------------------------------------------------------------ the block code


@pytest.mark.parametrize("k,m", [(1, 1), (1, 3), (2, 1), (3, 2), (4, 3), (5, 2)])
def test_every_loss_of_up_to_m_pieces_is_recovered(k, m):
    rng = random.Random(k * 10 + m)
    cb = 24
    for n_data in range(1, k + 1):  # n_data < k: a short last block (virtual zero chunks)
        # data chunks of every length 0..cb (a short chunk: an object's last one; 0: an empty object)
        data = [rng.randbytes(rng.choice([cb, cb, 0, 1, cb - 1, 7])) for _ in range(n_data)]
        code = fec.BlockCode(k, m, cb)
        parity = code.encode(data)
        assert len(parity) == m and all(len(p) == cb for p in parity)
        pieces = {i: d for i, d in enumerate(data)} | {k + j: p for j, p in enumerate(parity)}
        real = sorted(pieces)
        for lost_n in range(0, m + 1):
            for lost in itertools.combinations(real, lost_n):
                known = {i: pieces[i] for i in real if i not in lost}
                got = code.recover(known, n_data)
                want = sorted(i for i in lost if i < n_data)
                assert sorted(got) == want
                for i in want:
                    assert got[i][:len(data[i])] == data[i] and not any(got[i][len(data[i]):])


def test_more_than_m_lost_is_refused_clearly():
    code = fec.BlockCode(3, 1, 16)
    data = [bytes(range(16)), bytes(16), b"x" * 16]
    parity = code.encode(data)
    with pytest.raises(ValueError, match="needs 3 of its 4 pieces"):
        code.recover({2: data[2], 3: parity[0]}, 3)


def test_encode_reads_views_and_selected_parity():
    src = np.arange(64, dtype=np.uint8)
    code = fec.BlockCode(2, 3, 32)
    views = [memoryview(src)[:32], memoryview(src)[32:]]
    allp = code.encode(views)
    assert code.encode(views, (2,)) == [allp[2]]
    assert code.encode([bytes(src[:32]), bytes(src[32:])]) == allp


@pytest.mark.parametrize("k,m,what", [(0, 1, "k 0"), (1, 0, "m 0"), (handshake.MAX_FEC_K + 1, 1, "max_fec_k"),
                                      (1, handshake.MAX_FEC_M + 1, "max_fec_m"),
                                      (handshake.MAX_FEC_K, handshake.MAX_FEC_M, "max_fec_pieces"),
                                      (2.0, 1, "integers"), (True, 1, "integers")])
def test_parameters_are_checked(k, m, what):
    assert what in fec.problem(k, m)
    with pytest.raises(ValueError, match=what):
        fec.BlockCode(k, m, 64)
    with pytest.raises(EncodeError, match=what):
        StreamSender(1, [np.zeros(10, np.float16)], fec=(k, m))


def test_sender_without_zfec_says_what_to_install(monkeypatch):
    monkeypatch.setattr(fec, "_zfec", None)
    monkeypatch.setitem(__import__("sys").modules, "zfec", None)  # import zfec fails
    assert not fec.available()
    with pytest.raises(EncodeError, match=r"pip install 'resonant\[fec\]'"):
        StreamSender(1, [np.zeros(10, np.float16)], fec=(4, 1))
    StreamSender(1, [np.zeros(10, np.float16)])  # without fec nothing needs it


# ------------------------------------------------------------------ streams


def _objects(rng: np.random.Generator, sizes, dtypes) -> list:
    return [np.frombuffer(rng.bytes(n * np.dtype(d).itemsize), d).copy() for n, d in zip(sizes, dtypes)]


def _split(frames, sender):
    """(heads, data chunks, parity frames by block, tail) of a stream's frames."""
    lay, (k, m) = sender.layout, sender.layout.fec
    heads, data, parity, tail = [], {}, {}, None
    for f in frames:
        fr = _codec.decode(f)
        if isinstance(fr, Chunk):
            if fr.frame_seq <= lay.chunks:
                data[fr.frame_seq - 1] = f
            else:
                b, j = fec.parity_of_seq(lay.chunks, k, m, fr.frame_seq)
                parity.setdefault(b, {})[j] = f
        elif fr.frame_seq == 0:
            heads.append(f)
        else:
            tail = f
    return heads, data, parity, tail


def _lossy(sender, frames, rnd: random.Random, max_loss: int | None = None) -> list:
    """The stream's data and parity frames with up to m (or max_loss) pieces lost per block."""
    lay, (k, m) = sender.layout, sender.layout.fec
    heads, data, parity, tail = _split(frames, sender)
    out = []
    for b in range(fec.blocks(lay.chunks, k)):
        pieces = [data[c] for c in range(b * k, min((b + 1) * k, lay.chunks))] + [parity[b][j] for j in range(m)]
        lose = rnd.randint(0, m if max_loss is None else max_loss)
        keep = sorted(rnd.sample(range(len(pieces)), len(pieces) - min(lose, len(pieces))))
        out += [pieces[i] for i in keep]
    return heads, out, tail


def test_order_of_frames_parity_after_each_block():
    objs = _objects(np.random.default_rng(0), [3000, 100, 0, 701], [np.float16, np.int8, np.float32, np.float16])
    s = StreamSender(7, objs, max_frame_bytes=600, fec=(4, 2))
    lay = s.layout
    seqs = [_codec.decode(f).frame_seq for f in s.chunks()]
    want = []
    for b in range(fec.blocks(lay.chunks, 4)):
        want += [c + 1 for c in range(b * 4, min(b * 4 + 4, lay.chunks))]
        want += [lay.chunks + 2 + b * 2 + j for j in range(2)]
    assert seqs == want
    assert s.layout.head_document()["fec"] == {"scheme": "rs", "k": 4, "m": 2}
    for b, j in [(0, 0), (fec.blocks(lay.chunks, 4) - 1, 1)]:
        assert s.parity_frame(b, j) == next(f for f in s.chunks() if _codec.decode(f).frame_seq ==
                                            fec.parity_seq(lay.chunks, 4, 2, b, j))
    with pytest.raises(EncodeError, match="parity"):
        s.parity_frame(fec.blocks(lay.chunks, 4), 0)
    assert _codec.decode(s.heart()).frame_seq == fec.last_parity_seq(lay.chunks, 4, 2) + 1
    records = [p for parts in s.records(5) for p in parts]
    joined = b"".join(bytes(p) for p in records)
    assert joined == b"".join(len(f).to_bytes(4, "little") + f for f in s)


_DT = [np.float16, np.float32, np.int8]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=st.lists(st.integers(0, 900), min_size=1, max_size=4), dts=st.lists(st.sampled_from(_DT), min_size=4,
       max_size=4), k=st.integers(1, 6), m=st.integers(1, 3), frame=st.sampled_from([512, 700, 1100]),
       seed=st.integers(0, 2**32 - 1), records=st.booleans())
def test_round_trip_with_up_to_m_lost_per_block(sizes, dts, k, m, frame, seed, records):
    rng = np.random.default_rng(seed)
    objs = _objects(rng, sizes, dts)
    s = StreamSender(9, objs, max_frame_bytes=frame, fec=(k, m))
    if records:  # the TCP records path (zero-copy chunks, parity frames between)
        frames, buf = [], b"".join(bytes(p) for parts in s.records(3) for p in parts)
        while buf:
            n = int.from_bytes(buf[:4], "little")
            frames.append(buf[4:4 + n])
            buf = buf[4 + n:]
    else:
        frames = list(s)
    rnd = random.Random(seed)
    heads, body, tail = _lossy(s, frames, rnd)
    body = body + rnd.sample(body, min(3, len(body))) + [tail]  # duplicates; TAIL anywhere
    rnd.shuffle(body)
    cut = rnd.randint(0, len(body))  # some before HEAD: held as early frames
    r = Reassembler()
    events = deliver(r, body[:cut] + heads + body[cut:])
    done = of(events, StreamComplete)
    assert done, [e for e in events if isinstance(e, StreamFailed)]
    for got, want in zip(done[0].objects, objs):
        assert_bit_exact(got, want)
    assert r.buffered_bytes == 0


def test_more_than_m_lost_fails_as_a_gap():
    objs = _objects(np.random.default_rng(1), [2000], [np.int8])
    s = StreamSender(3, objs, max_frame_bytes=512, fec=(4, 1))
    heads, data, parity, tail = _split(list(s), s)
    r = Reassembler()
    ev = deliver(r, heads + [data[c] for c in data if c not in (0, 1)] + [p for b in parity.values() for p in b.values()]
                 + [tail])
    assert not of(ev, StreamComplete)
    assert r.buffered_bytes > 0
    (failed,) = of(r.tick(1000.0), StreamFailed)
    assert failed.reason == "gap_after_tail" and failed.missing == [(0, 2 * s.layout.chunk_bytes)]
    assert r.buffered_bytes == 0


def test_parity_is_charged_while_held_and_released():
    objs = _objects(np.random.default_rng(2), [5000], [np.int8])  # 5 chunks: blocks of 3 and 2
    s = StreamSender(4, objs, max_frame_bytes=1100, fec=(3, 2))
    heads, data, parity, tail = _split(list(s), s)
    cb = s.layout.chunk_bytes
    budget = MemoryBudget(1 << 30)
    r = Reassembler(budget=budget)
    deliver(r, heads)
    base = r.buffered_bytes
    assert budget.used == base
    deliver(r, [parity[0][0], parity[0][1], parity[0][0]])  # parity first (a duplicate too): held
    assert r.buffered_bytes == base + 2 * (cb + PARITY_CHUNK_BYTES) + PARITY_BLOCK_BYTES == budget.used
    deliver(r, [data[1]])  # 1 data + 2 parity of k=3: recovers chunks 0 and 2, releases the parity
    assert r.buffered_bytes == base and all(r._streams[4].has(c) for c in range(3))
    deliver(r, [parity[1][1]])
    assert r.buffered_bytes == base + cb + PARITY_CHUNK_BYTES + PARITY_BLOCK_BYTES
    ev = deliver(r, [data[c] for c in range(3, s.layout.chunks)] + [tail])  # block 1 completes: its parity dropped
    assert of(ev, StreamComplete)
    assert r.buffered_bytes == 0 and budget.used == 0
    # a stream that fails while holding parity releases it too
    r = Reassembler(budget=budget)
    deliver(r, heads + [parity[0][0]])
    assert r.buffered_bytes > base
    r.close()
    assert r.buffered_bytes == 0 and budget.used == 0


def test_parity_over_the_limits_is_dropped_and_the_data_still_completes():
    objs = _objects(np.random.default_rng(3), [3000], [np.int8])
    s = StreamSender(5, objs, max_frame_bytes=1100, fec=(3, 1))
    heads, data, parity, tail = _split(list(s), s)
    r = Reassembler()
    deliver(r, heads)
    r.limits = StreamLimits(max_buffered_bytes=r.buffered_bytes + 100)
    deliver(r, [parity[0][0]])
    assert r.dropped_frames == 1 and r.buffered_bytes + 100 == r.limits.max_buffered_bytes
    ev = deliver(r, list(data.values()) + [tail])
    assert of(ev, StreamComplete) and r.buffered_bytes == 0


def test_recovery_through_the_fast_paths(monkeypatch):
    """A data chunk taken by the C fast paths (receive_chunk, place_records) that makes its
    block recoverable: the block is recovered at once."""
    objs = _objects(np.random.default_rng(4), [6000], [np.int8])
    s = StreamSender(6, objs, max_frame_bytes=1100, fec=(4, 1))
    heads, data, parity, tail = _split(list(s), s)
    for records in (False, True):
        before = _codec.fast_path_hits()
        r = Reassembler()
        deliver(r, heads + [parity[0][0], tail])  # parity of block 0 held; chunk 0 lost
        rest = [data[c] for c in range(1, s.layout.chunks)]
        if records:
            buf = bytearray(b"".join(len(f).to_bytes(4, "little") + f for f in rest))
            pos, ev = 0, []
            while pos < len(buf):
                pos2, _, _, e = r.place_records(buf, pos, len(buf), 65536, None, 0.0)
                ev += e
                if pos2 == pos:  # the general path takes one
                    n = int.from_bytes(buf[pos:pos + 4], "little")
                    ev += r.receive(bytes(buf[pos + 4:pos + 4 + n]), 0.0)
                    pos2 = pos + 4 + n
                pos = pos2
        else:
            ev = deliver(r, rest)
        (done,) = of(ev, StreamComplete)
        assert_bit_exact(done.objects[0], objs[0])
        assert r.buffered_bytes == 0
        if _codec.fast_paths():  # the chunks went the C way (with RESONANT_PURE=1 the general path did it all)
            name = "place_records" if records else "place_chunk"
            assert _codec.fast_path_hits()[name] - before[name] == s.layout.chunks - 1


def _parity_frame(sid, seq, payload: bytes, dtype=DType.I8):
    width = {DType.I8: 1, DType.F16: 2}[dtype]
    return _codec.encode(Chunk(Slice(dtype, (len(payload) // width,), payload), stream_id=sid, frame_seq=seq))


@pytest.mark.parametrize("case", ["short", "long", "dtype", "past_last", "no_fec", "tail_seq"])
def test_malformed_parity_is_bad_chunk(case):
    objs = _objects(np.random.default_rng(5), [750], [np.float16])
    s = StreamSender(8, objs, max_frame_bytes=600, fec=(2, 1) if case != "no_fec" else None)
    lay, cb = s.layout, s.layout.chunk_bytes
    seq = lay.chunks + 2
    frame = {"short": lambda: _parity_frame(8, seq, bytes(cb - 1)),
             "long": lambda: _parity_frame(8, seq, bytes(cb + 1)),
             "dtype": lambda: _parity_frame(8, seq, bytes(cb // 2 * 2), DType.F16),
             "past_last": lambda: _parity_frame(8, fec.last_parity_seq(lay.chunks, 2, 1) + 1, bytes(cb)),
             "no_fec": lambda: _parity_frame(8, seq, bytes(cb)),
             "tail_seq": lambda: _parity_frame(8, lay.chunks + 1, bytes(cb))}[case]()
    r = Reassembler()
    ev = deliver(r, s.heads() + [frame])
    (failed,) = of(ev, StreamFailed)
    assert failed.reason == "bad_chunk", failed
    assert r.buffered_bytes == 0


@pytest.mark.parametrize("fec_doc,what", [({"scheme": "rs", "k": 0, "m": 1}, "k 0"),
                                          ({"scheme": "rs", "k": 4, "m": 65}, "max_fec_m"),
                                          ({"scheme": "rs", "k": 224, "m": 64}, "max_fec_pieces"),
                                          ({"scheme": "xor", "k": 4, "m": 1}, "head.fec.scheme"),
                                          ({"scheme": "rs", "k": 4}, "head.fec")])
def test_head_with_fec_the_receiver_cannot_do_is_bad_head(fec_doc, what):
    from stream_helpers import head_frame
    doc = head_doc([{"dtype": int(DType.I8), "shape": [1000], "nbytes": 1000}], chunk_bytes=512, fec=fec_doc)
    (failed,) = deliver(Reassembler(), [head_frame(doc, 3)])
    assert isinstance(failed, StreamFailed) and failed.reason == "bad_head" and what in failed.detail


def test_head_with_fec_without_zfec_is_bad_head(monkeypatch):
    s = StreamSender(2, _objects(np.random.default_rng(6), [900], [np.int8]), max_frame_bytes=600, fec=(2, 1))
    monkeypatch.setattr(fec, "_zfec", None)
    monkeypatch.setitem(__import__("sys").modules, "zfec", None)
    (failed,) = deliver(Reassembler(), s.heads())
    assert failed.reason == "bad_head" and "pip install 'resonant[fec]'" in failed.detail


def test_head_in_parts_carries_fec():
    objs = [np.zeros(3, np.int8)] * 60
    s = StreamSender(11, objs, names=[f"object.number.{i:04d}" for i in range(60)], max_frame_bytes=600, fec=(5, 2))
    assert len(s.heads()) > 1
    heads, data, parity, tail = _split(list(s), s)
    body = [data[c] for c in data if c % 5 != 0] + [p for b in parity.values() for p in b.values()]
    ev = deliver(Reassembler(), heads + body + [tail])
    assert of(ev, StreamStarted)[0].layout.fec == (5, 2)
    assert of(ev, StreamComplete)


@pytest.mark.parametrize("codec", ["zstd", "xchacha", "zstd+xchacha"])
def test_parity_through_a_codec(codec):
    from resonant import Codec, Key
    key = Key.generate()
    send, recv = {"zstd": (Codec(3), Codec(3)), "xchacha": (Codec(key=key), Codec(key=key)),
                  "zstd+xchacha": (Codec(3, key=key), Codec(key=key))}[codec]
    objs = _objects(np.random.default_rng(7), [5000, 33], [np.float32, np.int8])
    s = StreamSender(12, objs, max_frame_bytes=2000, codec=send, fec=(3, 2))
    frames = list(s)
    assert all(len(f) <= 2000 for f in frames)
    lay = s.layout
    # drop data chunks 0 and 2 of every block (two of its five pieces): by position in the sending order
    body, pos = [], 0
    for b in range(fec.blocks(lay.chunks, 3)):
        n = min(3, lay.chunks - 3 * b)
        block = frames[1 + pos:1 + pos + n + 2]
        body += [f for i, f in enumerate(block) if i not in (0, 2)]
        pos += n + 2
    r = Reassembler(codec=recv)
    (done,) = of(deliver(r, [frames[0]] + body[::-1] + [frames[-1]]), StreamComplete)
    for got, want in zip(done.objects, objs):
        assert_bit_exact(got, want)
    assert r.buffered_bytes == 0


def test_parity_after_tail_that_recovers_the_last_chunk_completes_the_stream():
    objs = _objects(np.random.default_rng(8), [3000], [np.int8])
    s = StreamSender(13, objs, max_frame_bytes=1100, fec=(3, 1))
    heads, data, parity, tail = _split(list(s), s)
    r = Reassembler()
    ev = deliver(r, heads + [data[c] for c in data if c != 1] + [tail])
    assert not of(ev, StreamComplete)
    ev = deliver(r, [parity[0][0]])  # the last piece, after TAIL: chunk 1 recovered, the stream complete
    (done,) = of(ev, StreamComplete)
    assert_bit_exact(done.objects[0], objs[0])
    assert r.buffered_bytes == 0 and 13 not in r


def _session_stream(keyed: bool):
    from resonant import Key, Session
    from resonant.stream import StreamComplete as Complete
    key = Key.generate() if keyed else None
    c, s = Session(role="client", key=key), Session(role="server", key=key)
    c.initiate(0.0)
    for d in c.datagrams_to_send():
        s.receive_datagram(d, 0.0)
    for d in s.datagrams_to_send():
        c.receive_datagram(d, 0.0)
    x = np.random.default_rng(9).standard_normal(1_500_000 // 2).astype(np.float16)  # ~1,300 chunks of ~1.1 KB
    events = []
    for f in c.stream(c.new_stream_id(), [x], fec=(16, 2), max_frame_bytes=1200):
        c.send_encoded(f)
        for d in c.datagrams_to_send():
            events += s.receive_datagram(d, 0.0)
    done = [e for e in events if isinstance(e, Complete)]
    assert done and np.array_equal(done[0].objects[0], x)


def test_fec_stream_through_sessions():
    _session_stream(keyed=False)


def test_fec_stream_through_keyed_sessions():
    # (with a key every frame passes the replay window; a chunk of an open stream is taken below it: the
    # parity of block b goes right after the block, far above the next data chunks' frame_seq)
    _session_stream(keyed=True)
