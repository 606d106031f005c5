"""Hypothesis round-trips for every message type, dtype and modality; Cython vs plain Python;
and the message-building API."""

from __future__ import annotations

import numpy as np
import pytest
import strategies
from hypothesis import given
from hypothesis import strategies as st

import resonant
from resonant import DType, Flags, Modality, MsgType, Slice, refcodec


def roundtrip(frame: resonant.Frame) -> bytes:
    data = resonant.encode(frame)
    back = resonant.decode(data)
    assert back == frame
    assert type(back) is type(frame)
    assert resonant.encode(back) == data
    ref = refcodec.decode(data)  # the second codec reads the same fields
    assert ref == refcodec.from_frame(frame)
    assert refcodec.encode(ref) == data
    return data


@pytest.mark.parametrize("msg_type", list(MsgType), ids=lambda m: m.name)
@given(data=st.data())
def test_roundtrip_every_message_type(msg_type, data):
    roundtrip(data.draw(strategies.frames(msg_type)))


@pytest.mark.parametrize("dtype", list(DType), ids=lambda d: d.name)
@given(data=st.data())
def test_roundtrip_every_dtype(dtype, data):
    s = data.draw(strategies.slices(dtype))
    modality = data.draw(st.sampled_from(list(Modality)))
    roundtrip(resonant.Think(s, modality=modality, stream_id=1))
    roundtrip(resonant.Cache(s, s, modality=modality))


@pytest.mark.parametrize("modality", list(Modality), ids=lambda m: m.name)
def test_roundtrip_every_modality(modality):
    frame = resonant.Think(np.arange(6, dtype=np.float16).reshape(2, 3), modality=modality)
    assert resonant.decode(roundtrip(frame)).modality is modality


@given(st.integers(0, 7), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1))
def test_header_fields_over_their_range(flags, stream_id, frame_seq, space):
    frame = resonant.Sync({"method": "ping"}, flags=flags, stream_id=stream_id, frame_seq=frame_seq,
                          space_hash32=space)
    back = resonant.decode(roundtrip(frame))
    assert (back.flags, back.stream_id, back.frame_seq, back.space_hash32) == (flags, stream_id, frame_seq, space)


@given(strategies.liberal_frames())
def test_roundtrip_liberal_frames(frame):
    """Any number of slices of any dtype in any message type (and no slices in either form):
    decoded by both codecs with the same layout verdict, re-encoded byte for byte."""
    data = roundtrip(frame)
    back = resonant.decode(data)
    assert back.layout_ok == frame.layout_ok and back.layout_reason == frame.layout_reason
    assert back.empty_slice_len == frame.empty_slice_len
    assert len(data) == len(resonant.encode(frame.replace(slices=frame.slices))) 
    if not frame.layout_ok:
        with pytest.raises(resonant.errors.LayoutError) as exc:
            resonant.decode(data, strict=True)
        assert str(exc.value) == frame.layout_reason
        with pytest.raises(resonant.errors.LayoutError):
            refcodec.decode(data, strict=True)


@given(strategies.frames())
def test_codecs_agree_on_generated_frames(frame):
    data = resonant.encode(frame)
    assert refcodec.decode(data) == refcodec.from_frame(resonant.decode(data))


# ------------------------------------------------------------------ the building API


def test_think_from_one_array_with_defaults():
    h = np.random.default_rng(0).standard_normal((1, 384)).astype(np.float16)
    t = resonant.Think(h)
    assert (t.version, t.msg_type, t.flags, t.stream_id, t.frame_seq, t.space_hash32, t.modality) == (
        1, MsgType.THINK, Flags(0), 0, 0, 0, Modality.TEXT)
    assert t.hidden.dtype == DType.F16 and t.hidden.shape == (1, 384)
    back = resonant.decode(resonant.encode(t))
    np.testing.assert_array_equal(back.hidden.numpy(), h)


def test_from_array_does_not_copy_contiguous_input():
    h = np.ones((4, 8), np.float16)
    s = Slice.from_array(h)
    assert np.shares_memory(s.numpy(), h)


def test_from_array_big_endian_and_strided_input_is_converted():
    be = np.arange(12, dtype=">f2").reshape(3, 4)
    s = Slice.from_array(be)
    assert s.dtype == DType.F16
    np.testing.assert_array_equal(s.numpy(), be.astype("<f2"))
    strided = np.arange(20, dtype=np.int8).reshape(4, 5)[:, ::2]
    np.testing.assert_array_equal(Slice.from_array(strided).numpy(), strided)


