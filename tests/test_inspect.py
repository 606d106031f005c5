"""resonant.inspect: annotated frame dumps that tile the frame, agree with the manifest and the
decoder, annotate version 2 envelopes without a key, and never raise on malformed input."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
from conftest import MANIFEST, vector_bytes
from hypothesis import given
from hypothesis import strategies as st

import resonant
from resonant import Codec, Key, Sync, Think, inspect as vinspect
from resonant._spec import HEADER_FIELDS, SLICE_FIELDS, DType, Flags, Modality, MsgType
from resonant.errors import ResonantError

KEY = Key(bytes(range(32)), key_id=7)
HIDDEN = (np.sin(np.arange(2048, dtype=np.float32) / 17) * 3).astype(np.float16).reshape(1, 2048)
V2_CODECS = {"zstd": Codec(3), "zstd-noshuffle": Codec(3, shuffle=False), "xchacha": Codec(key=KEY),
             "zstd+xchacha": Codec(3, key=KEY)}


def _tiles(fields, length: int) -> None:
    pos = 0
    for f in fields:
        assert f.offset == pos, f
        assert f.size >= 0, f
        pos += f.size
    assert pos == length


def _by_path(fields) -> dict:
    return {f.path: f for f in fields}


def _v2_frames():
    msg = Think(HIDDEN, stream_id=5, frame_seq=2, space_hash32=99)
    return {name: (codec, codec.encode(msg), msg) for name, codec in V2_CODECS.items()}


V2 = _v2_frames()


# --------------------------------------------------------------------------- reference vectors


def test_reference_vectors_tile_exactly(vector):
    _, data = vector
    fields = vinspect.annotate(data)
    _tiles(fields, len(data))
    paths = [f.path for f in fields]
    assert "unparsed" not in paths and "trailing" not in paths
    assert fields[-1].path == "crc32" and fields[-1].note == "ok"
    assert fields[0].path == "header.version"


def test_values_agree_with_the_manifest(vector):
    entry, data = vector
    expect = entry["expect"]
    fields = _by_path(vinspect.annotate(data))
    for name in ("version", "msg_type", "flags", "stream_id", "frame_seq", "num_slices", "space_hash32", "modality"):
        assert fields[f"header.{name}"].value == expect[name], name
    assert fields["header.msg_type"].note == MsgType(expect["msg_type"]).name
    assert fields["header.modality"].note == Modality(expect["modality"]).name
    assert fields["header.flags"].note == ("|".join(f.name for f in Flags if expect["flags"] & f) or "none")
    for i, s in enumerate(expect["slices"]):
        assert fields[f"header.slice_len[{i}]"].value == s["payload_len"]
        assert fields[f"slices[{i}].dtype"].value == s["dtype"]
        assert fields[f"slices[{i}].dtype"].note == DType(s["dtype"]).name
        assert fields[f"slices[{i}].shape_len"].value == len(s["shape"])
        for k, d in enumerate(s["shape"]):
            assert fields[f"slices[{i}].shape[{k}]"].value == d
        payload = fields[f"slices[{i}].payload"]
        assert payload.size == s["payload_len"]
        assert hashlib.sha256(data[payload.offset:payload.offset + payload.size]).hexdigest() == s["payload_sha256"]
    assert f"header.slice_len[{len(expect['slices'])}]" not in fields
    assert f"slices[{len(expect['slices'])}].dtype" not in fields
    assert fields["crc32"].value == struct.unpack("<I", data[-4:])[0]


def test_render_json_agrees_with_the_manifest(vector):
    entry, data = vector
    out = vinspect.render_json(data)
    assert json.loads(json.dumps(out)) == out
    assert out["error"] is None
    expect = dict(entry["expect"])
    expect.pop("num_slices")
    expect["slices"] = [{k: s[k] for k in ("dtype", "shape", "payload_len")} for s in expect["slices"]]
    assert out["frame"] == expect
    assert out["fields"] == [f.as_dict() for f in vinspect.annotate(data)]
    for f in out["fields"]:
        assert set(f) == {"path", "offset", "size", "value", "note"}
        assert isinstance(f["offset"], int) and isinstance(f["size"], int)
        if not f["path"].endswith("payload"):
            assert type(f["value"]) is int, f


def test_text_render_names_every_field(vector):
    entry, data = vector
    text = vinspect.render_text(data)
    fields = vinspect.annotate(data)
    lines = text.splitlines()
    for f in fields:
        row = next(line for line in lines if f" {f.path} " in line)
        assert row.split()[:3] == [str(f.offset), f"0x{f.offset:04x}", str(f.size)]
    for spec_field in HEADER_FIELDS + SLICE_FIELDS:
        if spec_field.name in ("slice_len", "dtype", "shape_len", "shape", "payload") and not entry["expect"]["slices"]:
            continue
        assert spec_field.name in text
    frame = resonant.decode(data)
    assert repr(frame) in text  # the one-line summary
    assert "error:" not in text


def test_worked_example_renders_its_json():
    data = vector_bytes("01_sync_ping.bin")
    text = vinspect.render_text(data)
    assert 'json: {"method": "ping", "ts": 1730616000}' in text
    assert "Sync(stream_id=2882343476, frame_seq=0" in text
    row = next(line for line in text.splitlines() if " header.msg_type " in line)
    assert row.split()[-1] == "SYNC"
    row = next(line for line in text.splitlines() if " crc32 " in line)
    assert row.split()[-1] == "ok"


def test_payload_values_show_the_first_elements():
    text = vinspect.render_text(vector_bytes("12_critique_three_slices.bin"))
    row = next(line for line in text.splitlines() if " slices[1].payload " in line)
    assert "[1 2 3 4 5]" in row
    data = vector_bytes("04_think_f16_random.bin")
    first = resonant.decode(data).hidden.numpy().reshape(-1)[:3]
    row = next(line for line in vinspect.render_text(data).splitlines() if " slices[0].payload " in line)
    assert " ".join(str(x) for x in first) in row
    # Q4 and SparseCoo have no numpy dtype: the bytes are summarised instead.
    row = next(line for line in vinspect.render_text(vector_bytes("07_think_q4_odd.bin")).splitlines()
               if " slices[0].payload " in line)
    assert "(7 bytes)" in row


def test_long_json_is_cut():
    data = resonant.encode(Sync({"method": "note", "text": "x" * 1000}))
    line = next(line for line in vinspect.render_text(data).splitlines() if line.startswith("json: "))
    assert 190 < len(line) < 220 and line.endswith("…")


def test_any_bytes_like_input():
    data = vector_bytes("03_critique_two_slices.bin")
    want = vinspect.annotate(data)
    for form in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        assert vinspect.annotate(form) == want
        assert vinspect.render_json(form) == vinspect.render_json(data)


# --------------------------------------------------------------------------- version 2


@pytest.mark.parametrize("name", sorted(V2))
def test_version2_frames_are_annotated_down_to_the_envelope(name):
    codec, data, msg = V2[name]
    encrypted = bool(codec.keyring)
    fields = vinspect.annotate(data)
    _tiles(fields, len(data))
    by = _by_path(fields)
    header_end = by["envelope.body_len"].offset
    assert by["header.version"].value == 2
    assert by["header.flags"].value & Flags.XCHACHA == (Flags.XCHACHA if encrypted else 0)
    assert by["envelope.body_len"].value == len(resonant.encode(msg)) - header_end - 4  # the raw body
    assert by["envelope.filters"].note in ("none", "BYTE_SHUFFLE")
    assert by["header.slice_len[0]"].value == HIDDEN.nbytes
    assert "slices[0].payload" not in by
    assert fields[-1].path == "crc32" and fields[-1].note == "ok"
    if encrypted:
        assert by["envelope.key_id"].value == KEY.key_id
        assert by["envelope.nonce"].size == 24 and len(by["envelope.nonce"].value) == 48
        assert by["tag"].size == 16 and by["tag"].offset + 16 == len(data) - 4
        assert by["body"].offset == by["envelope.nonce"].offset + 24
        if not codec.zstd_level:
            assert by["body"].size == by["envelope.body_len"].value
    else:
        assert "envelope.key_id" not in by
        count = by["body.segment_count"].value
        assert [by[f"body.segment_len[{i}]"].value for i in range(count)] == \
            [by[f"body.segments[{i}]"].size for i in range(count)]
        assert all(by[f"body.segments[{i}]"].note.startswith("zstd frame of") for i in range(count))


@pytest.mark.parametrize("name", sorted(V2))
def test_version2_decoding_needs_the_key_only_to_decrypt(name):
    codec, data, msg = V2[name]
    out = vinspect.render_json(data)
    json.dumps(out)
    assert out["frame"]["version"] == 2 and out["frame"]["stream_id"] == 5 and out["frame"]["space_hash32"] == 99
    if codec.keyring:
        assert out["error"]["type"] == "UnknownKey" and out["error"]["path"] == "key_id"
        assert out["frame"]["slices"] == [{"dtype": None, "shape": None, "payload_len": HIDDEN.nbytes}]
        assert "UnknownKey" in vinspect.render_text(data)
    else:
        assert out["error"] is None
        assert out["frame"]["slices"] == [{"dtype": int(DType.F16), "shape": [1, 2048], "payload_len": HIDDEN.nbytes}]
    ins = vinspect.inspect(data, codec=codec)
    assert ins.error is None and ins.frame == msg
    text = vinspect.render_text(data, codec=codec)
    assert "error:" not in text and "hidden: F16 (1, 2048) [" in text


# --------------------------------------------------------------------------- malformed input


def _check_malformed(data) -> vinspect.Inspection:
    """inspect/render never raise on bytes, tile the input, and report exactly the decoder's verdict."""
    ins = vinspect.inspect(data)
    _tiles(ins.fields, len(data))
    try:
        resonant.decode(data)
    except ResonantError as exc:
        assert ins.error is not None
        assert (ins.error.type, ins.error.path, ins.error.offset, ins.error.message) == \
            (type(exc).__name__, exc.path, exc.offset, str(exc))
    else:
        assert ins.error is None
    return ins


