"""Hostile shapes (issue 14, item 3) and the `resonant recv --save` quota.

A peer chooses every dimension of a slice's shape (u32 each, up to max_dims of them) and of a
V-Stream object's shape in HEAD. A shape whose payload is empty can still name an absurd
tensor: (0, 2**32-1, 2**32-1, 2**32-1) is 0 elements, but numpy multiplies the non-zero
dimensions and refuses the array ("array is too big"), and a dense view of a sparse slice of
that shape asks for terabytes. Every such shape must be refused by the decoder, HEAD
validation and every consumer with a ResonantError, never a numpy/Python error.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import resonant
from resonant import Session, SessionConfig, Sync, Think, _codec, quant, refcodec
from resonant import inspect as rinspect
from resonant import _spec
from resonant._spec import MAX_DIMS, DType
from resonant.errors import HandshakeError, LimitExceeded, ResonantError
from resonant.stream import Reassembler, StreamFailed, StreamLayout
from test_transport import HOST, CLI, receiver, run_cli, udp  # noqa: F401  (helpers, not tests)

U32 = 2**32 - 1
HUGE = (0, U32, U32, U32)
MAX_SHAPE_ELEMENTS = getattr(_spec, "MAX_SHAPE_ELEMENTS", 1 << 40)


def frame_bytes(shape, dtype=int(DType.F16), payload=b"", msg_type=0) -> bytes:
    """A version 1 frame built byte by byte (the encoder refuses these shapes)."""
    rf = refcodec.RefFrame(version=1, msg_type=msg_type, flags=0, stream_id=7, frame_seq=0, space_hash32=0,
                           modality=0, slices=(refcodec.RefSlice(dtype, tuple(shape), payload),))
    return refcodec.encode(rf)


def product_zero_as_one(shape) -> int:
    return math.prod(d or 1 for d in shape)


# ------------------------------------------------------------------ the 55-byte Think


def test_the_55_byte_think_is_refused_by_the_decoder_with_the_shape_path():
    data = frame_bytes(HUGE)
    assert len(data) == 55
    with pytest.raises(LimitExceeded) as ei:
        resonant.decode(data)
    assert ei.value.path == "slices[0].shape"
    assert ei.value.offset == 35  # shape[0] of slice 0: 33 bytes of header, then dtype and shape_len
    assert "max_shape_elements" in str(ei.value)
    # The plain-Python reference codec applies the same rule, with the same path and offset.
    with pytest.raises(LimitExceeded) as er:
        refcodec.decode(data)
    assert (er.value.path, er.value.offset) == (ei.value.path, ei.value.offset)


def test_the_55_byte_think_through_a_codec_and_a_session():
    data = frame_bytes(HUGE)
    with pytest.raises(LimitExceeded):
        resonant.Codec().decode(data)
    for fast in (True, False):
        s = Session(SessionConfig(role="server"))
        s._fast = fast
        events = s.receive_datagram(data, 0.0)
        assert [type(e).__name__ for e in events] == ["FrameRejected"], events
        assert "slices[0].shape" in events[0].detail


def test_slice_numpy_never_raises_a_numpy_error():
    # Slices the encoder would build are within the limit; one at the limit (all zeros) works.
    s = _codec.Slice(DType.F16, (0, 1 << 20, 1 << 20), b"")
    assert s.numpy().shape == (0, 1 << 20, 1 << 20)
    with pytest.raises(resonant.errors.EncodeError, match="max_shape_elements"):
        _codec.Slice(DType.F16, HUGE, b"")
    with pytest.raises(resonant.errors.EncodeError, match="max_shape_elements"):
        _codec.Slice.from_array(np.empty((0, 1 << 31, 1 << 30), np.float16))


def test_the_55_byte_think_through_inspect():
    data = frame_bytes(HUGE)
    ins = rinspect.inspect(data)
    assert ins.error is not None and ins.error.type == "LimitExceeded" and ins.error.path == "slices[0].shape"
    text = rinspect.render_text(data)
    assert "LimitExceeded" in text and "slices[0].shape" in text
    doc = rinspect.render_json(data)
    assert doc["error"]["type"] == "LimitExceeded"


def test_inspect_cli_reports_the_55_byte_think(tmp_path):
    p = tmp_path / "think.bin"
    p.write_bytes(frame_bytes(HUGE))
    r = run_cli("inspect", str(p))
    assert r.returncode == 1, r.stderr
    assert "LimitExceeded" in r.stdout and "Traceback" not in r.stderr


def test_recv_keeps_running_after_the_55_byte_think():
    """Before: the receiver printed a numpy traceback and exited 1 on the first datagram."""
    good = resonant.encode(Think(np.arange(4, dtype=np.float16), stream_id=8))
    with receiver("udp", "--count", "1") as rx, udp() as s:
        s.sendto(frame_bytes(HUGE), (HOST, rx.port))
        rx.wait_stderr(r"rejected \(malformed\): .*slices\[0\]\.shape")
        assert rx.proc.poll() is None, rx.dump()
        s.sendto(good, (HOST, rx.port))
        [line] = rx.wait_stdout_lines(1)
        assert "[THINK] stream=8" in line and "F16[4]" in line
        assert rx.wait_exit() == 0, rx.dump()
        assert not any("Traceback" in ln for ln in rx.stderr), rx.dump()


# ------------------------------------------------------------------ HEAD objects


def head_frame(shape, nbytes=0, stream_id=9, dtype=int(DType.F16)) -> bytes:
    doc = {"method": "head", "v": 1, "msg_type": 1, "chunk_bytes": 4096, "total_bytes": nbytes,
           "objects": [{"dtype": dtype, "shape": list(shape), "nbytes": nbytes}], "hash": "xxh3_64"}
    return resonant.encode(Sync(doc, stream_id=stream_id, frame_seq=0))


@pytest.mark.parametrize("shape", [HUGE, (0, 1 << 21, 1 << 21), (1 << 21, 0, 1 << 20)])
def test_head_with_a_huge_shape_fails_the_stream_in_the_reassembler(shape):
    events = Reassembler().receive(head_frame(shape), 0.0)
    assert len(events) == 1 and isinstance(events[0], StreamFailed), events
    assert events[0].reason == "bad_head" and "head.objects[0].shape" in events[0].detail


def test_head_with_a_huge_shape_through_the_session():
    for fast in (True, False):
        s = Session(SessionConfig(role="server"))
        s._fast = fast
        events = s.receive_datagram(head_frame(HUGE), 0.0)
        failed = [e for e in events if isinstance(e, StreamFailed)]
        assert failed and "head.objects[0].shape" in failed[0].detail, events
        assert s.reassembler.open_streams == 0


def test_from_head_names_the_shape():
    doc = {"method": "head", "v": 1, "msg_type": 1, "chunk_bytes": 4096, "total_bytes": 0,
           "objects": [{"dtype": 1, "shape": list(HUGE), "nbytes": 0}], "hash": "xxh3_64"}
    with pytest.raises(HandshakeError) as ei:
        StreamLayout.from_head(doc)
    assert ei.value.path == "head.objects[0].shape"


def test_head_at_the_limit_is_accepted():
    shape = (0, 1 << 20, 1 << 20)  # product, a 0 counted as 1, is exactly max_shape_elements
    assert product_zero_as_one(shape) == MAX_SHAPE_ELEMENTS
    events = Reassembler().receive(head_frame(shape), 0.0)
    assert type(events[0]).__name__ == "StreamStarted", events


# ------------------------------------------------------------------ sparse and quantized consumers


def sparse_slice(shape, nnz=1, vd=DType.F32) -> _codec.Slice:
    coords = np.zeros((nnz, len(shape)), "<u4")
    values = np.ones(nnz, np.float32)
    payload = struct.pack("<IBBH", nnz, int(vd), 1, 0) + coords.tobytes() + values.tobytes()
    return _codec.Slice(DType.SPARSE_COO_U32, shape, payload)


def test_sparse_to_dense_refuses_a_huge_dense_shape_before_allocating():
    """Before: a 24-byte sparse slice of dense shape (1024, 1024, 1024, 1024) asked numpy
    for 4 TiB (MemoryError, or ValueError for larger shapes)."""
    s = sparse_slice((1024, 1024, 1024, 1024))
    with pytest.raises(LimitExceeded, match="max_bytes"):
        quant.sparse_to_dense(s)
    with pytest.raises(LimitExceeded, match="max_bytes"):
        quant.parse_sparse(s).to_dense()
    # The same slice received from a peer.
    frame = resonant.decode(resonant.encode(Think(s)))
    with pytest.raises(LimitExceeded):
        quant.sparse_to_dense(frame.hidden)
    # A caller may allow more; a small one works under the default.
    small = sparse_slice((4, 4))
    assert quant.sparse_to_dense(small).sum() == 1.0
    with pytest.raises(LimitExceeded):
        quant.sparse_to_dense(small, max_bytes=63)
    assert quant.sparse_to_dense(small, max_bytes=64).shape == (4, 4)


def test_dequantize_and_to_float_of_peer_slices():
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)
    for d in ("q8_0", "q4_0"):
        s = resonant.decode(resonant.encode(Think(quant.quantize(x, d)))).hidden
        assert quant.dequantize(s).shape == (2, 32)
        assert quant.to_float(s).shape == (2, 32)
    empty = _codec.Slice(DType.Q8_0, (0, 1 << 20, 1 << 20), b"")
    assert quant.dequantize(empty).shape == (0, 1 << 20, 1 << 20)
    for s in (_codec.Slice(DType.Q4, (2,), b"\x00"), sparse_slice((3,))):
        with pytest.raises(ResonantError):
            quant.to_float(s)


# ------------------------------------------------------------------ any shape: a slice or a ResonantError

_DTYPE_CODES = [int(d) for d in DType]


def _consume(frame) -> None:
    for s in frame.slices:
        try:
            arr = s.numpy()
            assert arr.shape == tuple(s.shape)
        except ResonantError:
            pass
        for fn in (quant.to_float, quant.dequantize, quant.sparse_to_dense, quant.parse_sparse):
            try:
                fn(s)
            except ResonantError:
                pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=st.lists(st.one_of(st.integers(0, U32), st.sampled_from([0, 1, 2, 1 << 16, 1 << 20, U32])),
                      min_size=0, max_size=MAX_DIMS),
       dtype=st.sampled_from(_DTYPE_CODES), nbytes=st.integers(0, 64))
def test_any_shape_decodes_to_a_usable_slice_or_raises_a_resonant_error(shape, dtype, nbytes):
    n = math.prod(shape)
    need = refcodec.expected_size(dtype, n)
    payload = bytes(need if need is not None and need <= 4096 else nbytes)
    data = frame_bytes(shape, dtype, payload)
    try:
        frame = resonant.decode(data)
    except ResonantError as exc:
        with pytest.raises(type(exc)):  # the reference agrees
            refcodec.decode(data)
        return
    assert product_zero_as_one(shape) <= MAX_SHAPE_ELEMENTS
    assert refcodec.decode(data).slices[0].shape == tuple(shape)
    _consume(frame)
    ins = rinspect.inspect(data)
    assert ins.error is None
    rinspect.render_text(data)


# ------------------------------------------------------------------ recv --save quota


def _stream_sender(path: Path, url: str) -> list[str]:
    return [*CLI, "send", "--to", url, str(path), "--type", "cache"]


def test_recv_save_refuses_what_would_go_over_max_bytes(tmp_path):
    """Before: no quota (a 304 KB compressed stream of zeros became 256 MiB on disk)."""
    import subprocess

    from test_transport import CHILD_CWD
    arr = np.zeros((2, 4, 64, 1024), np.float16)  # 1 MiB: a V-Stream of 2 objects
    src = tmp_path / "kv.npy"
    np.save(src, arr)
    save = tmp_path / "out"
    with receiver("tcp", "--count", "2", "--save", str(save), "--max-bytes", str(1_500_000)) as rx:
        for i in range(2):
            r = subprocess.run(_stream_sender(src, rx.url), stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=60, cwd=CHILD_CWD)
            if i == 0:
                assert r.returncode == 0, r.stderr
            else:  # the sender learns that the receiver did not keep it (the verdict), and why
                assert r.returncode == 1, r.stderr
                last = r.stderr.strip().splitlines()[-1]
                assert "save_refused" in last and "--max-bytes 1500000" in last, r.stderr
        rc = rx.wait_exit(30)
        assert rc == 3, rx.dump()
        assert any("saved 2 .npy files" in ln for ln in rx.stdout), rx.dump()
        refused = [ln for ln in rx.stderr if "not saved" in ln]
        assert len(refused) == 1 and "--max-bytes 1500000" in refused[0], rx.dump()
    files = sorted(save.iterdir())
    assert len(files) == 2
    assert sum(f.stat().st_size for f in files) <= 1_500_000


def test_recv_help_documents_max_bytes():
    r = run_cli("recv", "--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "--max-bytes N" in text and "(default 1 GiB" in text and "exit status is 3" in text
