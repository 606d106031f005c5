"""One-way latency of a 4 KiB Think over loopback UDP and TCP, between two processes, against
a raw socket ping-pong of the same bytes measured in the same run.

Not part of the test suite. Run from the repository root:

    python3 bench/bench_transport.py [--count 2000] [--rounds 4] [--json PATH|-] [--check]

The message is a Think carrying a float16 (1, 2048) hidden state: a 4,096-byte payload in a
4,143-byte frame (4,147 bytes as a TCP record). Each row is a ping-pong between this process
and a server process forked for it, over 127.0.0.1; one-way latency = round trip / 2.

- raw socket: the client sends the 4,143 frame bytes (TCP: the 4,147 record bytes); the server
  echoes them; nobody encodes or decodes anything.
- checksum floor (information): no objects at all. Each side reads into a buffer it keeps and
  takes the CRC-32 of what it read (the least a decoder must do), and the side that answers copies
  those bytes into a send buffer it keeps and takes their CRC again (the least an encoder must do:
  the payload is copied into the frame and checksummed), with the CRC-32 the codec uses. What any
  checksummed frame costs here before a single Python object is made for it.
- resonant codec only (information): no Session. The client sends `resonant.encode(Think(hidden,
  frame_seq=i))` (TCP: as one record); the server `resonant.decode()`s it, takes the numpy view of
  the payload and sends back an encoded Think of it; the client decodes the reply and takes its
  numpy view. The floor under the Session rows: what encoding and decoding alone cost here.
- resonant Session: both processes drive a sans-IO `resonant.Session` (handshake first) over
  plain blocking sockets. The client builds `Think(hidden)`, `session.send()`s it and writes
  `datagrams_to_send()` / `data_to_send()`; the server feeds what it reads to
  `receive_datagram()` / `receive_data()` (decode, CRC check), takes the numpy view of the
  payload, and sends a Think with that payload back the same way; the client decodes the
  reply and takes its numpy view. Reads are the same calls as the raw rows' (recv of bytes).
- raw asyncio protocols (information): plain asyncio DatagramProtocol/Protocol echo of the same
  bytes in both processes, one future awaited per round trip: what asyncio itself costs (with its
  defaults: UDP reads a 256 KiB buffer per datagram, which resonant's transports cut to 64 KiB).
- resonant asyncio (information): `resonant.connect()` in this process, `resonant.serve()`
  with `server.reply(addr, frame)` in the server process.
- resonant asyncio with a handler (information): the same client; the server is
  `resonant.serve(handler=...)`, which answers each Think from the read callback (no task
  switch per message, as the raw asyncio echo server has none).

The rows are interleaved: every round runs each row for count/rounds round trips (the order
reversed every other round), so a noisy spell of this machine hits all of them; every row is
warmed up first, and each round starts with a few discarded round trips. Replies are checked
(outside the timed region) to carry the bytes that were sent. The GC is disabled in every
process while timing, as in the other benches (with it on, a Session ping-pong triggers about
3 generation-0 collections per 2,000 round trips: no difference).

The in-process table times each hop's steps in a hot loop without sockets, and the ping-pong's
excess over raw is set beside it: in the ping-pong the same steps run several times slower (every
process resumes its Python work straight out of a blocking recv(), its vCPU idle in between, and
works on freshly received buffers), so the hot figures understate the latency cost.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import os
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

import resonant
from resonant import Think
from resonant.session import (
    ConnectionBroken,
    FrameRejected,
    HandshakeFailed,
    MessageReceived,
    RemoteError,
    Session,
    SessionConfig,
    frame_record,
)

# Run as a script, the bench directory is sys.path[0]; the helpers live next to this file.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_codec import Target, finish, machine, print_machine, print_targets, time_stmt  # noqa: E402

SEED = 20241103
SHAPE = (1, 2048)
STREAM_ID = 7
STOP_STREAM = 0xFFFFFFFF      # a Think on this stream tells a resonant server to exit
TARGET_P50 = 1.3              # ours p50 <= 1.3 x raw p50, per transport
REFERENCE_CLAIM_US = 430.0    # the reference's pitch: encode + UDP + decode of this message, 0.43 ms
RECV_TIMEOUT_S = 10           # SO_RCVTIMEO on client sockets: a dead server fails the run instead of hanging
ROUND_WARMUP = 20             # discarded round trips at the start of every round
HOST = "127.0.0.1"
MAX_DGRAM = 65536

RAW, OURS, CODEC, AIO, AIO_RAW = "raw socket", "resonant Session", "resonant codec", "resonant asyncio", "raw asyncio"
FLOOR = "checksum floor"
AIO_HANDLER = "resonant asyncio handler"
pc = time.perf_counter_ns


def hidden_state() -> np.ndarray:
    return np.random.default_rng(SEED).standard_normal(SHAPE).astype(np.float16)


def _fail(why: str) -> None:
    raise RuntimeError(why)


def _check_events(events: list) -> None:
    for e in events:
        if isinstance(e, (FrameRejected, ConnectionBroken, RemoteError, HandshakeFailed)):
            _fail(f"unexpected event {e!r}")


# --------------------------------------------------------------------------- server processes


def _udp_raw_server(sock: socket.socket) -> None:
    """Echo every datagram; an empty one ends the loop."""
    gc.disable()
    recvfrom, sendto = sock.recvfrom, sock.sendto
    while True:
        data, addr = recvfrom(MAX_DGRAM)
        if not data:
            return
        sendto(data, addr)


def _udp_session_server(sock: socket.socket) -> None:
    """Answer the handshake; echo every Think's payload in a new Think, through the Session."""
    gc.disable()
    session = Session(SessionConfig(role="server"))
    recvfrom, sendto = sock.recvfrom, sock.sendto
    while True:
        data, addr = recvfrom(MAX_DGRAM)
        now = pc() * 1e-9
        for e in session.receive_datagram(data, now):
            if type(e) is MessageReceived and type(e.frame) is Think:
                frame = e.frame
                if frame.stream_id == STOP_STREAM:
                    return
                session.send(Think(frame.hidden.numpy(), stream_id=frame.stream_id), now)
            elif isinstance(e, (FrameRejected, RemoteError)):
                _fail(f"server: {e!r}")
        for d in session.datagrams_to_send():
            sendto(d, addr)