@pytest.mark.pure_skip  # inspect over every truncation: decode(), which has no fast path
def test_every_truncation_of_every_reference_vector():
    for entry in MANIFEST:
        data = vector_bytes(entry["file"])
        view = memoryview(data)
        for k in range(len(data)):
            ins = _check_malformed(view[:k])
            assert ins.error is not None, (entry["file"], k)


@pytest.mark.parametrize("name", sorted(V2))
def test_every_truncation_of_a_version2_frame(name):
    _, data, _ = V2[name]
    view = memoryview(data)
    for k in range(len(data)):
        ins = _check_malformed(view[:k])
        assert ins.error is not None


def test_renders_of_truncations_never_raise():
    for name in ("01_sync_ping.bin", "12_critique_three_slices.bin"):
        data = vector_bytes(name)
        for k in range(len(data)):
            assert "error: " in vinspect.render_text(data[:k])
            json.dumps(vinspect.render_json(data[:k]))
    _, data, _ = V2["zstd+xchacha"]
    for k in range(0, len(data), 7):
        vinspect.render_text(data[:k])
        json.dumps(vinspect.render_json(data[:k]))


def _crc_fixed(body: bytes) -> bytes:
    return body + struct.pack("<I", resonant.crc32(body))


def test_what_stops_the_layout_is_named():
    ping = vector_bytes("01_sync_ping.bin")
    # num_slices over max_slices: the slice_len table is not read.
    bad = _crc_fixed(ping[:16] + struct.pack("<Q", 2**64 - 1) + ping[24:-4])
    ins = _check_malformed(bad)
    assert ins.fields[-2].path == "unparsed" and "max_slices" in ins.fields[-2].note
    assert ins.error.type == "LimitExceeded" and ins.error.path == "num_slices"
    # An unknown version: nothing after it is laid out.
    ins = _check_malformed(b"\x07" + ping[1:])
    assert [f.path for f in ins.fields] == ["header.version", "unparsed", "crc32"]
    assert ins.fields[0].note == "unknown version" and ins.error.type == "UnknownVersion"
    # Bytes after the last slice, with a good CRC: a trailing field.
    ins = _check_malformed(_crc_fixed(ping[:-4] + b"\x00\x01"))
    assert ins.fields[-2].path == "trailing" and ins.fields[-2].size == 2 and ins.fields[-1].note == "ok"
    assert ins.error.type == "TrailingBytes"
    # A flipped payload bit: the CRC mismatches, the JSON is shown as unverified.
    flipped = bytearray(ping)
    flipped[50] ^= 1
    ins = _check_malformed(bytes(flipped))
    assert ins.fields[-1].note.startswith("mismatch") and ins.error.type == "ChecksumMismatch"
    text = vinspect.render_text(bytes(flipped))
    assert "json (json, not verified): " in text and "error: ChecksumMismatch: crc32:" in text
    # Nothing at all.
    ins = _check_malformed(b"")
    assert ins.fields == () and ins.error.type == "TruncatedFrame"
    assert vinspect.render_json(b"")["frame"] is None


