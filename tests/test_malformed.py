"""Malformed frames: every one raises a DecodeError subclass naming field path and byte offset,
the Cython and plain-Python codecs agree on the class, path and offset, and nothing crashes."""

from __future__ import annotations

import struct
import zlib

import pytest
import strategies
from conftest import MANIFEST, vector_bytes
from hypothesis import given
from hypothesis import strategies as st

import resonant
from resonant import refcodec
from resonant._spec import DType, Flags, Modality, MsgType
from resonant.errors import (
    ChecksumMismatch,
    DecodeError,
    LayoutError,
    LimitExceeded,
    SizeMismatch,
    TrailingBytes,
    TruncatedFrame,
    UnknownDType,
    UnknownFlags,
    UnknownMessageType,
    UnknownModality,
    UnknownVersion,
)

SMALL = [v["file"] for v in MANIFEST if v["length"] < 5000]


def outcome(decode, data):
    try:
        frame = decode(data)
    except DecodeError as exc:
        return ("error", type(exc), exc.path, exc.offset)
    return ("ok", refcodec.from_frame(frame) if not isinstance(frame, refcodec.RefFrame) else frame)


def agree(data, strict: bool = False) -> tuple:
    """Both codecs give the same frame (with the same layout verdict) or the same error (class,
    field path, byte offset); strict: both refuse slices that fit no layout (LayoutError).

    The plain codec speaks version 1 only; version 2 input (transformed bodies) is checked
    for raising nothing but DecodeErrors (test_transforms.py covers it in depth)."""
    fast = outcome(lambda d: resonant.decode(d, strict=strict), data)
    if data[:1] == b"\x02":
        return fast
    slow = outcome(lambda d: refcodec.decode(d, strict=strict), data)
    assert fast == slow, (data.hex(), fast, slow)
    return fast


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def patch(data: bytes, offset: int, fmt: str, value: int, fix_crc: bool = True) -> bytes:
    b = bytearray(data)
    struct.pack_into("<" + fmt, b, offset, value)
    return with_crc(bytes(b[:-4])) if fix_crc else bytes(b)


@pytest.mark.parametrize("name", [v["file"] for v in MANIFEST])
def test_truncation_at_every_offset(name):
    data = vector_bytes(name)
    # every offset of the small frames; for the 64 KB one every header offset and a stride of the payload
    offsets = range(len(data)) if len(data) < 5000 else [*range(200), *range(200, len(data), 251), len(data) - 1]
    for k in offsets:
        result = agree(data[:k])
        assert result[0] == "error" and result[1] is TruncatedFrame, (k, result)


def test_one_byte_short_and_one_byte_long():
    data = vector_bytes("04_think_f16_random.bin")
    with pytest.raises(TruncatedFrame) as exc:
        resonant.decode(data[:-1])
    assert str(exc.value) == "slices[0].payload: needs 4096 bytes, 4095 remain before the 4-byte crc32 (at byte 43)"
    assert (exc.value.path, exc.value.offset) == ("slices[0].payload", 43)
    with pytest.raises(TrailingBytes) as exc:
        resonant.decode(data + b"\0")
    assert str(exc.value) == "crc32: 1 unexpected bytes between the last slice and the crc32 (at byte 4139)"
    with pytest.raises(TruncatedFrame, match=r"^version: empty input \(at byte 0\)$"):
        resonant.decode(b"")
    with pytest.raises(TruncatedFrame, match=r"^frame_seq: needs 8 bytes, 6 remain before the 4-byte crc32 \(at byte 8\)$"):
        resonant.decode(data[:18])
    assert agree(data[:-1])[1] is TruncatedFrame and agree(data + b"\0")[1] is TrailingBytes


@pytest.mark.parametrize("name", SMALL)
def test_every_single_bit_flip_is_rejected(name):
    data = vector_bytes(name)
    for i in range(len(data)):
        for bit in range(8):
            b = bytearray(data)
            b[i] ^= 1 << bit
            result = agree(bytes(b))
            assert result[0] == "error", (i, bit)  # CRC-32 catches every single-bit error


def test_checksum_mismatch_message():
    data = bytearray(vector_bytes("01_sync_ping.bin"))
    data[40] ^= 0x01
    with pytest.raises(ChecksumMismatch) as exc:
        resonant.decode(bytes(data))
    assert exc.value.path == "crc32" and exc.value.offset == 75
    assert str(exc.value).startswith("crc32: stored 0x8ef3b675, computed 0x")
    assert str(exc.value).endswith(" over 75 bytes (at byte 75)")


# A valid CRC over a broken header: each field's own error, with the exact message.
PING = vector_bytes("01_sync_ping.bin")        # Sync, 1 slice: I8 [36]
THINK = vector_bytes("04_think_f16_random.bin")  # Think, 1 slice: F16 [1, 2048]


