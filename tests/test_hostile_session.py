"""Hostile peers (issue 14), the Session half: cross-session replay of encrypted traffic (session
keys), evicted replay windows, unauthenticated errors during a keyed handshake, reused stream
ids, handshake documents of the wrong types, and a server that lost the session."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resonant import Key, Keyring, Sync, Think, _codec, handshake, transforms
from resonant.errors import EncodeError, HandshakeError, LocalProtocolError, ResonantError
from resonant.session import (
    FrameRejected,
    HandshakeComplete,
    HandshakeFailed,
    IdRanges,
    MessageReceived,
    RemoteError,
    ReplayWindow,
    Session,
    State,
    frame_record,
)
from resonant.stream import Reassembler, StreamComplete, StreamSender
from resonant.transforms import Codec, SessionKeyring, session_key


def kinds(events) -> list[str]:
    return [type(e).__name__ for e in events]


def thinks(events) -> list:
    return [e for e in events if isinstance(e, MessageReceived) and isinstance(e.frame, Think)]


def rejected(events, reason: str) -> list:
    return [e for e in events if isinstance(e, FrameRejected) and e.reason == reason]


def deliver(frames, to: Session, now: float = 0.0) -> list:
    return [e for d in frames for e in to.receive_datagram(d, now)]


def exchange(a: Session, b: Session, now: float = 0.0) -> list:
    """a's queued datagrams to b; b's events."""
    return deliver(a.datagrams_to_send(), b, now)


def handshake_pair(c: Session, s: Session, now: float = 0.0) -> list:
    c.initiate(now)
    exchange(c, s, now)
    return exchange(s, c, now)


def think(i: int = 0, stream_id: int = 1) -> Think:
    return Think(np.full((1, 16), i, np.float16), stream_id=stream_id)


def plain_control(doc: dict, seq: int = 0) -> bytes:
    return _codec.encode(Sync(json.dumps(doc).encode(), frame_seq=seq))


def control_codec(key, direction: str | None) -> Codec:
    """What a key holder seals control documents with in one direction (client-to-server or
    server-to-client): the directional control subkeys of the long-term key."""
    ring = key if isinstance(key, Keyring) else Keyring([key])
    if direction is None or not hasattr(transforms, "ControlKeyring"):  # (the code before the directional keys)
        return Codec(key=ring)
    return Codec(key=transforms.ControlKeyring(ring, direction))


def sealed_control(doc: dict, key, seq: int = 0, stream_id: int = 0, direction: str | None = "auto") -> bytes:
    """A control document sealed by a key holder: a ping as a client seals it, anything else as a
    server does (direction=None: under the long-term key itself)."""
    if direction == "auto":
        direction = "client-to-server" if doc.get("method") == "ping" else "server-to-client"
    return control_codec(key, direction).encode(Sync(json.dumps(doc).encode(), frame_seq=seq, stream_id=stream_id))


def docs(frames) -> list[dict]:
    """The control documents of frames (any key)."""
    out = []
    for d in frames:
        f = _codec.decode(d) if d[0] == 1 else None
        if f is not None and isinstance(f, Sync) and f.json is not None:
            out.append(json.loads(f.json.tobytes()))
    return out


# ------------------------------------------------------------------ item 2: cross-session replay


@pytest.mark.parametrize("fast", [True, False])
def test_recorded_keyed_session_replayed_into_a_fresh_server_delivers_nothing(fast):
    # Before: the fresh server answered the recorded ping and delivered all 5 recorded Thinks again.
    key = Key.generate()
    c, s = Session(role="client", key=key), Session(role="server", key=key)
    for x in (c, s):
        x._fast = fast  # keyed traffic never takes the C path: the same outcome either way
    c.initiate(0.0)
    recording = c.datagrams_to_send()
    exchange_events = deliver(recording, s)
    assert isinstance(exchange_events[-1], HandshakeComplete)
    exchange(s, c)
    for i in range(5):
        c.send(think(i))
    data = c.datagrams_to_send()
    recording += data
    assert len(thinks(deliver(data, s))) == 5
    # The attacker replays the whole recording from a new source port: a new server Session.
    fresh = Session(role="server", key=key)
    fresh._fast = fast
    events = deliver(recording, fresh)
    assert thinks(events) == []
    assert not fresh._chunks_direct() and fresh.state is State.ESTABLISHED
    assert fresh.stats["malformed"] == 5  # the Thinks do not open under the new session key
    # ...and over TCP (a new connection).
    fresh_tcp = Session(role="server", key=key)
    events = fresh_tcp.receive_data(b"".join(frame_record(d) for d in recording), 0.0)
    assert thinks(events) == []


def test_recorded_stream_replayed_into_a_fresh_server_completes_nothing():
    key = Key.generate()
    c, s = Session(role="client", key=key), Session(role="server", key=key)
    c.initiate(0.0)
    recording = c.datagrams_to_send()
    deliver(recording, s)
    exchange(s, c)
    objs = [np.arange(4096, dtype=np.float16).reshape(64, 64)]
    for d in c.stream(c.new_stream_id(), objs):
        c.send_encoded(d)
    data = c.datagrams_to_send()
    recording += data
    assert isinstance(deliver(data, s)[-1], StreamComplete)
    fresh = Session(role="server", key=key)
    assert not [e for e in deliver(recording, fresh) if isinstance(e, StreamComplete)]


def test_session_key_is_bound_to_both_randoms_and_keeps_the_key_id():
    key = Key(bytes(range(32)), key_id=7)
    a, b = bytes(32), bytes([1]) + bytes(31)
    k1 = session_key(key, a, b, "client-to-server")
    assert k1.key_id == 7 and k1 != key
    assert session_key(key, a, b, "client-to-server") == k1
    assert session_key(key, b, a, "client-to-server") != k1 and session_key(key, a, a, "client-to-server") != k1
    assert session_key(Key(bytes(32), key_id=7), a, b, "client-to-server") != k1
    assert session_key(key, a, b, "server-to-client") not in (k1, key)  # one key per direction
    assert transforms.control_key(key, "client-to-server") != transforms.control_key(key, "server-to-client")
    with pytest.raises(ValueError):
        session_key(key, a[:31], b, "client-to-server")


def test_data_sealed_under_the_long_term_key_after_the_handshake_is_refused():
    key = Key.generate()
    c, s = Session(role="client", key=key), Session(role="server", key=key)
    handshake_pair(c, s)
    legacy = Codec(key=key).encode(think(1).replace(frame_seq=100))
    (ev,) = s.receive_datagram(legacy, 0.0)
    assert ev.reason == "malformed"  # only a Sync is tried under the long-term key as well
    tail = {"method": "tail", "chunks": 1, "total_bytes": 2, "xxh3_64": "0" * 16}
    (ev,) = s.receive_datagram(sealed_control(tail, key, stream_id=4, direction="client-to-server"), 0.0)
    assert ev.reason == "stale" and s.stats["stale"] == 1
    # the long-term key itself seals nothing a Session reads, not even a control document
    ping = {"method": "ping", "v": 2, "crypto": ["xchacha20poly1305"], "client_random": "ab" * 32}
    (ev,) = s.receive_datagram(sealed_control(ping, key, seq=3, direction=None), 0.0)
    assert ev.reason == "malformed" and s.stats["rekeys"] == 1


def test_session_keys_follow_rotation_of_the_long_term_keyring():
    old, new = Key.generate(), Key.generate()
    ring_c, ring_s = Keyring([old]), Keyring([old])
    c, s = Session(role="client", key=ring_c), Session(role="server", key=ring_s)
    handshake_pair(c, s)
    c.send(think(1))
    assert len(thinks(exchange(c, s))) == 1
    ring_s.add(new)
    ring_c.add(new, make_primary=True)  # the session key of the new key is derived on first use
    c.send(think(2))
    (frame,) = c.datagrams_to_send()
    assert Codec(key=c._encoder.keyring).decode(frame).frame_seq == 1  # (opens under the session keys)
    assert len(thinks(s.receive_datagram(frame, 0.0))) == 1
    assert isinstance(s._decoder.keyring, SessionKeyring) and new.key_id in s._decoder.keyring
    ring_c.add(old, make_primary=True)  # a late frame under the old key...
    c.send(think(3))
    late = c.datagrams_to_send()
    ring_s.add(new, make_primary=True)
    ring_s.remove(old.key_id)  # ...after the receiver dropped it
    (ev,) = deliver(late, s)
    assert ev.reason == "malformed" and "not a known key" in ev.detail


def test_evicted_stream_window_refuses_its_frames():
    # Before: once 16 other streams had pushed stream 1's window out, its frames were accepted again.
    key = Key.generate()
    c = Session(role="client", key=key)
    s = Session(role="server", key=key, replay_streams=16)
    handshake_pair(c, s)
    c.send(think(0, stream_id=1))
    first = c.datagrams_to_send()
    assert len(thinks(deliver(first, s))) == 1
    for sid in range(2, 40):
        c.send(think(sid, stream_id=sid))
    assert len(thinks(exchange(c, s))) == 38
    events = deliver(first, s, 5.0)
    assert thinks(events) == [] and rejected(events, "evicted")
    assert len(s.replay.evicted) == 1  # stream ids 1..23 dropped, remembered as one range
    # The sender is told (rate-limited, sealed): RemoteError naming the stream.
    (err,) = [e for e in exchange(s, c, 5.0) if isinstance(e, RemoteError)]
    assert err.code == "BAD_REQUEST" and err.document["stream_id"] == 1


def test_exhausted_replay_state_makes_the_peers_rekey():
    key = Key.generate()
    c = Session(role="client", key=key)
    s = Session(role="server", key=key, replay_streams=2, replay_ranges=1)
    handshake_pair(c, s)
    for sid in (1, 3, 5):  # 1 is dropped (one range); dropping 3 would need a second range
        c.send(think(sid, stream_id=sid))
    exchange(c, s)
    c.send(think(7, stream_id=7))
    events = exchange(c, s, 1.0)
    assert rejected(events, "exhausted") and thinks(events) == []
    (err,) = [e for e in exchange(s, c, 1.0) if isinstance(e, RemoteError)]
    assert err.code == "HANDSHAKE_REQUIRED"
    c.initiate(1.0)  # what the asyncio client does on HANDSHAKE_REQUIRED
    exchange(c, s, 1.0)
    assert isinstance(exchange(s, c, 1.0)[-1], HandshakeComplete)
    assert c.state is State.ESTABLISHED
    c.send(think(7, stream_id=7))
    events = exchange(c, s, 1.0)  # the client's key confirmation, then its frame
    assert len(thinks(events)) == 1 and s.stats["rekeys"] == 2


def test_client_whose_replay_state_is_exhausted_starts_a_new_session():
    key = Key.generate()
    c = Session(role="client", key=key, replay_streams=2, replay_ranges=1)
    s = Session(role="server", key=key)
    handshake_pair(c, s)
    for sid in (1, 3, 5, 7):
        s.send(think(sid, stream_id=sid))
    events = exchange(s, c, 1.0)
    assert len(thinks(events)) == 3 and rejected(events, "exhausted")
    assert c.state is State.AWAIT_CAPABILITY  # the ping is queued
    exchange(c, s, 1.0)
    assert isinstance(exchange(s, c, 1.0)[-1], HandshakeComplete) and c.stats["rekeys"] == 2
    # the client's key confirmation makes the server switch (it has nothing else to send)
    assert kinds(exchange(c, s, 1.0)) == ["HandshakeComplete"] and s.stats["rekeys"] == 2
    s.send(think(7, stream_id=7))
    assert len(thinks(exchange(s, c, 1.0))) == 1


def test_replay_window_model_with_eviction():
    w = ReplayWindow(size=8, max_streams=2, max_ranges=2)
    assert [w.check(i, 0) for i in (1, 2, 3)] == ["ok"] * 3  # 1 dropped
    assert w.check(1, 5) == "evicted"
    assert w.check(4, 0) == "ok"  # 2 dropped: joins 1's range
    assert w.check(10, 0) == "ok"  # 3 dropped: joins too
    assert w.check(20, 0) == "ok"  # 4 dropped: joins too
    assert len(w.evicted) == 1
    assert w.check(30, 0) == "ok"  # 10 dropped: a second range
    assert w.check(40, 0) == "exhausted"  # 20 would need a third
    assert w.check(20, 1) == "ok" and w.check(30, 1) == "ok"  # the kept windows go on


def test_id_ranges():
    r = IdRanges()
    for x in (5, 7, 6, 1, 3, 2, 100):
        r.add(x)
    assert len(r) == 3 and all(x in r for x in (1, 2, 3, 5, 6, 7, 100)) and 4 not in r and 8 not in r
    assert not r.needs_range(4) and not r.needs_range(99) and r.needs_range(50)
    r.add(4)
    assert len(r) == 2


def test_ping_replayed_into_a_live_session():
    key = Key.generate()
    c, s = Session(role="client", key=key), Session(role="server", key=key)
    c.initiate(0.0)
    ping = c.datagrams_to_send()
    deliver(ping, s)
    s.datagrams_to_send()  # (the capability is lost)
    # An exact copy of a sealed ping is acted on once.
    (ev,) = deliver(ping, s)
    assert ev.reason == "replay"
    # A retry (the same client_random, a new encryption) gets the same server_random: the key stays.
    c.tick(0.6)
    deliver(c.datagrams_to_send(), s)
    s_frames = s.datagrams_to_send()
    assert s.stats["rekeys"] == 1
    assert isinstance(deliver(s_frames, c)[-1], HandshakeComplete)
    c.send(think(1))
    assert len(thinks(exchange(c, s))) == 1
    # A ping recorded from another session (another client_random) is answered, but the running
    # session stays until a frame proves the new keys: the live client's frames keep flowing.
    other = Session(role="client", key=key)
    other.initiate(0.0)
    deliver(other.datagrams_to_send(), s, 2.0)
    s.datagrams_to_send()  # (the capability goes to the recorder's address, or nowhere)
    assert s.stats["rekeys"] == 1
    c.send(think(2))
    assert len(thinks(exchange(c, s, 3.0))) == 1
    assert s.datagrams_to_send() == []  # nothing to complain about
    handshake_pair(c, s, 3.0)  # a genuine re-key still works
    c.send(think(3))
    assert len(thinks(exchange(c, s, 3.0))) == 1 and s.stats["rekeys"] == 2


def test_recorded_capability_cannot_answer_a_new_ping():
    key = Key.generate()
    c, s = Session(role="client", key=key), Session(role="server", key=key)
    c.initiate(0.0)
    exchange(c, s)
    old_capability = s.datagrams_to_send()
    deliver(old_capability, c)
    c.initiate(1.0)  # a new handshake: a new client_random
    # The attacker answers the new ping with the recorded capability (a fresh copy, so not by tag).
    events = deliver(old_capability, c, 1.0)
    assert rejected(events, "replay") or rejected(events, "stale")
    assert c.state is State.AWAIT_CAPABILITY


def test_client_restart_gets_a_new_session_and_the_old_frames_are_refused():
    key = Key.generate()
    c1, s = Session(role="client", key=key), Session(role="server", key=key)
    handshake_pair(c1, s)
    c1.send(think(1))
    old = c1.datagrams_to_send()
    assert len(thinks(deliver(old, s))) == 1
    c2 = Session(role="client", key=key)  # the same client, restarted, from the same address
    assert isinstance(handshake_pair(c2, s, 1.0)[-1], HandshakeComplete)
    c2.send(think(2))
    assert len(thinks(exchange(c2, s, 1.0))) == 1
    assert thinks(deliver(old, s, 1.0)) == []


def test_keyed_server_refuses_a_sealed_ping_without_client_random():
    key = Key.generate()
    s = Session(role="server", key=key)
    ping = {"method": "ping", "v": 2, "crypto": ["xchacha20poly1305"]}
    events = s.receive_datagram(sealed_control(ping, key), 0.0)
    assert isinstance(events[-1], HandshakeFailed) and events[-1].code == "UNSUPPORTED_FEATURE"
    assert "client_random" in events[-1].message and s.state is State.IDLE
    bad = dict(ping, client_random="zz" * 32)  # off the schema now (hex64): a bad frame naming the field
    (ev,) = s.receive_datagram(sealed_control(bad, key, seq=1), 1.0)
    assert ev.reason == "malformed" and "ping.client_random" in ev.detail and s.state is State.IDLE


def test_unkeyed_sessions_send_no_random_and_reference_pings_still_work():
    c, s = Session(role="client"), Session(role="server")
    c.initiate(0.0)
    (ping,) = docs(c.datagrams_to_send())
    assert "client_random" not in ping
    events = s.receive_datagram(plain_control({"method": "ping", "ts": 1730616000}), 0.0)  # the reference's ping
    assert isinstance(events[-1], HandshakeComplete) and events[-1].agreement.proto == 1
    (cap,) = docs(s.datagrams_to_send())
    assert "server_random" not in cap and "client_random" not in cap


# ------------------------------------------------------------------ item 8: unauthenticated errors


def test_plaintext_error_does_not_end_a_keyed_handshake():
    # Before: the plain error failed the handshake at once (HandshakeFailed UNSUPPORTED_FEATURE).
    c = Session(role="client", key=Key.generate(), handshake_attempts=3)
    c.initiate(0.0)
    c.datagrams_to_send()
    err = {"method": "error", "code": "UNSUPPORTED_FEATURE", "message": "the server requires lz4"}
    events = c.receive_datagram(plain_control(err), 0.1)
    assert kinds(events) == ["FrameRejected"] and events[0].reason == "unauthenticated"
    assert c.state is State.AWAIT_CAPABILITY and c.stats["unauthenticated"] == 1
    failed = []
    for t in (0.6, 1.2, 1.8, 2.4):
        failed += c.tick(t)
        assert len(c.datagrams_to_send()) <= 1
    (ev,) = failed
    assert ev.code == "TIMEOUT" and "the server requires lz4" in ev.message


def test_sealed_error_answering_this_ping_ends_the_handshake():
    key = Key.generate()
    c = Session(role="client", key=key, space_hash32=1)
    s = Session(role="server", key=key, expected_space_hash=2)
    events = handshake_pair(c, s)
    assert isinstance(events[-1], HandshakeFailed) and events[-1].code == "SPACE_MISMATCH"
    assert c.state is State.FAILED


def test_recorded_sealed_error_does_not_end_a_new_handshake():
    key = Key.generate()
    c1 = Session(role="client", key=key, space_hash32=1)
    s = Session(role="server", key=key, expected_space_hash=2)
    c1.initiate(0.0)
    exchange(c1, s)
    recorded_error = s.datagrams_to_send()
    c2 = Session(role="client", key=key, space_hash32=2)
    c2.initiate(5.0)
    events = deliver(recorded_error, c2, 5.0)
    assert rejected(events, "stale") and c2.state is State.AWAIT_CAPABILITY


# ------------------------------------------------------------------ item 9: reused stream ids


def test_stream_refuses_ids_already_used_in_the_session():
    key = Key.generate()
    c, s = Session(role="client", key=key, max_frame_bytes=20000), Session(role="server", key=key)
    plain = Session(role="client")
    plain.send(think(0, stream_id=3))
    list(plain.stream(3, [np.ones((8, 8), np.float16)]))  # no replay window for plain frames: allowed
    handshake_pair(c, s)
    c.send(think(0, stream_id=3))
    objs = [np.ones((8, 8), np.float16)]
    with pytest.raises(LocalProtocolError, match="stream id 0 .*handshake"):
        c.stream(0, objs)
    with pytest.raises(LocalProtocolError, match="stream id 3 .*send"):
        c.stream(3, objs)
    list(c.stream(5, objs))
    with pytest.raises(LocalProtocolError, match="stream id 5 .*V-Stream"):
        c.stream(5, objs)
    with pytest.raises(LocalProtocolError, match="stream id 5 carried a V-Stream"):
        c.send(think(0, stream_id=5))
    ids = [c.new_stream_id() for _ in range(6)]
    assert ids == [1, 2, 4, 6, 7, 8]
    with pytest.raises((LocalProtocolError, EncodeError)):  # too large: not sent, so 10 stays free
        c.send(Think(np.ones((1, 30000), np.float16), stream_id=10))  # fits 64 KiB, not the agreed size
    list(c.stream(10, objs))


def test_reused_stream_id_from_another_implementation_is_reported_to_the_sender():
    # Before: the second stream's frames were dropped as replays and the sender heard nothing.
    key = Key.generate()
    c, s = Session(role="client", key=key), Session(role="server", key=key)
    handshake_pair(c, s)
    objs = [np.ones((8, 8), np.float16)]
    for d in c.stream(9, objs):
        c.send_encoded(d)
    assert isinstance(exchange(c, s)[-1], StreamComplete)
    for d in StreamSender(9, objs, codec=c._encoder):  # an implementation that reuses the id
        c.send_encoded(d)
    events = exchange(c, s, 1.0)
    assert not [e for e in events if isinstance(e, StreamComplete)] and rejected(events, "replay")
    (err,) = [e for e in exchange(s, c, 1.0) if isinstance(e, RemoteError)]
    assert err.code == "BAD_REQUEST" and err.document["stream_id"] == 9 and "new stream id" in err.message


# ------------------------------------------------------------------ item 5: a server that lost the session


def test_server_that_lost_the_session_makes_the_client_rehandshake():
    # Before: the new server's HANDSHAKE_REQUIRED (stream 0, frame_seq 0) was dropped by the client's
    # replay window as a replay, and the client never learnt.
    key = Key.generate()
    c, s = Session(role="client", key=key), Session(role="server", key=key)
    handshake_pair(c, s)
    c.send(think(1))
    assert len(thinks(exchange(c, s))) == 1
    s2 = Session(role="server", key=key)  # the server evicted the session
    c.send(think(2))
    assert thinks(exchange(c, s2, 1.0)) == []
    events = exchange(s2, c, 1.0)
    (err,) = [e for e in events if isinstance(e, RemoteError)]
    assert err.code == "HANDSHAKE_REQUIRED"
    c.initiate(1.0)  # the contract: on RemoteError HANDSHAKE_REQUIRED, initiate() again
    exchange(c, s2, 1.0)
    assert isinstance(exchange(s2, c, 1.0)[-1], HandshakeComplete)
    c.send(think(3))
    assert len(thinks(exchange(c, s2, 1.0))) == 1


def test_a_replayed_handshake_required_acts_once():
    key = Key.generate()
    c, s = Session(role="client", key=key), Session(role="server", key=key)
    handshake_pair(c, s)
    s2 = Session(role="server", key=key)
    c.send(think(1))
    exchange(c, s2)
    err = s2.datagrams_to_send()
    assert [type(e) for e in deliver(err, c)] == [MessageReceived, RemoteError]
    (ev,) = deliver(err, c)
    assert ev.reason == "replay"


def test_unkeyed_strict_server_that_lost_the_session():
    c = Session(role="client", space_hash32=5)
    s = Session(role="server", expected_space_hash=5)
    handshake_pair(c, s)
    s2 = Session(role="server", expected_space_hash=5)
    c.send(Think(np.ones((1, 4), np.float16), space_hash32=5))
    exchange(c, s2)
    (err,) = [e for e in exchange(s2, c) if isinstance(e, RemoteError)]
    assert err.code == "HANDSHAKE_REQUIRED"


# ------------------------------------------------------------------ item 6: documents of the wrong types


def test_method_of_the_wrong_type():
    for raw in (b'{"method": []}', b'{"method": {}}', b'{"method": 1}', b'{}'):
        with pytest.raises(HandshakeError):
            handshake.parse(raw)
    frame = plain_control({"method": []})
    for s in (Session(role="server"), Session(role="client"), Session(role="server", key=Key.generate())):
        s.receive_datagram(frame, 0.0)
        s.receive_data(frame_record(frame), 0.0)
    Reassembler().receive(_codec.decode(frame), 0.0)


@pytest.mark.parametrize("compress", [["lz4"], []])
def test_capability_without_a_common_compression(compress):
    # Before: StopIteration out of receive_datagram.
    c = Session(role="client", compress=("zstd", "none"))
    c.initiate(0.0)
    cap = {"method": "capability", "v": 2, "agreed_proto": 2, "compress": compress, "crypto": ["none"]}
    events = c.receive_datagram(plain_control(cap), 0.0)
    assert isinstance(events[-1], HandshakeFailed) and "compress" in events[-1].message


def test_no_common_dtype_is_refused_with_the_field_named():
    s = Session(role="server")
    events = s.receive_datagram(plain_control({"method": "ping", "v": 2, "supports": {"dtype": []}}), 0.0)
    assert isinstance(events[-1], HandshakeFailed) and events[-1].message.startswith("supports.dtype")
    c = Session(role="client")
    c.initiate(0.0)
    cap = {"method": "capability", "v": 2, "agreed_proto": 2, "supports": {"dtype": ["future"]}}
    events = c.receive_datagram(plain_control(cap), 0.0)
    assert isinstance(events[-1], HandshakeFailed) and "supports.dtype" in events[-1].message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


def _paths(spec: dict, prefix: tuple = ()) -> list[tuple]:
    """Every field path of a message schema, nested fields included ("0" stands for a list item)."""
    out = []
    for name, f in spec.items():
        out.append(prefix + (name,))
        if f["fields"]:
            inner = prefix + (name, 0) if f["type"] == "list[object]" else prefix + (name,)
            out += _paths(f["fields"], inner)
    return out


def _put(doc, path: tuple, value) -> None:
    """doc at path = value, making the containers on the way (a list gets one item)."""
    for i, step in enumerate(path[:-1]):
        nxt = [] if isinstance(path[i + 1], int) else {}
        if isinstance(step, int):
            if not isinstance(doc, list):
                return
            if not doc:
                doc.append(nxt)
            doc = doc[0]
        else:
            if not isinstance(doc, dict):
                return
            if not isinstance(doc.get(step), (dict, list)):
                doc[step] = nxt
            doc = doc[step]
    last = path[-1]
    if isinstance(last, int):
        if isinstance(doc, list):
            doc[:1] = [value]
    elif isinstance(doc, dict):
        doc[last] = value


def _fuzzed(data, message: str) -> dict:
    """The message's example with arbitrary JSON in one to three fields (at any depth)."""
    doc = json.loads(json.dumps(handshake.EXAMPLES[message]))
    paths = _paths(handshake.SCHEMA[message]) + [("x-extra",), ("supports", "x-ext")]
    for _ in range(data.draw(st.integers(1, 3))):
        _put(doc, data.draw(st.sampled_from(paths)), data.draw(json_values))
    return doc


