"""The fast-path switch: RESONANT_PURE=1 (read once, at import) turns off every C fast path, so
that the general paths do everything; resonant.fast_paths() reports which are on. The suite runs
both ways (`make test`); the pairs of paths are compared in test_session, test_stream and
test_roundtrip. Here: the switch really turns each one off, in a fresh process either way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import resonant
from resonant import _codec
from resonant.session import Session

# Exercises every fast path once (a message built from arrays, a data message in and out over
# UDP and TCP, a V-Stream over datagrams and over TCP records read in place), then prints the
# fast-path counters, how often RecordReader.feed took its general path for a one-record read,
# and a digest of every event and output, which must not depend on the switch.
_EXERCISE = r"""
import hashlib, json
import numpy as np
import resonant
from resonant import _codec
from resonant.records import RecordReader, frame_record
from resonant.session import Session
from resonant.stream_sender import StreamSender

splits = [0]
general = RecordReader._split
def counted(self, *a):
    splits[0] += 1
    return general(self, *a)
RecordReader._split = counted

out = hashlib.sha256()
def note(*things):
    out.update(repr(things).encode())

x = np.arange(2048, dtype=np.float16).reshape(1, 2048)
think = resonant.Think(x, stream_id=3)                          # init_message, slice_of_array
note(resonant.encode(think), resonant.Slice.from_array(x).tobytes())
client = Session(role="client")
client.send(think)                                              # queue_numbered
(wire,) = client.datagrams_to_send()
server = Session(role="server")
note(server.receive_datagram(wire, 0.0))                        # message_event (UDP)
note(server.receive_data(frame_record(wire), 0.0))              # message_event (TCP, one record)
note(RecordReader().feed(frame_record(wire))[0].tobytes())      # RecordReader's one-record shortcut
big = (np.arange(300_000) % 1000).astype(np.float16)
for frame in StreamSender(5, [big]):                            # encode_chunk(s)
    note(server.receive_datagram(frame, 1.0))                   # place_chunk
tcp = Session(role="server")
data = b"".join(b"".join(bytes(p) for p in parts) for parts in StreamSender(7, [big]).records())  # encode_chunk_parts
k = 0
while k < len(data):                                            # read in place, as the TCP transport does
    buf = tcp.get_buffer()
    n = min(len(buf), len(data) - k, 200_000)
    buf[:n] = data[k:k + n]
    note(tcp.buffer_updated(n, 2.0))                            # place_records
    k += n
note(server.stats, tcp.stats)
print(json.dumps({"fast_paths": list(resonant.fast_paths()), "hits": _codec.fast_path_hits(),
                  "record_reader_general": splits[0], "digest": out.hexdigest()}))
"""


def _run(pure: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RESONANT_PURE"}
    if pure:
        env["RESONANT_PURE"] = "1"
    root = Path(resonant.__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    done = subprocess.run([sys.executable, "-c", _EXERCISE], env=env, capture_output=True, text=True, timeout=120,
                          cwd=str(root))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_switch_turns_every_fast_path_off_with_the_same_results():
    fast, pure = _run(pure=False), _run(pure=True)
    names = list(fast["hits"])
    assert fast["fast_paths"] == names and pure["fast_paths"] == []
    assert all(fast["hits"][n] > 0 for n in names), fast["hits"]  # the exercise reaches every fast path...
    assert all(pure["hits"][n] == 0 for n in names), pure["hits"]  # ...and with RESONANT_PURE=1 none is taken
    assert fast["record_reader_general"] == 0 and pure["record_reader_general"] > 0
    assert fast["digest"] == pure["digest"]  # the same events, frames and statistics either way


def test_fast_paths_report_and_the_session_default():
    on = resonant.fast_paths()
    assert on == () or set(on) == set(_codec.fast_path_hits())
    assert on == (() if os.environ.get("RESONANT_PURE", "").strip() not in ("", "0") else on)
    s = Session(role="server")
    assert s._fast is bool(on)
    s._fast = False  # settable per session (tests)
    frame = resonant.Think(np.ones((1, 4), np.float16))
    before = _codec.fast_path_hits()["message_event"]
    (ev,) = s.receive_datagram(resonant.encode(frame), 0.0)
    assert ev.frame == frame and _codec.fast_path_hits()["message_event"] == before


def test_now_is_checked_the_same_way_on_either_path():
    """`now` is a number on every path: a data message that a fast path takes (which does not use
    the time) is refused with now=None exactly as the general path (declared `double now`) refuses
    it, so RESONANT_PURE=1 does not change what a caller may pass."""
    frame = resonant.Think(np.ones((1, 4), np.float16), stream_id=3)
    wire = resonant.encode(frame)
    from resonant.records import frame_record
    for fast in (True, False):
        s = Session(role="server")
        s._fast = fast
        for call in (lambda: s.receive_datagram(wire, None), lambda: s.receive_data(frame_record(wire), None),
                     lambda: s.send(frame, None)):
            try:
                call()
            except TypeError as exc:
                assert "NoneType" in str(exc)
            else:
                raise AssertionError(f"now=None accepted with _fast={fast}")
        (ev,) = s.receive_datagram(wire, 1)  # an int is a time like any other
        assert ev.frame == frame
