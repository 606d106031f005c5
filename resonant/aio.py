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
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import OrderedDict, deque
from dataclasses import replace
from typing import Any, AsyncIterator, Callable, Sequence
from urllib.parse import urlsplit

from resonant._codec import Frame
from resonant._spec import MAX_UDP_FRAME_BYTES
from resonant.errors import HandshakeRefused
from resonant.stream import MemoryBudget
from resonant.session import (
    ConnectionBroken,
    HandshakeComplete,
    HandshakeFailed,
    Role,
    Session,
    SessionConfig,
)

__all__ = ["connect", "serve", "Peer", "Server", "parse_url", "MAX_UDP_FRAME_BYTES"]

_TICK = 0.05                  # seconds between timer ticks
_UDP_RCVBUF = 4 << 20         # ask the kernel for this much receive buffer
_QUEUE_LIMIT = 4096           # events waiting for the application before reading pauses


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


def _expire(w: asyncio.Future) -> None:
    if not w.done():
        w.set_result(_TIMED_OUT)


# ------------------------------------------------------------------ protocols


class _Link:
    """What a Peer needs from a transport: write frames, wait for room, close."""

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

    def deliver(self, events: list) -> None:
        put = self.events.put_nowait
        for e in events:
            put(e)
        if self.session._out:
            self.flush()  # replies (capability, error) the events caused


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

    def error_received(self, exc) -> None:
        self.icmp_error = exc  # e.g. ICMP port unreachable: nobody listens (yet); UDP goes on

    def connection_lost(self, exc) -> None:
        self.closed.set()
        self._can_write.set()
        self.events.put_nowait(_CLOSED)  # wakes whoever waits for an event

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
                return
            if isinstance(event, HandshakeFailed):
                raise HandshakeRefused("handshake", f"{event.code}: {event.message}")

    def _check_open(self) -> None:
        t = self._link.transport
        if self._link.closed.is_set() or t is None or t.is_closing():
            raise ConnectionError(f"the connection to {self.address} is closed")

    async def send(self, frame: Frame) -> None:
        """Send one message (encoded as agreed); ConnectionError once the connection is closed."""
        self._check_open()
        self.session.send(frame, _now())
        self._link.flush()
        await self._link.drain()

    async def send_stream(self, objects: Sequence, *, stream_id: int | None = None,
                          progress: Callable[[int, int], None] | None = None,
                          rate: float | None = None, **kwargs: Any) -> int:
        """Send tensors as a V-Stream (HEAD, chunks, TAIL); returns the stream id.

        progress(sent_bytes, total_bytes) is called as frames go out. rate (bytes/s) paces
        UDP (default 200 MB/s there: without pacing a fast sender overruns the receiver's
        socket buffer, and UDP streams have no loss recovery yet)."""
        self._check_open()
        sid = next(self._stream_ids) if stream_id is None else stream_id
        sender = self.session.stream(sid, objects, **kwargs)
        total = sender.layout.total_bytes
        if rate is None and self.scheme == "udp":
            rate = 200e6
        start = _now()
        sent = 0
        if self.scheme == "tcp":
            # Zero-copy: records whose payloads are views of the objects (joined by writelines
            # before Python 3.12, sent as they are with sendmsg after); once the last is handed
            # over, wait until the transport holds none of them, so the caller may reuse the objects.
            for parts in self.session._records_of(sender, 16):
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
            if progress is not None:
                progress(total, total)
            return sid
        for data in sender:  # UDP: yield after every datagram, so that a receiver in this event loop keeps up
            self._check_open()  # the peer went away mid-stream
            self.session.send_encoded(data)
            sent += len(data)
            self._link.flush()
            await self._link.drain()
            if rate:
                await asyncio.sleep(max(0.0, sent / rate - (_now() - start)))
            if progress is not None:
                progress(min(sent, total), total)
        if progress is not None:
            progress(total, total)
        return sid

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
    while True:
        await asyncio.sleep(_TICK)
        link.deliver(link.session.tick(_now()))


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
            **kwargs: Any) -> _Opening:
    """Connect to tcp://host:port or udp://host:port and (by default) perform the handshake.

    Keyword arguments are SessionConfig fields (key=, expected_space_hash=, space_hash32=,
    compress=, max_frame_bytes=, ...)."""
    return _Opening(_connect(url, config, handshake, timeout, kwargs))


async def _connect(url: str, config, handshake: bool, timeout: float, kwargs: dict) -> Peer:
    scheme, host, port = parse_url(url)
    session = Session(_config(Role.CLIENT, scheme, config, kwargs))
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

    def __init__(self, scheme: str, config: SessionConfig, max_peers: int) -> None:
        self.handler: Callable[[tuple, Any], Frame | None] | None = None
        self.scheme = scheme
        self.config = config
        self.max_peers = max_peers
        self.budget: MemoryBudget | None = None
        self.idle_timeout = 300.0
        self.events = _Inbox()
        self.links: "OrderedDict[tuple, _Link]" = OrderedDict()
        self.address: tuple | None = None
        self._server: asyncio.AbstractServer | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._ticker: asyncio.Task | None = None
        self.rejected_peers = 0
        self.dropped_datagrams = 0

    def _session(self) -> Session:
        return Session(self.config, budget=self.budget)

    def _emit(self, address: tuple, session: Session | None, events: list) -> None:
        """One peer's events: to the handler, whose answers are queued on the peer's session (the
        caller sends them), or else to the application's queue. session None: the peer is gone
        and answers are dropped."""
        handler = self.handler
        if handler is None:
            put = self.events.put_nowait
            for e in events:
                put((address, e))
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

    def __aiter__(self) -> AsyncIterator:
        return self._iter()

    async def _iter(self):
        while True:
            item = await self.events.get()
            if item is None:
                return
            yield item

    async def next_event(self, timeout: float | None = None):
        item = await self.events.get(timeout)
        if item is None:
            raise EOFError("the server is closed")
        return item

    async def reply(self, address: tuple, frame: Frame) -> None:
        """Send a frame back to one peer."""
        link = self.links.get(address)
        if link is None:
            raise KeyError(f"no peer {address}")
        link.session.send(frame, _now())
        if self._udp is not None:
            for d in link.session.datagrams_to_send():
                self._udp.sendto(d, address)
        else:
            link.flush()
            await link.drain()

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