_KEY = Key(bytes(range(32)), key_id=11)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_json_in_any_field_raises_only_resonant_errors(data):
    message = data.draw(st.sampled_from(["ping", "capability", "head", "tail", "error"]))
    doc = _fuzzed(data, message)
    raw = json.dumps(doc).encode()
    try:
        handshake.parse(raw)
    except HandshakeError:
        pass
    try:
        Reassembler().receive(Sync(raw, stream_id=3), 0.0)
    except ResonantError:
        pass
    role = data.draw(st.sampled_from(["client", "server"]))
    keyed = data.draw(st.booleans())
    s = Session(role=role, key=_KEY if keyed else None, compress=("zstd",) if data.draw(st.booleans()) else
                ("none", "zstd"))
    state = data.draw(st.sampled_from(["idle", "started", "established"]))
    if state == "established":  # through a real handshake with a peer of the same configuration
        other = Session(role="server" if role == "client" else "client", key=_KEY if keyed else None)
        c, srv = (s, other) if role == "client" else (other, s)
        handshake_pair(c, srv)
        assert s.state is State.ESTABLISHED
    if role == "client" and state == "started":
        s.initiate(0.0)
        if keyed and message in ("capability", "error") and s._client_random is not None:
            doc.setdefault("client_random", s._client_random.hex())  # (so the document reaches the checks)
            doc.setdefault("server_random", "ab" * 32)
            raw = json.dumps(doc).encode()
    frame = Sync(raw, stream_id=data.draw(st.sampled_from([0, 3])), frame_seq=data.draw(st.integers(0, 3)))
    wire = Codec(key=_KEY).encode(frame) if keyed and data.draw(st.booleans()) else _codec.encode(frame)
    s.receive_datagram(wire, 1.0)  # must not raise
    s.receive_data(frame_record(wire), 2.0)
    s.tick(100.0)


