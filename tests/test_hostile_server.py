"""Hostile peers against resonant.serve / resonant.connect (the asyncio adapter), with real
processes on loopback: a server child (`python -c _SERVER`, which iterates the server as an
application does and reports what it got as JSON lines), attacked from this process with plain
sockets, while a legitimate client (resonant.connect) checks that it is still served.

Issue 14 items 4 (TCP back-pressure that never resumed; one peer stalling another), 5 (UDP
sessions evicted by garbage; the client's re-handshake), 10 (connection exhaustion, slowloris)
and the low items (malformed-record bursts, handshake amplification, garbage floods).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

import resonant
from resonant import Key, MsgType
from resonant.session import HandshakeComplete, RemoteError

HOST = "127.0.0.1"
CHILD_CWD = tempfile.gettempdir()
WAIT = 20.0  # seconds: the longest any single wait may take (a loaded 2-core machine)
LEGIT = 4242  # the legitimate client's stream_id

# The server child: serve(URL, **KWARGS) (keywords the installed serve() lacks are left out, so
# that the same test runs against older code for the "before" figures), iterate its events, and
# print a JSON status line whenever it changed: messages per stream_id, FrameRejected events, the
# server's counters and the longest event-loop stall seen (a task that wakes every 5 ms).
_SERVER = r"""
import asyncio, inspect, json, sys, time
import resonant
from resonant import MessageReceived, FrameRejected

url, kwargs = sys.argv[1], json.loads(sys.argv[2])
if "key_file" in kwargs:
    kwargs["key"] = resonant.Key.from_file(kwargs.pop("key_file"))
accepted = inspect.signature(resonant.aio.serve).parameters
kwargs = {k: v for k, v in kwargs.items() if k in accepted or k in {f for f in resonant.SessionConfig.__dataclass_fields__}}

async def main():
    counts, state = {}, {"rejected": 0, "stall_ms": 0.0}
    async with resonant.serve(url, **kwargs) as server:
        print(json.dumps({"port": server.address[1]}), flush=True)

        async def monitor():
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                state["stall_ms"] = max(state["stall_ms"], (now - last - 0.005) * 1000)
                last = now

        async def report():
            prev = None
            while True:
                await asyncio.sleep(0.1)
                st = {"counts": counts, "links": len(server.links), "pending": len(getattr(server, "pending", ())),
                      **state, **{k: getattr(server, k, None) for k in (
                          "rejected_peers", "dropped_datagrams", "evicted_pending", "timed_out",
                          "garbage_datagrams", "refused_datagrams", "unanswered_bytes")}}
                line = json.dumps(st, sort_keys=True)
                if line != prev:
                    print(line, flush=True)
                    prev = line

        tasks = [asyncio.ensure_future(monitor()), asyncio.ensure_future(report())]
        async for addr, event in server:
            if type(event) is MessageReceived:
                sid = str(event.frame.stream_id)
                counts[sid] = counts.get(sid, 0) + 1
            elif type(event) is FrameRejected:
                state["rejected"] += 1

