"""Fuzz target: Session.receive_datagram, Session.receive_data and Session.tick, as server and
client, keyed (the test key) and not, C fast path on and off, with the clock advancing.
Input: a config byte (bit 0: client; bit 1: keyed; bit 2: fast path off; bit 3: strict), then
operations (see common.ops): datagrams, TCP bytes (mode bit WRAP adds the record length),
ticks, clock steps, draining the send queue.

A Session documents that receive_* and tick never raise for anything the peer sent, so for
this target any exception is a finding, a ResonantError included.

    python3 fuzz/fuzz_session.py -max_total_time=120      # see docs/fuzzing.md
"""

import atheris

with atheris.instrument_imports(include=["resonant"]):
    import resonant
    import resonant.session
    import resonant.stream
    import resonant.transforms

import common

KEY = common.test_key()


def make_session(cfg: int):
    kw = {"role": "client" if cfg & 1 else "server"}
    if cfg & 2:
        kw["key"] = KEY
    if cfg & 8:
        kw["strict"] = True
    s = resonant.session.Session(resonant.session.SessionConfig(**kw))
    if cfg & 4:
        s._fast = False
    return s


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    s = make_session(data[0])
    now = 1000.0
    if data[0] & 1:
        s.initiate(now)
    for kind, mode, payload in common.ops(data):
        if kind == common.OP_DATAGRAM:
            s.receive_datagram(common.prepare(mode & (common.FIX_CRC | common.SEAL), payload), now)
        elif kind == common.OP_DATA:
            s.receive_data(common.prepare(mode, payload), now)
        elif kind == common.OP_TICK:
            s.tick(now)
        elif kind == common.OP_ADVANCE:
            now += payload[0] / 8 if payload else 256.0
        elif kind == common.OP_DRAIN:
            s.datagrams_to_send()
            s.data_to_send()
    s.tick(now + 3600.0)
    s.receive_eof(now + 3600.0)


def _exchange(cfg: int) -> tuple[list[bytes], list[bytes]]:
    """A real handshake and traffic between a client and a server built like make_session:
    (what the client sent, what the server sent)."""
    import numpy as np
    client, server = make_session(cfg | 1), make_session(cfg & ~1)
    now = 1000.0
    client.initiate(now)
    c_out, s_out = [], []

    def pump():
        for _ in range(4):
            for d in client.datagrams_to_send():
                c_out.append(d)
                server.receive_datagram(d, now)
            for d in server.datagrams_to_send():
                s_out.append(d)
                client.receive_datagram(d, now)
    pump()
    rng = np.random.default_rng(1)
    client.send(resonant.Think(rng.standard_normal((2, 32)).astype(np.float16), stream_id=11), now)
    server.send(resonant.Think(rng.standard_normal(16).astype(np.float32), stream_id=12), now)
    pump()
    for f in client.stream(13, [rng.standard_normal((8, 30)).astype(np.float16)], max_frame_bytes=600):
        client.send_encoded(f)
    for f in server.stream(14, [rng.standard_normal(200).astype(np.float32)], max_frame_bytes=600):
        server.send_encoded(f)
    pump()
    return c_out, s_out


def seeds() -> list[bytes]:
    out = []
    for keyed in (0, 2):
        c_out, s_out = _exchange(keyed)
        for cfg, frames in ((keyed, c_out), (keyed | 1, s_out)):
            out.append(bytes([cfg]) + b"".join(common.op(common.OP_DATAGRAM, f) for f in frames))
            out.append(bytes([cfg | 4]) + b"".join(common.op(common.OP_DATA, f, common.WRAP) + common.op(common.OP_ADVANCE, b"\x04")
                                                  + common.op(common.OP_TICK) for f in frames))
            out.append(bytes([cfg | 8]) + b"".join(common.op(common.OP_DATAGRAM, f, common.FIX_CRC) + common.op(common.OP_DRAIN)
                                                  for f in frames[::-1]))
    return out


if __name__ == "__main__":
    common.run("session", TestOneInput, seeds, max_len=262144)
