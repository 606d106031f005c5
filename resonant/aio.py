"""asyncio transports: thin adapters that move bytes and timers for a sans-IO Session.

    async with resonant.connect("tcp://127.0.0.1:7000") as peer:
        await peer.send(resonant.Think(hidden))
        await peer.send_stream([k0, v0, k1, v1], names=[...])
        async for event in peer: ...

    async with resonant.serve("udp://0.0.0.0:7000") as server:
        async for peer, event in server: ...

UDP carries one frame per datagram (at most 65,507 bytes, smaller with max_frame_bytes);
TCP carries records (u32 little-endian length, then one frame), read straight into the
session's buffer (asyncio.BufferedProtocol) and parsed in place.

Hostile peers (serve()):
- Fair queueing: events wait for the application in one queue, counted per peer; only a peer
  over its own share is paused (TCP, resumed as the application takes its events) or dropped
  (UDP), and a TCP read is never larger than the peer's remaining share can take. A paused peer's
  idle and record deadlines stop until it resumes. Events of sources without a session count
  under one key.
- Memory: one peer holds at most max_peer_memory of the shared max_memory (a peer not yet
  established a quarter of that); completed streams stay charged until the application takes
  their StreamComplete, and a peer whose queued completions exceed max_peer_memory is paused.
- Peers that have not completed the handshake live in a pool of their own (max_pending), where a
  newcomer evicts the oldest; established peers are never evicted by them. TCP: a connection
  must complete the handshake (lenient server: send one valid frame) within handshake_timeout
  and every started record within record_timeout (slowloris), and is closed after max_malformed
  malformed records; unproven or misbehaving connections are read 16 KiB at a time.
- UDP anti-amplification (QUIC's rule): a source without an established session is never
  answered with more than 3 times the bytes received from it; a spoofed one-shot ping gets no
  answer, a real client's ping (as large as the capability, or retried) does. Datagrams that
  cannot be a frame (too short, unknown version or message type) from unknown sources are dropped
  before any session or event is made (at most 100 a second reported); a strict server makes a
  session only for a Sync and refuses other frames statelessly with HANDSHAKE_REQUIRED (once a
  second per source, 100 a second in all).
- The client (connect()) answers a HANDSHAKE_REQUIRED from the server (it lost or dropped the
  session) by handshaking again, at most 3 times in a row; send() waits for it. Frames sent
  before the refusal reached the client are lost.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import OrderedDict, deque
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, Sequence
from urllib.parse import urlsplit

from resonant import _codec
from resonant._codec import Frame
from resonant._spec import MAX_UDP_FRAME_BYTES, MIN_FRAME_BYTES, VERSION, VERSION_TRANSFORMED, MsgType
from resonant.errors import DecodeError, HandshakeRefused
from resonant.delivery import REPORT_INTERVAL, StreamDelivered, StreamUndelivered
from resonant.kv import KVCacheReceived, held_bytes
from resonant.reassembler import StreamComplete
from resonant.session import (
    ConnectionBroken,
    FrameRejected,
    HandshakeComplete,
    HandshakeFailed,
    RemoteError,
    Session,
    SessionConfig,
)
from resonant.stream_limits import MemoryBudget
from resonant.transitions import Role, State

__all__ = ["connect", "serve", "Peer", "Server", "parse_url", "MAX_UDP_FRAME_BYTES", "DeliveryFailed"]


class DeliveryFailed(ConnectionError):
    """send_stream(): the receiver did not verify the stream. reason: the receiver's (remote True:
    its StreamFailed reason, e.g. hash_mismatch, limit, timeout, or its application's, e.g.
    save_failed) or this side's ('no_feedback': the receiver fell silent; 'retransmits'; 'hash_mismatch':
    it verified other bytes; 'closed': the connection went away)."""

    def __init__(self, stream_id: int, reason: str, detail: str, remote: bool = False) -> None:
        self.stream_id, self.reason, self.detail, self.remote = stream_id, reason, detail, remote
        who = "the receiver refused" if remote else "not delivered"
        super().__init__(f"stream {stream_id}: {who}: {_printable(reason)}: {_printable(detail)}")


def _printable(text: str) -> str:
    """A peer's text for a one-line message: control characters (newlines, terminal escapes) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))

_TICK = 0.05                  # seconds between timer ticks
_FAST_TICK = REPORT_INTERVAL  # ... and for sessions with V-Stream feedback under way (reports, verdicts)
_UDP_RATE = 200e6             # bytes/s: the default pacing cap of a UDP V-Stream (send_stream(rate=))
_POLL_FRAMES = 64             # UDP V-Stream: frames taken from the Delivery per poll
_UDP_RCVBUF = 4 << 20         # ask the kernel for this much receive buffer
_QUEUE_LIMIT = 4096           # events waiting for the application before reading pauses
# Server: the events queued for the application are counted per peer; a peer whose own backlog is
# over its share (_QUEUE_LIMIT divided among the peers with a backlog, at least _QUEUE_MIN_SHARE)
# is paused (TCP) or its datagrams dropped (UDP), and resumed when the application has taken half.
_QUEUE_MIN_SHARE = 64
# Events from sources without a session (UDP garbage reports and stateless refusals, the streams of
# a peer that is gone) are counted under this one key: they are rate-limited already, and one key
# per source would let spoofed sources shrink every peer's share.
_SESSIONLESS = ("", 0)
# Server: the part of max_memory one peer may hold (max_peer_memory, default max_memory //
# _PEER_MEMORY_SHARE), and the part of that a peer not yet established may (// _PENDING_MEMORY_SHARE).
_PEER_MEMORY_SHARE = 4
_PENDING_MEMORY_SHARE = 4
# Server: peers that have not completed the handshake (TCP: nor, on a lenient server, sent one
# valid frame) are held in a pool of their own, at most max_pending (default: max_peers // 8,
# at least 16); a new one evicts the oldest there, never an established peer.
_PENDING_SHARE = 8
_PENDING_MIN = 16
_HANDSHAKE_TIMEOUT = 5.0      # TCP server: seconds to complete the handshake (or send a valid frame)
_RECORD_TIMEOUT = 10.0        # TCP server: seconds a started record may take to complete
_MAX_MALFORMED = 1024         # TCP server: malformed records before the connection is closed
_MIN_READ = 4096              # TCP server: the smallest read (see _ServerTcpLink.get_buffer)
_MIN_RECORD = 4 + MIN_FRAME_BYTES  # the smallest TCP record
_YIELD_EVERY = 256            # Server iteration: events handed out before the event loop gets a turn
_SUSPECT_READ = 16 << 10      # TCP server: read size for a connection not yet proven or that sent a malformed record
# UDP server, unvalidated sources (no established session): never more bytes answered than
# _AMPLIFICATION times the bytes received from that address (QUIC's rule), at most one stateless
# HANDSHAKE_REQUIRED refusal per source per _REFUSAL_INTERVAL seconds and _REFUSALS_PER_S in all,
# and at most _REPORTS_PER_S garbage datagrams from unknown sources reported as events.
_AMPLIFICATION = 3
_REFUSAL_INTERVAL = 1.0
_REFUSALS_PER_S = 100.0
_REPORTS_PER_S = 100.0
_UNVALIDATED_TABLE = 4096     # sources whose byte counts are remembered (least recently heard dropped)
_MAX_REHANDSHAKES = 3         # client: re-handshakes in a row (without completing) on HANDSHAKE_REQUIRED
_MSG_TYPE_MAX = max(MsgType)
_SYNC_TYPE = int(MsgType.SYNC)