asyncio.run(main())
"""


class ServerChild:
    """The server child; .port once it listens, .status the last JSON status line."""

    def __init__(self, url: str, **kwargs) -> None:
        self.argv = [sys.executable, "-c", _SERVER, url, json.dumps(kwargs)]
        self.status: dict = {}
        self.lines: list[str] = []
        self.stderr: list[str] = []
        self._cv = threading.Condition()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1, cwd=CHILD_CWD)
        threading.Thread(target=self._pump, args=(self.proc.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, False), daemon=True).start()
        self.port = self.wait(lambda s: s.get("port"), "the port")["port"]
        self.status = {}

    def _pump(self, pipe, out: bool) -> None:
        for line in pipe:
            with self._cv:
                if out:
                    self.lines.append(line)
                    self.status = json.loads(line)
                else:
                    self.stderr.append(line.rstrip("\n"))
                self._cv.notify_all()

    def wait(self, pred, what: str, timeout: float = WAIT) -> dict:
        deadline = time.monotonic() + timeout
        with self._cv:
            while not pred(self.status):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last status "
                                         f"{self.status}\nstderr: {self.stderr[-20:]}")
                self._cv.wait(min(left, 0.1))
            return dict(self.status)

    def count(self, sid: int) -> int:
        return self.status.get("counts", {}).get(str(sid), 0)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(Exception):
                pipe.close()


@contextlib.contextmanager
def server_child(url: str, **kwargs):
    s = ServerChild(url, **kwargs)
    try:
        yield s
    finally:
        s.kill()


def record(frame: bytes) -> bytes:
    return struct.pack("<I", len(frame)) + frame


def keepalive(sid: int, seq: int = 0) -> bytes:
    return resonant.encode(resonant.make_frame(MsgType.SYNC, [], stream_id=sid, frame_seq=seq))


def think(sid: int, seq: int = 0) -> bytes:
    return resonant.encode(resonant.Think(np.arange(8, dtype=np.float16), stream_id=sid, frame_seq=seq))


def closed_by_peer(s: socket.socket, timeout: float = WAIT) -> bool:
    """Whether the server closed the connection (EOF or reset) within `timeout` seconds."""
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def legit_messages(url: str, n: int, *, pace: float = 0.0, **kwargs) -> list:
    """A legitimate client: handshake, n Think messages on stream LEGIT; returns the events it got."""
    events = []
    async with resonant.connect(url, timeout=10.0, **kwargs) as peer:
        for i in range(n):
            await peer.send(resonant.Think(np.full(8, i, dtype=np.float16), stream_id=LEGIT))
            if pace:
                await asyncio.sleep(pace)
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                events.append(await peer.next_event(0.2))
    return events


# ------------------------------------------------------------------ item 4: TCP back-pressure


def test_tcp_20000_pipelined_frames_are_all_delivered():
    """Before: reading paused at 4,096 queued events and never resumed (8,856 of 20,000 came)."""
    n = 20_000
    with server_child(f"tcp://{HOST}:0") as srv, socket.create_connection((HOST, srv.port), timeout=WAIT) as c:
        c.sendall(b"".join(record(keepalive(7, i)) for i in range(n)))
        with contextlib.suppress(AssertionError):
            srv.wait(lambda s: s.get("counts", {}).get("7", 0) >= n, f"{n} messages", timeout=60)
        print(f"\npipelined: {srv.count(7)}/{n} delivered")
        assert srv.count(7) == n


def test_tcp_a_flooding_peer_does_not_stall_a_legitimate_one():
    """An attacker pipelines bursts of keepalives on new connections, over and over; a legitimate
    client's messages still arrive (before: a read while the shared queue held more than 4,096
    events paused the legitimate connection too, for good)."""
    stop = threading.Event()
    with server_child(f"tcp://{HOST}:0") as srv:
        burst = b"".join(record(keepalive(1, i)) for i in range(5000))

        def flood():
            conns = []
            try:
                while not stop.is_set() and len(conns) < 200:
                    c = socket.create_connection((HOST, srv.port), timeout=WAIT)
                    conns.append(c)
                    c.settimeout(0.2)
                    with contextlib.suppress(OSError):
                        c.sendall(burst)
            finally:
                for c in conns:
                    c.close()

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        try:
            srv.wait(lambda s: s.get("counts", {}).get("1", 0) > 20_000, "the flood to arrive")
            run(legit_messages(f"tcp://{HOST}:{srv.port}", 200, pace=0.005))
            with contextlib.suppress(AssertionError):
                srv.wait(lambda s: s.get("counts", {}).get(str(LEGIT), 0) >= 200, "the legitimate messages")
            print(f"\nflood: {srv.count(LEGIT)}/200 legitimate messages delivered, {srv.count(1)} flood messages")
            assert srv.count(LEGIT) == 200
        finally:
            stop.set()
            t.join(10)


# ------------------------------------------------------------------ item 5: UDP session eviction


def _udp_flood(port: int, sources: int, datagrams: list[bytes]) -> int:
    """Send each datagram from `sources` distinct source ports; returns the bytes answered."""
    socks = []
    try:
        for _ in range(sources):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((HOST, 0))
            s.setblocking(False)
            socks.append(s)
        for i, s in enumerate(socks):
            for d in datagrams:
                with contextlib.suppress(BlockingIOError):
                    s.sendto(d, (HOST, port))
            if i % 64 == 63:
                time.sleep(0.005)  # lets the receiver keep up (socket buffer), as a slow flood would
        time.sleep(0.5)
        answered = 0
        for s in socks:
            with contextlib.suppress(BlockingIOError):
                while True:
                    answered += len(s.recv(65536))
        return answered
    finally:
        for s in socks:
            s.close()


def _garbage_datagrams() -> list[bytes]:
    bad_crc = bytearray(think(5))
    bad_crc[-1] ^= 0xFF
    bad_sync = bytearray(keepalive(5))
    bad_sync[-1] ^= 0xFF
    return [b"\x00" * 40, os.urandom(200), bytes(bad_crc), bytes(bad_sync)]


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed-strict", "keyed"])
def test_udp_garbage_from_1100_ports_does_not_evict_a_handshaken_client(keyed, tmp_path):
    """Before: 1,100 sources evicted the client's session (max_peers 1,024) and its later frames
    were refused with HANDSHAKE_REQUIRED."""
    opts, copts = {"strict": True}, {}
    if keyed:
        key = Key.generate()
        key.to_file(tmp_path / "k.key")
        opts, copts = {"key_file": str(tmp_path / "k.key")}, {"key": key}
    with server_child(f"udp://{HOST}:0", **opts) as srv:
        url = f"udp://{HOST}:{srv.port}"

        async def scenario():
            async with resonant.connect(url, timeout=10.0, **copts) as peer:
                await peer.send(resonant.Think(np.zeros(8, np.float16), stream_id=LEGIT))
                await asyncio.to_thread(srv.wait, lambda s: s.get("counts", {}).get(str(LEGIT), 0) >= 1, "message 1")
                await asyncio.to_thread(_udp_flood, srv.port, 1100, _garbage_datagrams())
                for i in range(20):
                    await peer.send(resonant.Think(np.full(8, i, np.float16), stream_id=LEGIT))
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(srv.wait, lambda s: s.get("counts", {}).get(str(LEGIT), 0) >= 21,
                                        "the 20 messages after the flood")
        with contextlib.suppress(AssertionError):
            run(scenario())
        print(f"\ngarbage from 1,100 ports: {srv.count(LEGIT)}/21 legitimate messages delivered; status {srv.status}")
        assert srv.count(LEGIT) == 21
        if srv.status.get("pending") is not None:  # (after the fix) the garbage made no established session
            assert srv.status["links"] - srv.status["pending"] == 1, srv.status


@pytest.mark.parametrize("keyed", [False, True],
    ids=["unkeyed-strict", "keyed"])
def test_udp_client_handshakes_again_when_the_server_lost_its_session(keyed, tmp_path):
    """The server restarts on the same port (so it has no session for the client): the client's
    next frame is refused with HANDSHAKE_REQUIRED, the client handshakes again by itself, and later
    messages arrive."""
    opts, copts = {"strict": True}, {}
    if keyed:
        key = Key.generate()
        key.to_file(tmp_path / "k.key")
        opts, copts = {"key_file": str(tmp_path / "k.key")}, {"key": key}
    srv = ServerChild(f"udp://{HOST}:0", **opts)
    port = srv.port
    url = f"udp://{HOST}:{port}"
    try:
        async def scenario():
            seen = []
            async with resonant.connect(url, timeout=10.0, **copts) as peer:
                await peer.send(resonant.Think(np.zeros(8, np.float16), stream_id=LEGIT))
                await asyncio.to_thread(srv.wait, lambda s: s.get("counts", {}).get(str(LEGIT), 0) >= 1, "message 1")
                srv.kill()
                new = await asyncio.to_thread(ServerChild, f"udp://{HOST}:{port}", **opts)
                try:
                    deadline = time.monotonic() + 15
                    while new.count(LEGIT) < 5 and time.monotonic() < deadline:
                        await peer.send(resonant.Think(np.ones(8, np.float16), stream_id=LEGIT))
                        with contextlib.suppress(asyncio.TimeoutError):
                            while True:
                                seen.append(await peer.next_event(0.1))
                    return seen, new.count(LEGIT), new
                except BaseException:
                    new.kill()
                    raise
        seen, delivered, new = run(scenario())
        new.kill()
        assert any(isinstance(e, RemoteError) and e.code == "HANDSHAKE_REQUIRED" for e in seen), seen
        assert any(isinstance(e, HandshakeComplete) for e in seen), seen
        assert delivered >= 5
    finally:
        srv.kill()


# ------------------------------------------------------------------ item 10: connection exhaustion


@pytest.mark.pure_skip  # connection limits (1,100 sockets), no frame reaches a fast path
def test_tcp_1100_idle_connections_do_not_lock_out_a_client():
    """Before: the 1,024 idle connections took every place and every new client was closed."""
    with server_child(f"tcp://{HOST}:0") as srv:
        idle = []
        try:
            for _ in range(1100):
                idle.append(socket.create_connection((HOST, srv.port), timeout=WAIT))
            time.sleep(0.5)
            start = time.monotonic()
            run(legit_messages(f"tcp://{HOST}:{srv.port}", 3), timeout=30)
            srv.wait(lambda s: s.get("counts", {}).get(str(LEGIT), 0) >= 3, "the legitimate client's messages")
            served = time.monotonic() - start
            print(f"\n1,100 idle connections: a new client served in {served:.2f} s; status {srv.status}")
            assert served < 10.0, served  # (immediately, in practice: it evicts the oldest idle connection)
        finally:
            for s in idle:
                s.close()


def test_tcp_a_connection_that_never_handshakes_is_closed_by_the_deadline():
    with server_child(f"tcp://{HOST}:0", strict=True, handshake_timeout=1.0) as srv:
        with socket.create_connection((HOST, srv.port), timeout=WAIT) as c:
            start = time.monotonic()
            data = record(think(1))
            for i in range(10):  # a byte every 0.2 s, never a whole record: no handshake
                try:
                    c.sendall(data[i:i + 1])
                except OSError:  # closed already
                    break
                time.sleep(0.2)
                if srv.status.get("timed_out"):
                    break
            assert closed_by_peer(c, 10.0)
            assert time.monotonic() - start < 8.0
        assert srv.wait(lambda s: s.get("timed_out"), "timed_out")["timed_out"] == 1


def test_tcp_slowloris_record_after_the_handshake_is_closed_by_the_record_deadline():
    with server_child(f"tcp://{HOST}:0", record_timeout=1.0) as srv:
        async def scenario():
            async with resonant.connect(f"tcp://{HOST}:{srv.port}", timeout=10.0) as peer:
                t = peer._link.transport
                data = record(think(LEGIT))
                closed_after = None
                start = time.monotonic()
                for i in range(len(data) - 1):  # one byte every 0.1 s: the record never completes in time
                    if peer._link.closed.is_set():
                        closed_after = time.monotonic() - start
                        break
                    t.write(data[i:i + 1])
                    await asyncio.sleep(0.1)
                return closed_after
        closed_after = run(scenario())
        print(f"\nslowloris after the handshake: closed after {closed_after} s")
        assert closed_after is not None and closed_after < 5.0, closed_after
        assert srv.wait(lambda s: s.get("timed_out"), "timed_out")["timed_out"] == 1


# ------------------------------------------------------------------ low items


def test_tcp_a_burst_of_malformed_records_closes_that_connection_and_others_are_served():
    """1.2 MB of 33-byte records with a bad CRC: the connection is closed after max_malformed
    (before: all of them were parsed and reported, the event loop stalled for seconds)."""
    bad = bytearray(keepalive(3))
    bad[-1] ^= 0xFF
    burst = record(bytes(bad)) * (1_200_000 // (len(bad) + 4))
    with server_child(f"tcp://{HOST}:0") as srv:
        with socket.create_connection((HOST, srv.port), timeout=WAIT) as c:
            with contextlib.suppress(OSError):
                c.sendall(burst)
            run(legit_messages(f"tcp://{HOST}:{srv.port}", 3), timeout=30)
            srv.wait(lambda s: s.get("counts", {}).get(str(LEGIT), 0) >= 3, "the legitimate client's messages")
            assert closed_by_peer(c, 10.0)
        st = srv.wait(lambda s: s.get("rejected", 0) > 0, "the rejections")
        assert st["rejected"] < 2000, st  # max_malformed (1,024) and what one read held
        print(f"\nmalformed burst: longest event-loop stall {st['stall_ms']:.0f} ms, {st['rejected']} rejected")


def test_udp_handshake_answers_to_unvalidated_sources_stay_within_3x():
    """Minimal pings from 300 ports, each sent once (as a spoofed source would): the answers
    (capability, 283 bytes for a 50-byte ping before) are at most 3 times the bytes received."""
    ping = resonant.encode(resonant.Sync(json.dumps({"method": "ping", "v": 2}).encode()))
    with server_child(f"udp://{HOST}:0") as srv:
        answered = _udp_flood(srv.port, 300, [ping])
        received = 300 * len(ping)
        print(f"\namplification: {answered} bytes answered for {received} received ({answered / received:.2f}x)")
        assert answered <= 3 * received
        # A real client still handshakes (its ping is as large as the answer) and is served.
        run(legit_messages(f"udp://{HOST}:{srv.port}", 3, pace=0.01))
        srv.wait(lambda s: s.get("counts", {}).get(str(LEGIT), 0) >= 3, "the legitimate client's messages")


def test_udp_a_minimal_ping_is_answered_once_its_retries_made_up_the_bytes():
    """A client whose ping is small (e.g. the reference's) is answered after a few retries."""
    ping = resonant.encode(resonant.Sync(json.dumps({"method": "ping", "v": 2}).encode()))
    with server_child(f"udp://{HOST}:0") as srv, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        for attempt in range(10):
            s.sendto(ping, (HOST, srv.port))
            try:
                answer = s.recv(65536)
                break
            except socket.timeout:
                continue
        else:
            pytest.fail("no capability after 10 pings")
        assert b'"capability"' in answer
        assert attempt >= 1  # (the first ping alone did not earn the answer)


def test_udp_garbage_flood_makes_no_session_and_a_client_is_served():
    """Datagrams that cannot be a frame are dropped before any session is made; a client sending
    during the flood is served."""
    stop = threading.Event()
    with server_child(f"udp://{HOST}:0") as srv:
        garbage = [b"\x00" * 40, b"\x07" + os.urandom(100), b"\x01\x09" + os.urandom(60)]

        def flood():
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(64)]
            for s in socks:
                s.setblocking(False)
            try:
                while not stop.is_set():
                    for s in socks:
                        for g in garbage:
                            with contextlib.suppress(BlockingIOError):
                                s.sendto(g, (HOST, srv.port))
                    time.sleep(0.001)
            finally:
                for s in socks:
                    s.close()

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        try:
            time.sleep(0.5)
            n = 300
            run(legit_messages(f"udp://{HOST}:{srv.port}", n, pace=0.005), timeout=60)
            time.sleep(0.5)
            got = srv.count(LEGIT)
            st = srv.status
            print(f"\ngarbage flood: {got}/{n} legitimate messages delivered; status {st}")
            assert got >= n // 5  # (a guard: the figure varies with the load; 73-99% measured, 26% before)
            if st.get("garbage_datagrams") is not None:
                assert st["garbage_datagrams"] > 1000 and st["links"] <= 2, st
        finally:
            stop.set()
            t.join(10)