# ------------------------------------------------------------------ review 1 (F1-F5)


def _keyed_pair(now: float = 0.0, **kw):
    key = Key.generate()
    c, s = Session(role="client", key=key, **kw), Session(role="server", key=key, **kw)
    events = handshake_pair(c, s, now)
    assert isinstance(events[-1], HandshakeComplete) and s.state is State.ESTABLISHED
    return key, c, s


def test_reflected_frames_are_not_delivered_and_do_not_burn_the_reply():
    """F1: one key for both directions let an attacker bounce a peer's frame back to it: it was
    delivered, and the genuine reply on that (stream, seq) was dropped as a replay."""
    key, c, s = _keyed_pair()
    c.send(think(7, stream_id=5))
    out = c.datagrams_to_send()
    assert len(thinks(deliver(out, s))) == 1
    reflected = deliver(out, c)  # the client's own frame, back to it
    assert thinks(reflected) == [] and rejected(reflected, "malformed")
    s.send(think(8, stream_id=5))  # the server's genuine answer on stream 5, frame_seq 0
    (answer,) = thinks(exchange(s, c))
    assert answer.frame.hidden.numpy()[0, 0] == 8
    # a V-Stream reflected to its sender completes nothing
    sid = s.new_stream_id()
    for f in s.stream(sid, [np.arange(64, dtype=np.float32)]):
        s.send_encoded(f)
    mine = s.datagrams_to_send()
    assert not [e for e in deliver(mine, s) if isinstance(e, StreamComplete)]
    assert [e for e in deliver(mine, c) if isinstance(e, StreamComplete)]
    # control documents have a direction too: the client's ping reflected to the client, the server's
    # error reflected to the server, change nothing
    c.initiate(1.0)
    ping = c.datagrams_to_send()
    assert not [e for e in deliver(ping, c, 1.0) if isinstance(e, MessageReceived)]
    err = sealed_control({"method": "error", "code": "INTERNAL", "message": "x"}, key, direction="server-to-client")
    assert not [e for e in s.receive_datagram(err, 1.0) if isinstance(e, RemoteError)]


