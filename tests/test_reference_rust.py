"""The reference implementation's Rust build as a live peer (issue 16, part 1).

../shared/reference-rust holds the reference crate built (bin/decode_frames, bin/recv_think, ...)
and ../shared/vectors/reference-rust 60 frames from its encoder with a manifest saying what a
receiver must do with each. Both directions are checked: its frames through resonant.decode /
encode, and resonant's frames through its `VFrame::decode` (bin/decode_frames) and its UDP
receiver example (bin/recv_think).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import socket
import subprocess
import time

import numpy as np
import pytest
from conftest import ROOT

import resonant
from resonant import DType, Flags, Modality, MsgType, Slice, errors, refcodec

REF = ROOT.parent / "shared" / "reference-rust"
REF_BIN = REF / "bin"
RUST_VECTORS = ROOT.parent / "shared" / "vectors" / "reference-rust"

HEADER = ("version", "msg_type", "flags", "stream_id", "frame_seq", "num_slices", "space_hash32", "modality")

if (RUST_VECTORS / "manifest.json").exists():
    RUST_MANIFEST = json.loads((RUST_VECTORS / "manifest.json").read_text())["frames"]
else:
    RUST_MANIFEST = []
need_vectors = pytest.mark.skipif(not RUST_MANIFEST, reason="../shared/vectors/reference-rust is not beside this checkout")
need_ref = pytest.mark.skipif(not (REF_BIN / "decode_frames").exists(),
                              reason="../shared/reference-rust (the reference's Rust build) is not beside this checkout")

# Frames the reference writes and reads (manifest expect "decode") whose slices fit none of their
# type's layouts (issue 16 part 2: valid on the wire, decoded with layout_ok False; strict=True
# refuses them with LayoutError). The other 3 that resonant rejected before decode and fit: the Rust
# encoder's 37-byte form of a Sync with no slices, and two 2-slice Critiques whose slices[1] is a
# mask by content.
LAYOUT_MISFITS = {
    "x_think_2_slices.bin",
    "x_think_0_slices.bin",
    "x_cache_1_slice.bin",
    "x_cache_3_slices.bin",
    "x_cache_4_slices.bin",
    "x_cache_1024_slices.bin",
    "x_ask_context_2d.bin",
    "x_ask_context_f16.bin",
    "x_ask_3_slices.bin",
    "x_sync_2_slices.bin",
    "x_sync_f16.bin",
    "x_sync_i8_2d.bin",
    "x_critique_4_slices.bin",
    "x_critique_expl_2d.bin",
}
# No slices, written by the Rust encoder with one slice_len entry of 0 (37 bytes).
EMPTY_ENTRY_FORM = {"x_think_0_slices.bin", "x_sync_0_slices_heart.bin"}

# The manifest names error classes; each must be a resonant.errors class. None needs an explicit
# mapping today (x_version_2 expects DecodeError; resonant raises LayoutError, a DecodeError subclass).
ERROR_ALIASES: dict[str, str] = {}


def _decode_params():
    return [pytest.param(e, id=e["file"]) for e in RUST_MANIFEST if e["expect"] == "decode"]


def _reject_params():
    return [pytest.param(e, id=e["file"]) for e in RUST_MANIFEST if e["expect"] != "decode"]


@need_vectors
def test_manifest_lists_every_file():
    assert len(RUST_MANIFEST) == 60
    assert sorted(e["file"] for e in RUST_MANIFEST) == sorted(p.name for p in RUST_VECTORS.glob("*.bin"))
    assert LAYOUT_MISFITS | EMPTY_ENTRY_FORM <= {e["file"] for e in RUST_MANIFEST if e["expect"] == "decode"}


@need_vectors
@pytest.mark.parametrize("entry", _decode_params())
def test_reference_frame_decodes(entry):
    data = (RUST_VECTORS / entry["file"]).read_bytes()
    assert len(data) == entry["bytes"]
    frame = resonant.decode(data)
    for name in HEADER:
        assert int(getattr(frame, name)) == entry["fields"][name], name
    assert len(frame.slices) == len(entry["slices"])
    for s, e in zip(frame.slices, entry["slices"]):
        assert s.dtype == DType(e["dtype"])
        assert s.shape == tuple(e["shape"])
        assert len(s.payload) == e["payload_len"]
        assert hashlib.sha256(s.payload).hexdigest() == e["payload_sha256"]
    assert resonant.encode(frame) == data
    assert frame.layout_ok is (entry["file"] not in LAYOUT_MISFITS)
    assert frame.empty_slice_len is (entry["file"] in EMPTY_ENTRY_FORM)
    # the second codec reads the same fields, the same layout verdict, and writes the same bytes
    ref = refcodec.decode(data)
    assert ref == refcodec.from_frame(frame) and refcodec.encode(ref) == data
    if frame.layout_ok:
        assert resonant.decode(data, strict=True) == frame
    else:
        assert frame.layout_reason
        with pytest.raises(errors.LayoutError) as exc:
            resonant.decode(data, strict=True)
        assert str(exc.value) == frame.layout_reason
        with pytest.raises(errors.LayoutError):
            refcodec.decode(data, strict=True)


@need_vectors
@pytest.mark.parametrize("entry", _reject_params())
def test_reference_frame_rejected(entry):
    name = entry["expect"]["reject"]
    cls = getattr(errors, ERROR_ALIASES.get(name, name), None)
    assert isinstance(cls, type) and issubclass(cls, errors.ResonantError), f"no resonant error class {name}"
    data = (RUST_VECTORS / entry["file"]).read_bytes()
    with pytest.raises(cls):
        resonant.decode(data)
    with pytest.raises(cls):
        resonant.decode(data, strict=True)


# --- resonant -> the reference's decoder (bin/decode_frames) --------------------------------------

H = 2451163210
_rng = np.random.default_rng(16)


def _catalogue():
    """Version-1 frames the reference can read, built with resonant's API."""
    f16 = lambda *shape: _rng.standard_normal(shape).astype(np.float16)  # noqa: E731
    i8 = lambda *shape: _rng.integers(-128, 128, shape, dtype=np.int8)  # noqa: E731
    return {
        "think_f16_1x2048": resonant.Think(f16(1, 2048), stream_id=0x12345678, frame_seq=1, space_hash32=H),
        "think_f16_4x8x16": resonant.Think(f16(4, 8, 16), stream_id=7, frame_seq=2, space_hash32=H,
                                           modality=Modality.IMAGE),
        "think_f16_16": resonant.Think(f16(16), stream_id=0xFFFFFFFF, frame_seq=0xFFFFFFFF, space_hash32=0xFFFFFFFF),
        "think_i8_1x300": resonant.Think(i8(1, 300), stream_id=3, frame_seq=4, space_hash32=H, modality=Modality.AUDIO),
        "think_i8_2x3x5": resonant.Think(i8(2, 3, 5), stream_id=5, space_hash32=H),
        "think_flag_zstd": resonant.Think(f16(1, 64), stream_id=8, space_hash32=H, flags=Flags.ZSTD),
        "think_flag_xchacha": resonant.Think(f16(1, 64), stream_id=8, space_hash32=H, flags=Flags.XCHACHA),
        "think_flag_zstd_xchacha": resonant.Think(i8(32), stream_id=8, space_hash32=H,
                                                  flags=Flags.ZSTD | Flags.XCHACHA),
        "cache_f16_kv": resonant.Cache(f16(2, 4, 8, 16), f16(2, 4, 8, 16), stream_id=9, frame_seq=3, space_hash32=H),
        "ask_query_only": resonant.Ask(i8(384), stream_id=11, space_hash32=H),
        "ask_query_context": resonant.Ask(f16(1, 64), "what is the capital of France?", stream_id=11, space_hash32=H),
        "critique_1": resonant.Critique(f16(16), stream_id=12, frame_seq=2, space_hash32=H),
        "critique_3": resonant.make_frame(MsgType.CRITIQUE, [Slice.from_array(f16(16)),
                                                             Slice.from_array(np.arange(16, dtype=np.int8)),
                                                             Slice.from_json({"note": "divergence", "magnitude": 0.5})],
                                          stream_id=12, frame_seq=3, space_hash32=H),
        "sync_ping_json": resonant.Sync({"method": "ping", "ts": 1730616000}, stream_id=0xABCD1234, space_hash32=H),
        "sync_mixed": resonant.Sync({"method": "capability", "v": 1}, stream_id=1, space_hash32=H,
                                    modality=Modality.MIXED),
    }