def test_tcp_unproven_connections_never_evict_established_peers_and_max_peers_holds():
    """In process: max_peers=2, max_pending=2. Idle connections evict each other, not the two
    established clients; a third client that completes the handshake is refused (max_peers)."""
    async def scenario():
        async with resonant.serve(f"tcp://{HOST}:0", max_peers=2, max_pending=2) as server:
            url = f"tcp://{HOST}:{server.address[1]}"
            a = await resonant.connect(url)
            b = await resonant.connect(url)
            idle = []
            for _ in range(6):
                idle.append(await asyncio.open_connection(HOST, server.address[1]))
            await asyncio.sleep(0.2)
            assert server.evicted_pending == 4 and len(server.pending) == 2
            for p in (a, b):
                await p.send(resonant.Think(np.zeros(4, np.float16), stream_id=LEGIT))
            senders = set()
            while len(senders) < 2:
                addr, e = await server.next_event(5.0)
                if isinstance(e, resonant.MessageReceived) and e.frame.stream_id == LEGIT:
                    senders.add(addr)
            with pytest.raises(resonant.HandshakeRefused):
                await resonant.connect(url, timeout=3.0)
            assert server.rejected_peers == 1
            for p in (a, b):
                await p.close()
            for _, w in idle:
                w.close()
    run(scenario())