def _accept(listener: socket.socket) -> socket.socket:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    listener.close()
    return conn


def _recv_exact(conn: socket.socket, view: memoryview) -> bool:
    """Fill `view`; False on EOF before the first byte."""
    got, n = 0, len(view)
    while got < n:
        k = conn.recv_into(view[got:], n - got)
        if k == 0:
            if got:
                _fail(f"EOF {got} bytes into a {n}-byte record")
            return False
        got += k
    return True


def _tcp_raw_server(listener: socket.socket, nbytes: int) -> None:
    """Echo records of `nbytes` bytes until EOF."""
    gc.disable()
    conn = _accept(listener)
    buf = bytearray(nbytes)
    view = memoryview(buf)
    while _recv_exact(conn, view):
        conn.sendall(view)


def _tcp_session_server(listener: socket.socket) -> None:
    gc.disable()
    conn = _accept(listener)
    session = Session(SessionConfig(role="server"))
    recv, sendall = conn.recv, conn.sendall
    while True:
        data = recv(MAX_DGRAM)
        if not data:
            return
        now = pc() * 1e-9
        for e in session.receive_data(data, now):
            if type(e) is MessageReceived and type(e.frame) is Think:
                frame = e.frame
                if frame.stream_id == STOP_STREAM:
                    return
                session.send(Think(frame.hidden.numpy(), stream_id=frame.stream_id), now)
            elif isinstance(e, (FrameRejected, RemoteError, ConnectionBroken)):
                _fail(f"server: {e!r}")
        out = session.data_to_send()
        if out:
            sendall(out)


def _udp_crc_server(sock: socket.socket) -> None:
    """The checksum floor: CRC what was read, copy it into the send buffer, CRC that, send it back."""
    gc.disable()
    crc, recvfrom_into, sendto = resonant.crc32, sock.recvfrom_into, sock.sendto
    inbuf, outbuf = memoryview(bytearray(MAX_DGRAM)), memoryview(bytearray(MAX_DGRAM))
    while True:
        n, addr = recvfrom_into(inbuf)
        if n == 0:
            return
        crc(inbuf[:n])
        out = outbuf[:n]
        out[:] = inbuf[:n]
        crc(out)
        sendto(out, addr)


def _tcp_crc_server(listener: socket.socket, nbytes: int) -> None:
    """The checksum floor over TCP: records of `nbytes` bytes, as _udp_crc_server, until EOF."""
    gc.disable()
    conn = _accept(listener)
    crc, sendall = resonant.crc32, conn.sendall
    inbuf, outbuf = memoryview(bytearray(nbytes)), memoryview(bytearray(nbytes))
    while _recv_exact(conn, inbuf):
        crc(inbuf)
        outbuf[:] = inbuf
        crc(outbuf)
        sendall(outbuf)


def _udp_codec_server(sock: socket.socket) -> None:
    """No Session: decode every datagram, encode a Think of its payload (numbered), send it back."""
    gc.disable()
    recvfrom, sendto, decode, encode = sock.recvfrom, sock.sendto, resonant.decode, resonant.encode
    seq = 0
    while True:
        data, addr = recvfrom(MAX_DGRAM)
        frame = decode(data)
        if frame.stream_id == STOP_STREAM:
            return
        seq += 1
        sendto(encode(Think(frame.hidden.numpy(), stream_id=frame.stream_id, frame_seq=seq)), addr)


def _tcp_codec_server(listener: socket.socket) -> None:
    """No Session: each read is one record (checked); decode it, send back a record of a Think of its payload."""
    gc.disable()
    conn = _accept(listener)
    recv, sendall, decode, encode = conn.recv, conn.sendall, resonant.decode, resonant.encode
    seq = 0
    while True:
        data = recv(MAX_DGRAM)
        if not data:
            return
        if int.from_bytes(data[:4], "little") != len(data) - 4:
            _fail("TCP codec server: a read that is not exactly one record")
        frame = decode(memoryview(data)[4:])
        if frame.stream_id == STOP_STREAM:
            return
        seq += 1
        sendall(frame_record(encode(Think(frame.hidden.numpy(), stream_id=frame.stream_id, frame_seq=seq))))