def test_harvested_handshake_required_is_stale():
    """F2: a fresh server Session minted sealed HANDSHAKE_REQUIRED errors for any frame, and an
    established client acted on every one."""
    key, c, s = _keyed_pair()
    c.send(think(1))
    recorded = c.datagrams_to_send()
    deliver(recorded, s)
    minted, garbled = [], []
    for _ in range(3):  # from three source addresses: a fresh server Session each
        x = Session(role="server", key=key)
        x.receive_datagram(recorded[0], 0.0)  # a recorded keyed frame
        minted += x.datagrams_to_send()
        y = Session(role="server", key=key)
        y.receive_datagram(_garble(recorded[0]), 0.0)  # any garbled frame: no capture needed
        garbled += y.datagrams_to_send()
    assert len(minted) == 3 and len(garbled) == 3
    events = deliver(garbled, c, 5.0)
    assert not [e for e in events if isinstance(e, RemoteError)]
    assert len(rejected(events, "stale")) == 3 and c.state is State.ESTABLISHED
    # an echo of a frame the client did send (captured on the path) is acted on once per session key
    events = deliver(minted, c, 5.0)
    assert [e.code for e in events if isinstance(e, RemoteError)] == ["HANDSHAKE_REQUIRED"]
    assert len(rejected(events, "stale")) == 2
    # an error for a frame sent under an earlier session key (late, after a re-key) is stale too
    c.send(think(2))
    old_frame = c.datagrams_to_send()
    c.initiate(1.0)
    exchange(c, s, 1.0)
    assert isinstance(exchange(s, c, 1.0)[-1], HandshakeComplete)
    c.send(think(3))
    assert len(thinks(exchange(c, s, 1.1))) == 1  # the server switches to the new key
    lost = Session(role="server", key=key)  # a server that never had the old session
    lost.receive_datagram(old_frame[0], 1.2)
    late = lost.datagrams_to_send()
    assert docs_sealed(late, key)[0]["code"] == "HANDSHAKE_REQUIRED"
    events = deliver(late, c, 1.3)
    assert not [e for e in events if isinstance(e, RemoteError)] and rejected(events, "stale")