def test_udp_a_flooding_source_does_not_make_the_server_drop_another_peers_datagrams():
    """In process, the application not reading yet: 6,000 keepalives from one source fill only
    that source's share of the queue; a client that connects then is still served (before: every
    datagram was dropped once 4,096 events were queued, the client's ping too)."""
    async def scenario():
        async with resonant.serve(f"udp://{HOST}:0") as server:
            port = server.address[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for i in range(6000):
                    s.sendto(keepalive(1, i), (HOST, port))
                    if i % 500 == 499:
                        await asyncio.sleep(0.01)  # the server reads (the socket buffer is not the limit here)
            await asyncio.sleep(0.2)
            assert server.events.qsize() >= _QUEUE_LIMIT_FOR_TEST
            async with resonant.connect(f"udp://{HOST}:{port}", timeout=5.0) as peer:
                for i in range(10):
                    await peer.send(resonant.Think(np.zeros(4, np.float16), stream_id=LEGIT))
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.2)
            legit = 0
            while not server.events.empty():
                _, e = await server.next_event(1.0)
                if isinstance(e, resonant.MessageReceived) and e.frame.stream_id == LEGIT:
                    legit += 1
            assert legit == 10
    run(scenario())


_QUEUE_LIMIT_FOR_TEST = 4000  # (the shared queue's limit is 4,096 events)


