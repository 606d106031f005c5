"""A deterministic UDP impairment relay: loss (random or in bursts), duplication, reordering,
delay, jitter and a bottleneck with a drop-tail queue, for testing and benchmarking transports
over impaired networks on a machine without netem.

Three layers:

- `Impairment`: what a direction of the path does to datagrams (a frozen, validated dataclass).
- `ImpairmentModel`: the sans-IO decision maker for one direction. `admit(nbytes, now)` returns
  the times at which the datagram is delivered: `[]` = dropped, one time = delivered once, two
  times = duplicated. Time is passed in, never read; the random numbers come from its own
  generator seeded from `Impairment.seed` and the direction's name, and every datagram draws the
  same number of them whatever happens to it, so the same seed and the same sequence of datagrams
  give the same losses, duplicates and reorderings (with a `rate`, queue drops depend on the
  times passed in as well, which is the point of a queue).
- `Relay`: a real UDP relay in its own process (it never competes for the caller's GIL) that
  listens on 127.0.0.1 and forwards each client's datagrams to one target address, from a socket
  of its own per client (as a NAT does, so several clients can share a relay), and the target's
  answers back to that client; each direction goes through its own `ImpairmentModel` (shared by
  all clients, as a link is). A delayed datagram leaves within about a millisecond of its due
  time (poll()'s timeout is in milliseconds; the process may also wait for a core); the model's
  decisions do not depend on that.

    with Relay.start(("127.0.0.1", 7000), forward=Impairment(loss=0.05, seed=1)) as relay:
        client.sendto(data, relay.address)   # reaches 127.0.0.1:7000 with 5% loss
        print(relay.stats())

From the command line (runs in the foreground until interrupted, printing its address first):

    python -m resonant.relay --listen 127.0.0.1:0 --to 127.0.0.1:7000 --loss 0.05 --burst 1 \\
        --dup 0 --reorder 0 --delay 0 --seed 1 [--rate BYTES/S]
"""

from __future__ import annotations

import argparse
import heapq
import math
import json
import os
import random
import select
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Impairment", "ImpairmentModel", "ImpairmentStats", "Relay", "RELAY_MAX_CLIENTS",
           "RELAY_MAX_PENDING_BYTES", "RELAY_SOCKET_BUFFER"]

RELAY_SOCKET_BUFFER = 8 * 1024 * 1024
"""SO_RCVBUF / SO_SNDBUF the relay asks for on each of its sockets (SO_*BUFFORCE first, which
root may use past net.core.rmem_max; the kernel doubles what it grants)."""

RELAY_MAX_CLIENTS = 1024
"""Client addresses the relay keeps a forwarding socket for; datagrams from further new
addresses are dropped (counted as `clients_refused`). Sockets are never expired: a relay lives
for one test or bench run."""

RELAY_MAX_PENDING_BYTES = 256 * 1024 * 1024
"""Bytes of delayed datagrams (delay, jitter, reordering, a bottleneck's queue) the relay holds at
once; a datagram that would go past it is dropped (counted as `pending_drops`)."""

RELAY_MAX_DATAGRAM = 65535
"""Read buffer per datagram: the largest UDP payload there is."""

_RECV_BATCH = 512  # datagrams read from one socket before the loop looks at the others
_SO_RCVBUFFORCE, _SO_SNDBUFFORCE = 33, 32  # Linux values; the socket module does not export them


