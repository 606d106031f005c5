"""Talking to reference receivers (issue 16 part 3): reference mode.

The reference's receivers read a ping but never answer it. A client that allows the reference
fallback (no key, not strict) takes a peer that stays silent for reference_fallback_ms for a
reference receiver and sends what the reference reads: version-1 frames, the reference dtypes
(others converted by the dtype fallback rules, or refused), one frame per message (no V-Stream).
Checked at the Session level, through connect() over UDP and TCP against silent sockets whose
capture bin/decode_frames (the reference's decoder) reads back, and with `resonant send` against
bin/recv_think (the reference's UDP receiver example).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
import pytest
from conftest import ROOT
from test_reference_rust import recv_think

import resonant
from resonant import DType, Key, MsgType, Slice, Think, handshake
from resonant._spec import REFERENCE_DTYPES
from resonant.aio import connect
from resonant.errors import HandshakeRefused, LocalProtocolError
from resonant.session import HandshakeComplete, HandshakeFailed, Session, SessionConfig
from resonant.stream import StreamComplete
from resonant.transitions import State

REF_BIN = ROOT.parent / "shared" / "reference-rust" / "bin"
need_ref = pytest.mark.skipif(not (REF_BIN / "decode_frames").exists(),
                              reason="../shared/reference-rust (the reference's Rust build) is not beside this checkout")
CLI = [sys.executable, "-m", "resonant.cli"]
CHILD_CWD = tempfile.gettempdir()  # (as test_transport: the source tree must not shadow the package)
HEADER = ("version", "msg_type", "flags", "stream_id", "frame_seq", "num_slices", "space_hash32", "modality")
WAIT = handshake.REFERENCE_FALLBACK_MS / 1000
_rng = np.random.default_rng(163)


def _client(**kw) -> Session:
    return Session(SessionConfig(role="client", reference_fallback=True, **kw))


def _fallen_back(**kw) -> Session:
    c = _client(**kw)
    c.initiate(0.0)
    c.datagrams_to_send()
    c.tick(WAIT)
    assert c.reference_mode
    return c


# ------------------------------------------------------------------ the Session


def test_default_wait_is_the_schema_limit_and_at_most_one_second():
    assert SessionConfig().reference_fallback_wait == WAIT <= 1.0
    assert not SessionConfig().reference_fallback  # off unless asked for


def test_session_falls_back_when_no_capability_comes_within_the_wait():
    c = _client()
    c.initiate(10.0)
    assert len(c.datagrams_to_send()) == 1
    assert c.tick(10.0 + WAIT / 2) == [] and c.state is State.AWAIT_CAPABILITY  # (a retry on the way)
    c.datagrams_to_send()
    assert c.tick(10.0 + WAIT - 0.001) == [] and not c.reference_mode
    (ev,) = c.tick(10.0 + WAIT)
    assert isinstance(ev, HandshakeComplete) and ev.agreement.reference
    a = c.agreement
    assert (a.proto, a.compress, a.crypto, a.dtypes) == (1, "none", "none", REFERENCE_DTYPES)
    assert c.state is State.ESTABLISHED and c.reference_mode
    assert c.datagrams_to_send() == []  # no more pings
    assert c.tick(100.0) == []


def test_session_without_the_option_times_out_as_before():
    c = Session(SessionConfig(role="client"))
    c.initiate(0.0)
    events = []
    for i in range(1, 20):
        events += c.tick(i * 0.5)
    assert isinstance(events[-1], HandshakeFailed) and events[-1].code == "TIMEOUT"
    assert not c.reference_mode and c.state is State.FAILED


@pytest.mark.parametrize("kw", [{"key": Key.generate()}, {"strict": True}, {"expected_space_hash": 7}],
                         ids=["key", "strict", "space-hash-implies-strict"])
def test_key_or_strict_never_falls_back(kw):
    with pytest.raises(ValueError, match="never falls back to reference mode"):
        SessionConfig(role="client", reference_fallback=True, **kw)
    # without the option such a session keeps pinging, and the TIMEOUT says why it did not fall back
    c = Session(SessionConfig(role="client", **kw))
    c.initiate(0.0)
    events = [e for i in range(1, 20) for e in c.tick(i * 0.5)]
    assert isinstance(events[-1], HandshakeFailed) and events[-1].code == "TIMEOUT"
    assert "never falls back to reference mode" in events[-1].message


def test_a_lenient_space_hash_may_fall_back():
    c = _fallen_back(expected_space_hash=7, space_hash32=7, strict=False)
    assert c.reference_mode


def test_fallback_needs_a_reference_dtype():
    with pytest.raises(ValueError, match="none of what a reference receiver reads"):
        SessionConfig(role="client", reference_fallback=True, dtypes=("f32", "bf16"))
    c = _fallen_back(dtypes=("f32", "i8"))
    assert c.agreement.dtypes == ("i8",)


def _sent(c: Session, message) -> resonant.Frame:
    c.send(message, 1.0)
    (data,) = c.datagrams_to_send()
    assert data[0] == 1
    frame = resonant.decode(data)
    assert frame.version == 1 and not frame.transforms
    return frame


def test_reference_mode_sends_version_1_frames_in_the_reference_dtypes():
    c = _fallen_back(compress=("zstd", "none"))  # zstd preferred: reference mode sends plain frames anyway
    f32 = _rng.standard_normal((1, 64)).astype(np.float32)
    f = _sent(c, Think(f32, stream_id=3))
    assert f.slices[0].dtype == DType.F16 and np.array_equal(f.slices[0].numpy(), f32.astype(np.float16))
    bf16 = f32.astype(ml_dtypes.bfloat16)
    f = _sent(c, Think(bf16, stream_id=3))  # bf16 -> f32 is not read by the reference: -> f16
    assert f.slices[0].dtype == DType.F16 and f.frame_seq == 1
    assert np.array_equal(f.slices[0].numpy(), bf16.astype(np.float16))
    assert c.stats["dtype_converted"] == 2
    for sl in (Slice.from_array(np.arange(-8, 8, dtype=np.int8)), Slice(DType.Q4, (16,), bytes(range(8))),
               Slice(DType.SPARSE_COO, (4, 4), b"opaque")):
        f = _sent(c, Think(sl, stream_id=4))
        assert (f.slices[0].dtype, f.slices[0].shape, bytes(f.slices[0].payload)) == (sl.dtype, sl.shape,
                                                                                     bytes(sl.payload))
    assert c.stats["dtype_converted"] == 2


def test_reference_mode_refuses_a_dtype_it_cannot_convert():
    c = _fallen_back()
    with pytest.raises(LocalProtocolError, match=r"reads only f16, i8, q4, sparse tensors, and sparse_coo_u32 has no "
                                                 r"conversion"):
        c.send(Think(Slice(DType.SPARSE_COO_U32, (4, 5), bytes(12)), stream_id=3), 1.0)
    assert c.datagrams_to_send() == []


def test_reference_mode_refuses_a_v_stream_and_a_message_over_one_frame():
    c = _fallen_back(max_frame_bytes=1200)
    with pytest.raises(LocalProtocolError, match="a V-Stream cannot be sent in reference mode.*no V-Stream reassembly"):
        c.stream(c.new_stream_id(), [np.zeros(4096, np.float16)])
    with pytest.raises(LocalProtocolError, match=r"is a \d+-byte frame, over max_frame_bytes \(1200\).*one frame per "
                                                 "message, because the reference has no V-Stream reassembly"):
        c.send(Think(np.zeros((1, 1024), np.float16), stream_id=3), 1.0)
    assert c.datagrams_to_send() == []
    _sent(c, Think(np.zeros((1, 512), np.float16), stream_id=3))  # what fits one frame goes


def _late_pair(**kw) -> tuple[Session, Session, list[bytes]]:
    """A client fallen back to reference mode, a resonant server that has not yet seen its pings,
    and the pings (the first one and its retry) on their way to it."""
    c, s = _client(**kw), Session(role="server")
    c.initiate(0.0)
    pings = c.datagrams_to_send()
    c.tick(WAIT / 2)
    pings += c.datagrams_to_send()  # (the retry)
    c.tick(WAIT)
    assert c.reference_mode and len(pings) == 2
    return c, s, pings


def test_a_late_capability_leaves_reference_mode_and_v_streams_then_go():
    # A resonant server that answers after the fallback (e.g. a loaded machine): its capability
    # answers this client's ping, so the client adopts what it agrees (issue 16 part 3, late answer).
    c, s, pings = _late_pair(compress=("zstd", "none"))
    c.send(Think(np.ones((1, 8), np.float32), stream_id=3), 1.2)  # sent in reference mode: version 1, f16
    (early,) = c.datagrams_to_send()
    (msg,) = s.receive_datagram(early, 1.4)  # (a resonant server reads what reference mode sent)
    assert early[0] == 1 and msg.frame.slices[0].dtype == DType.F16
    events = [e for p in pings for e in s.receive_datagram(p, 1.5)]
    assert isinstance(events[-1], HandshakeComplete) and not events[-1].agreement.reference
    caps = s.datagrams_to_send()
    assert len(caps) == 2  # (each ping answered)
    events = c.receive_datagram(caps[0], 1.6)
    (done,) = [e for e in events if isinstance(e, HandshakeComplete)]
    assert isinstance(events[-1], HandshakeComplete)
    a = done.agreement
    assert not a.reference and a is c.agreement and (a.proto, a.compress) == (2, "zstd")
    assert not c.reference_mode and c.state is State.ESTABLISHED
    # the answer to the retry comes next: established with a real agreement, a capability is ignored
    assert [type(e).__name__ for e in c.receive_datagram(caps[1], 1.7)] == ["MessageReceived"] and c.agreement is a
    # frames now go with what was agreed, a V-Stream included, and the server takes them
    f32 = _rng.standard_normal((1, 64)).astype(np.float32)
    c.send(Think(f32, stream_id=5), 2.0)
    (data,) = c.datagrams_to_send()
    (msg,) = s.receive_datagram(data, 2.0)
    assert np.array_equal(msg.frame.slices[0].numpy(), f32)  # f32 as it is: no reference dtypes any more
    objs = [_rng.standard_normal((64, 512)).astype(np.float16) for _ in range(3)]
    for d in c.stream(c.new_stream_id(), objs, names=["a", "b", "c"]):
        c.send_encoded(d)
    out = c.datagrams_to_send()
    assert len(out) > 3
    events = [e for d in out for e in s.receive_datagram(d, 2.0)]
    assert isinstance(events[-1], StreamComplete)
    assert all(np.array_equal(x, y) for x, y in zip(events[-1].objects, objs))


def test_a_capability_that_does_not_answer_this_clients_ping_leaves_reference_mode_alone():
    # The capability goes through the same checks as in await_capability: one that echoes a
    # client_random answers a keyed client's ping (this client's pings carry none) and is stale;
    # one this client cannot use is ignored (reference mode goes on: the peer reads version 1).
    c, s, pings = _late_pair()
    stray = {"method": "capability", "v": 2, "agreed_proto": 2, "client_random": "ab" * 32,
             "server_random": "cd" * 32}
    for at in (0.5, 2.0):  # the same rule before the fallback (await_capability) and after it
        fresh = _client()
        fresh.initiate(0.0)
        if at > WAIT:
            fresh.tick(WAIT)
        before = fresh.state
        (ev,) = fresh.receive_datagram(_control(stray), at)
        assert ev.reason == "stale" and "does not answer this client's current ping" in ev.detail
        assert fresh.state is before and fresh.stats["stale"] == 1
    (ev,) = c.receive_datagram(_control(stray), 2.0)
    assert ev.reason == "stale" and c.reference_mode
    unusable = {"method": "capability", "v": 9, "agreed_proto": 9}
    assert [type(e).__name__ for e in c.receive_datagram(_control(unusable), 2.0)] == ["MessageReceived"]
    assert c.reference_mode and c.state is State.ESTABLISHED
    # and an established client with a real agreement ignores a capability, as before
    s.receive_datagram(pings[0], 2.0)
    (cap,) = s.datagrams_to_send()
    c.receive_datagram(cap, 2.1)
    a = c.agreement
    other = {"method": "capability", "v": 1, "agreed_proto": 1}
    assert [type(e).__name__ for e in c.receive_datagram(_control(other), 2.2)] == ["MessageReceived"]
    assert c.agreement is a and not c.reference_mode


def test_a_new_handshake_after_the_fallback_replaces_reference_mode():
    # (formerly test_a_late_capability_is_ignored_and_a_new_handshake_replaces_reference_mode: a late
    # capability is no longer ignored, see the two tests above; a new handshake still works)
    c, s = _fallen_back(), Session(role="server")
    c.initiate(3.0)  # a handshake started again (e.g. the application's) that completes: what it agrees
    (ping,) = c.datagrams_to_send()
    s.receive_datagram(ping, 3.0)
    (cap,) = s.datagrams_to_send()
    events = c.receive_datagram(cap, 3.0)
    assert isinstance(events[-1], HandshakeComplete) and not c.reference_mode and c.agreement.proto == 2


def _control(doc: dict) -> bytes:
    return resonant.encode(resonant.Sync(json.dumps(doc).encode(), stream_id=0, frame_seq=9))


# ------------------------------------------------------------------ capture and the reference's decoder


def _drain(sock: socket.socket) -> list[bytes]:
    out = []
    sock.setblocking(False)
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


def _records(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    assert pos == len(data)
    return out


def _decode_frames(tmp_path, frames: list[bytes]) -> list[dict]:
    for i, data in enumerate(frames):
        (tmp_path / f"{i:03d}.bin").write_bytes(data)
    out = subprocess.run([str(REF_BIN / "decode_frames"), str(tmp_path)], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    by_file = {r["file"]: r for r in map(json.loads, filter(None, out.splitlines()))}
    return [by_file[f"{i:03d}.bin"] for i in range(len(frames))]


def _assert_equal_fields(data: bytes, record: dict) -> resonant.Frame:
    """The reference's decoder read the frame, with every field equal to resonant's reading."""
    assert record.get("ok") is True, record.get("error")
    frame = resonant.decode(data)
    for name in HEADER:
        assert record[name] == int(getattr(frame, name)), name
    assert [(s["dtype"], tuple(s["shape"]), s["payload_hex"]) for s in record["slices"]] == \
        [(int(s.dtype), s.shape, bytes(s.payload).hex()) for s in frame.slices]
    assert record["reencode_identical"] is True
    return frame


def _messages():
    """(message as the application gives it, the slices the reference should get: dtype, array or payload)."""
    f16 = _rng.standard_normal((1, 256)).astype(np.float16)
    f32 = _rng.standard_normal((2, 64)).astype(np.float32)
    bf16 = _rng.standard_normal((64,)).astype(ml_dtypes.bfloat16)
    i8 = _rng.integers(-128, 128, (3, 100), dtype=np.int8)
    q4 = Slice(DType.Q4, (32,), _rng.integers(0, 256, 16, dtype=np.uint8).tobytes())
    k, v = _rng.standard_normal((2, 2, 4, 8)).astype(np.float32)
    return [
        (Think(f16, stream_id=21, space_hash32=5), [(DType.F16, f16)]),
        (Think(f32, stream_id=21, space_hash32=5), [(DType.F16, f32.astype(np.float16))]),
        (Think(bf16, stream_id=22), [(DType.F16, bf16.astype(np.float16))]),
        (Think(i8, stream_id=23), [(DType.I8, i8)]),
        (Think(q4, stream_id=24), [(DType.Q4, bytes(q4.payload))]),
        (resonant.Cache(k, v, stream_id=25), [(DType.F16, k.astype(np.float16)), (DType.F16, v.astype(np.float16))]),
        (resonant.Critique(f16[0, :16], stream_id=26), [(DType.F16, f16[0, :16])]),
    ]


def _check_payloads(frame, expected) -> None:
    assert len(frame.slices) == len(expected)
    for s, (dtype, want) in zip(frame.slices, expected):
        assert s.dtype == dtype
        if isinstance(want, bytes):
            assert bytes(s.payload) == want
        else:
            assert s.shape == want.shape and bytes(s.payload) == np.ascontiguousarray(want).tobytes()


def test_udp_peer_leaves_reference_mode_when_the_capability_comes_late():
    # connect() falls back (nothing answered within the wait); then a resonant server answers the
    # pings it kept: peer.reference_mode turns false and a V-Stream goes through to it.
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    server = Session(role="server")

    def serve(events: list) -> None:  # what waits on the socket, through the server Session
        srv.setblocking(False)
        while True:
            try:
                data, addr = srv.recvfrom(65536)
            except BlockingIOError:
                return
            events += server.receive_datagram(data, time.monotonic())
            for d in server.datagrams_to_send():
                srv.sendto(d, addr)

    async def run() -> list:
        async with connect(f"udp://127.0.0.1:{srv.getsockname()[1]}", reference_fallback=True, timeout=5.0) as peer:
            assert peer.reference_mode
            serve([])  # the pings, answered late
            deadline = time.monotonic() + 5.0
            event = None
            while not isinstance(event, HandshakeComplete) and time.monotonic() < deadline:
                event = await peer.next_event(timeout=5.0)  # (the capability's MessageReceived first)
            assert isinstance(event, HandshakeComplete) and not event.agreement.reference
            assert not peer.reference_mode and peer.agreement.proto == 2
            objs = [_rng.standard_normal((64, 1024)).astype(np.float16)]
            events: list = []

            async def pump() -> None:  # the server reads (and reports, then judges) while the stream goes
                while True:
                    serve(events)
                    server.tick(time.monotonic())
                    for d in server.datagrams_to_send():
                        srv.sendto(d, peer_addr[0])
                    await asyncio.sleep(0.005)

            peer_addr = [peer._link.transport.get_extra_info("sockname")]
            task = asyncio.ensure_future(pump())
            try:
                await peer.send_stream(objs)  # returns once the server's verdict came: verified
            finally:
                task.cancel()
            assert peer.agreement.feedback
            return [e for e in events if isinstance(e, StreamComplete)], objs

    try:
        (done,), objs = asyncio.run(run())
        assert np.array_equal(done.objects[0], objs[0])
    finally:
        srv.close()


async def _send_all(url: str, messages) -> None:
    async with connect(url, reference_fallback=True, timeout=5.0) as peer:
        assert peer.reference_mode and peer.agreement.proto == 1
        for message, _ in messages:
            await peer.send(message)
        with pytest.raises(LocalProtocolError, match="no V-Stream reassembly"):
            await peer.send_stream([np.zeros(100_000, np.float16)])
        await asyncio.sleep(0.05)


@need_ref
def test_udp_reference_mode_frames_are_read_by_the_reference_decoder(tmp_path):
    messages = _messages()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # a receiver that never answers a ping
        silent.bind(("127.0.0.1", 0))
        t = time.monotonic()
        asyncio.run(asyncio.wait_for(_send_all(f"udp://127.0.0.1:{silent.getsockname()[1]}", messages), 15))
        assert time.monotonic() - t < 10
        got = _drain(silent)
    pings = [d for d in got if resonant.decode(d).msg_type == MsgType.SYNC]
    data = [d for d in got if d not in pings]
    assert 1 <= len(pings) <= 3 and all(json.loads(resonant.decode(p).json.tobytes())["method"] == "ping"
                                        for p in pings)
    assert len(data) == len(messages)  # the refused V-Stream sent nothing
    records = _decode_frames(tmp_path, data)
    for d, rec, (message, expected) in zip(data, records, messages):
        frame = _assert_equal_fields(d, rec)
        assert rec["version"] == 1 and rec["msg_type"] == int(message.msg_type)
        assert (rec["stream_id"], rec["space_hash32"]) == (message.stream_id, message.space_hash32)
        _check_payloads(frame, expected)


@need_ref
def test_tcp_reference_mode_behaves_the_same(tmp_path):
    """The reference has no TCP receiver; a TCP peer that accepts and never answers is treated alike."""
    messages = _messages()[:3]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # the kernel accepts the connection; nobody reads until the client is done
        asyncio.run(asyncio.wait_for(_send_all(f"tcp://127.0.0.1:{listener.getsockname()[1]}", messages), 15))
        listener.settimeout(5)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            buf = b""
            while chunk := conn.recv(65536):
                buf += chunk
    frames = _records(buf)
    data = [d for d in frames if resonant.decode(d).msg_type != MsgType.SYNC]
    assert len(data) == len(messages) and len(frames) - len(data) <= 3  # (the pings)
    for d, rec, (_, expected) in zip(data, _decode_frames(tmp_path, data), messages):
        _check_payloads(_assert_equal_fields(d, rec), expected)


def test_connect_refuses_reference_fallback_with_a_key():
    async def go():
        with pytest.raises(ValueError, match="never falls back to reference mode"):
            await connect("udp://127.0.0.1:9", reference_fallback=True, key=Key.generate())
        with pytest.raises(ValueError, match="never falls back to reference mode"):
            await connect("udp://127.0.0.1:9", reference_fallback=True, strict=True)
    asyncio.run(asyncio.wait_for(go(), 10))


def test_nothing_listening_is_still_an_error_not_reference_mode():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: ICMP port unreachable

    async def go():
        with pytest.raises(HandshakeRefused, match="nothing listens"):
            await connect(f"udp://127.0.0.1:{port}", reference_fallback=True, timeout=5.0)
    asyncio.run(asyncio.wait_for(go(), 10))


# ------------------------------------------------------------------ `resonant send`


def _cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
                          cwd=CHILD_CWD)


@need_ref
def test_cli_send_with_no_options_falls_back_and_the_reference_reads_it(tmp_path):
    arr = _rng.standard_normal((1, 2048)).astype(np.float32)
    np.save(tmp_path / "h.npy", arr)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        url = f"udp://127.0.0.1:{silent.getsockname()[1]}"
        r = _cli("send", "--to", url, str(tmp_path / "h.npy"), "--stream-id", "77")
        got = _drain(silent)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0] == (f"resonant send: no capability from {url} within {WAIT} s: the peer looks like a reference "
                        "receiver; sending version-1 frames (f16/i8/q4/sparse, one frame per message)")
    assert lines[1] == f"sent THINK float32[1, 2048] (8192 bytes) converted to f16 (what the peer reads) to {url}: 4143 bytes on the wire"
    data = [d for d in got if resonant.decode(d).msg_type != MsgType.SYNC]
    assert len(data) == 1
    (rec,) = _decode_frames(tmp_path, data)
    frame = _assert_equal_fields(data[0], rec)
    assert (rec["version"], rec["msg_type"], rec["stream_id"], rec["frame_seq"]) == (1, int(MsgType.THINK), 77, 0)
    _check_payloads(frame, [(DType.F16, arr.astype(np.float16))])


@pytest.mark.pure_skip  # (each waits for the whole handshake: ~5 s)
@pytest.mark.parametrize("option", ["--key-file", "--strict"])
def test_cli_send_with_a_key_or_strict_never_falls_back(tmp_path, option):
    np.save(tmp_path / "h.npy", np.ones((1, 16), np.float16))
    args = ["--key-file", str(tmp_path / "k.key")] if option == "--key-file" else ["--strict"]
    if option == "--key-file":
        Key.generate().to_file(tmp_path / "k.key")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        r = _cli("send", "--to", f"udp://127.0.0.1:{silent.getsockname()[1]}", str(tmp_path / "h.npy"), *args)
        got = _drain(silent)
    assert r.returncode == 1, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("resonant send: handshake: TIMEOUT: no capability after 6 pings"), line
    assert "never falls back to reference mode" in line
    assert len(got) == 6 and all(d[1] == MsgType.SYNC for d in got)  # the pings only, nothing sent


@need_ref
def test_cli_send_refuses_an_array_larger_than_one_frame_in_reference_mode(tmp_path):
    np.save(tmp_path / "big.npy", np.zeros((1, 100_000), np.float16))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        r = _cli("send", "--to", f"udp://127.0.0.1:{silent.getsockname()[1]}", str(tmp_path / "big.npy"))
        got = _drain(silent)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"resonant send: send: {tmp_path / 'big.npy'} holds 200000 bytes, more than one frame "
                           "carries (65507 bytes); reference mode"), last
    assert "because the reference has no V-Stream reassembly" in last
    assert all(d[1] == MsgType.SYNC and json.loads(resonant.decode(d).json.tobytes())["method"] == "ping" for d in got)


@need_ref
def test_cli_send_with_no_options_to_recv_think(tmp_path):
    """The issue's case: `resonant send` with no options to the reference's receiver example, which
    prints each frame (never answering the pings): the Think arrives, its printed fields equal."""
    arr = _rng.standard_normal((1, 2048)).astype(np.float16)
    np.save(tmp_path / "h.npy", arr)
    with recv_think() as out:
        r = _cli("send", "--to", "udp://127.0.0.1:50051", str(tmp_path / "h.npy"), "--stream-id", "0x2a25c22c",
                 "--space-hash", "2451163210")
    (text,) = out
    assert r.returncode == 0, r.stderr
    assert "looks like a reference receiver" in r.stderr and "sent THINK float16[1, 2048]" in r.stderr
    frames = text.split("Frame #")[1:]
    thinks = [f for f in frames if "Type: Think" in f]
    assert len(thinks) == 1, text
    think = resonant.encode(Think(arr, stream_id=0x2A25C22C, space_hash32=2451163210))
    assert f"Received {len(think)} bytes" in text
    for expected in ("Version: 1", "Type: Think", "Stream ID: 0x2a25c22c", "Sequence: 0", "Slices: 1",
                     "Space hash: 0x9219c84a", "Modality: Text", "Flags: Flags(0x0)",
                     f"CRC32: 0x{int.from_bytes(think[-4:], 'little'):08x} ✓",
                     "Slice 0: F16 shape=[1, 2048] size=4096 bytes"):
        assert expected in thinks[0], expected
    assert all("Type: Sync" in f for f in frames if f is not thinks[0])  # the pings, unanswered


@pytest.mark.parametrize("message", [resonant.Sync(), resonant.make_frame(MsgType.THINK, []),
                                     resonant.make_frame(MsgType.SYNC, [], empty_slice_len=True)])
def test_reference_mode_refuses_a_frame_with_no_slices(message):
    """The reference's decoder rejects a frame with no slices in both forms (33 bytes: "slice_len
    field is empty"; the Rust encoder's 37 bytes as well): reference mode refuses it, sends nothing."""
    c = _fallen_back()
    with pytest.raises(LocalProtocolError, match="no slices"):
        c.send(message, 1.0)
    assert c.datagrams_to_send() == []