# ------------------------------------------------------------------ review 2: F3, F4, F2


def test_tcp_a_peer_the_server_paused_is_not_aborted_by_its_own_deadlines():
    """F3. In process, the application away for 3 s: a peer that pipelined 20,000 messages is
    paused for its backlog, usually mid-record; that pause is the server's own doing, so neither
    record_timeout (1 s) nor idle_timeout (1.5 s) may close it, and every message arrives
    (before: timed_out 1 and 4,101 of 20,000 delivered)."""
    n = 20_000

    async def scenario():
        async with resonant.serve(f"tcp://{HOST}:0", record_timeout=1.0, idle_timeout=1.5) as server:
            host, port = server.address
            r, w = await asyncio.open_connection(host, port)
            w.write(b"".join(record(think(7, i)) for i in range(n)))
            await w.drain()
            await asyncio.sleep(0.5)  # the application is busy (3 s in all)
            paused = bool(server._paused)
            await asyncio.sleep(2.5)
            got = 0
            with contextlib.suppress(asyncio.TimeoutError):
                while got < n:
                    _, e = await server.next_event(timeout=2.0)
                    got += type(e) is resonant.MessageReceived
            w.close()
            return paused, got, server.timed_out
    paused, got, timed_out = run(scenario())
    assert paused, "the scenario needs the peer paused"
    assert (got, timed_out) == (n, 0)