class _ServerTcpLink(_TcpLink):
    def __init__(self, server: Server) -> None:
        super().__init__(server._session())
        self.server = server
        self.peer: tuple = ()
        self.last = _now()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.peer = transport.get_extra_info("peername")
        if len(self.server.links) >= self.server.max_peers:
            self.server.rejected_peers += 1
            transport.close()
            return
        self.server.links[self.peer] = self

    def deliver(self, events: list) -> None:
        self.server._emit(self.peer, self.session, events)
        if self.session._out:
            self.flush()

    def buffer_updated(self, nbytes: int) -> None:
        self.last = _now()
        super().buffer_updated(nbytes)
        if self.server.events.qsize() > _QUEUE_LIMIT:
            self.transport.pause_reading()

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        # Unfinished streams fail (and their memory is released).
        self.server._emit(self.peer, None, self.session.reassembler.close("the connection closed"))
        self.server.links.pop(self.peer, None)


class _UdpServerProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: Server) -> None:
        self.server = server

    def connection_made(self, transport) -> None:
        self.transport = transport
        _udp_read_size(transport)
        try:
            transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _UDP_RCVBUF)
        except (OSError, AttributeError):
            pass

    def datagram_received(self, data: bytes, addr) -> None:
        srv = self.server
        if srv.events.qsize() >= _QUEUE_LIMIT:  # the application is not keeping up: UDP drops
            srv.dropped_datagrams += 1
            return
        link = srv.links.get(addr)
        if link is None:
            if len(srv.links) >= srv.max_peers:  # forget the least recently heard peer
                old_addr, old = srv.links.popitem(last=False)
                srv._emit(old_addr, None, old.session.reassembler.close("the peer's session was dropped (max_peers)"))
            link = _Link(srv._session())
            srv.links[addr] = link
        else:
            srv.links.move_to_end(addr)
        session = link.session
        srv._emit(addr, session, session.receive_datagram(data, _now()))
        if session._out:  # replies (capability, error; the handler's answers) the datagram caused
            for d in session.datagrams_to_send():
                self.transport.sendto(d, addr)

    def error_received(self, exc) -> None:
        pass


def serve(url: str, *, config: SessionConfig | None = None, max_peers: int = 1024, max_memory: int = 4 << 30,
          idle_timeout: float = 300.0, handler: Callable[[tuple, Any], Frame | None] | None = None,
          **kwargs: Any) -> _Opening:
    """Listen on tcp://host:port or udp://host:port (port 0 picks one; see server.address).

    Keyword arguments are SessionConfig fields. Every peer gets its own Session; at most
    max_peers at once (TCP: further connections are closed; UDP: the least recently heard
    peer's session is dropped). Stream buffers of all peers together stay within max_memory
    bytes (a shared MemoryBudget; each peer also has its StreamLimits). A TCP peer silent for
    idle_timeout seconds is disconnected.

    handler(peer_address, event), if given, is called for every event as the bytes that caused it
    are read, instead of queueing the event for `async for`; a message it returns is sent back to
    that peer at once. It must not block: this saves the task switch per message that iteration
    costs, for servers that answer each message straight away. An exception it raises goes to
    the event loop's exception handler, and the server goes on."""
    return _Opening(_serve(url, config, max_peers, max_memory, idle_timeout, handler, kwargs))


async def _serve(url: str, config, max_peers: int, max_memory: int, idle_timeout: float, handler, kwargs: dict) -> Server:
    scheme, host, port = parse_url(url)
    server = Server(scheme, _config(Role.SERVER, scheme, config, kwargs), max_peers)
    server.handler = handler
    server.budget = MemoryBudget(max_memory)
    server.idle_timeout = idle_timeout
    loop = asyncio.get_running_loop()
    if scheme == "tcp":
        server._server = await loop.create_server(lambda: _ServerTcpLink(server), host, port)
        server.address = server._server.sockets[0].getsockname()[:2]
    else:
        transport, _ = await loop.create_datagram_endpoint(lambda: _UdpServerProtocol(server), local_addr=(host, port))
        server._udp = transport
        server.address = transport.get_extra_info("sockname")[:2]

    async def ticker() -> None:
        while True:
            await asyncio.sleep(_TICK)
            now = _now()
            for addr, link in list(server.links.items()):
                server._emit(addr, link.session, link.session.tick(now))
                if server._udp is not None:
                    for d in link.session.datagrams_to_send():
                        server._udp.sendto(d, addr)
                else:
                    link.flush()
                    if now - link.last > server.idle_timeout and link.transport is not None:
                        link.transport.close()  # a silent peer (or one stuck mid-record) frees its buffer

    server._ticker = asyncio.ensure_future(ticker())
    return server