_SEEDS = [vector_bytes(v["file"]) for v in MANIFEST if len(vector_bytes(v["file"])) < 5000] + \
    [data for _, data, _ in V2.values()]


@given(st.binary(max_size=400))
def test_random_bytes_never_raise(data):
    _check_malformed(data)
    json.dumps(vinspect.render_json(data))
    vinspect.render_text(data)


@given(st.sampled_from([b"\x01", b"\x02"]), st.integers(0, 255), st.integers(0, 7), st.binary(max_size=300))
def test_random_bodies_behind_a_plausible_header_never_raise(version, msg_type, flags, rest):
    data = version + bytes([msg_type]) + struct.pack("<H", flags) + rest
    _check_malformed(data)
    json.dumps(vinspect.render_json(data))
    vinspect.render_text(data)


@given(st.sampled_from(_SEEDS), st.data())
def test_mutated_frames_never_raise(seed, draw):
    data = bytearray(seed)
    for _ in range(draw.draw(st.integers(1, 4))):
        i = draw.draw(st.integers(0, len(data) - 1))
        data[i] = draw.draw(st.integers(0, 255))
    if draw.draw(st.booleans()):  # a valid CRC, so the structure and meaning checks are reached
        data = bytearray(_crc_fixed(bytes(data[:-4])))
    _check_malformed(bytes(data))
    json.dumps(vinspect.render_json(bytes(data)))
    vinspect.render_text(bytes(data))


def test_text_is_never_written_raw_to_the_terminal():
    """A peer's text (an Ask's context, a Sync's JSON string) may hold escape sequences: inspect
    shows control characters escaped."""
    from resonant.inspect import render_text
    ask = resonant.Ask(np.zeros(4, np.float16), "\x1b[2J\x1b]0;pwned\x07 hello")
    out = render_text(resonant.encode(ask))
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[2J" in out and "hello" in out