class _NotQuiteNdarray(np.ndarray):
    """An ndarray subclass: Slice.from_array takes its general path for it, not the C one."""


def _slice_or_error(make):
    try:
        s = make()
    except resonant.EncodeError as exc:
        return ("error", exc.path, exc.detail)
    return (int(s.dtype), s.shape, s.tobytes())


@given(dtype=st.sampled_from(["<f2", ">f2", "<f4", "<i1", "<u1", "<i4", "<f8", "bool", "bfloat16"]),
       shape=st.lists(st.integers(0, 5), min_size=0, max_size=9), order=st.sampled_from(["C", "F", "strided"]))
def test_from_array_fast_path_matches_the_general_path(dtype, shape, order):
    """Slice.from_array and messages built from arrays take a C path for exact ndarrays; it gives
    the same slice (dtype, shape, bytes) or the same error as the general path, for every dtype,
    rank (0 to 9: over max_dims), layout and empty shape."""
    import ml_dtypes
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    a = (np.arange(int(np.prod(shape)), dtype=np.float64) % 7).astype(dt).reshape(shape, order="C" if order != "F" else "F")
    if order == "strided" and a.ndim:
        a = a[..., ::2]
    fast = _slice_or_error(lambda: Slice.from_array(a))
    assert fast == _slice_or_error(lambda: Slice.from_array(a.view(_NotQuiteNdarray)))
    if fast[0] != "error":
        assert fast[1] == a.shape
        if a.flags.c_contiguous and a.dtype.byteorder != ">":
            assert np.shares_memory(Slice.from_array(a).numpy(), a) or a.size == 0
    msg = _slice_or_error(lambda: resonant.Think(a).hidden)
    assert msg == _slice_or_error(lambda: resonant.Think(a.view(_NotQuiteNdarray)).hidden)


def test_float64_needs_an_explicit_dtype():
    x = np.ones(4, np.float64)
    with pytest.raises(resonant.EncodeError, match=r"^hidden\.dtype: no dtype for numpy float64"):
        resonant.Think(x)
    t = resonant.Think(Slice.from_array(x, dtype=DType.F16))
    assert t.hidden.numpy().dtype == np.float16


def test_bf16_and_f32_round_trip_without_widening():
    import ml_dtypes
    x = np.random.default_rng(3).standard_normal((4, 96)).astype(np.float32)
    for dtype, arr in ((DType.F32, x), (DType.BF16, x.astype(ml_dtypes.bfloat16))):
        t = resonant.Think(arr)
        assert t.hidden.dtype == dtype and t.hidden.nbytes == arr.nbytes
        back = resonant.decode(resonant.encode(t)).hidden.numpy()
        assert back.dtype == arr.dtype and back.shape == arr.shape
        np.testing.assert_array_equal(back.view(np.uint8), arr.view(np.uint8))


def test_text_and_json_roles():
    c = resonant.Critique(np.zeros(8, np.float16), np.array([1, 0, 1], np.int8), {"note": "x"})
    assert c.mask.numpy().tolist() == [1, 0, 1] and c.explanation.json() == {"note": "x"}
    only_mask = resonant.Critique(np.zeros(8, np.float16), mask=np.array([1], np.int8))
    assert len(only_mask.slices) == 3 and only_mask.explanation.nbytes == 0  # explanation slot left empty
    a = resonant.Ask(np.zeros(4, np.int8), context="héllo")
    assert resonant.decode(resonant.encode(a)).context.text() == "héllo"
    s = resonant.Sync(b'{"method": "ping"}')
    assert s.json.json() == {"method": "ping"}


def test_replace_returns_a_modified_copy():
    t = resonant.Think(np.zeros(4, np.float16), stream_id=1)
    u = t.replace(frame_seq=9, flags=Flags.STRONG_TAIL)
    assert (t.frame_seq, u.frame_seq, u.stream_id, u.flags) == (0, 9, 1, Flags.STRONG_TAIL)
    assert u.hidden == t.hidden
    with pytest.raises(TypeError, match="unexpected field 'colour'"):
        t.replace(colour=1)