def test_udp_reports_on_sessionless_sources_do_not_shrink_the_peers_shares():
    """F3 (shares). Garbage datagrams from 300 source ports are reported (FrameRejected) under
    one shared count, not one per source, so they cannot shrink every peer's share of the queue
    to its minimum (before: 100 entries, one per reported source)."""
    async def scenario():
        async with resonant.serve(f"udp://{HOST}:0") as server:
            port = server.address[1]
            socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(300)]
            try:
                for s in socks:
                    s.sendto(b"\x00" * 40, (HOST, port))
                await asyncio.sleep(0.3)
            finally:
                for s in socks:
                    s.close()
            assert server.events.qsize() > 10  # some were reported
            keys = len(server._queued)
            while not server.events.empty():
                await server.next_event(1.0)
            return keys, dict(server._queued)
    keys, left = run(scenario())
    assert keys == 1 and left == {}


def _completed_streams_held(n_streams: int, *, after_close: bool = False):
    """A client sends n_streams streams of 1 MiB to a server with max_memory (and max_peer_memory,
    one peer only here) 2 MiB whose
    application has not taken any event; returns (budget.used while queued, bytes of queued
    StreamComplete events, completed, failed with 'limit', budget.used at the end)."""
    from resonant.aio import DeliveryFailed
    from resonant.stream import StreamComplete, StreamFailed

    async def scenario():
        async with resonant.serve(f"tcp://{HOST}:0", max_memory=2 << 20, max_peer_memory=2 << 20) as server:
            host, port = server.address
            async with resonant.connect(f"tcp://{host}:{port}") as peer:
                x = np.ones(1 << 20, np.int8)
                refused = 0
                for _ in range(n_streams):
                    try:
                        await peer.send_stream([x])  # returns on the server's verdict
                    except DeliveryFailed as exc:  # the sender learns each refusal (feedback)
                        assert exc.remote and exc.reason == "limit", exc
                        refused += 1
                await asyncio.sleep(0.5)  # the application has not taken any event yet
            await asyncio.sleep(0.2)
            queued = [e for _, e in list(server.events._items)]
            held = sum(e.nbytes for e in queued if isinstance(e, StreamComplete))
            used = server.budget.used
            done = sum(isinstance(e, StreamComplete) for e in queued)
            limit = sum(isinstance(e, StreamFailed) and e.reason == "limit" for e in queued)
            assert refused == limit
            if not after_close:
                while not server.events.empty():
                    await server.next_event(1.0)
        if after_close:  # the events are still handed out after close (until the end marker)
            with contextlib.suppress(EOFError):
                while True:
                    await server.next_event(1.0)
        return used, held, done, limit, server
    used, held, done, limit, server = run(scenario())
    return used, held, done, limit, server.budget.used