def _garble(frame: bytes) -> bytes:
    """A keyed frame whose ciphertext no longer authenticates (CRC fixed): what an attacker can send."""
    import zlib
    b = bytearray(frame)
    b[-10] ^= 1  # (inside the tag: the echoed tag is one the client never sent)
    b[-4:] = zlib.crc32(bytes(b[:-4])).to_bytes(4, "little")
    return bytes(b)


def docs_sealed(frames, key, direction: str = "server-to-client") -> list[dict]:
    codec = control_codec(key, direction)
    codec.require_encryption = False
    return [json.loads(codec.decode(d).json.tobytes()) for d in frames]


def test_genuine_handshake_required_echoes_the_frame_and_is_acted_on():
    """F2, the good path: a server that lost the session echoes the failing frame's tag; the client,
    which sent that frame under its current key, reports RemoteError(HANDSHAKE_REQUIRED)."""
    key, c, s = _keyed_pair()
    c.send(think(1))
    (frame,) = c.datagrams_to_send()
    restarted = Session(role="server", key=key)
    restarted.receive_datagram(frame, 1.0)
    reply = restarted.datagrams_to_send()
    (doc,) = docs_sealed(reply, key)
    assert doc["code"] == "HANDSHAKE_REQUIRED" and doc["tag"] == frame[-20:-4].hex()
    events = deliver(reply, c, 1.0)
    assert [e.code for e in events if isinstance(e, RemoteError)] == ["HANDSHAKE_REQUIRED"]