def _run_decode_frames(directory):
    out = subprocess.run([str(REF_BIN / "decode_frames"), str(directory)], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return {r["file"]: r for r in map(json.loads, filter(None, out.splitlines()))}


def _assert_reference_reads(frame, record):
    assert record.get("ok") is True, record.get("error")
    for name in HEADER:
        assert record[name] == int(getattr(frame, name)), name
    assert len(record["slices"]) == len(frame.slices)
    for got, s in zip(record["slices"], frame.slices):
        assert got["dtype"] == int(s.dtype)
        assert tuple(got["shape"]) == s.shape
        assert got["payload_hex"] == bytes(s.payload).hex()
    assert record["reencode_identical"] is True


@need_ref
def test_reference_decodes_resonant_frames(tmp_path):
    frames = _catalogue()
    for name, frame in frames.items():
        assert frame.version == 1
        (tmp_path / f"{name}.bin").write_bytes(resonant.encode(frame))
    records = _run_decode_frames(tmp_path)
    assert sorted(records) == sorted(f"{n}.bin" for n in frames)
    for name, frame in frames.items():
        _assert_reference_reads(frame, records[f"{name}.bin"])


def test_role_properties_of_reference_misfits():
    """Role properties give what fits; a 2-slice Critique's slices[1] is the mask unless it reads as text."""
    load = lambda name: resonant.decode((RUST_VECTORS / name).read_bytes())  # noqa: E731
    if not RUST_MANIFEST:
        pytest.skip("../shared/vectors/reference-rust is not beside this checkout")
    think2 = load("x_think_2_slices.bin")
    assert isinstance(think2, resonant.Think) and think2.hidden is None and len(think2.slices) == 2
    cache4 = load("x_cache_4_slices.bin")
    assert cache4.keys is None and cache4.values is None and len(cache4.slices) == 4
    ask = load("x_ask_context_f16.bin")
    assert ask.query is ask.slices[0] and ask.context is None
    sync = load("x_sync_f16.bin")
    assert sync.json is None and sync.slices[0].dtype == DType.F16
    for name in ("x_critique_div_mask_1d.bin", "x_critique_div_mask_2d.bin", "x_critique_div_f16_mask.bin"):
        c = load(name)
        assert c.layout_ok and c.divergence is c.slices[0] and c.mask is c.slices[1] and c.explanation is None, name
    c = load("critique_2_explanation.bin")
    assert c.layout_ok and c.explanation is c.slices[1] and c.mask is None and c.explanation.json() is not None
    expl2d = load("x_critique_expl_2d.bin")
    assert expl2d.mask is expl2d.slices[1] and expl2d.explanation is None and not expl2d.layout_ok


@need_ref
def test_reference_rejects_every_frame_without_slices(tmp_path):
    """The reference's Rust decoder reads no frame without slices, in either form ('slice_len field
    is empty'): neither resonant's (the spec's and the reference's Python form, 33 bytes) nor the
    Rust encoder's own (37 bytes, make_frame(empty_slice_len=True)). resonant keeps the spec's form
    and reads both (the discrepancy is written in the spec)."""
    heart = resonant.Sync(stream_id=14, frame_seq=7, space_hash32=H)
    rust_form = resonant.make_frame(MsgType.SYNC, [], stream_id=14, frame_seq=7, space_hash32=H, empty_slice_len=True)
    assert len(resonant.encode(heart)) == 33 and not heart.empty_slice_len
    assert len(resonant.encode(rust_form)) == 37 and rust_form.empty_slice_len
    rust = (RUST_VECTORS / "x_sync_0_slices_heart.bin").read_bytes()  # the Rust encoder's own, rebuilt
    got = resonant.decode(rust)
    assert resonant.encode(resonant.make_frame(MsgType.SYNC, [], stream_id=got.stream_id, frame_seq=got.frame_seq,
                                               space_hash32=got.space_hash32, modality=got.modality, flags=got.flags,
                                               empty_slice_len=True)) == rust
    (tmp_path / "heart.bin").write_bytes(resonant.encode(heart))
    (tmp_path / "rust_form.bin").write_bytes(resonant.encode(rust_form))
    records = _run_decode_frames(tmp_path)
    for name in ("heart.bin", "rust_form.bin"):
        assert records[name]["ok"] is False and "slice_len field is empty" in records[name]["error"], records[name]
    for frame in (heart, rust_form):
        back = resonant.decode(resonant.encode(frame))
        assert back == frame and back.empty_slice_len == frame.empty_slice_len
        assert resonant.encode(back) == resonant.encode(frame)


def test_resonant_refuses_zero_d_tensor():
    """The reference refuses an empty shape on encode and decode: resonant refuses to build one
    (reshape it to [1]), so it never sends one."""
    with pytest.raises(errors.EncodeError, match=r"^hidden\.shape: a 0-D tensor \(empty shape\): reshape it to \[1\]"):
        resonant.Think(np.array(1.5, np.float16), stream_id=15, space_hash32=H)
    with pytest.raises(errors.EncodeError, match="reshape it to"):
        Slice.from_array(np.array(1.5, np.float16))
    with pytest.raises(errors.EncodeError, match=r"^slices\[0\]\.shape: a 0-D tensor"):  # built or decoded: not sent
        resonant.encode(resonant.Think(Slice(DType.F16, (), b"\0\0")))


@need_ref
def test_reference_decodes_resonant_one_element_tensor(tmp_path):
    scalar = resonant.Think(np.array(1.5, np.float16).reshape(1), stream_id=15, space_hash32=H)
    (tmp_path / "scalar.bin").write_bytes(resonant.encode(scalar))
    _assert_reference_reads(scalar, _run_decode_frames(tmp_path)["scalar.bin"])


# --- resonant -> the reference's UDP receiver example (bin/recv_think) -----------------------------

RECV_ADDR = ("127.0.0.1", 50051)


def _udp_bound(addr) -> bool:
    """Whether a UDP socket is bound to addr (Linux: /proc/net/udp lists local addresses in hex)."""
    want = f"{socket.inet_aton(addr[0])[::-1].hex().upper()}:{addr[1]:04X}"
    try:
        lines = open("/proc/net/udp").read().splitlines()[1:]
    except OSError:
        return True  # cannot tell: the banner has to do
    return any(line.split()[1] == want for line in lines)


@contextlib.contextmanager
def recv_think():
    """bin/recv_think running and bound to 127.0.0.1:50051 (skips when the port is busy); yields a
    list that holds its whole output once the block is left (it is killed then)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind(RECV_ADDR)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            pytest.skip("127.0.0.1:50051 (bin/recv_think's fixed port) is busy")
        raise
    finally:
        probe.close()
    proc = subprocess.Popen([str(REF_BIN / "recv_think")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out: list[str] = []
    banner = b""
    try:
        deadline = time.monotonic() + 5
        while b"Listening" not in banner and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner += line
        assert b"Listening on 127.0.0.1:50051" in banner, banner
        # It prints the banner as it binds, not after: a datagram sent at once may find no socket yet.
        while not _udp_bound(RECV_ADDR) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _udp_bound(RECV_ADDR), "bin/recv_think did not bind 127.0.0.1:50051"
        yield out
        time.sleep(0.5)  # not a timing assertion: lets it print before it is killed
    finally:
        proc.kill()
        out.append((banner + proc.communicate(timeout=5)[0]).decode("utf-8", "replace"))


@need_ref
def test_reference_receiver_prints_resonant_think():
    think = resonant.Think(_rng.standard_normal((1, 2048)).astype(np.float16), stream_id=0x2A25C22C, frame_seq=1,
                           space_hash32=H, flags=Flags.ZSTD)
    data = resonant.encode(think)
    with recv_think() as out:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(data, RECV_ADDR)
    (text,) = out
    assert f"Received {len(data)} bytes" in text, text
    for expected in ("Version: 1", "Type: Think", "Stream ID: 0x2a25c22c", "Sequence: 1", "Slices: 1",
                     "Space hash: 0x9219c84a", "Flags: Flags(ZSTD)", "✓",
                     "Slice 0: F16 shape=[1, 2048] size=4096 bytes"):
        assert expected in text, expected