def test_tcp_completed_streams_stay_charged_to_max_memory_until_the_application_takes_them():
    """F4. Completed streams waiting in the server's queue hold their buffers: they stay charged
    to max_memory (2 MiB) until the application takes them, so later HEADs fail with 'limit'
    (before: budget.used 0 while 40 MiB of StreamComplete were queued)."""
    used, held, done, limit, used_after = _completed_streams_held(40)
    assert held <= 2 << 20 and used >= held > 0
    assert done >= 1 and limit >= 38 and done + limit == 40
    assert used_after == 0


def test_tcp_a_server_closed_with_completed_streams_queued_releases_them_when_drained():
    """F4. The server closes with completions still queued: draining the queue (the events are
    still handed out) brings the budget back to 0."""
    used, held, done, limit, used_after = _completed_streams_held(3, after_close=True)
    assert done >= 1 and used_after == 0


def test_tcp_one_unauthenticated_head_cannot_reserve_the_whole_shared_budget():
    """F2. On a lenient server (max_memory 64 MiB) a peer's single HEAD announcing nearly 64 MiB
    is refused by the per-peer cap (max_peer_memory, default max_memory // 4), and a legitimate
    client's 1 MiB stream completes (before: StreamFailed 'limit', the budget all reserved)."""
    from resonant.stream import StreamComplete, StreamFailed, StreamSender
    m = 64 << 20

    async def scenario():
        async with resonant.serve(f"tcp://{HOST}:0", max_memory=m) as server:
            host, port = server.address
            hog = StreamSender(1, [np.zeros(m - 8192, np.int8)])  # only its HEAD is ever sent
            r, w = await asyncio.open_connection(host, port)
            w.write(record(hog.head()))
            await w.drain()
            await asyncio.sleep(0.3)
            hog_used = server.budget.used
            hog_addr = w.get_extra_info("sockname")[:2]
            outcome = None
            async with resonant.connect(f"tcp://{host}:{port}") as peer:
                await peer.send_stream([np.ones(1 << 20, np.int8)])
                with contextlib.suppress(asyncio.TimeoutError):
                    while outcome is None:
                        addr, e = await server.next_event(timeout=5.0)
                        if addr != hog_addr and isinstance(e, (StreamFailed, StreamComplete)):
                            outcome = e
            w.close()
            return hog_used, outcome
    hog_used, outcome = run(scenario())
    assert hog_used <= m // 4
    assert isinstance(outcome, StreamComplete), outcome


def test_tcp_a_peer_whose_queued_completions_fill_its_share_is_paused_and_others_still_stream():
    """F4. max_memory 8 MiB, max_peer_memory 2 MiB, the application away: one client sends ten
    1 MiB streams; once its queued StreamComplete events hold more than 2 MiB it is paused, so
    a second client's 1 MiB stream still completes (without the pause: the first client's queued
    completions take the whole budget and the second's stream fails with 'limit')."""
    from resonant.stream import StreamComplete, StreamFailed

    async def scenario():
        async with resonant.serve(f"tcp://{HOST}:0", max_memory=8 << 20, max_peer_memory=2 << 20) as server:
            host, port = server.address
            url = f"tcp://{host}:{port}"
            async with resonant.connect(url) as greedy, resonant.connect(url) as other:
                async def flood():
                    for _ in range(10):
                        await greedy.send_stream([np.ones(1 << 20, np.int8)])
                task = asyncio.ensure_future(flood())
                await asyncio.sleep(1.0)  # the application has not taken any event yet
                held = max(server._held.values(), default=0)
                await other.send_stream([np.full(1 << 20, 2, np.int8)], stream_id=LEGIT)
                await asyncio.sleep(0.5)
                outcome = next((e for _, e in list(server.events._items)
                                if isinstance(e, (StreamComplete, StreamFailed)) and e.stream_id == LEGIT), None)
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            return held, outcome
    held, outcome = run(scenario())
    assert held <= 3 << 20
    assert isinstance(outcome, StreamComplete), outcome
