"""resonant.records: TCP record framing (frame_record, RecordReader)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resonant.errors import FramingError
from resonant.records import RecordReader, frame_record


def _vectors() -> list[bytes]:
    import glob
    import os
    here = os.path.dirname(__file__)
    return [open(p, "rb").read() for p in sorted(glob.glob(os.path.join(here, "vectors/reference/*.bin")))]


def test_records_whole_and_byte_by_byte():
    frames = _vectors()
    stream = b"".join(frame_record(f) for f in frames)
    r = RecordReader()
    assert [bytes(v) for v in r.feed(stream)] == frames
    r = RecordReader()
    got = []
    for i in range(len(stream)):
        got += [bytes(v) for v in r.feed(stream[i:i + 1])]
    assert got == frames and r.pending == 0


@given(st.lists(st.integers(1, 70000), max_size=8))
def test_records_any_split(cuts):
    frames = _vectors()
    stream = b"".join(frame_record(f) for f in frames)
    bounds = sorted({0, len(stream), *(c % len(stream) for c in cuts)})
    r = RecordReader(read_size=4096)
    got = []
    for a, b in zip(bounds, bounds[1:]):
        got += [bytes(v) for v in r.feed(stream[a:b])]
    assert got == frames


def test_record_length_limits():
    r = RecordReader()
    with pytest.raises(FramingError, match=r"record.length: 4294967295 is outside 1..max_frame_bytes \(65536\)"):
        r.feed(b"\xff\xff\xff\xff")
    with pytest.raises(FramingError):  # stays broken
        r.feed(frame_record(_vectors()[0]))
    with pytest.raises(FramingError, match="record.length: 0"):
        RecordReader().feed(b"\x00\x00\x00\x00")
    r = RecordReader()  # records before a bad length are delivered; the error follows
    rec = frame_record(_vectors()[0])
    assert [bytes(v) for v in r.feed(rec + b"\x00\x00\x00\x00")] == [rec[4:]]
    assert r.broken is not None and r.broken.path == "record.length"
    with pytest.raises(FramingError, match="record.length: 0"):
        r.feed(rec)


def test_records_one_per_read():
    """A read holding exactly one record (the common case for small messages) gives a view of
    the read itself; anything else (a longer length, two records, a bad length) the general way."""
    frames = _vectors()
    r = RecordReader()
    for f in frames:
        rec = frame_record(f)
        (v,) = r.feed(rec)
        assert bytes(v) == f and v.obj is rec
    assert r.consumed == sum(len(f) + 4 for f in frames) and r.pending == 0
    r = RecordReader(max_frame_bytes=1000)
    big = frame_record(bytes(1001))
    with pytest.raises(FramingError, match=r"record.length: 1001 is outside 1..max_frame_bytes \(1000\)"):
        r.feed(big)
    r = RecordReader()
    rec = frame_record(frames[0])
    assert r.feed(rec[:-1]) == [] and [bytes(v) for v in r.feed(rec[-1:] + rec)] == [frames[0], frames[0]]
    long = b"\x10\x00\x00\x00" + bytes(8)  # announces 16 bytes, carries 8: kept for the next read
    assert RecordReader().feed(long) == []


def test_truncated_record_at_eof():
    r = RecordReader()
    rec = frame_record(_vectors()[0])
    r.feed(rec[:10])
    with pytest.raises(FramingError, match="ended 10 bytes into a record of"):
        r.eof()
    RecordReader().eof()  # nothing pending: fine