def _aio_server(scheme: str, pipe) -> None:
    """resonant.serve(); every Think is answered with server.reply(addr, Think(same payload))."""
    gc.disable()

    async def run() -> None:
        async with resonant.serve(f"{scheme}://{HOST}:0") as server:
            pipe.send(tuple(server.address))
            async for addr, e in server:
                if isinstance(e, MessageReceived) and type(e.frame) is Think:
                    frame = e.frame
                    if frame.stream_id == STOP_STREAM:
                        return
                    await server.reply(addr, Think(frame.hidden.numpy(), stream_id=frame.stream_id))
                elif isinstance(e, (FrameRejected, RemoteError, ConnectionBroken)):
                    _fail(f"server: {e!r}")

    asyncio.run(run())


def _aio_handler_server(scheme: str, pipe) -> None:
    """resonant.serve(handler=...): every Think is answered from the read callback (no task switch)."""
    gc.disable()

    async def run() -> None:
        done = asyncio.get_running_loop().create_future()

        def answer(addr, e):
            if type(e) is MessageReceived and type(e.frame) is Think:
                frame = e.frame
                if frame.stream_id != STOP_STREAM:
                    return Think(frame.hidden.numpy(), stream_id=frame.stream_id)
                if not done.done():
                    done.set_result(None)
            elif isinstance(e, (FrameRejected, RemoteError, ConnectionBroken)) and not done.done():
                done.set_exception(RuntimeError(f"server: {e!r}"))
            return None

        async with resonant.serve(f"{scheme}://{HOST}:0", handler=answer) as server:
            pipe.send(tuple(server.address))
            await done

    asyncio.run(run())