@dataclass(frozen=True)
class Impairment:
    """What one direction of the path does to datagrams. The defaults are a perfect path.

    loss:          long-run probability that a datagram is lost, 0..1.
    burst:         mean length of a burst of consecutive losses, >= 1. 1 = each datagram is lost
                   independently with probability `loss`; > 1 = a Gilbert-Elliott two-state
                   chain (the bad state loses every datagram, the good state none) whose bursts
                   last `burst` datagrams on average and whose long-run loss is `loss` (which
                   then must be at most burst / (burst + 1), or 1).
    dup:           probability that a datagram (not lost) is delivered twice.
    reorder:       probability that a datagram (not lost) is held back `reorder_delay` seconds
                   more than the others, so that the ones sent after it overtake it.
    reorder_delay: seconds a reordered datagram is held back (default 2 ms).
    delay:         fixed one-way delay in seconds.
    jitter:        extra delay drawn uniformly from 0..jitter seconds per datagram (datagrams
                   can overtake each other by up to that much).
    rate:          bottleneck rate in bytes/s, or None for none. Datagrams are serialized at
                   this rate through a drop-tail queue of `queue_bytes`: a datagram that finds
                   the queue full is dropped (congestion), the others wait their turn.
    queue_bytes:   the bottleneck queue's size in bytes (default 256 KiB); used only with `rate`.
    seed:          seed of the random decisions (each direction derives its own generator).

    Order of the steps per datagram: loss, duplication, the bottleneck queue (the duplicate
    travels with its original, not through the queue), then delay, jitter and reordering.
    """

    loss: float = 0.0
    burst: float = 1.0
    dup: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.002
    delay: float = 0.0
    jitter: float = 0.0
    rate: float | None = None
    queue_bytes: int = 256 * 1024
    seed: int = 0

    def __post_init__(self) -> None:
        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Impairment.{name} must be a finite number, got {value!r}")
            return float(value)

        for name in ("loss", "dup", "reorder"):
            if not 0.0 <= number(name) <= 1.0:
                raise ValueError(f"Impairment.{name} is a probability: it must be within 0..1, got {getattr(self, name)!r}")
        if number("burst") < 1.0:
            raise ValueError(f"Impairment.burst is a mean burst length in datagrams: it must be >= 1, got {self.burst!r}")
        if self.burst > 1.0 and self.loss < 1.0 and self.loss > self.burst / (self.burst + 1.0):
            raise ValueError(f"Impairment.loss={self.loss!r} is too high for bursts of {self.burst!r} datagrams "
                             f"(a burst is followed by at least one delivered datagram): at most "
                             f"{self.burst / (self.burst + 1.0):.4f}, or 1")
        for name in ("reorder_delay", "delay", "jitter"):
            if number(name) < 0.0:
                raise ValueError(f"Impairment.{name} is in seconds: it must be >= 0, got {getattr(self, name)!r}")
        if self.rate is not None and not number("rate") > 0.0:
            raise ValueError(f"Impairment.rate is in bytes/s: it must be > 0 (or None for no bottleneck), got {self.rate!r}")
        if isinstance(self.queue_bytes, bool) or not isinstance(self.queue_bytes, int) or self.queue_bytes <= 0:
            raise ValueError(f"Impairment.queue_bytes must be a positive int, got {self.queue_bytes!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"Impairment.seed must be an int, got {self.seed!r}")

    @property
    def is_perfect(self) -> bool:
        """True if this path neither drops, duplicates, delays nor reorders anything."""
        return (self.loss == 0.0 and self.dup == 0.0 and self.reorder == 0.0 and self.delay == 0.0
                and self.jitter == 0.0 and self.rate is None)


@dataclass
class ImpairmentStats:
    """Counters of one `ImpairmentModel`."""

    datagrams_in: int = 0       # datagrams admitted
    bytes_in: int = 0
    dropped: int = 0            # lost by `loss`
    queue_drops: int = 0        # dropped by the bottleneck's full queue
    duplicated: int = 0         # delivered twice
    reordered: int = 0          # held back by reorder_delay
    delivered: int = 0          # deliveries (a duplicated datagram counts twice)
    bytes_delivered: int = 0
    loss_bursts: int = 0        # runs of consecutive `loss` drops (queue drops not counted)


class ImpairmentModel:
    """The sans-IO decisions for one direction of a path.

    `admit(nbytes, now)` is called once per datagram, in the order they arrive, with the current
    time in seconds (any monotonic clock); it returns the delivery times (`[]` = dropped; two
    entries = duplicated). `direction` names the direction ("forward", "backward", ...): the
    random generator is seeded from (impairment.seed, direction), so the two directions of a
    relay with one seed make independent decisions.
    """

    def __init__(self, impairment: Impairment, direction: str = "forward") -> None:
        if not isinstance(impairment, Impairment):
            raise TypeError(f"ImpairmentModel needs an Impairment, got {type(impairment).__name__}")
        self.impairment = impairment
        self.direction = direction
        self.stats = ImpairmentStats()
        self._rng = random.Random(f"resonant.relay:{impairment.seed}:{direction}")
        imp = impairment
        if imp.burst > 1.0 and 0.0 < imp.loss < 1.0:
            self._bad_to_good = 1.0 / imp.burst
            self._good_to_bad = imp.loss * self._bad_to_good / (1.0 - imp.loss)
        else:
            self._bad_to_good = self._good_to_bad = None  # independent losses
        self._bad = False
        self._last_lost = False
        self._busy_until = -math.inf  # when the bottleneck finishes sending what it has queued

    def admit(self, nbytes: int, now: float) -> list[float]:
        """Decide the fate of a datagram of `nbytes` bytes arriving at time `now` (seconds)."""
        imp = self.impairment
        st = self.stats
        st.datagrams_in += 1
        st.bytes_in += nbytes
        rnd = self._rng.random
        # always the same five draws per datagram: the decisions for datagram i depend only on
        # the seed and i, whatever happened to the datagrams before it
        u_loss, u_dup, u_reorder, u_jitter, u_jitter2 = rnd(), rnd(), rnd(), rnd(), rnd()
        if self._good_to_bad is None:
            lost = u_loss < imp.loss
        else:
            self._bad = (u_loss >= self._bad_to_good) if self._bad else (u_loss < self._good_to_bad)
            lost = self._bad
        if lost:
            st.dropped += 1
            if not self._last_lost:
                st.loss_bursts += 1
            self._last_lost = True
            return []
        self._last_lost = False
        depart = now
        if imp.rate is not None:
            start = self._busy_until if self._busy_until > now else now
            if (start - now) * imp.rate + nbytes > imp.queue_bytes:
                st.queue_drops += 1
                return []
            self._busy_until = depart = start + nbytes / imp.rate
        due = depart + imp.delay + u_jitter * imp.jitter
        if u_reorder < imp.reorder:
            st.reordered += 1
            due += imp.reorder_delay
        times = [due]
        if u_dup < imp.dup:
            st.duplicated += 1
            times.append(depart + imp.delay + u_jitter2 * imp.jitter)
        st.delivered += len(times)
        st.bytes_delivered += nbytes * len(times)
        return times


def _big_buffers(sock: socket.socket) -> None:
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, RELAY_SOCKET_BUFFER)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, RELAY_SOCKET_BUFFER)
            except OSError:
                pass