def parse_url(url: str) -> tuple[str, str, int]:
    """'tcp://host:port' or 'udp://host:port' -> (scheme, host, port)."""
    parts = urlsplit(url)
    if parts.scheme not in ("tcp", "udp"):
        raise ValueError(f"{url!r}: the scheme must be tcp:// or udp://")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    if not parts.hostname or port is None:
        raise ValueError(f"{url!r}: give a host and a port, e.g. {parts.scheme}://127.0.0.1:7000")
    return parts.scheme, parts.hostname, port


def _config(role: Role, scheme: str, config: SessionConfig | None, kwargs: dict) -> SessionConfig:
    cfg = config if config is not None else SessionConfig(role=role, **kwargs)
    if config is not None and kwargs:
        raise TypeError("pass a SessionConfig or keyword arguments, not both")
    cfg = replace(cfg, role=role)
    if scheme == "udp" and cfg.max_frame_bytes > MAX_UDP_FRAME_BYTES:
        cfg = replace(cfg, max_frame_bytes=MAX_UDP_FRAME_BYTES)
    return cfg


_UDP_READ = 65536  # holds any UDP datagram


def _udp_read_size(transport) -> None:
    """asyncio's selector transport reads each datagram into a new 256 KiB bytes object; glibc
    maps that much memory for it and unmaps it once the bytes are trimmed to the datagram's size
    (tens of microseconds per datagram on a virtual machine). Every datagram fits 64 KiB, which
    the heap serves."""
    if getattr(transport, "max_size", 0) > _UDP_READ:
        transport.max_size = _UDP_READ


def _now() -> float:
    return time.monotonic()


_CLOSED = object()  # queued when a connection is lost


class _Inbox:
    """Events waiting for the application: a FIFO with put_nowait / get(timeout), as
    asyncio.Queue has, but holding on to its event loop. (asyncio.Queue looks the running loop up
    on every get() that waits, and asyncio.timeout() on every use; CPython checks the process id
    on each lookup, a system call, which on a virtual machine costs several microseconds per
    message.)"""

    def __init__(self) -> None:
        self._items: deque = deque()
        self._waiters: deque = deque()
        self._loop: asyncio.AbstractEventLoop | None = None

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        if self._waiters:
            self._wake_next()

    def put_all(self, items: list) -> None:
        """put_nowait of each item, in order."""
        self._items.extend(items)
        for _ in range(min(len(items), len(self._waiters))):  # (a waiter per item, as put_nowait wakes)
            self._wake_next()

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    async def get(self, timeout: float | None = None) -> Any:
        """The next item; asyncio.TimeoutError when none came within `timeout` seconds."""
        if self._items:
            return self._items.popleft()
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self._items:
            w = loop.create_future()
            self._waiters.append(w)
            timer = None if deadline is None else loop.call_at(deadline, _expire, w)
            try:
                await w
            except BaseException:  # cancelled: a wake-up this waiter took goes to the next one
                w.cancel()
                self._discard(w)
                if self._items:
                    self._wake_next()
                raise
            finally:
                if timer is not None:
                    timer.cancel()
            if w.result() is _TIMED_OUT:
                self._discard(w)
                if not self._items:
                    raise asyncio.TimeoutError
        return self._items.popleft()

    def _discard(self, w: asyncio.Future) -> None:
        try:
            self._waiters.remove(w)
        except ValueError:  # already taken by put_nowait
            pass

    def _wake_next(self) -> None:
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(None)
                return


_TIMED_OUT = object()


def _wake(w: asyncio.Future) -> None:
    if not w.done():
        w.set_result(None)


def _expire(w: asyncio.Future) -> None:
    if not w.done():
        w.set_result(_TIMED_OUT)


# ------------------------------------------------------------------ protocols


# The events that keep buffers alive while queued (_queued_bytes).
_HELD_TYPES = frozenset((StreamComplete, KVCacheReceived))


def _queued_bytes(event) -> int:
    """The bytes a queued event keeps alive, charged to a server's max_memory until it is taken:
    a completed stream's buffer; a KV cache's tensors (resonant.kv.held_bytes)."""
    t = type(event)
    if t is StreamComplete:
        return event.nbytes
    if t is KVCacheReceived:
        return held_bytes(event)
    return 0


