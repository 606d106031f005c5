"""Liberal decoding (issue 16 part 2): decode what the wire allows, check roles where asked.

Any number of slices of any dtype in any message type is a valid V-Frame (the reference writes and
reads them): resonant.decode returns the message class with layout_ok / layout_reason; strict=True,
SessionConfig(strict_layout=True) and `resonant recv --strict` refuse such frames (LayoutError).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import resonant
from resonant import DType, MsgType, Session, SessionConfig, Slice, Sync, Think, refcodec
from resonant.errors import EncodeError, LayoutError
from resonant.session import FrameRejected, MessageReceived
from test_transport import HOST, receiver, udp  # noqa: F401  (helpers, not tests)

F16 = lambda *shape: np.arange(int(np.prod(shape)), dtype=np.float16).reshape(shape)  # noqa: E731


def two_layer_cache(**header) -> bytes:
    """A Cache carrying K and V of two layers: 4 slices (valid on the wire, fits no Cache layout)."""
    return resonant.encode(resonant.make_frame(MsgType.CACHE, [Slice.from_array(F16(2, 4))] * 4, **header))


# ------------------------------------------------------------------ decode


def test_decode_is_liberal_and_strict_on_request():
    data = two_layer_cache(stream_id=3)
    frame = resonant.decode(data)
    assert isinstance(frame, resonant.Cache) and len(frame.slices) == 4
    assert frame.layout_ok is False
    assert frame.layout_reason == "num_slices: Cache carries 2 slices, got 4 (at byte 16)"
    assert frame.keys is None and frame.values is None  # no Cache layout has 4 slices: use .slices
    assert resonant.encode(frame) == data
    with pytest.raises(LayoutError) as exc:
        resonant.decode(data, strict=True)
    assert str(exc.value) == frame.layout_reason and exc.value.path == "num_slices" and exc.value.offset == 16
    with pytest.raises(LayoutError):
        resonant.Codec().decode(data, strict=True)
    assert refcodec.decode(data) == refcodec.from_frame(frame)


def test_fitting_frames_say_so():
    for frame in (Think(F16(1, 8)), resonant.Cache(F16(2), F16(2)), resonant.Ask(F16(4), "context"), Sync(),
                  Sync({"method": "ping"}), resonant.Critique(F16(4), explanation={"why": 1})):
        back = resonant.decode(resonant.encode(frame))
        assert frame.layout_ok and frame.layout_reason is None
        assert back.layout_ok and back.layout_reason is None
        assert resonant.decode(resonant.encode(frame), strict=True) == frame


def test_text_role_of_the_wrong_dtype_decodes_and_its_property_is_none():
    frame = resonant.make_frame(MsgType.ASK, [Slice.from_array(F16(4)), Slice.from_array(F16(4))], stream_id=2)
    assert not frame.layout_ok
    assert frame.layout_reason.startswith("slices[1].dtype: the context slice of Ask carries text: it must be I8 "
                                          "of one dimension, got F16 of 1 dimensions (at byte ")
    back = resonant.decode(resonant.encode(frame))
    assert back.layout_reason == frame.layout_reason  # the same text, built or decoded
    assert back.query is back.slices[0] and back.context is None


def test_typed_constructors_keep_checking_roles():
    with pytest.raises(EncodeError, match=r"^slices\[1\]: the context slice carries text"):
        resonant.Ask(F16(4), Slice.from_array(F16(4)))
    with pytest.raises(EncodeError, match=r"^slices\[0\]: the json slice carries text"):
        Sync(Slice.from_array(F16(4)))


def test_make_frame_builds_what_the_wire_allows():
    think0 = resonant.make_frame(MsgType.THINK, [])
    assert not think0.layout_ok and think0.hidden is None
    assert resonant.decode(resonant.encode(think0)) == think0
    big = resonant.make_frame(MsgType.CACHE, [Slice.from_text(b"x")] * 1024)
    assert len(resonant.decode(resonant.encode(big)).slices) == 1024
    with pytest.raises(EncodeError, match="more than max_slices"):
        resonant.make_frame(MsgType.CACHE, [Slice.from_text(b"x")] * 1025)
    # replace() keeps what the frame is: a misfit stays one, a fitting frame made to misfit says so
    t = Think(F16(4)).replace(slices=[Slice.from_array(F16(4))] * 2)
    assert type(t) is Think and not t.layout_ok
    assert t.replace(stream_id=9).layout_reason == t.layout_reason


def test_repr_of_a_misfit_shows_its_slices():
    r = repr(resonant.decode(two_layer_cache()))
    assert r.startswith("Cache(") and "slices=(" in r and "layout_ok=False" in r


# ------------------------------------------------------------------ a 2-slice Critique, by content


@pytest.mark.parametrize("second, role", [
    (Slice.from_json({"note": "divergence", "magnitude": 0.5}), "explanation"),  # the reference README's form
    (Slice.from_text("plain text, no JSON"), "explanation"),
    (Slice.from_text(b""), "explanation"),
    (Slice.from_array(np.array([0, 1, 1, 0], np.int8)), "mask"),  # the reference code's form (init.rs)
    (Slice.from_array(np.array([[0, 1, 1, 0]], np.int8)), "mask"),  # 2-D: never text
    (Slice.from_array(F16(4)), "mask"),
    (Slice(DType.I8, (3,), b"\xff\xfe\xfd"), "mask"),  # not UTF-8
])
def test_two_slice_critique_second_slice_by_content(second, role):
    frame = resonant.make_frame(MsgType.CRITIQUE, [Slice.from_array(F16(4)), second])
    back = resonant.decode(resonant.encode(frame))
    assert back.layout_ok and frame.layout_ok  # either reading fits
    other = "mask" if role == "explanation" else "explanation"
    assert getattr(back, role) is back.slices[1] and getattr(back, other) is None
    assert back.divergence is back.slices[0]
    assert refcodec.decode(resonant.encode(frame)).layout_ok


def test_constructor_with_a_mask_sends_three_slices():
    c = resonant.Critique(F16(4), mask=np.array([0, 1, 1, 0], np.int8))
    assert len(c.slices) == 3 and c.mask is c.slices[1] and c.explanation.tobytes() == b""


# ------------------------------------------------------------------ the two forms of a frame with no slices


def test_empty_frame_in_both_forms():
    spec_form = resonant.encode(Sync(stream_id=5))
    rust_form = resonant.encode(resonant.make_frame(MsgType.SYNC, [], stream_id=5, empty_slice_len=True))
    assert len(spec_form) == 33 and len(rust_form) == 37
    assert rust_form[24:28] == b"\0\0\0\0" and rust_form[:24] == spec_form[:24]
    for data, empty in ((spec_form, False), (rust_form, True)):
        for decode in (resonant.decode, refcodec.decode):
            f = decode(data)
            assert f.empty_slice_len is empty and f.layout_ok and f.slices == ()
        f = resonant.decode(data)
        assert f.stream_id == 5 and resonant.encode(f) == data  # re-encoded in the form received
        assert resonant.encode(f.replace(frame_seq=1))[:1] and len(resonant.encode(f.replace(frame_seq=1))) == len(data)
        assert refcodec.encode(refcodec.decode(data)) == data
    assert resonant.decode(spec_form) == resonant.decode(rust_form)  # the same message


def test_rust_form_needs_a_zero_entry_and_version_1():
    rust_form = bytearray(resonant.encode(resonant.make_frame(MsgType.SYNC, [], empty_slice_len=True)))
    rust_form[24] = 1  # a slice_len of 1 for no slice: not that form, 4 bytes too many
    from resonant._codec import crc32
    rust_form[-4:] = crc32(bytes(rust_form[:-4])).to_bytes(4, "little")
    with pytest.raises(resonant.errors.TrailingBytes):
        resonant.decode(bytes(rust_form))
    with pytest.raises(resonant.errors.TrailingBytes):
        refcodec.decode(bytes(rust_form))


# ------------------------------------------------------------------ Session


@pytest.mark.parametrize("fast", [True, False])
def test_session_delivers_misfits_unless_strict_layout(fast):
    data = two_layer_cache(stream_id=4)
    s = Session(SessionConfig(role="server"))
    s._fast = fast
    [ev] = s.receive_datagram(data, 0.0)
    assert isinstance(ev, MessageReceived) and not ev.frame.layout_ok and len(ev.frame.slices) == 4
    strict = Session(SessionConfig(role="server", strict_layout=True))
    strict._fast = fast
    [ev] = strict.receive_datagram(data, 0.0)
    assert isinstance(ev, FrameRejected) and ev.reason == "malformed" and isinstance(ev.error, LayoutError)
    assert "Cache carries 2 slices, got 4" in ev.detail
    # the fitting frame still takes the same path
    assert isinstance(strict.receive_datagram(resonant.encode(Think(F16(4))), 0.0)[0], MessageReceived)


@pytest.mark.parametrize("fast", [True, False])
def test_session_over_tcp_delivers_misfits(fast):
    data = two_layer_cache(stream_id=4)
    s = Session(SessionConfig(role="server"))
    s._fast = fast
    [ev] = s.receive_data(len(data).to_bytes(4, "little") + data, 0.0)
    assert isinstance(ev, MessageReceived) and not ev.frame.layout_ok


def test_session_holds_a_stream_chunk_to_its_layout():
    chunk = resonant.encode(resonant.make_frame(MsgType.CHUNK, [Slice.from_text(b"ab")] * 2, stream_id=6, frame_seq=1))
    s = Session(SessionConfig(role="server"))
    [ev] = s.receive_datagram(chunk, 0.0)
    assert isinstance(ev, FrameRejected) and ev.reason == "malformed" and isinstance(ev.error, LayoutError)


def test_non_json_sync_is_a_message_not_an_error():
    s = Session(SessionConfig(role="server"))
    [ev] = s.receive_datagram(resonant.encode(Sync(b"hello", stream_id=2)), 0.0)
    assert isinstance(ev, MessageReceived) and ev.document is None and ev.frame.json.tobytes() == b"hello"
    assert s.datagrams_to_send() == []  # no error reply


# ------------------------------------------------------------------ resonant recv


def test_recv_prints_misfits_and_non_json_sync():
    with receiver("udp", "--count", "3") as rx, udp() as sock:
        sock.sendto(two_layer_cache(stream_id=21), (HOST, rx.port))
        sock.sendto(resonant.encode(Sync(b"hello \xff", stream_id=22)), (HOST, rx.port))
        sock.sendto(resonant.encode(resonant.make_frame(MsgType.SYNC, [Slice.from_array(F16(4))], stream_id=23)),
                    (HOST, rx.port))
        lines = rx.wait_stdout_lines(3)
        assert rx.wait_exit() == 0, rx.dump()
    cache, text, f16 = sorted(lines, key=lambda ln: ln.split("stream=")[1])
    assert "[CACHE] stream=21" in cache and "(layout: num_slices: Cache carries 2 slices, got 4" in cache
    assert "[SYNC] stream=22" in text and "(not JSON) 'hello \\\\xff'" in text and "layout" not in text
    assert "[SYNC] stream=23" in f16 and "(layout: slices[0].dtype: the json slice of Sync carries text" in f16
    assert not any("rejected" in ln for ln in rx.stderr), rx.dump()


def test_recv_strict_refuses_misfits():
    with receiver("udp", "--count", "1", "--strict") as rx, udp() as sock:
        sock.sendto(two_layer_cache(stream_id=21), (HOST, rx.port))
        rx.wait_stderr(r"rejected \(malformed\): num_slices: Cache carries 2 slices, got 4")
        assert rx.proc.poll() is None, rx.dump()


def test_inspect_walks_the_rust_form():
    from resonant import inspect as rinspect
    data = resonant.encode(resonant.make_frame(MsgType.SYNC, [], stream_id=5, space_hash32=7, empty_slice_len=True))
    ins = rinspect.inspect(data)
    assert ins.error is None and ins.frame.empty_slice_len
    paths = [f.path for f in ins.fields]
    assert paths[6:9] == ["header.slice_len[0]", "header.space_hash32", "header.modality"] and "trailing" not in paths
    assert ins.header["space_hash32"] == 7


def test_constructor_refuses_an_explanation_a_receiver_would_take_for_a_mask():
    with pytest.raises(EncodeError, match=r"^slices\[1\]: the explanation slice must read as text"):
        resonant.Critique(F16(4), explanation=b"\x00\x01")
    assert resonant.Critique(F16(4), explanation="tab\tand newline\n").explanation is not None


def test_transformed_misfits_decode_liberally_and_strictly():
    key = resonant.Key(bytes(range(32)), key_id=1)
    zeros = Slice.from_array(np.zeros((4, 64), np.float16))  # compressible: ZSTD is kept
    frame = resonant.make_frame(MsgType.THINK, [zeros, zeros], stream_id=3)
    for codec in (resonant.Codec(3), resonant.Codec(3, key=key)):
        data = codec.encode(frame)
        assert data[0] == 2
        back = codec.decode(data)
        assert back == frame and not back.layout_ok and back.transforms
        assert back.layout_reason == "num_slices: Think carries 1 slices, got 2 (at byte 16)"
        with pytest.raises(LayoutError):
            codec.decode(data, strict=True)
    empty = resonant.make_frame(MsgType.SYNC, [], empty_slice_len=True)  # (version 2 has no 37-byte form)
    data = resonant.Codec(3, key=key).encode(empty)
    assert resonant.Codec(3, key=key).decode(data) == empty


def test_space_mismatch_offset_of_the_37_byte_empty_form():
    """The Session's SpaceMismatch names the byte of space_hash32, also in the Rust encoder's empty
    form (one slice_len entry of 0: space_hash32 4 bytes further on), as decode() does."""
    data = resonant.encode(resonant.make_frame(MsgType.THINK, [], empty_slice_len=True, space_hash32=7))
    with pytest.raises(resonant.errors.SpaceMismatch) as exc:
        resonant.decode(data, expected_space_hash=8)
    server = Session(SessionConfig(role="server", strict=False, expected_space_hash=8))
    (ev,) = server.receive_datagram(data, 0.0)
    assert isinstance(ev, FrameRejected) and ev.error.offset == exc.value.offset
    assert data[ev.error.offset:ev.error.offset + 4] == (7).to_bytes(4, "little")


def test_inspect_labels_slices_by_the_role_they_are_read_in():
    """render_text names a slice's role only where the frame reads it in that role: a 2-slice
    Critique's mask (not text) is no explanation, a Sync's F16 slice is no JSON document."""
    from resonant import inspect as rinspect
    mask = resonant.make_frame(MsgType.CRITIQUE, [Slice.from_array(F16(4)), Slice.from_array(np.array([1, 0, 1, 1], np.int8))])
    assert mask.mask is mask.slices[1] and mask.explanation is None
    text = rinspect.render_text(resonant.encode(mask))
    assert "explanation" not in text.split("\n\n")[1]
    sync = resonant.make_frame(MsgType.SYNC, [Slice.from_array(F16(2))])
    text = rinspect.render_text(resonant.encode(sync))
    assert not any(line.startswith("json") for line in text.splitlines())
    doc = rinspect.render_text(resonant.encode(resonant.Critique(F16(4), explanation={"why": 1})))
    assert 'explanation (json): {"why": 1}' in doc or 'explanation (json): {"why":1}' in doc