def test_messages_are_immutable():
    t = resonant.Think(np.zeros(4, np.float16))
    with pytest.raises(AttributeError):
        t.stream_id = 3
    with pytest.raises(TypeError):
        hash(t)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: resonant.Think(np.zeros(4, np.float16), stream_id=2**32), r"^stream_id: 4294967296 is not an integer that fits u32$"),
        (lambda: resonant.Think(np.zeros(4, np.float16), frame_seq=-1), r"^frame_seq: -1 is not an integer that fits u64$"),
        (lambda: resonant.Think(np.zeros(4, np.float16), modality=9), r"^modality: 9 is not a modality"),
        (lambda: resonant.Think(np.zeros(4, np.float16), flags=8), r"^flags: 8 has bits outside"),
        (lambda: resonant.Think("text"), r"^hidden: expected a numpy array or Slice, got str$"),
        (lambda: resonant.Cache(np.zeros(4, np.float16), None), r"^values: Cache with keys needs values$"),
        (lambda: resonant.Think(np.zeros(40000, np.float16)), r"^hidden\.payload: 80000 bytes, more than max_frame_bytes \(65536\)$"),
        (lambda: resonant.encode(resonant.Cache(np.zeros(20000, np.float16), np.zeros(20000, np.float16))),
         r"^frame: 80053 bytes, more than max_frame_bytes \(65536\); send it as a stream$"),
        (lambda: Slice(DType.F16, (3,), b"\0" * 5), r"^payload: F16 of shape \(3,\) \(3 elements\) needs 6 bytes, the payload is 5$"),
        (lambda: Slice(DType.Q4, (3,), b"\0" * 3), r"^payload: Q4 of shape \(3,\) \(3 elements\) needs 2 bytes, the payload is 3$"),
        (lambda: Slice(0x42, (3,), b""), r"^dtype: 66 is not a dtype"),
        (lambda: Slice(DType.I8, (1,) * 9, b"\0"), r"^shape: 9 dimensions, more than max_dims \(8\)$"),
        (lambda: Slice(DType.I8, (2**32,), b""), r"^shape\[0\]: 4294967296 does not fit u32$"),
        (lambda: Slice(DType.I8, (1,), "x"), r"^payload: expected a bytes-like object, got str$"),
        # (make_frame builds any slices the wire allows, issue 16: the typed constructors check roles)
        (lambda: resonant.make_frame(MsgType.SYNC, [Slice.from_text("")] * 1025), r"^slices: 1025 slices, more than max_slices \(1024\)$"),
        (lambda: resonant.make_frame(MsgType.SYNC, [Slice.from_text("")], empty_slice_len=True), r"^empty_slice_len: applies to a frame with no slices, this one has 1$"),
        (lambda: resonant.Sync(Slice.from_array(np.zeros(2, np.float16))), r"^slices\[0\]: the json slice carries text"),
        (lambda: resonant.Think(np.array(1.5, np.float16)), r"^hidden\.shape: a 0-D tensor \(empty shape\): reshape it to \[1\]: the reference rejects an empty shape$"),
        (lambda: resonant.encode(resonant.Think(Slice(DType.F16, (), b"\0\0"))), r"^slices\[0\]\.shape: a 0-D tensor"),
    ],
)
def test_encode_errors_name_the_field(build, message):
    with pytest.raises(resonant.EncodeError, match=message):
        build()


def test_encode_rejects_non_frames():
    with pytest.raises(TypeError):
        resonant.encode(b"not a frame")
    with pytest.raises(TypeError):
        resonant.Frame()


def test_empty_and_zero_sized_slices():
    t = resonant.Think(np.zeros((0, 5), np.float16))
    back = resonant.decode(roundtrip(t))
    assert back.hidden.shape == (0, 5) and back.hidden.numpy().size == 0
    # A 0-D tensor is refused on encode (the reference rejects an empty shape: reshape it to [1],
    # issue 16); a 0-D frame from an older resonant peer still decodes, and is not sent on.
    with pytest.raises(resonant.EncodeError, match=r"reshape it to \[1\]"):
        resonant.Think(np.array(1.5, np.float16))
    old = refcodec.encode(refcodec.RefFrame(version=1, msg_type=0, flags=0, stream_id=0, frame_seq=0, space_hash32=0,
                                            modality=0, slices=(refcodec.RefSlice(1, (), np.float16(1.5).tobytes()),)))
    back = resonant.decode(old)
    assert back.hidden.shape == () and back.hidden.numpy() == np.float16(1.5) and back.layout_ok
    with pytest.raises(resonant.EncodeError, match=r"^slices\[0\]\.shape: a 0-D tensor"):
        resonant.encode(back)