class _Link:
    """What a Peer needs from a transport: write frames, wait for room, close."""

    pending = False  # server: not (yet) established (see Server.pending)

    def __init__(self, session: Session) -> None:
        self.session = session
        self.events = _Inbox()
        self.closed = asyncio.Event()
        self.transport: asyncio.BaseTransport | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.icmp_error: Exception | None = None

    def flush(self) -> None:
        raise NotImplementedError

    _waiters: set | None = None

    async def wait_input(self, delay: float) -> None:
        """Sleep up to `delay` seconds, less when something arrives from the peer (or it goes away);
        every waiter is woken (several send_stream calls may wait on one peer)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if self._waiters is None:
            self._waiters = set()
        self._waiters.add(fut)
        handle = loop.call_later(max(0.0, delay), _wake, fut)
        try:
            await fut
        finally:
            handle.cancel()
            self._waiters.discard(fut)

    def woken(self) -> None:
        if self._waiters:
            for w in self._waiters:
                if not w.done():
                    w.set_result(None)

    async def drain(self) -> None:
        await self._can_write.wait()

    async def written(self) -> None:
        """Wait until the transport has handed every buffer to the kernel (or the connection is lost)."""
        t = self.transport
        if t is None or t.is_closing() or not t.get_write_buffer_size():
            return
        low, high = t.get_write_buffer_limits()
        t.set_write_buffer_limits(high=0)  # pauses writing (this link's drain) until the buffer is empty
        try:
            await self.drain()
        finally:
            if not t.is_closing():
                t.set_write_buffer_limits(high=high, low=low)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # Client: once the first handshake completed, a HANDSHAKE_REQUIRED from the server (it lost or
    # dropped our session) starts the handshake again, at most _MAX_REHANDSHAKES times in a row.
    rehandshake = False          # set by Peer.handshake once it completed
    rehandshaking = False
    _rehandshakes = 0
    _ready: asyncio.Event | None = None

    def deliver(self, events: list) -> None:
        events = self.session.kv.expand(events)  # KV-cache streams: KVLayerReceived, KVCacheReceived added
        put = self.events.put_nowait
        for e in events:
            t = type(e)
            if t is RemoteError or t is HandshakeFailed or t is HandshakeComplete:
                self._handshake_event(e)
            put(e)
        if self.session._out:
            self.flush()  # replies (capability, error) the events caused

    def _handshake_event(self, e) -> None:
        if not self.rehandshake:
            return
        if type(e) is HandshakeComplete:
            self.rehandshaking = False
            self._rehandshakes = 0
            if self._ready is not None:
                self._ready.set()
            return
        if e.code != "HANDSHAKE_REQUIRED":
            if type(e) is HandshakeFailed and self.rehandshaking:  # e.g. no capability in time: give up
                self.rehandshaking = False
                if self._ready is not None:
                    self._ready.set()
            return
        session = self.session
        if session.state is State.AWAIT_CAPABILITY or session.state is State.CLOSED:
            return  # already pinging (a refusal of an earlier frame)
        if self._rehandshakes >= _MAX_REHANDSHAKES:
            self.rehandshaking = False
            if self._ready is not None:
                self._ready.set()
            return
        self._rehandshakes += 1
        self.rehandshaking = True
        if self._ready is None:
            self._ready = asyncio.Event()
        self._ready.clear()
        session.initiate(_now())  # the ticker repeats the ping, session.tick gives up after handshake_attempts


class _TcpLink(_Link, asyncio.BufferedProtocol):
    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.session.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        events = self.session.buffer_updated(nbytes, _now())
        self.deliver(events)
        self.woken()
        if events and type(events[-1]) is ConnectionBroken:  # (the Session puts it last)
            self.transport.close()  # the record stream cannot be resynchronised
        elif self.events.qsize() > _QUEUE_LIMIT:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.deliver(self.session.receive_eof(_now()))
        return False

    def connection_lost(self, exc) -> None:
        self.closed.set()
        self._can_write.set()
        self.events.put_nowait(_CLOSED)  # wakes whoever waits for an event
        self.woken()

    def flush(self) -> None:
        parts = self.session.records_to_send()
        if parts and self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(parts)  # Python 3.12+: one sendmsg, no join

    def resume(self) -> None:
        if self.transport is not None and self.events.qsize() < _QUEUE_LIMIT // 2 and not self.transport.is_closing():
            self.transport.resume_reading()


class _UdpClientLink(_Link, asyncio.DatagramProtocol):
    def connection_made(self, transport) -> None:
        self.transport = transport
        _udp_read_size(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UDP_RCVBUF)
            except OSError:
                pass

    def datagram_received(self, data: bytes, addr) -> None:
        self.deliver(self.session.receive_datagram(data, _now()))
        self.woken()

    def error_received(self, exc) -> None:
        self.icmp_error = exc  # e.g. ICMP port unreachable: nobody listens (yet); UDP goes on

    def connection_lost(self, exc) -> None:
        self.closed.set()
        self._can_write.set()
        self.events.put_nowait(_CLOSED)  # wakes whoever waits for an event
        self.woken()

    def flush(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        for d in self.session.datagrams_to_send():
            self.transport.sendto(d)

    def resume(self) -> None:
        pass


# ------------------------------------------------------------------ the client side


class Peer:
    """A connected peer (returned by connect()). send() / send_stream() / iterate for events."""

    def __init__(self, link: _Link, scheme: str, address: tuple) -> None:
        self._link = link
        self.session = link.session
        self.scheme = scheme
        self.address = address
        self._ticker: asyncio.Task | None = None
        self._stream_ids = iter(range(1 << 20, 1 << 32))

    @property
    def agreement(self):
        return self.session.agreement

    @property
    def reference_mode(self) -> bool:
        """Whether the peer never answered the handshake and was taken for a reference receiver
        (connect(..., reference_fallback=True)): frames go as version 1, in the reference's dtypes,
        one frame per message (send_stream() and larger messages raise LocalProtocolError). Read
        from the session each time: a capability that comes after the fallback ends it."""
        return self.session.reference_mode

    async def handshake(self, timeout: float = 5.0) -> None:
        """Ping until the server answers; raises HandshakeRefused on an error or no answer."""
        self.session.initiate(_now())
        self._link.flush()
        deadline = _now() + timeout
        while True:
            left = deadline - _now()
            if left <= 0:
                raise HandshakeRefused("handshake", f"no capability from {self.address} within {timeout} s")
            if isinstance(self._link.icmp_error, ConnectionRefusedError) and self.session._pings_sent >= 2:
                raise HandshakeRefused("handshake", f"nothing listens at udp://{self.address[0]}:{self.address[1]} "
                                       "(ICMP port unreachable)")
            try:
                event = await self._link.events.get(min(left, 0.25))
            except asyncio.TimeoutError:
                continue
            if event is _CLOSED:
                raise HandshakeRefused("handshake", f"the connection to {self.address} closed during the handshake")
            if isinstance(event, HandshakeComplete):
                if event.agreement.reference and isinstance(self._link.icmp_error, ConnectionRefusedError):
                    # no answer because nothing listens (a reference receiver would have taken the pings)
                    self.session.agreement = None
                    raise HandshakeRefused("handshake", f"nothing listens at udp://{self.address[0]}:"
                                           f"{self.address[1]} (ICMP port unreachable)")
                self._link.rehandshake = True
                return
            if isinstance(event, HandshakeFailed):
                raise HandshakeRefused("handshake", f"{event.code}: {event.message}")

    def _check_open(self) -> None:
        t = self._link.transport
        if self._link.closed.is_set() or t is None or t.is_closing():
            raise ConnectionError(f"the connection to {self.address} is closed")

    async def _await_rehandshake(self) -> None:
        """The server asked for the handshake again (it had dropped our session): wait, bounded, until
        it completed (or failed), so that what is sent next is not refused too."""
        link = self._link
        if link._ready is not None:
            try:
                await asyncio.wait_for(link._ready.wait(), self.session.config.handshake_retry
                                       * (self.session.config.handshake_attempts + 1))
            except asyncio.TimeoutError:
                pass

    async def send(self, frame: Frame) -> None:
        """Send one message (encoded as agreed); ConnectionError once the connection is closed.
        While the handshake is being repeated (the server answered HANDSHAKE_REQUIRED), waits for it."""
        if self._link.rehandshaking:
            await self._await_rehandshake()
        self._check_open()
        self.session.send(frame, _now())
        self._link.flush()
        await self._link.drain()

    async def send_stream(self, objects: Sequence, *, stream_id: int | None = None,
                          progress: Callable[[int, int], None] | None = None,
                          rate: float | None = None, **kwargs: Any) -> int:
        """Send tensors as a V-Stream (HEAD, chunks, TAIL); returns the stream id once the receiver
        has verified it.

        With feedback agreed in the handshake (both sides resonant with SessionConfig.feedback, the
        default), it returns only after the receiver's verdict: the stream arrived and its xxh3_64 is
        the one sent (StreamDelivered in the events too); otherwise it raises DeliveryFailed with the
        receiver's reason, or 'no_feedback' when the receiver falls silent for feedback_timeout (5 s).
        Over UDP it resends what the receiver reports missing (selective repeat) and paces the
        datagrams at a rate that adapts to loss and delay, never above `rate` bytes/s (default 200
        MB/s). Over TCP, `rate` caps the rate too (default: none). Without feedback (a peer that
        does not offer it), it returns once every frame was handed to the transport. The objects
        must not change until it returns. progress(sent_bytes, total_bytes) is called as frames go out."""
        return await self._send_stream(lambda sid, rate: self.session.stream(sid, objects, rate=rate, **kwargs),
                                       stream_id, progress, rate)

    async def send_kv_cache(self, cache: Any, *, signature: Any = None, dtype: str | None = None,
                            stream_id: int | None = None, progress: Callable[[int, int], None] | None = None,
                            rate: float | None = None, **kwargs: Any) -> int:
        """Send a transformers KV cache (DynamicCache or legacy tuple) as a V-Stream; returns its
        stream id once the receiver has verified it, as send_stream() (over TCP and UDP alike). The
        receiver gets KVLayerReceived events layer by layer and a KVCacheReceived with a ready
        DynamicCache in the cache's own torch dtype (resonant.kv).

        signature: the model's ModelSignature (ModelSignature.from_hf(model, tokenizer)); a receiver
        that declared its model (expected_signature=) refuses a cache of another model, or of none:
        DeliveryFailed with reason "model_mismatch" and the differing fields in its detail. dtype: None
        sends the tensors as they are; "f32", "f16", "bf16", "q8_0" or "q4_0" on the wire (the receiver
        converts back to the cache's dtype; q8_0 / q4_0 are lossy, ~4x / ~7x smaller than float32).
        Other keywords as send_stream (fec=, ...). Needs torch on both sides."""
        return await self._send_stream(
            lambda sid, rate: self.session.kv_stream(sid, cache, signature=signature, dtype=dtype, rate=rate, **kwargs),
            stream_id, progress, rate)

    async def _send_stream(self, build: Callable[[int, float | None], Any], stream_id: int | None,
                           progress: Callable[[int, int], None] | None, rate: float | None) -> int:
        """send_stream's work for the StreamSender build(stream_id, rate) makes on the session."""
        if self._link.rehandshaking:
            await self._await_rehandshake()
        self._check_open()
        sid = next(self._stream_ids) if stream_id is None else stream_id
        udp = self.scheme == "udp"
        if rate is None and udp:
            rate = _UDP_RATE
        session = self.session
        sender = build(sid, rate if udp else None)
        delivery = session.delivery(sid)
        total = sender.layout.total_bytes
        start = _now()
        sent = 0
        try:
            if not udp:
                # Zero-copy: records whose payloads are views of the objects (joined by writelines
                # before Python 3.12, sent as they are with sendmsg after); once the last is handed
                # over, wait until the transport holds none of them, so the caller may reuse the objects.
                for parts in session._records_of(sender, 16):
                    self._check_open()  # the peer went away mid-stream
                    self._link.flush()  # anything queued before (a control reply) goes first
                    self._link.transport.writelines(parts)
                    sent += sum(map(len, parts))
                    await self._link.drain()
                    if rate:
                        await asyncio.sleep(max(0.0, sent / rate - (_now() - start)))
                    if progress is not None:
                        progress(min(sent, total), total)
                await self._link.written()
                if delivery is not None:
                    delivery.sent_all(_now())
                    await self._verdict(delivery)
            elif delivery is not None:
                await self._send_udp_delivery(delivery, total, progress)
            else:  # a peer without feedback: every frame once, paced at the rate
                for data in sender:  # yield after every datagram, so that a receiver in this event loop keeps up
                    self._check_open()  # the peer went away mid-stream
                    session.send_encoded(data)
                    sent += len(data)
                    self._link.flush()
                    await self._link.drain()
                    if rate:
                        await asyncio.sleep(max(0.0, sent / rate - (_now() - start)))
                    if progress is not None:
                        progress(min(sent, total), total)
        except BaseException:
            if delivery is not None and not delivery.done:  # (cancelled, or the connection went away)
                delivery.close("the sender stopped", _now())
                session._deliveries.pop(sid, None)
            raise
        if progress is not None:
            progress(total, total)
        return sid

    async def _send_udp_delivery(self, delivery, total: int, progress) -> None:
        """UDP with feedback: what the Delivery gives (new chunks, resends, HEAD and TAIL again), paced,
        until its verdict."""
        link, session = self._link, self.session
        chunk = max(1, delivery._chunk_bytes)
        while not delivery.done:
            if link.closed.is_set():
                delivery.close(f"the connection to {self.address} is closed", _now())
                break
            now = _now()
            frames = delivery.poll(now, _POLL_FRAMES)
            if frames:
                for data in frames:
                    session.send_encoded(data)
                link.flush()
                if progress is not None:
                    progress(min(delivery._next_new * chunk, total), total)
            wait = delivery.next_time(_now()) - _now()
            if wait > 0:
                await link.wait_input(min(wait, REPORT_INTERVAL))
            else:
                await asyncio.sleep(0)  # a receiver in this event loop gets its turn
        self._raise_unless_delivered(delivery)

    async def _verdict(self, delivery) -> None:
        """Wait for the verdict of a stream whose frames are all written (TCP)."""
        link = self._link
        while not delivery.done:
            if link.closed.is_set():
                delivery.close(f"the connection to {self.address} closed before the receiver's verdict", _now())
                break
            await link.wait_input(REPORT_INTERVAL)
        self._raise_unless_delivered(delivery)

    def _raise_unless_delivered(self, delivery) -> None:
        r = delivery.result
        if isinstance(r, StreamUndelivered):
            self.session._deliveries.pop(delivery.stream_id, None)
            raise DeliveryFailed(r.stream_id, r.reason, r.detail, r.remote)

    async def next_event(self, timeout: float | None = None):
        """The next event (MessageReceived, stream events, RemoteError, ...); ConnectionError
        once the connection is closed, asyncio.TimeoutError after `timeout` seconds."""
        event = await self._link.events.get(timeout)
        if event is _CLOSED:
            self._link.events.put_nowait(_CLOSED)  # stays closed for the next caller
            raise ConnectionError(f"the connection to {self.address} is closed")
        self._link.resume()
        return event

    def __aiter__(self) -> AsyncIterator:
        return self._iter()

    async def _iter(self):
        while True:
            event = await self._link.events.get()
            if event is _CLOSED:
                self._link.events.put_nowait(_CLOSED)
                return
            self._link.resume()
            yield event

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self.session.close(_now())
        t = self._link.transport
        if t is not None and not t.is_closing():
            if isinstance(self._link, _TcpLink) and t.can_write_eof():
                t.write_eof()
            t.close()
        try:
            await asyncio.wait_for(self._link.closed.wait(), 2.0)
        except asyncio.TimeoutError:
            pass

    async def __aenter__(self) -> "Peer":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def _tick(link: _Link) -> None:
    session = link.session
    while True:
        await asyncio.sleep(_FAST_TICK if session.feedback_busy else _TICK)
        link.deliver(session.tick(_now()))


class _Opening:
    """What connect() and serve() return: `async with connect(...) as peer` and
    `peer = await connect(...)` both work (likewise for serve)."""

    def __init__(self, coro) -> None:
        self._coro = coro
        self._opened: Any = None

    def __await__(self):
        return self._coro.__await__()

    async def __aenter__(self):
        self._opened = await self._coro
        return self._opened

    async def __aexit__(self, *exc) -> None:
        await self._opened.close()


def connect(url: str, *, config: SessionConfig | None = None, handshake: bool = True, timeout: float = 5.0,
            reference_fallback: bool = False, **kwargs: Any) -> _Opening:
    """Connect to tcp://host:port or udp://host:port and (by default) perform the handshake.

    Keyword arguments are SessionConfig fields (key=, expected_space_hash=, space_hash32=,
    compress=, max_frame_bytes=, ...).

    reference_fallback=True: when neither a capability nor an error answers the pings within
    SessionConfig.reference_fallback_wait (1 s by default, reference_fallback_ms of
    schema/handshake.yaml), the peer is taken for a reference receiver (they read pings but never
    answer) and the connection goes on in reference mode (peer.reference_mode): version-1 frames
    (no compression, no encryption), only the dtypes the reference reads (f16, i8, q4, sparse;
    others converted by the dtype fallback rules, e.g. f32 -> f16, or refused with a
    LocalProtocolError), one frame per message (send_stream() and a message larger than one frame
    raise LocalProtocolError: the reference has no V-Stream reassembly). Over TCP alike (the
    reference has only UDP receivers; a TCP peer that accepts and never answers is treated the
    same). With a key or a strict config it is refused at once with ValueError: such a session
    never falls back (without the option it keeps pinging and fails with TIMEOUT). Nothing
    listening on UDP (ICMP port unreachable) still fails with HandshakeRefused."""
    return _Opening(_connect(url, config, handshake, timeout, kwargs, reference_fallback))


async def _connect(url: str, config, handshake: bool, timeout: float, kwargs: dict,
                   reference_fallback: bool = False) -> Peer:
    scheme, host, port = parse_url(url)
    cfg = _config(Role.CLIENT, scheme, config, kwargs)
    if reference_fallback and not cfg.reference_fallback:
        cfg = replace(cfg, reference_fallback=True)  # (checked by SessionConfig: no key, not strict)
    session = Session(cfg)
    loop = asyncio.get_running_loop()
    if scheme == "tcp":
        _, link = await asyncio.wait_for(loop.create_connection(lambda: _TcpLink(session), host, port), timeout)
    else:
        _, link = await loop.create_datagram_endpoint(lambda: _UdpClientLink(session), remote_addr=(host, port))
    peer = Peer(link, scheme, (host, port))
    peer._ticker = asyncio.ensure_future(_tick(link))
    if handshake:
        try:
            await peer.handshake(timeout)
        except BaseException:
            await peer.close()
            raise
    return peer


# ------------------------------------------------------------------ the server side


class Server:
    """A listening endpoint (returned by serve()). Iterate it for (peer_address, event), or give
    serve() a handler."""

    def __init__(self, scheme: str, config: SessionConfig, max_peers: int, max_pending: int | None = None) -> None:
        self.handler: Callable[[tuple, Any], Frame | None] | None = None
        self.scheme = scheme
        self.config = config
        self.strict = config.is_strict
        self.max_peers = max_peers
        if max_pending is None:  # a lenient UDP server keeps clients that never handshake (the reference's)
            max_pending = (max_peers if scheme == "udp" and not self.strict  # among its pending sessions
                           else min(max_peers, max(_PENDING_MIN, max_peers // _PENDING_SHARE)))
        self.max_pending = max_pending
        self.budget: MemoryBudget | None = None
        self.idle_timeout = 300.0
        self.handshake_timeout = _HANDSHAKE_TIMEOUT
        self.record_timeout = _RECORD_TIMEOUT
        self.max_malformed = _MAX_MALFORMED
        self.events = _Inbox()
        self.links: "OrderedDict[tuple, _Link]" = OrderedDict()  # every peer with a session
        self.pending: "OrderedDict[tuple, _Link]" = OrderedDict()  # those not (yet) established
        self.address: tuple | None = None
        self._server: asyncio.AbstractServer | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_protocol: _UdpServerProtocol | None = None
        self._ticker: asyncio.Task | None = None
        self._queued: dict[tuple, int] = {}     # events in self.events, per peer
        self._paused: dict[tuple, _Link] = {}   # TCP peers paused for their backlog
        self._held: dict[tuple, int] = {}       # bytes of queued StreamComplete events, per peer
        self.max_peer_memory = 4 << 30
        self._peer_config = self._pending_config = config
        self._handed = 0
        self.rejected_peers = 0
        self.dropped_datagrams = 0
        self.evicted_pending = 0
        self.timed_out = 0
        self.garbage_datagrams = 0
        self.refused_datagrams = 0
        self.unanswered_bytes = 0  # replies held back by the anti-amplification rule
        self._unvalidated: "OrderedDict[tuple, list]" = OrderedDict()  # UDP: addr -> [received, answered, last refusal]
        self._refusals = _Bucket(_REFUSALS_PER_S)
        self._reports = _Bucket(_REPORTS_PER_S)

    def _limits(self, max_memory: int, max_peer_memory: int | None) -> None:
        """Each peer's StreamLimits within its part of the shared budget (see serve())."""
        if max_peer_memory is None:
            max_peer_memory = max_memory // _PEER_MEMORY_SHARE
        if max_peer_memory < 0:
            raise ValueError("max_peer_memory must be >= 0")
        self.max_peer_memory = max_peer_memory

        def capped(cap: int) -> SessionConfig:
            lim = self.config.stream_limits
            return replace(self.config, stream_limits=replace(
                lim, max_stream_bytes=min(lim.max_stream_bytes, cap), max_buffered_bytes=min(lim.max_buffered_bytes, cap),
                max_early_bytes=min(lim.max_early_bytes, cap)))
        self._peer_config = capped(max_peer_memory)
        self._pending_config = capped(max_peer_memory // _PENDING_MEMORY_SHARE)

    def _session(self) -> Session:
        """A new peer's session: not yet established, so within the pending peers' memory cap."""
        return Session(self._pending_config, budget=self.budget)

    def _emit(self, address: tuple, session: Session | None, events: list) -> None:
        """One peer's events: to the handler, whose answers are queued on the peer's session (the
        caller sends them), or else to the application's queue. session None: the peer is gone
        and answers are dropped."""
        handler = self.handler
        if session is not None:
            events = session.kv.expand(events)  # KV-cache streams: KVLayerReceived, KVCacheReceived added
        if handler is None:
            if events:
                key = address if session is not None else _SESSIONLESS
                self.events.put_all([(address, e) for e in events])
                if not _HELD_TYPES.isdisjoint(map(type, events)):
                    for e in events:
                        n = _queued_bytes(e)
                        if n:  # its buffers stay charged until the application takes it
                            self._hold(key, n)
                q = self._queued
                q[key] = q.get(key, 0) + len(events)
            return
        for e in events:
            try:
                answer = handler(address, e)
                if answer is not None and session is not None:
                    session.send(answer, _now())
            except Exception as exc:  # the server goes on; the loop's exception handler reports it
                asyncio.get_running_loop().call_exception_handler(
                    {"message": f"resonant.serve handler failed on {type(e).__name__} from {address}",
                     "exception": exc})

    def _share(self) -> int:
        return max(_QUEUE_MIN_SHARE, _QUEUE_LIMIT // max(1, len(self._queued)))

    def _over(self, address: tuple) -> bool:
        """Whether this peer's own backlog of queued events is over its share, or the bytes of its
        queued completed streams over its share of max_memory."""
        return (self._queued.get(address, 0) > self._share()
                or (bool(self._held) and self._held.get(address, 0) > self.max_peer_memory))

    def _hold(self, key, nbytes: int) -> None:
        """A completed stream queued for the application: its buffers are charged to max_memory
        again (the Reassembler released its own charge at completion) until it is taken."""
        if self.budget is not None:
            self.budget.used += nbytes
        self._held[key] = self._held.get(key, 0) + nbytes

    def _took(self, item) -> None:
        """The application took one event: count it off its peer (or the sessionless count); release
        a completed stream's charge; resume a paused peer at half its share."""
        address, event = item
        q = self._queued
        n = q.get(address, 0) - 1
        if n > 0 and type(event) not in _HELD_TYPES and not self._paused:  # (the usual case, in short)
            q[address] = n
            return
        key = address if n >= 0 else _SESSIONLESS
        n = q.get(key, 0) - 1
        if n > 0:
            q[key] = n
        else:
            q.pop(key, None)
        nbytes = _queued_bytes(event)
        if nbytes:
            held = self._held
            hkey = address if held.get(address, 0) >= nbytes else _SESSIONLESS
            left = held.get(hkey, 0) - nbytes
            if left > 0:
                held[hkey] = left
            else:
                held.pop(hkey, None)
            if self.budget is not None:
                self.budget.used -= nbytes
        if self._paused and address in self._paused and n <= self._share() // 2 \
                and self._held.get(address, 0) <= self.max_peer_memory // 2:
            link = self._paused.pop(address)
            t = link.transport
            if t is not None and not t.is_closing():
                link.last = link.progress = _now()  # its deadlines start again
                t.resume_reading()

    def __aiter__(self) -> AsyncIterator:
        return self._iter()

    async def _iter(self):
        n = 0
        waiting = self.events._items
        while True:
            item = waiting.popleft() if waiting else await self.events.get()
            if item is None:
                self.events.put_nowait(None)  # stays closed for the next caller
                return
            self._took(item)
            n += 1
            if n >= _YIELD_EVERY:  # a full queue never makes get() wait: let the loop read and write
                n = 0
                await asyncio.sleep(0)
            yield item

    async def next_event(self, timeout: float | None = None):
        item = await self.events.get(timeout)
        if item is None:
            self.events.put_nowait(None)
            raise EOFError("the server is closed")
        self._took(item)
        self._handed += 1
        if self._handed >= _YIELD_EVERY:  # (as _iter)
            self._handed = 0
            await asyncio.sleep(0)
        return item

    def verdict(self, address: tuple, stream_id: int, ok: bool, reason: str = "", detail: str = "") -> bool:
        """Serve with hold_verdicts=True (SessionConfig): the application's verdict on a stream the peer at
        `address` sent, once it has kept the data (ok), or not (reason, e.g. "save_failed", and detail);
        sent at once. False when there is no such peer or no verdict is held for the stream."""
        link = self.links.get(address)
        if link is None or not link.session.verdict(stream_id, ok, reason, detail):
            return False
        if self._udp is not None:
            self._udp_protocol._send(link, address)
        else:
            link.flush()
        return True

    async def reply(self, address: tuple, frame: Frame) -> None:
        """Send a frame back to one peer."""
        link = self.links.get(address)
        if link is None:
            raise KeyError(f"no peer {address}")
        link.session.send(frame, _now())
        if self._udp is not None:
            self._udp_protocol._send(link, address)
        else:
            link.flush()
            await link.drain()

    def _promote(self, address: tuple, link: _Link) -> bool:
        """A pending peer completed the handshake (TCP, lenient: sent a valid frame). TCP: refused
        when max_peers are established; UDP: the least recently heard established peer is dropped."""
        self.pending.pop(address, None)
        link.pending = False
        link.session.reassembler.limits = self._peer_config.stream_limits  # its full share of max_memory
        if len(self.links) - len(self.pending) <= self.max_peers:
            return True
        if self._udp is None:
            self.rejected_peers += 1
            return False
        for old_addr, old in self.links.items():
            if not old.pending and old is not link:
                self._drop(old_addr, old, "the peer's session was dropped (max_peers)")
                break
        return True

    def _drop(self, address: tuple, link: _Link, why: str) -> None:
        """UDP: forget a peer's session."""
        self.links.pop(address, None)
        self.pending.pop(address, None)
        self._emit(address, None, link.session.reassembler.close(why))

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            self._server.close()
            for link in list(self.links.values()):
                if link.transport is not None:
                    link.transport.close()
            await self._server.wait_closed()
        if self._udp is not None:
            self._udp.close()
        self.events.put_nowait(None)

    async def __aenter__(self) -> "Server":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class _Bucket:
    """A token bucket: take() is true at most `rate` times a second on average (bursts of `rate`)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = _now()

    def take(self, now: float) -> bool:
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _malformed(data) -> FrameRejected | None:
    """Stateless: the decoder's report on a datagram that fails the header check."""
    try:
        _codec.decode(bytes(data))
    except DecodeError as exc:
        return FrameRejected("malformed", str(exc), exc)
    return None


class _ServerTcpLink(_TcpLink):
    def __init__(self, server: Server) -> None:
        super().__init__(server._session())
        self.server = server
        self.peer: tuple = ()
        self.last = self.born = self.progress = _now()
        self.pending = True
        self.frames_seen = 0
        self.suspect = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        srv = self.server
        self.peer = transport.get_extra_info("peername")
        if len(srv.pending) >= srv.max_pending:  # the oldest connection that has not proven itself goes
            old_addr, old = srv.pending.popitem(last=False)
            srv.evicted_pending += 1
            if old.transport is not None:
                old.transport.abort()
        srv.links[self.peer] = self
        srv.pending[self.peer] = self

    def get_buffer(self, sizehint: int) -> memoryview:
        buf = self.session.get_buffer(sizehint)
        limit = _SUSPECT_READ if self.pending or self.suspect else len(buf)  # a peer not yet proven, or that
        srv = self.server                                                     # sent malformed records: small reads
        if srv._queued:  # no more than this peer's share of the queue can come of one read (a record is >= 37 bytes)
            room = srv._share() - srv._queued.get(self.peer, 0)
            limit = min(limit, max(_MIN_READ, room * _MIN_RECORD))
        return buf if limit >= len(buf) else buf[:limit]

    def deliver(self, events: list) -> None:
        srv = self.server
        srv._emit(self.peer, self.session, events)
        if self.pending and self._proven() and not srv._promote(self.peer, self):
            self.transport.close()  # max_peers established already
            return
        if self.session._out:
            self.flush()

    def _proven(self) -> bool:
        """Established, or (on a lenient server) sent a valid frame."""
        s = self.session
        if s.state is State.ESTABLISHED:
            return True
        if self.server.strict:
            return False
        st = s.stats
        return st["frames_in"] > st["malformed"] + st["not_encrypted"] + st["space_mismatch"]

    def buffer_updated(self, nbytes: int) -> None:
        self.last = _now()
        super().buffer_updated(nbytes)
        srv = self.server
        malformed = self.session.stats["malformed"]
        if malformed:
            self.suspect = True
            if malformed >= srv.max_malformed and not self.transport.is_closing():
                self.transport.close()
                return
        if srv._queued and srv._over(self.peer) and not self.transport.is_closing():
            self.transport.pause_reading()
            srv._paused[self.peer] = self

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        srv = self.server
        # Unfinished streams fail (and their memory is released).
        srv._emit(self.peer, None, self.session.reassembler.close("the connection closed"))
        if srv.links.get(self.peer) is self:
            del srv.links[self.peer]
        if srv.pending.get(self.peer) is self:
            del srv.pending[self.peer]
        srv._paused.pop(self.peer, None)


class _UdpServerProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        server._udp_protocol = self

    def connection_made(self, transport) -> None:
        self.transport = transport
        _udp_read_size(transport)
        try:
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UDP_RCVBUF)
        except (OSError, AttributeError):
            pass

    def datagram_received(self, data: bytes, addr) -> None:
        srv = self.server
        link = srv.links.get(addr)
        if link is None or link.pending:
            self._unvalidated(data, addr, link)
            return
        if srv._queued and srv._over(addr):  # the application is not keeping up with this peer: UDP drops
            srv.dropped_datagrams += 1
            return
        srv.links.move_to_end(addr)
        session = link.session
        srv._emit(addr, session, session.receive_datagram(data, _now()))
        if session._out:  # replies (capability, error; the handler's answers) the datagram caused
            for d in session.datagrams_to_send():
                self.transport.sendto(d, addr)

    def _credit(self, addr, received: int) -> list:
        """The byte counts of an unvalidated source ([received, answered, last refusal])."""
        table = self.server._unvalidated
        entry = table.get(addr)
        if entry is None:
            entry = table[addr] = [0, 0, float("-inf")]
            if len(table) > _UNVALIDATED_TABLE:
                table.popitem(last=False)
        else:
            table.move_to_end(addr)
        entry[0] += received
        return entry

    def _unvalidated(self, data: bytes, addr, link: _Link | None) -> None:
        """A datagram from a source without an established session: checked cheaply first; a
        session is made only for what may be a frame (on a strict server, only for a Sync, which a
        ping is); answers are limited to _AMPLIFICATION times what the source sent."""
        srv = self.server
        now = _now()
        if len(data) < MIN_FRAME_BYTES or (data[0] != VERSION and data[0] != VERSION_TRANSFORMED) \
                or data[1] > _MSG_TYPE_MAX:
            if link is not None:  # a known (lenient) source: its session reports it
                self._feed(data, addr, link, now)
                return
            srv.garbage_datagrams += 1
            if srv._reports.take(now):
                rejected = _malformed(data)
                if rejected is not None:
                    srv._emit(addr, None, [rejected])
            return
        if link is None:
            if srv.strict and data[1] != _SYNC_TYPE:  # data before the handshake: refuse without a session
                self._refuse(data, addr, now)
                return
            if srv._queued and srv._over(addr):
                srv.dropped_datagrams += 1
                return
            if len(srv.pending) >= srv.max_pending:  # the least recently heard unproven source goes
                old_addr, old = srv.pending.popitem(last=False)
                srv.evicted_pending += 1
                srv._drop(old_addr, old, "the peer's session was dropped (max_pending)")
            link = _Link(srv._session())
            link.pending = True
            srv.links[addr] = link
            srv.pending[addr] = link
        else:
            if srv._queued and srv._over(addr):
                srv.dropped_datagrams += 1
                return
            srv.links.move_to_end(addr)
            srv.pending.move_to_end(addr)
        self._feed(data, addr, link, now)

    def _feed(self, data: bytes, addr, link: _Link, now: float) -> None:
        srv = self.server
        entry = self._credit(addr, len(data))
        session = link.session
        srv._emit(addr, session, session.receive_datagram(data, now))
        held = self._send(link, addr, entry)
        if session.state is State.ESTABLISHED and not held and link.pending:
            srv._promote(addr, link)
            srv._unvalidated.pop(addr, None)

    def _send(self, link: _Link, addr, entry: list | None = None) -> int:
        """Send what the session queued; for an unvalidated source, within the amplification
        limit (the rest is dropped). Returns the bytes held back."""
        if not link.session._out:
            return 0
        datagrams = link.session.datagrams_to_send()
        if not link.pending:
            for d in datagrams:
                self.transport.sendto(d, addr)
            return 0
        if entry is None:
            entry = self._credit(addr, 0)
        held = 0
        for d in datagrams:
            if entry[1] + len(d) <= _AMPLIFICATION * entry[0]:
                entry[1] += len(d)
                self.transport.sendto(d, addr)
            else:
                held += len(d)
        self.server.unanswered_bytes += held
        return held

    def _refuse(self, data: bytes, addr, now: float) -> None:
        """Strict server, a data frame from a source without a session (say, one whose session was
        dropped): HANDSHAKE_REQUIRED, from a session made for this answer and forgotten, at most one
        per source per _REFUSAL_INTERVAL and _REFUSALS_PER_S in all, within the amplification limit."""
        srv = self.server
        srv.refused_datagrams += 1
        entry = self._credit(addr, len(data))
        if now - entry[2] < _REFUSAL_INTERVAL or not srv._refusals.take(now):
            return
        entry[2] = now
        link = _Link(srv._session())
        link.pending = True
        srv._emit(addr, None, link.session.receive_datagram(data, now))
        self._send(link, addr, entry)

    def error_received(self, exc) -> None:
        pass


def serve(url: str, *, config: SessionConfig | None = None, max_peers: int = 1024, max_memory: int = 4 << 30,
          idle_timeout: float = 300.0, handler: Callable[[tuple, Any], Frame | None] | None = None,
          max_pending: int | None = None, handshake_timeout: float = _HANDSHAKE_TIMEOUT,
          record_timeout: float = _RECORD_TIMEOUT, max_malformed: int = _MAX_MALFORMED,
          max_peer_memory: int | None = None, **kwargs: Any) -> _Opening:
    """Listen on tcp://host:port or udp://host:port (port 0 picks one; see server.address).

    Keyword arguments are SessionConfig fields. Every peer gets its own Session; at most
    max_peers established at once (TCP: further connections are closed once they complete the
    handshake; UDP: the least recently heard established peer's session is dropped). Peers that
    have not completed the handshake are held apart, at most max_pending (default max_peers // 8,
    at least 16; on a lenient UDP server, where clients may send without the handshake,
    max_peers): a new one evicts the oldest of them, never an established peer. Stream buffers
    of all peers together stay within max_memory bytes (a shared MemoryBudget; each peer also has
    its StreamLimits), completed streams included until the application takes their
    StreamComplete. One peer may hold at most max_peer_memory of it (default max_memory // 4:
    a single peer, authenticated or not, cannot reserve the whole budget with one HEAD, and one
    client may still stream a quarter of it; the peer's StreamLimits max_stream_bytes,
    max_buffered_bytes and max_early_bytes are lowered to it), a peer that has not completed the
    handshake (lenient UDP: has not handshaken at all) a quarter of that; a TCP peer whose queued
    completed streams hold more than max_peer_memory is paused (UDP: its datagrams dropped). A
    TCP peer silent for idle_timeout seconds is disconnected.

    TCP deadlines: a connection that has not completed the handshake within handshake_timeout
    seconds (on a lenient server: has not sent one valid frame) is closed, and so is one whose
    started record does not complete within record_timeout seconds (slowloris), or that sent
    max_malformed malformed records. While the server itself has paused a peer (its backlog), the
    record and idle deadlines do not run; they start again when it is resumed.

    UDP, for sources without an established session: datagrams that cannot be a frame (too
    short, unknown version or message type) are dropped before any session is made (at most
    100 a second are reported as FrameRejected events); a strict server makes a session only for
    a Sync (a ping) and refuses other frames with HANDSHAKE_REQUIRED (at most once a second per
    source); and no source is answered with more than 3 times the bytes it sent until it is
    established (QUIC's anti-amplification rule: a client whose ping is smaller than a third of
    the capability is answered when its retries have made up the difference).

    The application's queue is shared fairly: a peer whose own backlog of events is over its
    share of 4096 is paused (TCP; resumed as the application takes its events) or its datagrams
    dropped (UDP).

    handler(peer_address, event), if given, is called for every event as the bytes that caused it
    are read, instead of queueing the event for `async for`; a message it returns is sent back to
    that peer at once. It must not block: this saves the task switch per message that iteration
    costs, for servers that answer each message straight away. An exception it raises goes to
    the event loop's exception handler, and the server goes on."""
    return _Opening(_serve(url, config, max_peers, max_memory, idle_timeout, handler, kwargs,
                           max_pending, handshake_timeout, record_timeout, max_malformed, max_peer_memory))


async def _serve(url: str, config, max_peers: int, max_memory: int, idle_timeout: float, handler, kwargs: dict,
                 max_pending: int | None = None, handshake_timeout: float = _HANDSHAKE_TIMEOUT,
                 record_timeout: float = _RECORD_TIMEOUT, max_malformed: int = _MAX_MALFORMED,
                 max_peer_memory: int | None = None) -> Server:
    scheme, host, port = parse_url(url)
    server = Server(scheme, _config(Role.SERVER, scheme, config, kwargs), max_peers, max_pending)
    server.handler = handler
    server.budget = MemoryBudget(max_memory)
    server._limits(max_memory, max_peer_memory)
    server.idle_timeout = idle_timeout
    server.handshake_timeout = handshake_timeout
    server.record_timeout = record_timeout
    server.max_malformed = max_malformed
    loop = asyncio.get_running_loop()
    if scheme == "tcp":
        server._server = await loop.create_server(lambda: _ServerTcpLink(server), host, port)
        server.address = server._server.sockets[0].getsockname()[:2]
    else:
        transport, _ = await loop.create_datagram_endpoint(lambda: _UdpServerProtocol(server), local_addr=(host, port))
        server._udp = transport
        server.address = transport.get_extra_info("sockname")[:2]

    async def ticker() -> None:
        every = max(1, round(_TICK / _FAST_TICK))
        n = 0
        while True:
            await asyncio.sleep(_FAST_TICK)  # (sessions with feedback under way: every time; the others every _TICK)
            n += 1
            now = _now()
            for addr, link in list(server.links.items()):
                if n % every and not link.session.feedback_busy:
                    continue
                server._emit(addr, link.session, link.session.tick(now))
                if server._udp is not None:
                    server._udp_protocol._send(link, addr)
                    continue
                link.flush()
                t = link.transport
                if t is None or t.is_closing():
                    continue
                if addr in server._paused:  # paused by us: not late (idle and record deadlines restart at resume)
                    if link.pending and now - link.born > server.handshake_timeout:
                        server.timed_out += 1
                        t.abort()  # the handshake deadline still holds
                    continue
                frames = link.session.stats["frames_in"]
                partial = link.session.records.pending
                if frames != link.frames_seen:
                    link.frames_seen = frames
                    link.progress = now
                elif not partial:
                    link.progress = now  # no record started: nothing is late
                if now - link.last > server.idle_timeout:
                    t.close()  # a silent peer (or one stuck mid-record) frees its buffer
                elif link.pending and now - link.born > server.handshake_timeout:
                    server.timed_out += 1
                    t.abort()  # no handshake (or valid frame) in time
                elif partial and now - link.progress > server.record_timeout:
                    server.timed_out += 1
                    t.abort()  # a record trickling in (slowloris)

    server._ticker = asyncio.ensure_future(ticker())
    return server