@pytest.mark.parametrize(
    "data, cls, message",
    [
        (patch(PING, 0, "B", 3, fix_crc=False), UnknownVersion,
         "version: 3 (this decoder speaks versions 1 and 2) (at byte 0)"),
        (patch(PING, 1, "B", 9), UnknownMessageType,
         f"msg_type: 9 is not a message type ({', '.join(f'{m.value} {m.name}' for m in MsgType)}) (at byte 1)"),
        (patch(PING, 2, "H", 0x0100), UnknownFlags,
         f"flags: 0x0100 sets bits outside {', '.join(f'{f.name}={f.value}' for f in Flags)} (at byte 2)"),
        (patch(PING, 32, "B", 7), UnknownModality,
         f"modality: 7 is not a modality ({', '.join(f'{m.value} {m.name}' for m in Modality)}) (at byte 32)"),
        (patch(PING, 33, "B", 0x42), UnknownDType,
         f"slices[0].dtype: 0x42 is not a dtype ({', '.join(f'0x{d.value:02x} {d.name}' for d in DType)}) (at byte 33)"),
        (patch(PING, 16, "Q", 2**64 - 1, fix_crc=False), LimitExceeded,
         "num_slices: 18446744073709551615, more than max_slices (1024) (at byte 16)"),
        (patch(PING, 34, "B", 9, fix_crc=False), LimitExceeded,
         "slices[0].shape_len: 9 dimensions, more than max_dims (8) (at byte 34)"),
        (patch(THINK, 39, "I", 2047), SizeMismatch,
         "slices[0].payload: F16 of shape (1, 2047) (2047 elements) needs 4094 bytes, slice_len[0] is 4096 (at byte 43)"),
        (patch(PING, 33, "B", 1), SizeMismatch,
         "slices[0].payload: F16 of shape (36,) (36 elements) needs 72 bytes, slice_len[0] is 36 (at byte 39)"),
        (patch(THINK, 1, "B", 3), LayoutError,
         "slices[0].dtype: the json slice of Sync carries text: it must be I8 of one dimension, got F16 of 2 dimensions (at byte 33)"),
        (patch(THINK, 1, "B", 1), LayoutError, "num_slices: Cache carries 2 slices, got 1 (at byte 16)"),
    ],
    ids=["version", "msg_type", "flags", "modality", "dtype", "num_slices", "shape_len", "shape", "dtype-size",
         "role-dtype", "slice-count"],
)
def test_broken_header_with_valid_crc(data, cls, message):
    strict = cls is LayoutError  # (slices that fit no layout are refused only when asked)
    with pytest.raises(cls) as exc:
        resonant.decode(data, strict=strict)
    assert str(exc.value) == message
    assert agree(data, strict=strict)[1] is cls
    if strict:  # valid on the wire: decoded, the frame says why its slices do not fit
        frame = resonant.decode(data)
        assert not frame.layout_ok and frame.layout_reason == message
        assert agree(data)[0] == "ok"


def test_huge_dimensions_saturate_instead_of_overflowing():
    # Eight dimensions of 2**32 - 1 (2**256 elements) are over max_shape_elements: both codecs
    # refuse the shape before the size rule (which used to report the saturated element count).
    shape = (2**32 - 1,) * 8
    rf = refcodec.RefFrame(version=1, msg_type=0, flags=0, stream_id=0, frame_seq=0, space_hash32=0, modality=0,
                           slices=(refcodec.RefSlice(int(resonant.DType.F16), shape, b"\0" * 4),))
    data = refcodec.encode(rf)
    with pytest.raises(LimitExceeded) as exc:
        resonant.decode(data)
    assert exc.value.path == "slices[0].shape" and "max_shape_elements (1099511627776)" in str(exc.value)
    assert agree(data)[1] is LimitExceeded


def test_oversized_input_is_rejected_before_parsing():
    with pytest.raises(LimitExceeded, match=r"^frame: 65537 bytes, more than max_frame_bytes \(65536\) \(at byte 0\)$"):
        resonant.decode(b"\x01" * 65537)
    assert agree(b"\x01" * 65537)[1] is LimitExceeded


def test_max_slices_with_valid_structure():
    frame = resonant.Sync()
    body = bytearray(resonant.encode(frame)[:-4])
    struct.pack_into("<Q", body, 16, 1025)
    assert agree(bytes(body) + b"\0" * 4)[1] is LimitExceeded


def test_non_buffer_input_is_a_type_error():
    for bad in ("text", None, 5, [1, 2]):
        with pytest.raises(TypeError, match="bytes-like"):
            resonant.decode(bad)


@given(st.binary(max_size=300))
def test_random_bytes(data):
    result = agree(data)
    assert result[0] == "error" or data[:1] == b"\x02" or resonant.encode(resonant.decode(data)) == data


@given(st.binary(min_size=20, max_size=300))
def test_random_bodies_with_version_and_valid_crc(body):
    data = with_crc(b"\x01" + body)
    agree(data)


@given(strategies.encoded_frames(liberal=True), st.data())
def test_mutated_valid_frames(data, draw):
    """Random byte edits of valid frames (also ones whose slices fit no layout), with and without a
    fixed CRC: codecs agree, liberal and strict, nothing crashes."""
    b = bytearray(data)
    for _ in range(draw.draw(st.integers(1, 4))):
        i = draw.draw(st.integers(0, len(b) - 1))
        b[i] = draw.draw(st.integers(0, 255))
    strict = draw.draw(st.booleans())
    agree(bytes(b), strict)
    if len(b) > 4:
        agree(with_crc(bytes(b[:-4])), strict)


def test_deeply_nested_json_payload_is_a_decode_error():
    """Found by fuzz_codec: a Sync whose JSON nests deeper than Python's recursion limit raised
    RecursionError from Slice.json(); it is a DecodeError naming the payload."""
    text = "[" * 30_000 + "]" * 30_000  # deeper than the recursion limit, within one frame
    frame = resonant.decode(resonant.encode(resonant.Sync(text)))
    with pytest.raises(resonant.errors.DecodeError, match="nested too deeply"):
        frame.slices[0].json()