def _aio_raw_server(scheme: str, pipe, nbytes: int) -> None:
    """Plain asyncio protocols echoing the same bytes (UDP: every datagram; TCP: every nbytes-byte
    record): what asyncio itself costs, for the asyncio rows. A one-byte datagram or EOF ends it
    (asyncio does not send empty datagrams)."""
    gc.disable()

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport) -> None:
            self.transport = transport

        def datagram_received(self, data: bytes, addr) -> None:
            if len(data) == 1:
                done.set_result(None)
                return
            self.transport.sendto(data, addr)

    class Tcp(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport = transport
            self.buf = bytearray()
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while len(self.buf) >= nbytes:
                self.transport.write(bytes(self.buf[:nbytes]))
                del self.buf[:nbytes]

        def connection_lost(self, exc) -> None:
            if not done.done():
                done.set_result(None)

    async def run() -> None:
        nonlocal done
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        if scheme == "udp":
            transport, _ = await loop.create_datagram_endpoint(Udp, local_addr=(HOST, 0))
            pipe.send(transport.get_extra_info("sockname")[:2])
            await done
            transport.close()
        else:
            server = await loop.create_server(Tcp, HOST, 0)
            pipe.send(server.sockets[0].getsockname()[:2])
            await done
            server.close()

    done: Any = None
    asyncio.run(run())


# --------------------------------------------------------------------------- clients


def _timeout(sock: socket.socket) -> None:
    """A kernel receive timeout: the socket stays blocking (no poll() before each recv)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", RECV_TIMEOUT_S, 0))


class Client:
    transport: str
    kind: str
    name: str

    def __init__(self, hidden: np.ndarray) -> None:
        self.hidden = hidden
        self.wire = resonant.encode(Think(hidden, stream_id=STREAM_ID, frame_seq=1))
        self.samples: list[int] = []
        self.proc: multiprocessing.Process | None = None

    def start_server(self, ctx) -> None:
        """Create the listening socket and fork the server process (before any client socket exists)."""
        raise NotImplementedError

    def setup(self) -> None:
        """Connect (and shake hands)."""

    def run(self, n: int) -> list[int]:
        """n round trips; their durations in ns."""
        raise NotImplementedError

    def stop(self) -> None:
        """Tell the server process to exit and close the socket."""

    def _check(self, arr: np.ndarray) -> None:
        if arr.shape != SHAPE or arr.dtype != np.float16 or not np.array_equal(arr, self.hidden):
            _fail(f"{self.transport} {self.name}: the reply does not carry the hidden state sent")


class _UdpClient(Client):
    """A bound UDP socket handed to the forked server (`serve`); the client connects to it."""

    serve: Any

    def start_server(self, ctx) -> None:
        self.server_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server_sock.bind((HOST, 0))
        self.proc = ctx.Process(target=type(self).serve, args=(self.server_sock,), daemon=True)
        self.proc.start()

    def setup(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        _timeout(self.sock)
        self.sock.connect(self.server_sock.getsockname())
        self.server_sock.close()


class _TcpClient(Client):
    """A listening socket handed to the forked server (`serve`, with `server_args()`); the
    client connects with TCP_NODELAY."""

    serve: Any

    def server_args(self) -> tuple:
        return ()

    def start_server(self, ctx) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.proc = ctx.Process(target=type(self).serve, args=(self.listener, *self.server_args()), daemon=True)
        self.proc.start()

    def setup(self) -> None:
        self.sock = socket.create_connection(self.listener.getsockname())
        self.listener.close()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _timeout(self.sock)


class UdpRaw(_UdpClient):
    transport, kind, name = "UDP", RAW, "raw socket ping-pong (4,143 B datagram)"
    serve = staticmethod(_udp_raw_server)

    def run(self, n: int) -> list[int]:
        send, recv, wire = self.sock.send, self.sock.recv, self.wire
        out = []
        for _ in range(n):
            t0 = pc()
            send(wire)
            data = recv(MAX_DGRAM)
            t1 = pc()
            out.append(t1 - t0)
            if data != wire:
                _fail("UDP raw: the echo differs from what was sent")
        return out

    def stop(self) -> None:
        self.sock.send(b"")
        self.sock.close()


class UdpCrc(UdpRaw):
    """The checksum floor: the raw ping-pong plus the CRCs and the copy any checksummed frame costs."""

    transport, kind, name = "UDP", FLOOR, "checksum floor: CRC + copy, no objects (info)"
    serve = staticmethod(_udp_crc_server)

    def run(self, n: int) -> list[int]:
        send, recv_into, crc, wire = self.sock.send, self.sock.recv_into, resonant.crc32, self.wire
        size, want = len(wire), resonant.crc32(wire)
        out_view, in_buf = memoryview(bytearray(size)), bytearray(MAX_DGRAM)
        in_view = memoryview(in_buf)
        out = []
        for _ in range(n):
            t0 = pc()
            out_view[:] = wire
            crc(out_view)
            send(out_view)
            k = recv_into(in_buf)
            got = crc(in_view[:k])
            t1 = pc()
            out.append(t1 - t0)
            if k != size or got != want:
                _fail("UDP checksum floor: the echo differs from what was sent")
        return out


class UdpSession(_UdpClient):
    transport, kind, name = "UDP", OURS, "resonant Session (sans-IO, blocking sockets)"
    serve = staticmethod(_udp_session_server)

    def setup(self) -> None:
        super().setup()
        self.session = Session(SessionConfig(role="client"))
        self.session.initiate(time.monotonic())
        for d in self.session.datagrams_to_send():
            self.sock.send(d)
        while self.session.agreement is None:
            events = self.session.receive_datagram(self.sock.recv(MAX_DGRAM), time.monotonic())
            _check_events(events)
        assert self.session.agreement.compress == "none" and self.session.agreement.crypto == "none"

    def run(self, n: int) -> list[int]:
        send, recv, session, hidden = self.sock.send, self.sock.recv, self.session, self.hidden
        out = []
        for _ in range(n):
            t0 = pc()
            now = t0 * 1e-9
            session.send(Think(hidden, stream_id=STREAM_ID), now)
            for d in session.datagrams_to_send():
                send(d)
            reply = None
            while reply is None:
                for e in session.receive_datagram(recv(MAX_DGRAM), now):
                    if type(e) is MessageReceived and type(e.frame) is Think:
                        reply = e.frame
            arr = reply.hidden.numpy()
            t1 = pc()
            out.append(t1 - t0)
            self._check(arr)
        return out

    def stop(self) -> None:
        self.session.send(Think(self.hidden, stream_id=STOP_STREAM))
        for d in self.session.datagrams_to_send():
            self.sock.send(d)
        self.sock.close()


class UdpCodec(_UdpClient):
    """The floor under the Session row: the same messages through resonant.encode/decode alone."""

    transport, kind, name = "UDP", CODEC, "resonant codec only, no Session (info)"
    serve = staticmethod(_udp_codec_server)

    def run(self, n: int) -> list[int]:
        send, recv, hidden, encode, decode = self.sock.send, self.sock.recv, self.hidden, resonant.encode, resonant.decode
        out = []
        for i in range(n):
            t0 = pc()
            send(encode(Think(hidden, stream_id=STREAM_ID, frame_seq=i)))
            arr = decode(recv(MAX_DGRAM)).hidden.numpy()
            t1 = pc()
            out.append(t1 - t0)
            self._check(arr)
        return out

    def stop(self) -> None:
        self.sock.send(resonant.encode(Think(self.hidden, stream_id=STOP_STREAM)))
        self.sock.close()


class TcpRaw(_TcpClient):
    transport, kind, name = "TCP", RAW, "raw socket ping-pong (4,147 B record)"
    serve = staticmethod(_tcp_raw_server)

    def server_args(self) -> tuple:
        self.record = frame_record(self.wire)
        return (len(self.record),)

    def run(self, n: int) -> list[int]:
        sock, record = self.sock, self.record
        sendall = sock.sendall
        buf = bytearray(len(record))
        view = memoryview(buf)
        out = []
        for _ in range(n):
            t0 = pc()
            sendall(record)
            if not _recv_exact(sock, view):
                _fail("TCP raw: the server closed the connection")
            t1 = pc()
            out.append(t1 - t0)
            if buf != record:
                _fail("TCP raw: the echo differs from what was sent")
        return out

    def stop(self) -> None:
        self.sock.close()


class TcpCrc(TcpRaw):
    """The checksum floor over TCP: the raw ping-pong plus the CRCs and the copy (see UdpCrc)."""

    transport, kind, name = "TCP", FLOOR, "checksum floor: CRC + copy, no objects (info)"
    serve = staticmethod(_tcp_crc_server)

    def run(self, n: int) -> list[int]:
        sock, record, crc = self.sock, self.record, resonant.crc32
        sendall, want = sock.sendall, crc(record)
        out_view, in_view = memoryview(bytearray(len(record))), memoryview(bytearray(len(record)))
        out = []
        for _ in range(n):
            t0 = pc()
            out_view[:] = record
            crc(out_view)
            sendall(out_view)
            if not _recv_exact(sock, in_view):
                _fail("TCP checksum floor: the server closed the connection")
            got = crc(in_view)
            t1 = pc()
            out.append(t1 - t0)
            if got != want:
                _fail("TCP checksum floor: the echo differs from what was sent")
        return out


class TcpSession(_TcpClient):
    transport, kind, name = "TCP", OURS, "resonant Session (sans-IO, blocking sockets)"
    serve = staticmethod(_tcp_session_server)

    def setup(self) -> None:
        super().setup()
        self.session = Session(SessionConfig(role="client"))
        self.session.initiate(time.monotonic())
        self.sock.sendall(self.session.data_to_send())
        while self.session.agreement is None:
            data = self.sock.recv(MAX_DGRAM)
            if not data:
                _fail("TCP: the server closed the connection during the handshake")
            _check_events(self.session.receive_data(data, time.monotonic()))
        assert self.session.agreement.compress == "none" and self.session.agreement.crypto == "none"

    def run(self, n: int) -> list[int]:
        sendall, recv, session, hidden = self.sock.sendall, self.sock.recv, self.session, self.hidden
        out = []
        for _ in range(n):
            t0 = pc()
            now = t0 * 1e-9
            session.send(Think(hidden, stream_id=STREAM_ID), now)
            sendall(session.data_to_send())
            reply = None
            while reply is None:
                data = recv(MAX_DGRAM)
                if not data:
                    _fail("TCP: the server closed the connection")
                for e in session.receive_data(data, now):
                    if type(e) is MessageReceived and type(e.frame) is Think:
                        reply = e.frame
            arr = reply.hidden.numpy()
            t1 = pc()
            out.append(t1 - t0)
            self._check(arr)
        return out

    def stop(self) -> None:
        self.session.send(Think(self.hidden, stream_id=STOP_STREAM))
        self.sock.sendall(self.session.data_to_send())
        self.sock.close()


class TcpCodec(_TcpClient):
    """The floor under the Session row: the same records through resonant.encode/decode alone
    (every read must be exactly one record, as it is on loopback)."""

    transport, kind, name = "TCP", CODEC, "resonant codec only, no Session (info)"
    serve = staticmethod(_tcp_codec_server)

    def run(self, n: int) -> list[int]:
        sendall, recv, hidden, encode, decode = self.sock.sendall, self.sock.recv, self.hidden, resonant.encode, resonant.decode
        out = []
        for i in range(n):
            t0 = pc()
            sendall(frame_record(encode(Think(hidden, stream_id=STREAM_ID, frame_seq=i))))
            data = recv(MAX_DGRAM)
            arr = decode(memoryview(data)[4:]).hidden.numpy()
            t1 = pc()
            out.append(t1 - t0)
            if int.from_bytes(data[:4], "little") != len(data) - 4:
                _fail("TCP codec client: a read that is not exactly one record")
            self._check(arr)
        return out

    def stop(self) -> None:
        self.sock.sendall(frame_record(resonant.encode(Think(self.hidden, stream_id=STOP_STREAM))))
        self.sock.close()


class _AioClient(Client):
    """A client on an event loop of this process (driven one round at a time); its server process
    sends back the address it listens on through a pipe."""

    loop: asyncio.AbstractEventLoop | None = None

    def __init__(self, hidden: np.ndarray, scheme: str) -> None:
        super().__init__(hidden)
        self.scheme = scheme
        self.transport = scheme.upper()

    def server_args(self) -> tuple:
        return ()

    def start_server(self, ctx) -> None:
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=type(self).serve, args=(self.scheme, child, *self.server_args()), daemon=True)
        self.proc.start()
        child.close()

    def server_address(self) -> tuple:
        if not self.pipe.poll(RECV_TIMEOUT_S):
            _fail(f"the {self.name} {self.transport} server did not start")
        return tuple(self.pipe.recv())

    def run(self, n: int) -> list[int]:
        return self.loop.run_until_complete(self._run(n))

    async def _run(self, n: int) -> list[int]:
        raise NotImplementedError


class Aio(_AioClient):
    """resonant.connect() in this process, resonant.serve() in the server's."""

    kind = AIO
    name = "resonant asyncio connect/serve (info)"
    serve = staticmethod(_aio_server)

    def setup(self) -> None:
        host, port = self.server_address()
        self.peer = self.loop.run_until_complete(resonant.connect(f"{self.scheme}://{host}:{port}"))

    async def _run(self, n: int) -> list[int]:
        peer, hidden = self.peer, self.hidden
        out = []
        for _ in range(n):
            t0 = pc()
            await peer.send(Think(hidden, stream_id=STREAM_ID))
            while True:
                e = await peer.next_event(RECV_TIMEOUT_S)
                if type(e) is MessageReceived and type(e.frame) is Think:
                    break
                if isinstance(e, (FrameRejected, RemoteError, ConnectionBroken)):
                    _fail(f"asyncio client: {e!r}")
            arr = e.frame.hidden.numpy()
            t1 = pc()
            out.append(t1 - t0)
            self._check(arr)
        return out

    def stop(self) -> None:
        async def bye() -> None:
            await self.peer.send(Think(self.hidden, stream_id=STOP_STREAM))
            await self.peer.close()
        self.loop.run_until_complete(bye())


class AioHandler(Aio):
    """resonant.connect() in this process, resonant.serve(handler=...) in the server's."""

    kind = AIO_HANDLER
    name = "resonant asyncio connect/serve(handler=) (info)"
    serve = staticmethod(_aio_handler_server)


class AioRaw(_AioClient):
    """Plain asyncio protocols in this process and the server's: the same bytes echoed, one future
    awaited per round trip, nothing encoded or decoded (the floor under the resonant asyncio rows)."""

    kind = AIO_RAW
    name = "raw asyncio protocols (info)"
    serve = staticmethod(_aio_raw_server)

    def __init__(self, hidden: np.ndarray, scheme: str) -> None:
        super().__init__(hidden, scheme)
        self.data = self.wire if scheme == "udp" else frame_record(self.wire)

    def server_args(self) -> tuple:
        return (len(self.data),)

    def setup(self) -> None:
        addr = self.server_address()
        client = self
        self.waiter: asyncio.Future | None = None
        self.buf = bytearray()

        class Udp(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, a) -> None:
                client.waiter.set_result(data)

        class Tcp(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                client.buf += data
                if len(client.buf) >= len(client.data):
                    client.waiter.set_result(bytes(client.buf))
                    client.buf.clear()

        async def open_() -> asyncio.BaseTransport:
            loop = asyncio.get_running_loop()
            if self.scheme == "udp":
                t, _ = await loop.create_datagram_endpoint(Udp, remote_addr=addr)
            else:
                t, _ = await loop.create_connection(Tcp, *addr)
                t.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return t
        self.t = self.loop.run_until_complete(open_())

    async def _run(self, n: int) -> list[int]:
        loop, t, data = self.loop, self.t, self.data
        send = t.sendto if self.scheme == "udp" else t.write
        out = []
        for _ in range(n):
            self.waiter = loop.create_future()
            t0 = pc()
            send(data)
            got = await self.waiter  # (run() bounds the whole batch with a timeout)
            t1 = pc()
            out.append(t1 - t0)
            if got != data:
                _fail(f"raw asyncio {self.transport}: the echo differs from what was sent")
        return out

    def run(self, n: int) -> list[int]:  # bounded: a lost datagram must not hang the run
        return self.loop.run_until_complete(asyncio.wait_for(self._run(n), RECV_TIMEOUT_S + n * 0.01))

    def stop(self) -> None:
        if self.scheme == "udp":
            self.t.sendto(b"\0")
        self.t.close()
        self.loop.run_until_complete(asyncio.sleep(0))


# --------------------------------------------------------------------------- statistics


@dataclass
class Row:
    transport: str
    kind: str
    name: str
    samples: int
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    min_us: float
    max_us: float
    rtt_p50_us: float


def summarize(c: Client) -> Row:
    one_way = np.asarray(c.samples, dtype=np.float64) / 2e3  # ns round trip -> us one way
    p50, p90, p99 = np.percentile(one_way, [50, 90, 99])
    return Row(c.transport, c.kind, c.name, len(one_way), float(p50), float(p90), float(p99),
               float(one_way.mean()), float(one_way.min()), float(one_way.max()), float(2 * p50))


def in_process_costs(hidden: np.ndarray) -> dict[str, float]:
    """What one hop costs in this process, without sockets (best of 3 calibrated samples, ns)."""
    def pair() -> tuple[Session, Session]:
        c, s = Session(SessionConfig(role="client")), Session(SessionConfig(role="server"))
        c.initiate(0.0)
        for d in c.datagrams_to_send():
            s.receive_datagram(d, 0.0)
        for d in s.datagrams_to_send():
            c.receive_datagram(d, 0.0)
        return c, s

    c, s = pair()
    c.send(Think(hidden, stream_id=STREAM_ID), 0.0)
    dgram = c.datagrams_to_send()[0]
    c.send(Think(hidden, stream_id=STREAM_ID), 0.0)
    record = c.data_to_send()
    wire = resonant.encode(Think(hidden, stream_id=STREAM_ID))
    ns = {"resonant": resonant, "Think": Think, "hidden": hidden, "sid": STREAM_ID, "c": c, "s": s,
          "dgram": dgram, "record": record, "wire": wire, "frame": Think(hidden, stream_id=STREAM_ID)}
    stmts = {
        "Think(hidden)": "Think(hidden, stream_id=sid)",
        "resonant.encode(Think(hidden))": "resonant.encode(Think(hidden, stream_id=sid))",
        "resonant.decode(wire).hidden.numpy()": "resonant.decode(wire).hidden.numpy()",
        "UDP send: Session.send(Think(hidden)) + datagrams_to_send()":
            "c.send(Think(hidden, stream_id=sid), 0.0); c.datagrams_to_send()",
        "UDP receive: Session.receive_datagram(d)[0].frame.hidden.numpy()":
            "s.receive_datagram(dgram, 0.0)[0].frame.hidden.numpy()",
        "TCP send: Session.send(Think(hidden)) + data_to_send()":
            "c.send(Think(hidden, stream_id=sid), 0.0); c.data_to_send()",
        "TCP receive: Session.receive_data(r)[0].frame.hidden.numpy()":
            "s.receive_data(record, 0.0)[0].frame.hidden.numpy()",
    }
    return {k: time_stmt(v, ns, 20_000_000, 3) for k, v in stmts.items()}


# --------------------------------------------------------------------------- main


def fmt_us(v: float | None) -> str:
    return "—" if v is None else f"{v:,.1f}"


def table(rows: list[Row], ours_udp_p50: float | None) -> str:
    lines = ["| transport | implementation | round trips | p50 µs | p99 µs | mean µs | p50 × raw | p99 × raw |",
             "|---|---|--:|--:|--:|--:|--:|--:|"]
    raw = {r.transport: r for r in rows if r.kind == RAW}
    last_udp = max((i for i, r in enumerate(rows) if r.transport == "UDP"), default=-1)
    for i, r in enumerate(rows):
        base = raw[r.transport]
        x50 = "—" if r.kind == RAW else f"{r.p50_us / base.p50_us:.2f}×"
        x99 = "—" if r.kind == RAW else f"{r.p99_us / base.p99_us:.2f}×"
        lines.append(f"| {r.transport} | {r.name} | {r.samples:,} | {fmt_us(r.p50_us)} | {fmt_us(r.p99_us)} | "
                     f"{fmt_us(r.mean_us)} | {x50} | {x99} |")
        if i == last_udp:
            note = "" if ours_udp_p50 is None else f" (ours: {ours_udp_p50:,.1f} µs p50)"
            lines.append(f"| UDP | reference claim (not measured here): encode + UDP + decode{note} | — | "
                         f"{REFERENCE_CLAIM_US:,.1f} | — | — | — | — |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=2000, help="timed round trips per row (default 2000)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds the count is split into (default 4)")
    p.add_argument("--warmup", type=int, default=300, help="untimed round trips per row before the rounds")
    p.add_argument("--no-aio", action="store_true", help="skip the asyncio rows")
    p.add_argument("--json", metavar="PATH", help="write raw numbers and targets as JSON ('-' for stdout)")
    p.add_argument("--check", action="store_true", help="exit 1 if any target fails")
    args = p.parse_args(argv)
    if args.count < args.rounds or args.rounds < 1:
        p.error("--count must be at least --rounds, and --rounds at least 1")
    out = sys.stderr if args.json == "-" else sys.stdout  # keep stdout pure JSON

    info = machine()
    print_machine(info, out)
    load_start = os.getloadavg()

    hidden = hidden_state()
    clients: list[Client] = [UdpRaw(hidden), UdpCrc(hidden), UdpCodec(hidden), UdpSession(hidden),
                             TcpRaw(hidden), TcpCrc(hidden), TcpCodec(hidden), TcpSession(hidden)]
    if not args.no_aio:
        clients[4:4] = [AioRaw(hidden, "udp"), Aio(hidden, "udp"), AioHandler(hidden, "udp")]
        clients += [AioRaw(hidden, "tcp"), Aio(hidden, "tcp"), AioHandler(hidden, "tcp")]
    wire = clients[0].wire
    assert len(wire) == 4143 and len(frame_record(wire)) == 4147

    ctx = multiprocessing.get_context("fork")
    loop: asyncio.AbstractEventLoop | None = None
    per_round = [args.count // args.rounds + (i < args.count % args.rounds) for i in range(args.rounds)]
    print(f"timing: {args.count:,} round trips per row in {args.rounds} interleaved rounds "
          f"({', '.join(map(str, per_round))}), after {args.warmup} warm-up round trips per row and "
          f"{ROUND_WARMUP} discarded at the start of each round; one-way = round trip / 2; GC off; "
          f"two processes over {HOST}", file=out)
    try:
        for c in clients:  # fork every server before this process opens a client socket or a loop
            c.start_server(ctx)
        loop = asyncio.new_event_loop()
        _AioClient.loop = loop
        for c in clients:
            c.setup()
            c.run(args.warmup)
        gc.collect()
        gc.disable()
        t_start = time.perf_counter()
        for i, n in enumerate(per_round):
            for c in (clients if i % 2 == 0 else clients[::-1]):
                c.run(ROUND_WARMUP)
                c.samples += c.run(n)
        elapsed = time.perf_counter() - t_start
        gc.enable()
        for c in clients:
            c.stop()
        for c in clients:
            c.proc.join(10)
            if c.proc.exitcode != 0:
                _fail(f"the {c.transport} {c.kind} server process failed (exit code {c.proc.exitcode})")
    finally:
        gc.enable()
        for c in clients:
            if c.proc is not None and c.proc.is_alive():
                c.proc.terminate()
                c.proc.join(5)
        if loop is not None:
            loop.close()

    rows = [summarize(c) for c in clients]
    by = {(r.transport, r.kind): r for r in rows}
    ours_udp = by[("UDP", OURS)]
    load_end = os.getloadavg()
    print(f"\nmessage: Think float16 {SHAPE}, {hidden.nbytes:,} B payload, {len(wire):,} B frame "
          f"({len(wire) + 4:,} B TCP record); timed part {elapsed:.1f} s; 1-minute load average "
          f"{load_start[0]:.2f} before, {load_end[0]:.2f} after (other work on these CPUs shows up as latency)\n",
          file=out)
    print("### One-way latency (round trip / 2), µs\n", file=out)
    print(table(rows, ours_udp.p50_us), file=out)

    costs = in_process_costs(hidden)
    print("\n### In-process cost of one hop's steps, no sockets (best of 3), ns\n", file=out)
    print("| step | ns |\n|---|--:|", file=out)
    for k, ns in costs.items():
        print(f"| {k} | {ns:,.0f} |", file=out)
    print("", file=out)
    hot: dict[str, float] = {}
    for tr in ("UDP", "TCP"):
        hot[tr] = sum(ns for k, ns in costs.items() if k.startswith(f"{tr} ")) / 1e3
        excess = by[(tr, OURS)].p50_us - by[(tr, RAW)].p50_us
        print(f"- {tr}: one hop's steps (send + receive) cost {hot[tr]:,.1f} µs hot; the ping-pong's one-way p50 "
              f"is {excess:,.1f} µs over raw ({excess / hot[tr]:.1f}× the hot cost)", file=out)

    main_t: list[Target] = []
    info_t: list[Target] = []
    for tr in ("UDP", "TCP"):
        raw, ours = by[(tr, RAW)], by[(tr, OURS)]
        main_t.append(Target(f"{tr} one-way p50, resonant Session / raw socket", ours.p50_us / raw.p50_us, "<=",
                             TARGET_P50, f"{ours.p50_us:,.1f} µs vs {raw.p50_us:,.1f} µs; "
                                         f"+{ours.p50_us - raw.p50_us:,.1f} µs"))
        info_t.append(Target(f"{tr} one-way p99, resonant Session / raw socket", ours.p99_us / raw.p99_us, ">=", 0.0,
                             f"{ours.p99_us:,.1f} µs vs {raw.p99_us:,.1f} µs"))
        floor, codec = by[(tr, FLOOR)], by[(tr, CODEC)]
        info_t.append(Target(f"{tr} one-way p50, checksum floor (CRC + copy, no objects) / raw socket",
                             floor.p50_us / raw.p50_us, ">=", 0.0,
                             f"{floor.p50_us:,.1f} µs; +{floor.p50_us - raw.p50_us:,.1f} µs for two CRCs and a copy per hop"))
        info_t.append(Target(f"{tr} one-way p50, resonant codec only (no Session) / raw socket",
                             codec.p50_us / raw.p50_us, ">=", 0.0,
                             f"{codec.p50_us:,.1f} µs; the Session adds {ours.p50_us - codec.p50_us:+,.1f} µs to it"))
        if (tr, AIO) in by:
            aio, aio_raw = by[(tr, AIO)], by[(tr, AIO_RAW)]
            info_t.append(Target(f"{tr} one-way p50, resonant asyncio / raw socket", aio.p50_us / raw.p50_us, ">=",
                                 0.0, f"{aio.p50_us:,.1f} µs; {aio.p50_us / ours.p50_us:.2f}× the sans-IO Session"))
            info_t.append(Target(f"{tr} one-way p50, resonant asyncio / raw asyncio protocols",
                                 aio.p50_us / aio_raw.p50_us, ">=", 0.0,
                                 f"{aio.p50_us:,.1f} µs vs {aio_raw.p50_us:,.1f} µs; +{aio.p50_us - aio_raw.p50_us:,.1f} µs"))
            hand = by[(tr, AIO_HANDLER)]
            info_t.append(Target(f"{tr} one-way p50, resonant asyncio with serve(handler=) / raw asyncio protocols",
                                 hand.p50_us / aio_raw.p50_us, ">=", 0.0,
                                 f"{hand.p50_us:,.1f} µs vs {aio_raw.p50_us:,.1f} µs; +{hand.p50_us - aio_raw.p50_us:,.1f} µs"))
    info_t.append(Target("UDP one-way p50, resonant Session / the reference's claim (0.43 ms, not measured here)",
                         ours_udp.p50_us / REFERENCE_CLAIM_US, ">=", 0.0,
                         f"{ours_udp.p50_us:,.1f} µs vs {REFERENCE_CLAIM_US:,.0f} µs"))
    print(f"\n## Targets (one-way p50, resonant Session <= {TARGET_P50:g}× raw socket p50, per transport)\n", file=out)
    print_targets(main_t, info_t, out)

    doc: dict[str, Any] | None = None
    if args.json:
        doc = {"machine": info, "count": args.count, "rounds": args.rounds, "per_round": per_round,
               "warmup": args.warmup, "round_warmup": ROUND_WARMUP, "gc": "off", "timed_seconds": elapsed,
               "loadavg_before": load_start, "loadavg_after": load_end,
               "message": {"shape": list(SHAPE), "dtype": "float16", "payload_bytes": hidden.nbytes,
                           "frame_bytes": len(wire), "record_bytes": len(wire) + 4},
               "rows": [asdict(r) for r in rows], "reference_claim_us": REFERENCE_CLAIM_US,
               "in_process_ns": costs, "hot_hop_us": hot,
               "targets": [asdict(t) for t in main_t], "info": [asdict(t) for t in info_t]}
    return finish(args, doc, main_t)


if __name__ == "__main__":
    sys.exit(main())