def test_replayed_pings_do_not_rekey_the_live_server():
    """F3: 257 recorded pings (more than the control tags remembered) replayed in a cycle re-keyed
    the live server once each, and the live client's data was then refused."""
    key, c, s = _keyed_pair()
    old = []
    for _ in range(handshake.CONTROL_TAGS_REMEMBERED + 1):
        x = Session(role="client", key=key)
        x.initiate(0.0)
        old += x.datagrams_to_send()
    rekeys = s.stats["rekeys"]
    deliver(old, s, 1.0)
    answers = s.datagrams_to_send()
    deliver(old, s, 2.0)
    answers += s.datagrams_to_send()
    assert s.stats["rekeys"] == rekeys and s.state is State.ESTABLISHED
    # rate-limited: one new session offered per rekey_interval (and the pending ping, replayed once it
    # left the remembered tags, answered again the same way): not one answer per ping
    assert len(answers) <= 3
    c.send(think(1))
    assert len(thinks(exchange(c, s, 3.0))) == 1
    s.send(think(2))
    assert len(thinks(exchange(s, c, 3.0))) == 1


def test_initiate_from_established_rekeys_end_to_end():
    """F3: a genuine re-key still works: the server switches when the first frame under the new key
    arrives; frames in flight under the old key, both ways, are still delivered."""
    key, c, s = _keyed_pair()
    c.send(think(1))
    c_old = c.datagrams_to_send()
    s.send(think(2))
    s_old = s.datagrams_to_send()
    rekeys = s.stats["rekeys"]
    c.initiate(1.0)
    exchange(c, s, 1.0)
    assert isinstance(exchange(s, c, 1.0)[-1], HandshakeComplete)
    assert s.stats["rekeys"] == rekeys  # not yet: no frame has proven the new key
    assert len(thinks(deliver(c_old, s, 1.1))) == 1  # in flight under the old key
    assert len(thinks(deliver(s_old, c, 1.1))) == 1
    c.send(think(3))
    events = exchange(c, s, 1.2)
    assert len(thinks(events)) == 1 and s.stats["rekeys"] == rekeys + 1
    s.send(think(4))
    assert len(thinks(exchange(s, c, 1.3))) == 1
    assert not rejected(deliver(c_old, s, 1.4), "ok") and not thinks(deliver(c_old, s, 1.4))