def _parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


@dataclass
class _Client:
    addr: tuple
    sock: socket.socket
    datagrams_out: int = 0
    datagrams_back: int = 0


@dataclass
class _Loop:
    """The relay's event loop (blocking sockets, poll(), a heap of delayed datagrams); runs in the
    relay process, or in the foreground for the CLI."""

    listen: tuple[str, int]
    target: tuple[str, int]
    forward: Impairment
    backward: Impairment
    counters: dict = field(default_factory=lambda: dict(clients_refused=0, target_unreachable=0, send_errors=0,
                                                        pending_drops=0))

    def __post_init__(self) -> None:
        self.fwd = ImpairmentModel(self.forward, "forward")
        self.bwd = ImpairmentModel(self.backward, "backward")
        family = socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        _big_buffers(self.sock)
        self.sock.bind(self.listen)
        self.address = self.sock.getsockname()[:2]
        self.clients: dict[tuple, _Client] = {}
        self.by_fd: dict[int, _Client] = {}
        self.heap: list = []
        self._seq = 0
        self._pending_bytes = 0
        self._cpu0 = time.process_time()
        self.poller = select.poll()
        self.poller.register(self.sock.fileno(), select.POLLIN)

    def stats(self) -> dict[str, Any]:
        return {"address": self.address, "target": self.target, "clients": len(self.clients),
                "pending": len(self.heap), "pending_bytes": self._pending_bytes,
                "forward": asdict(self.fwd.stats),
                "backward": asdict(self.bwd.stats), **self.counters,
                "cpu_seconds": round(time.process_time() - self._cpu0, 6),
                "rcvbuf": self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)}

    def _client(self, addr: tuple) -> _Client | None:
        client = self.clients.get(addr)
        if client is None:
            if len(self.clients) >= RELAY_MAX_CLIENTS:
                self.counters["clients_refused"] += 1
                return None
            up = socket.socket(socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET, socket.SOCK_DGRAM)
            _big_buffers(up)
            up.connect(self.target)  # answers come from the target only; the kernel filters the rest
            client = self.clients[addr] = self.by_fd[up.fileno()] = _Client(addr, up)
            self.poller.register(up.fileno(), select.POLLIN)
        return client

    def _send(self, sock: socket.socket, data: bytes, addr: tuple | None) -> None:
        try:
            if addr is None:
                sock.send(data)
            else:
                sock.sendto(data, addr)
        except OSError:  # ECONNREFUSED from an earlier datagram, ENOBUFS, ...: the datagram is lost
            self.counters["send_errors"] += 1

    def _route(self, times: list[float], now: float, sock: socket.socket, data: bytes, addr: tuple | None) -> None:
        for due in times:
            if due <= now:
                self._send(sock, data, addr)
            elif self._pending_bytes + len(data) > RELAY_MAX_PENDING_BYTES:
                self.counters["pending_drops"] += 1
            else:
                self._seq += 1
                self._pending_bytes += len(data)
                heapq.heappush(self.heap, (due, self._seq, sock, data, addr))

    def _drain_listen(self, now: float) -> None:
        recvfrom, admit = self.sock.recvfrom, self.fwd.admit
        perfect, st = self.forward.is_perfect, self.fwd.stats
        for _ in range(_RECV_BATCH):
            try:
                data, addr = recvfrom(RELAY_MAX_DATAGRAM, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            client = self._client(addr)
            if client is None:
                continue
            client.datagrams_out += 1
            if perfect:  # nothing to decide: count and pass it on
                st.datagrams_in += 1
                st.delivered += 1
                st.bytes_in += len(data)
                st.bytes_delivered += len(data)
                try:
                    client.sock.send(data)
                except OSError:
                    self.counters["send_errors"] += 1
                continue
            times = admit(len(data), now)
            if times:
                self._route(times, now, client.sock, data, None)

    def _drain_upstream(self, client: _Client, now: float) -> None:
        recv, admit, sendto = client.sock.recv, self.bwd.admit, self.sock.sendto
        perfect, st = self.backward.is_perfect, self.bwd.stats
        for _ in range(_RECV_BATCH):
            try:
                data = recv(RELAY_MAX_DATAGRAM, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:  # ICMP port unreachable: nobody listens at the target (yet)
                self.counters["target_unreachable"] += 1
                continue
            except OSError:
                continue
            client.datagrams_back += 1
            if perfect:
                st.datagrams_in += 1
                st.delivered += 1
                st.bytes_in += len(data)
                st.bytes_delivered += len(data)
                try:
                    sendto(data, client.addr)
                except OSError:
                    self.counters["send_errors"] += 1
                continue
            times = admit(len(data), now)
            if times:
                self._route(times, now, self.sock, data, client.addr)

    def _flush(self, now: float) -> None:
        heap = self.heap
        while heap and heap[0][0] <= now:
            _, _, sock, data, addr = heapq.heappop(heap)
            self._pending_bytes -= len(data)
            self._send(sock, data, addr)

    def run(self, control=None) -> None:
        """Relay until `control` (a _LineControl) says "stop" or closes; without one, until
        KeyboardInterrupt. Every request is answered with the stats."""
        ctrl_fd = -1
        if control is not None:
            ctrl_fd = control.fileno()
            self.poller.register(ctrl_fd, select.POLLIN)
        listen_fd = self.sock.fileno()
        poll, monotonic = self.poller.poll, time.monotonic
        try:
            while True:
                if self.heap:
                    wait = self.heap[0][0] - monotonic()
                    timeout = max(0, math.ceil(wait * 1000.0)) if wait > 0 else 0
                else:
                    timeout = None
                events = poll(timeout)
                now = monotonic()
                for fd, _ in events:
                    if fd == listen_fd:
                        self._drain_listen(now)
                    elif fd == ctrl_fd:
                        try:
                            messages = [control.recv()]
                            while control.pending():
                                messages.append(control.recv())
                        except (EOFError, OSError, ValueError):
                            return  # the parent is gone
                        for message in messages:
                            control.send(self.stats())
                            if message == "stop":
                                return
                    else:
                        client = self.by_fd.get(fd)
                        if client is not None:
                            self._drain_upstream(client, now)
                if self.heap:
                    self._flush(monotonic())
        finally:
            for client in self.clients.values():
                client.sock.close()
            self.sock.close()


class _LineControl:
    """The relay process's end of its control channel: JSON lines on stdin (requests: "stats",
    "stop") and stdout (answers). End of stdin (the parent is gone) stops the relay."""

    def __init__(self) -> None:
        self._buf = b""

    def fileno(self) -> int:
        return sys.stdin.fileno()

    def recv(self) -> str:
        while b"\n" not in self._buf:
            chunk = os.read(self.fileno(), 4096)
            if not chunk:
                raise EOFError
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def pending(self) -> bool:
        return b"\n" in self._buf

    def send(self, obj: Any) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def _serve_control(spec: str) -> int:
    """The relay process (`python -m resonant.relay --control SPEC`, started by Relay.start)."""
    control = _LineControl()
    try:
        conf = json.loads(spec)
        loop = _Loop(tuple(conf["listen"]), tuple(conf["target"]), Impairment(**conf["forward"]),
                     Impairment(**conf["backward"]))
    except Exception as exc:  # noqa: BLE001  (reported to the parent as one line)
        control.send({"error": f"{type(exc).__name__}: {exc}"})
        return 2
    control.send({"address": list(loop.address)})
    loop.run(control)
    return 0


class Relay:
    """A UDP impairment relay running in a process of its own; see `Relay.start`."""

    def __init__(self, process: subprocess.Popen, address: tuple[str, int], target: tuple[str, int]) -> None:
        self._process: subprocess.Popen | None = process
        self.address = address
        """(host, port) the relay listens on: send here instead of to the target."""
        self.target = target
        self.final_stats: dict[str, Any] | None = None

    @classmethod
    def start(cls, target: tuple[str, int], forward: Impairment | None = None,
              backward: Impairment | None = None, *, listen: tuple[str, int] = ("127.0.0.1", 0),
              timeout: float = 10.0) -> Relay:
        """Start a relay process and return once it listens.

        target:   (host, port) every client's datagrams are forwarded to.
        forward:  the Impairment of client -> target (default: a perfect path).
        backward: the Impairment of target -> client (default: the same as `forward`; each
                  direction still has its own model, random generator and bottleneck).
        listen:   (host, port) to listen on; port 0 picks a free one (see `.address`).
        timeout:  seconds to wait for the process to be up.

        The process is `python -m resonant.relay --control ...` with this resonant first on its
        path (a subprocess, not multiprocessing: nothing of the caller's main module is re-run).
        """
        forward = Impairment() if forward is None else forward
        backward = forward if backward is None else backward
        for name, value in (("forward", forward), ("backward", backward)):
            if not isinstance(value, Impairment):
                raise TypeError(f"Relay.start: {name} must be an Impairment, got {type(value).__name__}")
        target = (str(target[0]), int(target[1]))
        spec = json.dumps({"listen": list(listen), "target": list(target), "forward": asdict(forward),
                           "backward": asdict(backward)})
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        process = subprocess.Popen([sys.executable, "-m", "resonant.relay", "--control", spec], env=env,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        ready, _, _ = select.select([process.stdout], [], [], timeout)
        line = process.stdout.readline() if ready else b""
        answer = json.loads(line) if line.strip() else {"error": f"no answer within {timeout} s"}
        if "address" not in answer:
            process.kill()
            process.wait(5)
            raise RuntimeError(f"the relay could not start: {answer.get('error')}")
        return cls(process, tuple(answer["address"]), target)

    def _ask(self, request: str, timeout: float) -> dict[str, Any]:
        assert self._process is not None
        self._process.stdin.write(request.encode() + b"\n")
        self._process.stdin.flush()
        ready, _, _ = select.select([self._process.stdout], [], [], timeout)
        line = self._process.stdout.readline() if ready else b""
        if not line:
            raise RuntimeError(f"the relay did not answer {request!r} within {timeout} s")
        return json.loads(line)

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """The relay's counters: per direction (`forward`, `backward`) the model's ImpairmentStats
        as a dict, plus clients, pending / pending_bytes (delayed datagrams not yet sent),
        pending_drops (past RELAY_MAX_PENDING_BYTES), clients_refused (past RELAY_MAX_CLIENTS),
        target_unreachable (ICMP errors from the target), send_errors, cpu_seconds (the relay
        process's CPU time) and rcvbuf (the listening socket's SO_RCVBUF as granted).
        After stop(): the last ones."""
        if self._process is None:
            if self.final_stats is None:
                raise RuntimeError("the relay is stopped")
            return self.final_stats
        return self._ask("\"stats\"", timeout)

    def stop(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """Stop the relay process; returns its last stats (None if it had died)."""
        process = self._process
        if process is None:
            return self.final_stats
        try:
            self.final_stats = self._ask("\"stop\"", timeout)
        except (OSError, RuntimeError, ValueError):
            pass
        self._process = None
        for stream in (process.stdin, process.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)
        return self.final_stats

    def __enter__(self) -> Relay:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Relay({self.address[0]}:{self.address[1]} -> {self.target[0]}:{self.target[1]})"


def main(argv: list[str] | None = None) -> int:
    """`python -m resonant.relay`: run a relay in the foreground until interrupted."""
    p = argparse.ArgumentParser(prog="python -m resonant.relay",
                                description="UDP relay that impairs both directions of a path (loss, bursts, "
                                            "duplication, reordering, delay, jitter, a bottleneck).")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0 = pick one)")
    p.add_argument("--control", help=argparse.SUPPRESS)  # Relay.start's child process
    p.add_argument("--to", help="HOST:PORT of the target every client's datagrams go to")
    p.add_argument("--loss", type=float, default=0.0, help="long-run loss probability, 0..1")
    p.add_argument("--burst", type=float, default=1.0, help="mean loss burst length (1 = independent losses)")
    p.add_argument("--dup", type=float, default=0.0, help="probability a datagram is delivered twice")
    p.add_argument("--reorder", type=float, default=0.0, help="probability a datagram is held back (overtaken)")
    p.add_argument("--reorder-delay", type=float, default=0.002, help="seconds a reordered datagram is held back")
    p.add_argument("--delay", type=float, default=0.0, help="fixed one-way delay, seconds")
    p.add_argument("--jitter", type=float, default=0.0, help="uniform extra delay 0..JITTER seconds")
    p.add_argument("--rate", type=float, default=None, help="bottleneck rate in bytes/s (default: none)")
    p.add_argument("--queue-bytes", type=int, default=256 * 1024, help="bottleneck drop-tail queue, bytes")
    p.add_argument("--seed", type=int, default=0, help="seed of the random decisions")
    p.add_argument("--one-way", action="store_true", help="impair only client -> target (answers pass untouched)")
    args = p.parse_args(argv)
    if args.control is not None:
        return _serve_control(args.control)
    if args.to is None:
        p.error("--to HOST:PORT is required")
    try:
        listen, target = _parse_addr(args.listen), _parse_addr(args.to)
        imp = Impairment(loss=args.loss, burst=args.burst, dup=args.dup, reorder=args.reorder,
                         reorder_delay=args.reorder_delay, delay=args.delay, jitter=args.jitter, rate=args.rate,
                         queue_bytes=args.queue_bytes, seed=args.seed)
        loop = _Loop(listen, target, imp, Impairment() if args.one_way else imp)
    except (ValueError, OSError) as exc:
        print(f"resonant relay: {exc}", file=sys.stderr)
        return 2
    print(f"relay {loop.address[0]}:{loop.address[1]} -> {target[0]}:{target[1]}", flush=True)
    try:
        loop.run()
    except KeyboardInterrupt:
        pass
    # (run() closed the sockets on the way out; the models' counters remain)
    print(f"forward: {asdict(loop.fwd.stats)}\nbackward: {asdict(loop.bwd.stats)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
