"""The sans-IO session: every state x input of the handshake table, negotiation, space-hash
enforcement, strict mode, replay and TCP records through a Session (the ReplayWindow and
RecordReader alone are in test_replay.py and test_records.py, the table in test_transitions.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import resonant
from conftest import vector_bytes
from resonant import Key, ModelSignature, Sync, Think, _codec
from resonant._spec import DEFAULT_DTYPES, REFERENCE_DTYPES
from resonant.errors import LocalProtocolError
from resonant.session import (
    TRANSITIONS,
    Action,
    ConnectionBroken,
    FrameRejected,
    HandshakeComplete,
    HandshakeFailed,
    Input,
    MessageReceived,
    RemoteError,
    Role,
    Session,
    SessionConfig,
    State,
    frame_record,
)
from resonant.stream import StreamComplete, StreamSender

SPACE = 0x1234ABCD


def handshake(client: Session, server: Session, now: float = 0.0) -> tuple[list, list]:
    client.initiate(now)
    s_events = [e for d in client.datagrams_to_send() for e in server.receive_datagram(d, now)]
    c_events = [e for d in server.datagrams_to_send() for e in client.receive_datagram(d, now)]
    return c_events, s_events


def kinds(events) -> list[str]:
    return [type(e).__name__ for e in events]


def control(doc: dict, seq: int = 0, space: int = 0) -> bytes:
    return _codec.encode(Sync(json.dumps(doc).encode(), frame_seq=seq, space_hash32=space))


# ------------------------------------------------------------------ the state table


# Inputs as real bytes (or local calls). The server expects SPACE; strict is off so that
# DATA before the handshake is accepted (strict mode has its own tests).
PING_OK = {"method": "ping", "v": 2, "space_hash32": SPACE}
PING_BAD = {"method": "ping", "v": 2, "space_hash32": SPACE ^ 1}
CAP_OK = {"method": "capability", "v": 2, "agreed_proto": 2, "compress": ["none"], "crypto": ["none"]}
CAP_BAD = {"method": "capability", "v": 9, "agreed_proto": 9}
ERROR = {"method": "error", "code": "INTERNAL", "message": "boom"}


def _config(role: Role) -> SessionConfig:
    # (the reference fallback is allowed, its wait far beyond any RETRY the tests feed: SILENCE comes
    # only when _feed gives it)
    return SessionConfig(role=role, space_hash32=SPACE, expected_space_hash=SPACE, strict=False,
                         handshake_attempts=2, handshake_retry=0.5, reference_fallback=True,
                         reference_fallback_wait=1000.0)


def _drive_to(role: Role, state: State) -> Session:
    """A session brought to `state` by real inputs."""
    s = Session(_config(role))
    if state is State.IDLE:
        return s
    if state is State.CLOSED:
        s.close(0.0)
        return s
    if role is Role.SERVER:
        assert state is State.ESTABLISHED
        s.receive_datagram(control(PING_OK, space=SPACE), 0.0)
    else:
        s.initiate(0.0)
        if state is State.ESTABLISHED:
            s.receive_datagram(control(CAP_OK, space=SPACE), 0.0)
        elif state is State.FAILED:
            s.receive_datagram(control(ERROR, space=SPACE), 0.0)
    s.datagrams_to_send()
    assert s.state is state
    return s


def _feed(s: Session, inp: Input) -> list:
    data = {
        Input.PING_OK: lambda: control(PING_OK, 5, SPACE),
        Input.PING_BAD: lambda: control(PING_BAD, 5, SPACE),
        Input.CAPABILITY_OK: lambda: control(CAP_OK, 5, SPACE),
        Input.CAPABILITY_BAD: lambda: control(CAP_BAD, 5, SPACE),
        Input.ERROR: lambda: control(ERROR, 5, SPACE),
        Input.DATA: lambda: _codec.encode(Think(np.ones((1, 8), np.float16), stream_id=3, space_hash32=SPACE)),
        Input.BAD_FRAME: lambda: b"\x01\x00 definitely not a frame",
    }
    if inp in data:
        return s.receive_datagram(data[inp](), 1.0)
    if inp is Input.START:
        return s.initiate(1.0) or []
    if inp is Input.CLOSE:
        return s.close(1.0) or []
    if inp is Input.RETRY:
        s._pings_sent = 0
        return s.tick(s._next_ping + 0.01)  # past handshake_retry, with attempts left
    if inp is Input.SILENCE:  # past the reference fallback's wait (with attempts left)
        s._pings_sent = 0
        return s.tick(max(s._silence_at, s._next_ping) + 0.01)
    s._pings_sent = s.config.handshake_attempts  # DEADLINE: attempts used up
    return s.tick(s._next_ping + 0.01)


REACHABLE = [(r, st_) for r, st_ in sorted({(r, s) for (r, s, _) in TRANSITIONS}, key=str)
             if not (r is Role.SERVER and st_ in (State.AWAIT_CAPABILITY, State.FAILED))]


@pytest.mark.parametrize("role,state", REACHABLE)
@pytest.mark.parametrize("inp", list(Input))
def test_every_state_input_pair(role, state, inp):
    s = _drive_to(role, state)
    action, nxt = TRANSITIONS[role, state, inp]
    if action is Action.INVALID:
        with pytest.raises(LocalProtocolError):
            _feed(s, inp)
        assert s.state is state  # a refused call changes nothing
        return
    before = s.agreement
    events = _feed(s, inp)
    assert s.state is nxt, (role, state, inp, action)
    sent = s.datagrams_to_send()
    if action is Action.SEND_PING:
        assert [json.loads(_codec.decode(d).json.tobytes())["method"] for d in sent] == ["ping"]
    if action is Action.ANSWER_CAPABILITY:
        assert json.loads(_codec.decode(sent[-1]).json.tobytes())["method"] == "capability"
        assert isinstance(events[-1], HandshakeComplete)
    if action is Action.REFUSE_PING:  # answered, the session stays (review 1, F4)
        assert json.loads(_codec.decode(sent[-1]).json.tobytes())["code"] == "SPACE_MISMATCH"
        assert kinds(events) == ["FrameRejected"] and s.agreement is not None  # (rejected input: issue 16 part 4)
    if action is Action.ANSWER_ERROR:
        assert json.loads(_codec.decode(sent[-1]).json.tobytes())["code"] == "SPACE_MISMATCH"
        assert isinstance(events[-1], HandshakeFailed)
    if action is Action.ADOPT:
        assert isinstance(events[-1], HandshakeComplete) and s.agreement is not None
    if action is Action.FAIL:
        assert isinstance(events[-1], HandshakeFailed) and s.agreement is None
    if action is Action.ADOPT_IF_REFERENCE:  # (a real agreement here: test_reference_established_... has the other)
        assert kinds(events) == ["MessageReceived"] and s.agreement is before and not s.reference_mode
    if action is Action.ASSUME_REFERENCE:
        assert isinstance(events[-1], HandshakeComplete) and events[-1].agreement.reference and s.reference_mode
        assert sent == []  # (and no ping: the silence came first)
    if action in (Action.ACCEPT, Action.ACCEPT_IF_LENIENT):
        assert kinds(events) == ["MessageReceived"]
    if action is Action.REPORT_BAD_FRAME:
        assert kinds(events) == ["FrameRejected"] and events[0].reason == "malformed"
    if action is Action.REPORT_REMOTE_ERROR:
        assert isinstance(events[-1], RemoteError) and events[-1].code == "INTERNAL"
    if action is Action.DROP and inp not in (Input.CLOSE, Input.RETRY, Input.DEADLINE, Input.SILENCE):
        assert kinds(events) == ["FrameRejected"] and events[0].reason == "closed"
    if action is Action.SHUTDOWN:
        assert sent == []


@pytest.mark.parametrize("inp", list(Input))
def test_reference_established_client_follows_the_table_and_adopts_a_late_capability(inp):
    # established in reference mode (the silence came first): the same row; capability_ok
    # (adopt_if_reference) adopts the real agreement and leaves reference mode
    s = _drive_to(Role.CLIENT, State.AWAIT_CAPABILITY)
    _feed(s, Input.SILENCE)
    assert s.state is State.ESTABLISHED and s.reference_mode
    action, nxt = TRANSITIONS[Role.CLIENT, State.ESTABLISHED, inp]
    events = _feed(s, inp)
    assert s.state is nxt
    if inp is Input.CAPABILITY_OK:
        assert action is Action.ADOPT_IF_REFERENCE
        assert kinds(events) == ["MessageReceived", "HandshakeComplete"] and events[-1].agreement is s.agreement
        assert not s.reference_mode and s.agreement.proto == 2
    elif inp not in (Input.START, Input.CLOSE):
        assert s.reference_mode  # nothing else leaves it (a new handshake does once it completes)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from([i for i in Input]), max_size=12), st.sampled_from([Role.CLIENT, Role.SERVER]))
def test_random_input_sequences_follow_the_table(inputs, role):
    s = Session(_config(role))
    for inp in inputs:
        before = s.state
        action, nxt = TRANSITIONS[role, before, inp]
        if action is Action.INVALID:
            with pytest.raises(LocalProtocolError):
                _feed(s, inp)
            assert s.state is before
        else:
            _feed(s, inp)
            assert s.state is nxt
        s.datagrams_to_send()


# ------------------------------------------------------------------ negotiation


def test_default_handshake_and_data():
    c, s = Session(role="client"), Session(role="server")
    c_events, s_events = handshake(c, s)
    assert kinds(s_events) == ["MessageReceived", "HandshakeComplete"]
    assert isinstance(c_events[-1], HandshakeComplete)
    a = c.agreement
    assert (a.proto, a.compress, a.crypto, a.max_frame_bytes) == (2, "none", "none", 65536)
    arr = np.arange(2048, dtype=np.float16).reshape(1, 2048)
    c.send(Think(arr, stream_id=4))
    (ev,) = s.receive_data(c.data_to_send(), 0.0)
    assert isinstance(ev, MessageReceived) and np.array_equal(ev.frame.hidden.numpy(), arr)


def test_client_uses_best_common_compression_and_smaller_frame():
    c = Session(role="client", compress=("zstd", "none"), max_frame_bytes=1200)
    s = Session(role="server", compress=("zstd", "none"))
    handshake(c, s)
    assert c.agreement.compress == "zstd" and c.agreement.max_frame_bytes == 1200
    assert s.agreement.max_frame_bytes == 1200
    c.send(Think(np.zeros((1, 256), np.float16)))
    (d,) = c.datagrams_to_send()
    assert d[0] == 2  # a version-2 (compressed) frame
    (ev,) = s.receive_datagram(d, 0.0)
    assert ev.frame.hidden.numpy().sum() == 0


def test_unsupported_features_are_reduced_not_fatal():
    c = Session(role="client", compress=("zstd", "none"))
    s = Session(role="server", compress=("none",))  # this server never reads zstd
    c_events, _ = handshake(c, s)
    assert isinstance(c_events[-1], HandshakeComplete)
    assert c.agreement.compress == "none"
    c.send(Think(np.zeros((1, 256), np.float16)))
    assert c.datagrams_to_send()[0][0] == 1


def test_reference_ping_gets_protocol_1():
    s = Session(role="server", compress=("zstd", "none"))
    events = s.receive_datagram(vector_bytes("01_sync_ping.bin"), 0.0)
    assert isinstance(events[-1], HandshakeComplete)
    cap = json.loads(_codec.decode(s.datagrams_to_send()[0]).json.tobytes())
    assert cap["agreed_proto"] == 1 and cap["compress"] == ["none"] and cap["crypto"] == ["none"]


def test_unsupported_version():
    s = Session(role="server")
    events = s.receive_datagram(control({"method": "ping", "v": 0}), 0.0)
    assert isinstance(events[-1], HandshakeFailed) and events[-1].code == "UNSUPPORTED_VERSION"
    reply = json.loads(_codec.decode(s.datagrams_to_send()[0]).json.tobytes())
    assert reply["code"] == "UNSUPPORTED_VERSION" and reply["got"] == "0"


def test_encryption_negotiated_and_required():
    key = Key.generate()
    c, s = Session(role="client", key=key), Session(role="server", key=key)
    c_events, _ = handshake(c, s)
    assert c.agreement.crypto == "xchacha20poly1305"
    c.send(Think(np.ones((1, 64), np.float16), stream_id=1))
    (ev,) = s.receive_datagram(c.datagrams_to_send()[0], 0.0)
    assert isinstance(ev, MessageReceived)
    plain = _codec.encode(Think(np.ones((1, 64), np.float16), stream_id=1, frame_seq=50))
    (ev,) = s.receive_datagram(plain, 0.0)
    assert isinstance(ev, FrameRejected) and ev.reason == "not_encrypted"


def test_server_with_key_refuses_a_client_without_encryption():
    s = Session(role="server", key=Key.generate())
    # A plain ping to a server that requires encryption is refused, in the clear so that the
    # client can read why; being unauthenticated, it is not an input of the state machine (review 1, F4).
    events = s.receive_datagram(control({"method": "ping", "v": 2, "crypto": ["none"]}), 0.0)
    assert kinds(events) == ["FrameRejected"] and events[0].reason == "not_encrypted"
    assert s.state is State.IDLE
    (reply,) = s.datagrams_to_send()
    assert reply[0] == 1 and json.loads(_codec.decode(reply).json.tobytes())["code"] == "UNSUPPORTED_FEATURE"


def test_keyless_client_learns_at_once_that_the_server_requires_encryption():
    c, s = Session(role="client"), Session(role="server", key=Key.generate())
    c_events, _ = handshake(c, s)
    assert isinstance(c_events[-1], HandshakeFailed) and c_events[-1].code == "UNSUPPORTED_FEATURE"
    assert "requires encryption" in c_events[-1].message and c.state is State.FAILED


def test_keyed_client_learns_that_the_server_cannot_decrypt():
    # The refusal comes in the clear, so it is unauthenticated: it does not end a keyed client's
    # handshake (anyone could send it, issue 14 item 8), but the TIMEOUT names it.
    c, s = Session(role="client", key=Key.generate(), handshake_attempts=2), Session(role="server")
    c_events, s_events = handshake(c, s)
    assert kinds(s_events) == ["FrameRejected"] and s_events[0].reason == "malformed"
    assert kinds(c_events) == ["FrameRejected"] and c_events[0].reason == "unauthenticated"
    assert c.state is State.AWAIT_CAPABILITY
    c.tick(1.0)
    c.datagrams_to_send()
    (failed,) = c.tick(2.0)
    assert failed.code == "TIMEOUT" and "BAD_REQUEST" in failed.message and "key" in failed.message
    assert c.state is State.FAILED


def test_client_without_key_against_keyless_server_offering_none():
    c = Session(role="client", crypto=("none",))
    s = Session(role="server")
    handshake(c, s)
    assert c.agreement.crypto == "none"


def test_space_mismatch_is_explained():
    mine = ModelSignature("org/model-a", "r1", "f16", 6, 384, 12, 32, "tok1")
    theirs = ModelSignature("org/model-b", "r1", "f16", 6, 384, 12, 32, "tok1")
    s = Session(role="server", expected_space_hash=mine.space_hash32(), model_signature=mine)
    c = Session(role="client", space_hash32=theirs.space_hash32(), model_signature=theirs)
    c_events, s_events = handshake(c, s)
    assert isinstance(s_events[-1], HandshakeFailed) and s_events[-1].code == "SPACE_MISMATCH"
    assert "model_id" in s_events[-1].message and "model-b" in s_events[-1].message
    assert isinstance(c_events[-1], HandshakeFailed) and c_events[-1].code == "SPACE_MISMATCH"
    assert c.state is State.FAILED


def test_space_hash_enforced_on_data():
    s = Session(role="server", expected_space_hash=SPACE, strict=False)
    events = s.receive_datagram(_codec.encode(Think(np.ones((1, 4), np.float16), space_hash32=7)), 0.0)
    assert kinds(events) == ["FrameRejected"] and events[0].reason == "space_mismatch"
    reply = json.loads(_codec.decode(s.datagrams_to_send()[0]).json.tobytes())
    assert reply["code"] == "SPACE_MISMATCH" and reply["expected"] == str(SPACE) and reply["got"] == "7"
    # the error's offset is where space_hash32 is in that frame (after one slice_len entry), from the spec
    data = _codec.encode(Think(np.ones((1, 4), np.float16), space_hash32=7))
    err = s.receive_datagram(data, 0.0)[0].error
    assert int.from_bytes(data[err.offset:err.offset + 4], "little") == 7


def test_strict_mode_requires_the_handshake():
    s = Session(role="server", expected_space_hash=SPACE)  # strict by default
    assert s.config.is_strict
    data = _codec.encode(Think(np.ones((1, 4), np.float16), space_hash32=SPACE))
    events = s.receive_datagram(data, 0.0)
    assert kinds(events) == ["FrameRejected"] and events[0].reason == "handshake_required"
    assert json.loads(_codec.decode(s.datagrams_to_send()[0]).json.tobytes())["code"] == "HANDSHAKE_REQUIRED"
    s.receive_datagram(control(PING_OK, 1, SPACE), 0.0)
    assert kinds(s.receive_datagram(data, 0.0)) == ["MessageReceived"]


def test_lenient_by_default_like_the_reference_receiver():
    s = Session(role="server")
    assert not s.config.is_strict
    assert kinds(s.receive_datagram(_codec.encode(Think(np.ones((1, 4), np.float16))), 0.0)) == ["MessageReceived"]


@pytest.mark.parametrize("payload", [
    # (b"{not json", not JSON at all, is no control document: a message now, test_liberal.py)
    b"[]", json.dumps({"method": "ping", "v": -1}).encode(),
    json.dumps({"method": "nope"}).encode(), b'{"method":"ping","x":"' + b"a" * 60100 + b'"}',  # over max_json_bytes (60,000), fits a frame
    json.dumps({"method": "capability"}).encode(),
])
def test_bad_or_oversized_json_gets_an_error_reply(payload):
    s = Session(role="server")
    frame = _codec.encode(Sync(payload)) if len(payload) < 65000 else None
    if frame is None:
        pytest.skip("does not fit one frame")
    events = s.receive_datagram(frame, 0.0)
    assert kinds(events) == ["FrameRejected"] and events[0].reason == "malformed"
    reply = json.loads(_codec.decode(s.datagrams_to_send()[0]).json.tobytes())
    assert reply["method"] == "error" and reply["code"] == "BAD_REQUEST"


def test_error_replies_are_rate_limited():
    s = Session(role="server")
    for i in range(50):
        s.receive_datagram(b"garbage" * i, 0.001 * i)
    assert len(s.datagrams_to_send()) == 1
    s.receive_datagram(b"garbage", 2.0)
    assert len(s.datagrams_to_send()) == 1
    assert s.stats["malformed"] == 51


def test_ping_retries_then_fails():
    c = Session(role="client", handshake_retry=0.5, handshake_attempts=3)
    c.initiate(0.0)
    assert len(c.datagrams_to_send()) == 1
    assert c.tick(0.2) == [] and c.datagrams_to_send() == []
    c.tick(0.6)
    c.tick(1.2)
    assert len(c.datagrams_to_send()) == 2
    events = c.tick(1.8)
    assert isinstance(events[-1], HandshakeFailed) and events[-1].code == "TIMEOUT"
    assert c.state is State.FAILED


def test_repeated_ping_is_answered_again():
    c, s = Session(role="client"), Session(role="server")
    c.initiate(0.0)
    ping = c.datagrams_to_send()[0]
    s.receive_datagram(ping, 0.0)
    s.datagrams_to_send()  # the capability is lost
    c.tick(1.0)
    (retry,) = c.datagrams_to_send()
    events = s.receive_datagram(retry, 1.0)
    assert isinstance(events[-1], HandshakeComplete)
    (cap,) = s.datagrams_to_send()
    assert isinstance(c.receive_datagram(cap, 1.0)[-1], HandshakeComplete)


def test_local_misuse():
    s = Session(role="server")
    with pytest.raises(LocalProtocolError, match="only a client"):
        s.initiate(0.0)
    s.close()
    with pytest.raises(LocalProtocolError, match="closed"):
        s.send(Think(np.ones((1, 4), np.float16)))
    c = Session(role="client", max_frame_bytes=512)
    with pytest.raises(LocalProtocolError, match="max_frame_bytes"):
        c.send(Think(np.ones((1, 1024), np.float16)))
    with pytest.raises(ValueError, match="no key"):
        SessionConfig(crypto=("xchacha20poly1305",))
    with pytest.raises(ValueError, match="max_frame_bytes"):
        SessionConfig(max_frame_bytes=511)


def test_stream_through_sessions_with_compression_and_encryption():
    key = Key.generate()
    c = Session(role="client", key=key, compress=("zstd", "none"))
    s = Session(role="server", key=key, compress=("zstd", "none"))
    handshake(c, s)
    objs = [np.random.default_rng(i).standard_normal((4, 300, 64)).astype(np.float16) for i in range(4)]
    events = []
    for data in c.stream(77, objs, names=["a", "b", "c", "d"]):
        c.send_encoded(data)
    for d in c.datagrams_to_send():
        events += s.receive_datagram(d, 0.0)
    done = events[-1]
    assert isinstance(done, StreamComplete) and all(np.array_equal(a, b) for a, b in zip(done.objects, objs))


# ------------------------------------------------------------------ replay window


def test_replayed_encrypted_frames_are_dropped_and_counted():
    key = Key.generate()
    c, s = Session(role="client", key=key), Session(role="server", key=key)
    handshake(c, s)
    for _ in range(3):
        c.send(Think(np.ones((1, 8), np.float16), stream_id=9))
    frames = c.datagrams_to_send()
    for f in frames:
        assert kinds(s.receive_datagram(f, 0.0)) == ["MessageReceived"]
    for f in frames:
        (ev,) = s.receive_datagram(f, 0.0)
        assert ev.reason == "replay"
    assert s.stats["replay"] == 3


# ------------------------------------------------------------------ TCP records


def _vectors() -> list[bytes]:
    import glob
    import os
    here = os.path.dirname(__file__)
    return [open(p, "rb").read() for p in sorted(glob.glob(os.path.join(here, "vectors/reference/*.bin")))]


def test_tcp_messages_from_bytes_are_views_and_from_bytearrays_copies():
    """receive_data(bytes): the message's tensor is a view of those (immutable) bytes; from a
    bytearray (which the caller may reuse) it is decoded from a copy."""
    f = _vectors()[3]
    expect = _codec.decode(f).hidden.tobytes()
    rec = frame_record(f)
    (e,) = Session(role="server").receive_data(rec, 0.0)
    assert isinstance(e, MessageReceived) and e.frame.hidden.tobytes() == expect
    assert np.shares_memory(e.frame.hidden.numpy(), np.frombuffer(rec, np.uint8))
    buf = bytearray(rec)
    (e,) = Session(role="server").receive_data(buf, 0.0)
    buf[:] = bytes(len(buf))
    assert e.frame.hidden.tobytes() == expect


def test_session_tcp_errors_are_events():
    s = Session(role="server")
    good = frame_record(_vectors()[3])
    bad = frame_record(b"\x01" + b"\x00" * 40)
    events = s.receive_data(good + bad + good, 0.0)
    assert kinds(events) == ["MessageReceived", "FrameRejected", "MessageReceived"]
    events = s.receive_data(b"\xff\xff\xff\xff" + good, 0.0)
    assert kinds(events) == ["ConnectionBroken"] and isinstance(events[0], ConnectionBroken)
    s2 = Session(role="server")
    s2.receive_data(good[:100], 0.0)
    assert kinds(s2.receive_eof(0.0)) == ["ConnectionBroken"]


def test_zero_copy_buffer_protocol():
    s = Session(role="server")
    stream = b"".join(frame_record(f) for f in _vectors())
    events = []
    pos = 0
    while pos < len(stream):
        buf = s.get_buffer(-1)
        n = min(len(buf), 777, len(stream) - pos)
        buf[:n] = stream[pos:pos + n]
        pos += n
        events += s.buffer_updated(n, 0.0)
    msgs = [e for e in events if isinstance(e, MessageReceived)]
    assert len(msgs) == 12
    # Messages outlive the receive buffer: overwrite it and check a payload is intact.
    s.get_buffer(-1)[:1000] = b"\x00" * 1000
    assert msgs[3].frame.hidden.tobytes() == _codec.decode(_vectors()[3]).hidden.tobytes()


def test_dtypes_the_peer_lacks_are_reduced():
    import ml_dtypes
    c = Session(role="client", dtypes=("f16", "bf16", "f32", "i8"))
    s = Session(role="server", dtypes=("f16", "i8"))
    handshake(c, s)
    assert c.agreement.dtypes == ("f16", "i8")
    x = np.linspace(-2, 2, 64, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(1, 64)
    c.send(Think(x))
    (ev,) = s.receive_datagram(c.datagrams_to_send()[0], 0.0)
    got = ev.frame.hidden.numpy()
    assert got.dtype == np.float16 and np.array_equal(got.astype(np.float32), x.astype(np.float32))
    assert c.stats["dtype_converted"] == 1
    c.send(Think(np.ones((1, 4), np.int8)))  # agreed: unchanged
    assert c.stats["dtype_converted"] == 1
    only_i8 = Session(role="client", dtypes=("i8",))
    handshake(only_i8, Session(role="server"))
    with pytest.raises(LocalProtocolError, match="does not accept f16"):
        only_i8.send(Think(np.ones((1, 4), np.float16)))


def test_protocol_1_peers_get_reference_dtypes_only():
    s = Session(role="server")
    s.receive_datagram(control({"method": "ping", "ts": 1}), 0.0)
    assert s.agreement.proto == 1 and s.agreement.dtypes == tuple(d for d in DEFAULT_DTYPES if d in REFERENCE_DTYPES)
    assert s.agreement.dtypes and set(s.agreement.dtypes) <= set(REFERENCE_DTYPES)


# ------------------------------------------------------------------ nothing the peer sends raises


def _valid_inputs() -> list[bytes]:
    frames = _vectors()
    frames += [control(PING_OK, 1, SPACE), control(CAP_OK, 1, SPACE), control(ERROR, 1, SPACE),
               control({"method": "head", "v": 1, "msg_type": 1, "chunk_bytes": 512, "total_bytes": 1 << 40,
                        "objects": [{"dtype": 1, "shape": [1 << 39], "nbytes": 1 << 40}], "hash": "xxh3_64"}, 2)]
    return frames


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_datagram_in_any_state_never_raises(data):
    role = data.draw(st.sampled_from([Role.CLIENT, Role.SERVER]))
    key = Key(bytes(32), key_id=7) if data.draw(st.booleans()) else None
    s = Session(role=role, key=key, expected_space_hash=data.draw(st.sampled_from([None, SPACE])),
                strict=data.draw(st.sampled_from([None, False, True])))
    if role is Role.CLIENT and data.draw(st.booleans()):
        s.initiate(0.0)
    valid = _valid_inputs()
    for i in range(data.draw(st.integers(1, 6))):
        kind = data.draw(st.sampled_from(["random", "mutated", "truncated", "valid"]))
        base = data.draw(st.sampled_from(valid))
        if kind == "random":
            d = data.draw(st.binary(max_size=300))
        elif kind == "mutated":
            pos = data.draw(st.integers(0, len(base) - 1))
            d = base[:pos] + bytes([data.draw(st.integers(0, 255))]) + base[pos + 1:]
        elif kind == "truncated":
            d = base[:data.draw(st.integers(0, len(base)))]
        else:
            d = base
        events = s.receive_datagram(d, float(i))
        assert all(type(e).__module__.startswith("resonant") for e in events)
        s.tick(float(i) + 100.0)
        for out in s.datagrams_to_send():
            assert len(out) <= resonant.MAX_FRAME_BYTES


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(1, 2000), max_size=5))
def test_any_tcp_bytes_never_raise(noise, cuts):
    s = Session(role="server")
    stream = b"".join(frame_record(f) for f in _valid_inputs()[:4]) + noise
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    for a, b in zip(bounds, bounds[1:]):
        s.receive_data(stream[a:b], 0.0)
    s.receive_eof(0.0)


def test_a_session_is_small_until_it_needs_a_tcp_buffer():
    import tracemalloc

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        sessions = [Session(role="server") for _ in range(1024)]  # a UDP server's max_peers
        for s in sessions[:8]:
            s.receive_datagram(_vectors()[3], 0.0)
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert used < 16 << 20, used  # the 320 KiB TCP record buffer is allocated only on first TCP use
    s = sessions[0]
    s.receive_data(frame_record(_vectors()[3])[:10], 0.0)  # a partial record: now it needs the buffer
    assert s.records.pending == 10


def test_many_object_stream_over_small_frames_sends_its_head_in_parts():
    c = Session(role="client", max_frame_bytes=1200)
    s = Session(role="server")
    handshake(c, s)
    objs = [np.full((2, 16), i, np.float16) for i in range(48)]
    sender = c.stream(5, objs, names=[f"layer{i // 2}.{'keys' if i % 2 == 0 else 'values'}" for i in range(48)])
    assert len(sender.heads()) > 1
    for f in sender:
        c.send_encoded(f)
    events = [e for d in c.datagrams_to_send() for e in s.receive_datagram(d, 0.0)]
    assert all(len(d) <= 1200 for d in sender)
    (done,) = [e for e in events if isinstance(e, StreamComplete)]
    assert all(np.array_equal(a, b) for a, b in zip(done.objects, objs))


# ------------------------------------------------------------------ stream chunks on the fast path


def _stream_frames(space: int = 0, n: int = 20_000) -> tuple[np.ndarray, list[bytes]]:
    x = np.random.default_rng(31).standard_normal(n).astype(np.float16)
    return x, list(StreamSender(6, [x], max_frame_bytes=4096, space_hash32=space))


def test_strict_session_refuses_stream_chunks_before_the_handshake():
    s = Session(role="server", expected_space_hash=SPACE)
    _, frames = _stream_frames(SPACE)
    events = [e for f in frames for e in s.receive_datagram(f, 0.0)]
    assert kinds(events) == ["FrameRejected"] * len(frames)
    assert {e.reason for e in events} == {"handshake_required"}
    assert s.reassembler.open_streams == 0 and s.stats["frames_in"] == len(frames)


def test_session_with_a_key_refuses_plain_stream_chunks():
    s = Session(role="server", key=Key.generate())
    _, frames = _stream_frames()
    events = [e for f in frames for e in s.receive_datagram(f, 0.0)]
    assert {e.reason for e in events} == {"not_encrypted"} and s.reassembler.open_streams == 0


def test_session_stream_chunks_of_another_space_are_refused():
    s = Session(role="server", expected_space_hash=SPACE, strict=False)
    _, frames = _stream_frames(SPACE)
    other = list(StreamSender(6, [np.ones(5000, np.float16)], max_frame_bytes=4096, space_hash32=SPACE ^ 1))
    events = s.receive_datagram(frames[0], 0.0) + s.receive_datagram(other[1], 0.0)
    assert kinds(events) == ["StreamStarted", "FrameRejected"] and events[1].reason == "space_mismatch"


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_session_stream_over_the_fast_path_counts_and_completes(transport):
    s = Session(role="server")
    x, frames = _stream_frames()
    if transport == "udp":
        events = [e for f in frames for e in s.receive_datagram(f, 0.0)]
    else:
        data = b"".join(frame_record(f) for f in frames)
        events = [e for i in range(0, len(data), 3000) for e in s.receive_data(data[i:i + 3000], 0.0)]
    done = events[-1]
    assert isinstance(done, StreamComplete) and np.array_equal(done.objects[0], x)
    assert s.stats["frames_in"] == len(frames) and s.stats["bytes_in"] == sum(map(len, frames))


def _feed_in_place(s: Session, data: bytes, cuts: list[int]) -> list:
    """As a TCP transport does: read into get_buffer() in pieces, then buffer_updated."""
    events, pos, mv = [], 0, memoryview(data)
    for cut in cuts + [len(data)]:
        while pos < min(cut, len(data)):
            buf = s.get_buffer()
            k = min(len(buf), cut - pos)
            buf[:k] = mv[pos:pos + k]
            pos += k
            events += s.buffer_updated(k, 0.0)
            if any(isinstance(e, ConnectionBroken) for e in events):
                return events  # a transport closes the connection here
    return events


def _event_key(e):
    if isinstance(e, StreamComplete):
        return ("complete", e.stream_id, e.xxh3_64, [a.tobytes() for a in e.objects])
    if isinstance(e, MessageReceived):
        return ("message", type(e.frame).__name__, e.frame.stream_id, resonant.encode(e.frame))
    if isinstance(e, ConnectionBroken):
        return ("broken", str(e.error))
    if isinstance(e, FrameRejected):
        return ("rejected", e.reason, str(e.detail))
    return (type(e).__name__, getattr(e, "stream_id", None), getattr(e, "index", None),
            getattr(e, "reason", None), getattr(e, "missing", None))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_tcp_in_place_batches_give_the_events_of_the_general_path(data):
    """Records read in place (chunk runs placed by one C call) and the same bytes fed to
    receive_data give the same events and counts: interleaved messages, duplicates, a broken
    chunk and a bad length at the end included."""
    rnd = data.draw(st.randoms(use_true_random=False))
    x = np.arange(data.draw(st.integers(1, 20_000)), dtype=np.float16)
    frames = list(StreamSender(3, [x, x[: data.draw(st.integers(0, 3000))]],
                               max_frame_bytes=data.draw(st.sampled_from([600, 2048, 65536]))))
    body = frames[1:-1]
    if data.draw(st.booleans()):
        rnd.shuffle(body)
    for _ in range(data.draw(st.integers(0, 3))):  # messages and duplicates between chunks
        body.insert(rnd.randrange(len(body) + 1), rnd.choice([_codec.encode(Think(np.ones((1, 8), np.float16))),
                                                             rnd.choice(frames)]))
    if data.draw(st.booleans()):  # a chunk with a bad CRC
        i = rnd.randrange(len(body))
        body[i] = body[i][:-1] + bytes([body[i][-1] ^ 1])
    stream = b"".join(frame_record(f) for f in frames[:1] + body + frames[-1:])
    if data.draw(st.booleans()):
        stream += (70_000).to_bytes(4, "little") + b"xx"  # a length over max_frame_bytes
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    a, b = Session(role="server"), Session(role="server")
    b._fast = False  # data messages through _frame
    got = _feed_in_place(a, stream, cuts)
    want = b.receive_data(stream, 0.0)
    assert [_event_key(e) for e in got] == [_event_key(e) for e in want]
    assert a.stats == b.stats and a.records.consumed == b.records.consumed


# ------------------------------------------------------------------ plain messages on the fast path


def _message_inputs() -> list[bytes]:
    """Frames a peer may send: data messages of every kind (plain, zstd, another space, bad CRC,
    truncated), control frames, stream frames, the reference vectors and garbage."""
    rng = np.random.default_rng(5)
    h = rng.standard_normal((2, 64)).astype(np.float16)
    msgs = [resonant.Think(h, stream_id=3), resonant.Cache(h, h, stream_id=4),
            resonant.Ask(h[0], "why?", stream_id=5), resonant.Critique(h[0], explanation={"a": 1}, stream_id=6),
            resonant.Think(h, stream_id=3, space_hash32=SPACE), resonant.Think(h, stream_id=3, space_hash32=SPACE ^ 1)]
    out = [_codec.encode(m) for m in msgs]
    out.append(resonant.Codec(3).encode(msgs[0]))
    bad = bytearray(out[0])
    bad[-1] ^= 1
    out += [bytes(bad), out[1][:50], b"", b"\x01", b"\x07" * 40]
    out += [control({"method": "ping", "v": 1, "space_hash32": 0}), control({"method": "bogus"})]
    out += _stream_frames(0, 3000)[1][:3]
    return out + _vectors()


def _outcome(events: list) -> list:
    out = []
    for e in events:
        if isinstance(e, MessageReceived):
            out.append(("MessageReceived", _codec.encode(e.frame), e.document))
        else:
            out.append((type(e).__name__, getattr(e, "reason", None)))
    return out


@settings(max_examples=60, deadline=None)
@given(picks=st.lists(st.integers(0, 1000), min_size=1, max_size=30),
       config=st.sampled_from([{}, {"strict": True}, {"expected_space_hash": SPACE, "strict": False},
                               {"expected_space_hash": SPACE}, {"handshake": True}]),
       transport=st.sampled_from(["udp", "tcp", "tcp in place"]))
def test_plain_message_fast_path_gives_the_general_paths_events(picks, config, transport):
    """A session that takes plain messages in one step and one that sends every frame through
    _frame give the same events, stats and replies for any sequence of frames."""
    inputs = _message_inputs()
    config = dict(config)
    shake = config.pop("handshake", False)
    sessions = [Session(role="server", **config), Session(role="server", **config)]
    sessions[1]._fast = False  # the general path only
    for s in sessions:
        if shake:
            handshake(Session(role="client", **config), s)
        s.datagrams_to_send()
        s.data_to_send()
    seen = [[], []]
    for k in picks:
        data = inputs[k % len(inputs)]
        for s, got in zip(sessions, seen):
            if transport == "udp":
                got += _outcome(s.receive_datagram(data, 0.0))
            elif data and transport == "tcp":
                got += _outcome(s.receive_data(frame_record(data), 0.0))
            elif data:
                got += _outcome(_feed_in_place(s, frame_record(data), []))
            got.append(s.datagrams_to_send() + [s.data_to_send()])
    assert seen[0] == seen[1]
    assert sessions[0].stats == sessions[1].stats
    assert sessions[0].records.consumed == sessions[1].records.consumed


@pytest.mark.fast_paths
def test_plain_message_fast_path_takes_messages_and_copies_views_of_buffers():
    s = Session(role="server")
    calls = []
    general = s._frame
    s._frame = lambda *a, **k: calls.append(a) or general(*a, **k)
    wire = _codec.encode(resonant.Think(np.ones((1, 8), np.float16)))
    assert kinds(s.receive_datagram(wire, 0.0)) == ["MessageReceived"] and not calls
    assert kinds(s.receive_data(frame_record(wire), 0.0)) == ["MessageReceived"] and not calls
    buf = bytearray(frame_record(wire))
    (e,) = s.receive_data(buf, 0.0)  # a reusable buffer: the fast path copies the frame out
    buf[:] = bytes(len(buf))
    assert not calls and e.frame.hidden.tobytes() == np.ones(8, np.float16).tobytes()
    assert s.stats["messages"] == 3 and s.stats["frames_in"] == 3
    (e,) = _feed_in_place(s, frame_record(wire), [])  # read in place: copied out of the reused buffer
    s.get_buffer()[:len(buf)] = bytes(len(buf))
    assert not calls and e.frame.hidden.tobytes() == np.ones(8, np.float16).tobytes()
    assert s.records.pending == 0 and s.stats["messages"] == 4


def test_message_received_is_an_immutable_value():
    f = Think(np.ones((1, 4), np.float16), stream_id=2)
    a, b = MessageReceived(f, None), MessageReceived(frame=Think(np.ones((1, 4), np.float16), stream_id=2))
    assert a == b and a != MessageReceived(f, {"method": "x"}) and a != (f, None)
    assert repr(a).startswith("MessageReceived(frame=Think(stream_id=2") and repr(a).endswith("document=None)")
    with pytest.raises(AttributeError):
        a.frame = None  # type: ignore[misc]
    match a:
        case MessageReceived(frame, None):
            assert frame is f
        case _:
            raise AssertionError("no match")


def test_fast_path_keeps_its_own_view_of_a_callers_memoryview():
    """A message decoded from a caller's memoryview of bytes stays valid after the caller
    releases that view; a released view is refused, not read."""
    import gc

    s = Session(role="server")
    h = np.arange(8, dtype=np.float16).reshape(1, 8)
    mv = memoryview(_codec.encode(Think(h)))  # the view holds the only reference to the bytes
    (e,) = s.receive_datagram(mv, 0.0)
    mv.release()
    (base,) = [r for r in gc.get_referents(e.frame.hidden) if isinstance(r, memoryview)]
    assert base is not mv and type(base.obj) is bytes  # (base.obj raises on a released view)
    assert np.array_equal(e.frame.hidden.numpy(), h)
    with pytest.raises(ValueError):
        s.receive_datagram(mv, 0.0)


def test_general_path_switch_sends_plain_messages_through_frame():
    s = Session(role="server")
    s._fast = False
    calls = []
    general = s._frame
    s._frame = lambda *a, **k: calls.append(a) or general(*a, **k)
    wire = _codec.encode(resonant.Think(np.ones((1, 8), np.float16)))
    assert kinds(s.receive_datagram(wire, 0.0)) == ["MessageReceived"]
    assert kinds(s.receive_data(frame_record(wire), 0.0)) == ["MessageReceived"]
    assert len(calls) == 2


def _sendable(k: int):
    rng = np.random.default_rng(k)
    h = rng.standard_normal((2, 16)).astype(np.float16)
    sid = k % 3
    return [resonant.Think(h, stream_id=sid), resonant.Cache(h, h[::-1].copy(), stream_id=sid, flags=0),
            resonant.Ask(h[0], "why?", stream_id=sid, space_hash32=SPACE), resonant.Critique(h[0], stream_id=sid),
            resonant.Critique(h[0], (h[1] > 0).astype(np.int8), {"a": k}, stream_id=sid, modality=2), Sync({"method": "x"}, stream_id=sid),
            resonant.Think(h.astype(np.float32), stream_id=sid, frame_seq=7), resonant.Think(np.ones((1, 20000), np.float16)),
            "not a frame"][k % 9]


@settings(max_examples=60, deadline=None)
@given(picks=st.lists(st.tuples(st.integers(0, 1000), st.booleans()), min_size=1, max_size=20),
       config=st.sampled_from([{}, {"max_frame_bytes": 4096}, {"dtypes": ("f16", "i8")}, {"compress": ("zstd",)}]),
       transport=st.sampled_from(["udp", "tcp", "records"]))
def test_send_fast_path_queues_what_the_general_path_does(picks, config, transport):
    """Session.send's C path (numbered, encoded, checked and queued in one call) and the general
    path give the same bytes, errors and stats for any sequence of messages, after a handshake
    that may reduce dtypes, limit frame sizes or agree on compression."""
    sessions = [Session(role="client", **config), Session(role="client", **config)]
    sessions[1]._fast = False
    for s in sessions:
        handshake(s, Session(role="server", **config))
        s.datagrams_to_send()
    seen = [[], []]
    for k, keep in picks:
        frame = _sendable(k)
        for s, got in zip(sessions, seen):
            try:
                s.send(frame, 0.0, keep_seq=keep)
                got.append("ok")
            except Exception as exc:  # the same error either way
                got.append((type(exc).__name__, str(exc)))
            out = {"udp": s.datagrams_to_send, "tcp": s.data_to_send, "records": s.records_to_send}[transport]()
            got.append(out if transport != "records" else [bytes(p) for p in out])
    assert seen[0] == seen[1]
    assert sessions[0].stats == sessions[1].stats


def test_stream_records_cross_a_session_and_count_as_send_encoded_does():
    x = np.random.default_rng(8).standard_normal((4, 9000)).astype(np.float16)
    a, b = Session(role="client"), Session(role="client")
    lists = list(a.stream_records(5, [x], per_write=3))
    for f in b.stream(5, [x]):
        b.send_encoded(f)
    data = b"".join(bytes(p) for parts in lists for p in parts)
    assert data == b.data_to_send()
    assert a.stats == b.stats and a.stats["frames_out"] > 3
    rx = Session(role="server")
    events = [e for i in range(0, len(data), 70_000) for e in rx.receive_data(data[i:i + 70_000], 0.0)]
    assert isinstance(events[-1], StreamComplete) and np.array_equal(events[-1].objects[0], x)
    a.close()
    with pytest.raises(LocalProtocolError, match="closed"):
        next(iter(a.stream_records(6, [x])))


@pytest.mark.parametrize("fast", [True, False])
def test_a_stream_that_used_every_frame_seq_refuses_to_wrap(fast):
    """The last u64 frame_seq is sent; the next send on that stream raises instead of starting
    again at 0 (which a receiver's replay window would drop), on the C path and the general one;
    other streams go on."""
    s = Session(role="client")
    s._fast = fast
    s._seq[5] = 2**64 - 1
    s.send(resonant.Think(np.ones((1, 4), np.float16), stream_id=5), 0.0)
    (wire,) = s.datagrams_to_send()
    assert _codec.decode(wire).frame_seq == 2**64 - 1
    with pytest.raises(LocalProtocolError, match="every frame_seq"):
        s.send(resonant.Think(np.ones((1, 4), np.float16), stream_id=5), 0.0)
    assert s.datagrams_to_send() == [] and s.stats["frames_out"] == 1
    s.send(resonant.Think(np.ones((1, 4), np.float16), stream_id=6), 0.0)
    assert _codec.decode(s.datagrams_to_send()[0]).frame_seq == 0


# ------------------------------------------------------------------ documents from the handshake schema


def test_control_documents_are_built_and_read_from_the_schema(monkeypatch):
    """A field added to the schema (here patched into handshake.SCHEMA, as a new optional field of
    schema/handshake.yaml would be generated) is sent with its default and read by the peer; the
    Session's own fields come in schema order."""
    from resonant import handshake as hs

    extra = {"type": "u32", "required": False, "const": None, "choices": [], "default": 7, "fields": {}}
    monkeypatch.setitem(hs.SCHEMA, "ping", {**hs.SCHEMA["ping"], "priority": extra})
    monkeypatch.setitem(hs.SCHEMA, "capability", {**hs.SCHEMA["capability"], "priority": extra})
    client, server = Session(role="client"), Session(role="server", extra_fields={"priority": 2})
    c_events, s_events = handshake(client, server)
    ping = next(e.document for e in s_events if isinstance(e, MessageReceived))
    capability = next(e.document for e in c_events if isinstance(e, MessageReceived))
    assert ping["priority"] == 7 and hs.get(ping, "priority") == 7      # the default, sent
    assert capability["priority"] == 2                                  # the server's configured value
    assert [k for k in ping if k in hs.SCHEMA["ping"]] == [k for k in hs.SCHEMA["ping"] if k in ping]
    assert hs.get({"method": "ping"}, "priority") == 7                  # absent: read as the default


def test_absent_optional_fields_are_read_as_their_schema_defaults():
    from resonant import handshake as hs

    server = Session(role="server")
    events = server.receive_datagram(control({"method": "ping", "v": 2}), 0.0)  # no compress, crypto, frame size
    a = next(e for e in events if isinstance(e, HandshakeComplete)).agreement
    assert a.compress == hs.default("ping", "compress")[0] and a.crypto == hs.default("ping", "crypto")[0]
    assert a.max_frame_bytes == hs.default("ping", "max_frame_bytes") and a.critique is hs.default("ping", "supports.critique")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"v": 3}, "extra_fields: ping.v is set by the Session itself"),
        ({"colour": 1}, "extra_fields: ping.colour: not a field of the schema (fields: "),
        ({"ts": "now"}, "extra_fields: ping.ts: expected a number, got str"),
    ],
)
def test_extra_fields_are_checked_against_the_schema(fields, message):
    with pytest.raises(ValueError) as exc:
        Session(role="client", extra_fields=fields)
    assert str(exc.value).startswith(message)


def test_extra_fields_reach_the_ping():
    client, server = Session(role="client", extra_fields={"ts": 1730616000}), Session(role="server")
    _, s_events = handshake(client, server)
    assert next(e.document for e in s_events if isinstance(e, MessageReceived))["ts"] == 1730616000


def test_an_error_naming_long_lists_still_fits_the_schema():
    """The refusal of a ping whose dtypes share nothing names both lists; however long they are (more
    dtypes in the spec, or a peer listing many unknown ones), the error document stays within
    max_string_chars, so that the client can read why it was refused."""
    from resonant import handshake as hs

    server = Session(role="server", dtypes=("f16",))
    theirs = [f"x-dtype-{i:02d}-" + "y" * 20 for i in range(20)]
    server.receive_datagram(control({"method": "ping", "v": 2, "supports": {"dtype": theirs}}), 0.0)
    (reply,) = server.datagrams_to_send()
    doc = hs.parse(resonant.decode(reply).json.payload)
    assert doc["code"] == "UNSUPPORTED_FEATURE" and doc["message"].startswith("supports.dtype: the client reads")
    assert len(doc["message"]) <= hs.MAX_STRING_CHARS