def test_plain_or_unsuitable_ping_does_not_end_an_established_keyed_server():
    """F4: a ping in the clear (anyone can send one), or a sealed ping this server cannot serve (e.g.
    recorded before the upgrade, without client_random), dropped an established keyed server to idle."""
    key, c, s = _keyed_pair()
    forged = plain_control({"method": "ping"})
    events = s.receive_datagram(forged, 1.0)
    assert s.state is State.ESTABLISHED and not [e for e in events if isinstance(e, HandshakeFailed)]
    assert rejected(events, "not_encrypted")
    assert [d["code"] for d in docs(s.datagrams_to_send())] == ["UNSUPPORTED_FEATURE"]  # answered in the clear
    pre_upgrade = sealed_control({"method": "ping", "v": 2, "crypto": ["xchacha20poly1305"]}, key, seq=1)
    events = s.receive_datagram(pre_upgrade, 3.0)
    assert s.state is State.ESTABLISHED and not [e for e in events if isinstance(e, HandshakeFailed)]
    assert docs_sealed(s.datagrams_to_send(), key)[0]["code"] == "UNSUPPORTED_FEATURE"
    c.send(think(1))
    assert len(thinks(exchange(c, s, 4.0))) == 1


def test_client_random_must_be_exactly_64_lowercase_hex_digits():
    """F5: bytes.fromhex skips whitespace, so 62 digits and two spaces gave a 31-byte random, and
    every later frame raised ValueError out of receive_datagram."""
    from resonant.session import _random_of
    for bad in ("ab" * 31 + "  ", "ab" * 31 + "\t\n", " " + "ab" * 31 + " ", "AB" * 32, "ab" * 31 + "g0", "+" + "a" * 63):
        assert _random_of({"r": bad}, "r") is None
        with pytest.raises(HandshakeError):
            handshake.validate({"method": "ping", "client_random": bad})
    assert _random_of({"r": "ab" * 32}, "r") == bytes([0xAB]) * 32
    key = Key.generate()
    s = Session(role="server", key=key)
    ping = {"method": "ping", "v": 2, "space_hash32": 0, "crypto": ["xchacha20poly1305"], "client_random": "ab" * 31 + "  "}
    s.receive_datagram(sealed_control(ping, key), 0.0)
    assert s.state is not State.ESTABLISHED
    events = s.receive_datagram(Codec(key=key).encode(think(1)), 0.1)  # no exception
    assert not thinks(events)
    s.send(think(1))


