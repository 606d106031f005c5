"""Known-answer tests: the reference implementation's frames (tests/vectors/reference)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import MANIFEST, SHARED_VECTORS, VECTORS, vector_bytes

import resonant
from resonant import DType, Flags, Modality, MsgType, refcodec

HEADER = ("version", "msg_type", "flags", "stream_id", "frame_seq", "num_slices", "space_hash32", "modality")


def test_vendored_vectors_match_shared_copy():
    """tests/vectors is a copy of ../shared/vectors/reference; when that exists they must agree."""
    if not SHARED_VECTORS.exists():
        pytest.skip("../shared/vectors/reference is not beside this checkout")
    shared = sorted(p.name for p in SHARED_VECTORS.iterdir())
    assert shared == sorted(p.name for p in VECTORS.iterdir())
    for name in shared:
        assert (SHARED_VECTORS / name).read_bytes() == (VECTORS / name).read_bytes(), name


def test_every_vector_is_listed():
    assert len(MANIFEST) == 12
    assert sorted(v["file"] for v in MANIFEST) == sorted(p.name for p in VECTORS.glob("*.bin"))


def test_decodes_to_manifest_fields(vector):
    entry, data = vector
    expect = entry["expect"]
    assert len(data) == entry["length"]
    frame = resonant.decode(data)
    for name in HEADER:
        assert getattr(frame, name) == expect[name], name
    assert frame.msg_type == MsgType(expect["msg_type"])
    assert type(frame).MSG_TYPE == frame.msg_type
    assert len(frame.slices) == len(expect["slices"])
    for s, e in zip(frame.slices, expect["slices"]):
        assert s.dtype == DType(e["dtype"])
        assert s.shape == tuple(e["shape"])
        assert s.nbytes == len(s.payload) == e["payload_len"]
        assert hashlib.sha256(s.payload).hexdigest() == e["payload_sha256"]


def test_reencodes_byte_for_byte(vector):
    _, data = vector
    assert resonant.encode(resonant.decode(data)) == data
    assert resonant.encode(resonant.decode(bytearray(data))) == data
    assert resonant.encode(resonant.decode(memoryview(data))) == data
    assert resonant.encode(resonant.decode(np.frombuffer(data, np.uint8))) == data


def test_reference_codec_agrees(vector):
    _, data = vector
    ref = refcodec.decode(data)
    assert refcodec.encode(ref) == data
    assert refcodec.from_frame(resonant.decode(data)) == ref


def test_zstd_flag_without_compression_is_read_and_reported():
    frame = resonant.decode(vector_bytes("02_think_f16_zstd_flag_uncompressed.bin"))
    assert frame.flags == Flags.ZSTD
    assert frame.ignored_flags == Flags.ZSTD  # the flag was not honoured: the body is raw
    assert not frame.hidden.numpy().any()
    assert resonant.decode(vector_bytes("04_think_f16_random.bin")).ignored_flags == Flags(0)
    strong = resonant.decode(vector_bytes("11_flags_all_modalities.bin"))
    assert strong.flags == Flags.STRONG_TAIL and strong.ignored_flags == Flags(0)


def test_roles_of_reference_messages():
    crit2 = resonant.decode(vector_bytes("03_critique_two_slices.bin"))
    assert crit2.mask is None
    assert crit2.explanation.json() == {"note": "divergence at dims [3, 17]", "magnitude": 0.042}
    assert crit2.divergence.numpy().shape == (16,)
    crit3 = resonant.decode(vector_bytes("12_critique_three_slices.bin"))
    assert crit3.mask.tobytes() == bytes([1, 2, 3, 4, 5])
    assert crit3.explanation.json() == {}
    ask = resonant.decode(vector_bytes("06_ask_i8_query_and_context.bin"))
    assert ask.query.numpy().dtype == np.int8 and ask.query.shape == (384,)
    assert ask.context.text() == "what is the capital of France?"
    ping = resonant.decode(vector_bytes("01_sync_ping.bin"))
    assert ping.json.json() == {"method": "ping", "ts": 1730616000}
    heart = resonant.decode(vector_bytes("09_heart_no_slices.bin"))
    assert heart.slices == () and heart.json is None
    kv = resonant.decode(vector_bytes("05_cache_kv.bin"))
    assert kv.keys.numpy().shape == kv.values.numpy().shape == (2, 4, 8, 16)


def test_numpy_views_share_the_received_buffer():
    data = bytearray(vector_bytes("04_think_f16_random.bin"))
    frame = resonant.decode(data)
    arr = frame.hidden.numpy()
    assert arr.dtype == np.dtype("<f2") and arr.shape == (1, 2048)
    assert np.shares_memory(arr, np.frombuffer(data, np.uint8))
    before = arr[0, 0]
    off = data.index(frame.hidden.tobytes()[:64])
    data[off:off + 2] = np.float16(1234.0).tobytes()
    assert arr[0, 0] == np.float16(1234.0) != before  # a view, not a copy
    assert np.asarray(frame.hidden) is not None and np.asarray(frame.hidden).shape == (1, 2048)


def test_payload_of_bytes_input_is_read_only_view():
    data = vector_bytes("04_think_f16_random.bin")
    frame = resonant.decode(data)
    p = frame.hidden.payload
    assert isinstance(p, memoryview) and p.readonly and p.nbytes == 4096
    assert np.shares_memory(np.frombuffer(p, np.uint8), np.frombuffer(data, np.uint8))
    with pytest.raises(TypeError):
        p[0] = 1
    del frame, data  # the view keeps the received buffer alive
    assert hashlib.sha256(p).hexdigest() == MANIFEST[3]["expect"]["slices"][0]["payload_sha256"]


def test_q4_and_sparse_have_no_numpy_view():
    q4 = resonant.decode(vector_bytes("07_think_q4_odd.bin")).hidden
    with pytest.raises(resonant.UnsupportedDType, match=r"^dtype: Q4 has no numpy view; use \.payload$"):
        q4.numpy()
    sp = resonant.decode(vector_bytes("10_sparse_coo_opaque.bin")).hidden
    assert sp.dtype == DType.SPARSE_COO and sp.shape == (4, 100) and sp.nbytes == 60
    with pytest.raises(TypeError):
        sp.numpy()


def test_api_builds_the_reference_bytes():
    """Frames that use only the reference's features are byte-identical to what it builds."""
    sid, h = 0xABCD1234, 2451163210
    ping = resonant.Sync({"method": "ping", "ts": 1730616000}, stream_id=sid, space_hash32=h)
    assert resonant.encode(ping) == vector_bytes("01_sync_ping.bin")
    zeros = resonant.Think(np.zeros((1, 2048), np.float16), stream_id=sid, frame_seq=1, space_hash32=h,
                           flags=Flags.ZSTD)
    assert resonant.encode(zeros) == vector_bytes("02_think_f16_zstd_flag_uncompressed.bin")
    crit = resonant.Critique(np.zeros(16, np.float16),
                             explanation={"note": "divergence at dims [3, 17]", "magnitude": 0.042},
                             stream_id=sid, frame_seq=2, space_hash32=h)
    assert resonant.encode(crit) == vector_bytes("03_critique_two_slices.bin")
    kv = resonant.decode(vector_bytes("05_cache_kv.bin"))
    rebuilt = resonant.Cache(kv.keys.numpy(), kv.values.numpy(), stream_id=9, frame_seq=3, space_hash32=h)
    assert resonant.encode(rebuilt) == vector_bytes("05_cache_kv.bin")
    ask = resonant.decode(vector_bytes("06_ask_i8_query_and_context.bin"))
    rebuilt = resonant.Ask(ask.query.numpy(), "what is the capital of France?", stream_id=11, space_hash32=h)
    assert resonant.encode(rebuilt) == vector_bytes("06_ask_i8_query_and_context.bin")
    heart = resonant.Sync(stream_id=14, frame_seq=7, space_hash32=h)
    assert resonant.encode(heart) == vector_bytes("09_heart_no_slices.bin")
    big = resonant.decode(vector_bytes("08_think_near_64k.bin"))
    rebuilt = resonant.Think(big.hidden.numpy(), stream_id=13, frame_seq=6, space_hash32=h, modality=Modality.MIXED)
    assert resonant.encode(rebuilt) == vector_bytes("08_think_near_64k.bin")


def test_views_keep_the_received_buffer_alive():
    import gc
    data = bytearray(vector_bytes("05_cache_kv.bin"))
    frame = resonant.decode(data)
    keys = frame.keys.numpy()
    expected = keys.copy()
    assert keys.base is frame.keys and not keys.flags.writeable
    with pytest.raises(BufferError):
        data.extend(b"x")  # the decoded frame pins the buffer: it cannot be resized under the view
    del frame, data
    gc.collect()
    np.testing.assert_array_equal(keys, expected)
