"""resonant.stream_sender: the sender's errors, its chunk encoding (single and batched, against
the general encoder) and its zero-copy TCP records."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import resonant
from resonant import Chunk, DType, Slice, StreamSender
from resonant.errors import EncodeError


# ------------------------------------------------------------------ sender errors


@pytest.mark.parametrize(
    "objects, kwargs, message",
    [
        ([], {}, "objects: a stream needs at least one object"),
        ([np.zeros(2, np.float16)] * 2, {"names": ["a"]}, "names: 1 names for 2 objects"),
        ([np.zeros(2, np.float16)] * 2, {"names": ["a", "b", "c"]}, "names: 3 names for 2 objects"),
        ([np.zeros(2, np.float16)] * 2, {"layers": [0, 1, 2]}, "layers: 3 layers for 2 objects"),
        ([np.zeros(2, np.float16)], {"layers": []}, "layers: 0 layers for 1 objects"),
        ([np.zeros(2, np.float16)], {"max_frame_bytes": 511}, "max_frame_bytes: 511 is not in 512..65536"),
        ([np.zeros(2, np.float16)], {"max_frame_bytes": 65537}, "max_frame_bytes: 65537 is not in 512..65536"),
        ([np.zeros(2, np.float16)], {"max_frame_bytes": 0}, "max_frame_bytes: 0 is not in 512..65536"),
        ([np.zeros(2, np.float16), np.zeros(2, np.float64)], {},
         "objects[1].dtype: no dtype for numpy float64; convert it (e.g. to float16) first"),
        ([np.zeros(2, np.int64)], {}, "objects[0].dtype: no dtype for numpy int64; convert it (e.g. to float16) first"),
    ],
)
def test_sender_errors(objects, kwargs, message):
    with pytest.raises(EncodeError) as exc:
        StreamSender(1, objects, **kwargs)
    assert str(exc.value) == message


def test_max_frame_bytes_bounds_are_accepted():
    for mfb in (512, 65536):
        sender = StreamSender(1, [np.arange(1000, dtype=np.float16)], max_frame_bytes=mfb)
        assert sender.layout.chunk_bytes == (468 if mfb == 512 else 65492)
        assert max(len(f) for f in list(sender)[1:-1]) <= mfb


def test_sender_rejects_a_bad_name_with_encode_error():
    with pytest.raises(EncodeError) as exc:
        StreamSender(116, [np.zeros(2, np.float16)], names=["x" * 300])
    assert "names[0]" in str(exc.value) or "name" in exc.value.path


# ------------------------------------------------------------------ chunk encoding


def test_chunk_fast_path_writes_the_same_bytes_as_the_general_encoder():
    from resonant import _codec
    src = np.random.default_rng(5).standard_normal(3000).astype(np.float16)
    view = memoryview(src.view(np.uint8))
    for start, length in ((0, 6000), (100, 468), (5998, 2), (0, 0)):
        fast = _codec.encode_chunk(7, 3, 99, 2, DType.F16, length // 2, view, start, length)
        slow = resonant.encode(resonant.Chunk(Slice(DType.F16, (length // 2,), view[start:start + length]),
                                              stream_id=7, frame_seq=3, space_hash32=99, modality=2))
        assert fast == slow
    with pytest.raises(EncodeError, match=r"^source: bytes 5000\.\.7000 are outside a 6000-byte source$"):
        _codec.encode_chunk(7, 3, 0, 0, DType.F16, 1000, view, 5000, 2000)
    with pytest.raises(EncodeError, match=r"^payload: F16 of 10 elements does not take 30 bytes$"):
        _codec.encode_chunk(7, 3, 0, 0, DType.F16, 10, view, 0, 30)


def test_batched_chunk_encoding_gives_the_general_encoders_frames():
    objs = [np.random.default_rng(51).standard_normal(70_001).astype(np.float16), np.arange(5, dtype=np.float32),
            np.arange(3000, dtype=np.int8), np.zeros(0, np.float16)]
    for mfb in (600, 4096, 65536):
        sender = StreamSender(9, objs, max_frame_bytes=mfb, space_hash32=77, modality=2)
        frames = list(sender)
        cb = sender.layout.chunk_bytes
        want = []
        for o in sender.layout.objects:
            raw = np.ascontiguousarray(objs[o.index]).view(np.uint8).reshape(-1)
            width = resonant._codec.element_bytes(o.dtype)
            for j in range(o.chunks):
                piece = raw[j * cb:(j + 1) * cb]
                dtype = o.dtype if width else DType.I8
                want.append(resonant.encode(Chunk(Slice(dtype, (len(piece) // (width or 1),), piece),
                                                  stream_id=9, frame_seq=o.first_chunk + j + 1, space_hash32=77,
                                                  modality=2)))
        assert frames[len(sender.heads()):-1] == want


# ------------------------------------------------------------------ zero-copy TCP records


def _objects_for_records(kind: str) -> list:
    rng = np.random.default_rng(17)
    if kind == "one":
        return [rng.standard_normal(30_000).astype(np.float16)]
    if kind == "layers":
        return [rng.standard_normal((3, 1000 + 77 * i)).astype(np.float16) for i in range(5)]
    if kind == "mixed":
        return [rng.standard_normal(5000).astype(np.float32), np.arange(7, dtype=np.int8),
                np.zeros(0, np.float16), rng.standard_normal(4097).astype(ml_dtypes.bfloat16)]
    raise AssertionError(kind)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["one", "layers", "mixed"]), per_write=st.sampled_from([1, 3, 8, 1024]),
       max_frame=st.sampled_from([600, 4096, 65536]), how=st.sampled_from(["plain", "zstd", "md5"]))
def test_records_are_the_frames_behind_their_lengths(kind, per_write, max_frame, how):
    """StreamSender.records() gives, joined, exactly the TCP records of the frames iter() gives;
    without a codec the chunk payloads are views of the objects, not copies."""
    from resonant.records import frame_record
    objects = _objects_for_records(kind)
    kw = {"max_frame_bytes": max_frame, "codec": resonant.Codec(3) if how == "zstd" else None,
          "legacy_md5": how == "md5", "space_hash32": 77}
    want = b"".join(frame_record(f) for f in StreamSender(9, objects, **kw))
    sender = StreamSender(9, objects, **kw)
    lists = list(sender.records(per_write))
    assert b"".join(bytes(p) for parts in lists for p in parts) == want
    chunks = sender.layout.chunks
    assert all(sum(isinstance(p, memoryview) for p in parts) <= per_write for parts in lists)
    views = [p for parts in lists for p in parts if isinstance(p, memoryview)]
    if how == "plain" and resonant.fast_paths():  # (RESONANT_PURE: the chunks are encoded as frames)
        assert len(views) == chunks
        if kind != "mixed":  # float16 C-contiguous objects are sent from where they lie
            assert all(any(np.shares_memory(np.frombuffer(v, np.uint8), o.view(np.uint8).reshape(-1))
                           for o in objects) for v in views)
    else:
        assert not views
    assert sender.digest() == StreamSender(9, objects, **kw).digest()


def test_records_per_write_is_checked():
    with pytest.raises(ValueError, match="per_write 0 is outside 1..1024"):
        next(StreamSender(1, [np.ones(10, np.float16)]).records(0))


@pytest.mark.parametrize("names, layers", [(None, None), (["k0", "v0", "k0", "x"], [0, 0, 1, 1]), (None, [3, 3, 2, 2])])
def test_head_frame_carries_the_head_document_as_compact_json(names, layers):
    """The HEAD's JSON is compact_json of head_document(),
    byte for byte, alike and different objects, with and without names and layers."""
    from resonant.stream_layout import compact_json
    objects = [np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), np.ones(5, np.float16),
               np.zeros((2, 3), np.float32)]
    sender = StreamSender(1, objects, names=names, layers=layers)
    frame = resonant.decode(sender.head())
    assert bytes(frame.json.payload) == compact_json(sender.layout.head_document())