@need_ref
def test_reference_mode_sends_an_explanation_where_the_reference_reads_it(tmp_path):
    """The reference reads slices[1] of a 2-slice Critique as the mask: in reference mode a Critique
    with an explanation and no mask goes as three slices, the mask empty, the explanation third;
    one with a mask (and with or without an explanation) goes as it is."""
    div = np.arange(16, dtype=np.float16)
    mask = np.array([3, 7], np.int8)
    c = _fallen_back()
    cases = [resonant.Critique(div, explanation={"note": "dims 3 and 7"}),
             resonant.Critique(div, mask, {"note": "dims 3 and 7"}),
             resonant.Critique(div, mask)]
    sent = []
    for message in cases:
        c.send(message, 1.0)
        (data,) = c.datagrams_to_send()
        sent.append(data)
    records = _decode_frames(tmp_path, sent)
    frames = [_assert_equal_fields(d, r) for d, r in zip(sent, records)]
    expl_only, both, mask_only = frames
    assert len(expl_only.slices) == 3 and expl_only.layout_ok
    assert expl_only.mask.shape == (0,) and expl_only.explanation.json() == {"note": "dims 3 and 7"}
    assert records[0]["slices"][1]["shape"] == [0]  # what the reference reads as the mask: empty
    assert np.array_equal(expl_only.divergence.numpy(), div)
    assert len(both.slices) == 3 and np.array_equal(both.mask.numpy(), mask)
    assert both.explanation.json() == {"note": "dims 3 and 7"}
    assert np.array_equal(mask_only.mask.numpy(), mask)
    assert records[2]["slices"][1]["payload_hex"] == mask.tobytes().hex()  # the reference's mask: the mask