def test_mutated_sealed_control_documents_raise_only_resonant_errors():
    """F5 follow-up: /tmp/review1/fuzz.py, short, with documents sealed as a key holder would."""
    import random
    rng = random.Random(1)
    vals = [None, True, 0, -1, 2**40, 1.5, "", "x" * 300, "ab" * 32, "AB" * 32, "ab" * 31 + "\t\n", "ab" * 31 + "  ",
            [], {}, ["zstd"], {"a": 1}, "\u00e9" * 64, "ab" * 16]
    for it in range(200):
        key, c, s = _keyed_pair()
        tgt, role = (s, "ping") if it % 2 else (c, rng.choice(["capability", "error"]))
        d = {"method": role}
        if role == "ping":
            d.update({"v": 2, "space_hash32": 0, "crypto": ["xchacha20poly1305"], "client_random": "ab" * 32})
        if role == "capability":
            d.update({"agreed_proto": 2, "v": 2, "space_hash32": 0, "crypto": ["xchacha20poly1305"],
                      "client_random": c._client_random.hex(), "server_random": "cd" * 32})
        if role == "error":
            d.update({"code": "HANDSHAKE_REQUIRED", "message": "m"})
        fields = list(handshake.SCHEMA[role])
        for f in rng.sample(fields, k=min(3, len(fields))):
            d[f] = rng.choice(vals)
        try:
            tgt.receive_datagram(sealed_control(d, key, seq=rng.randrange(3)), 1.0)
            other = c if tgt is s else s
            tgt.send(think(1))
            other.receive_datagram(tgt.datagrams_to_send()[-1], 1.5)
            other.send(think(2))
            tgt.receive_datagram(other.datagrams_to_send()[-1], 2.0)
        except ResonantError:
            pass
