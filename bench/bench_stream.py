"""V-Stream throughput, in one process: split + encode + decode + reassemble of one large f16
tensor, against a plain memory copy of the same bytes measured in the same run. The receiver
writes either into a new output buffer per stream (the Reassembler's default: the kernel
zeroes every fresh page first) or into one reused buffer it hands the Reassembler through its
allocate hook, as a server with a KV-cache pool does; both are reported.

    python3 bench/bench_stream.py [--mib 256] [--repeat 3] [--json PATH|-]

Part (b) sends the same stream between two processes over loopback TCP through the TCP
transport's sans-IO Session (each frame a record behind a u32 little-endian length; the
receiver reads straight into the session's buffer and parses frames in place; the sender
writes Session.stream_records(), eight records per sendmsg with each chunk's payload a view of
the tensor), against raw sendall/recv_into of the same tensor bytes in the same run. Both are run under each socket
buffer setting (the kernel's autotuned default, and SO_SNDBUF/SO_RCVBUF set to 4 MiB on both
ends), every sample of every pair interleaved with the others; the ratio compares the best
raw time under any setting with the best V-Stream time under any setting (each side in the
configuration that suits it), and the same-setting ratios and medians are printed beside it.

Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import queue
import socket
import statistics
import struct
import sys
import threading
import time

import numpy as np

import resonant
import resonant.stream  # (set_buffer_cache; `import resonant` alone no longer imports resonant.stream since the layout split)
from bench_codec import best_of, machine, print_machine, write_json  # noqa: E402  (bench/ is sys.path[0] for a script)
from resonant import ConnectionBroken, FrameRejected, Reassembler, StreamComplete, StreamFailed, StreamSender
from resonant.session import MessageReceived, Session

TARGET_GBPS = 3.0
TARGET_TCP_RATIO = 0.8
_LEN = struct.Struct("<I")
_READ = 4 << 20  # bytes per recv_into
TCP_RAW, TCP_STREAM = "raw sendall/recv_into, new buffer", "V-Stream (Session), new output buffer"
TCP_RAW_REUSED, TCP_STREAM_REUSED = "raw sendall/recv_into, reused buffer", "V-Stream (Session), reused output buffer"
TCP_ROWS = {TCP_RAW: ("raw", False), TCP_STREAM: ("stream", False),
            TCP_RAW_REUSED: ("raw", True), TCP_STREAM_REUSED: ("stream", True)}
# Socket buffer settings: 0 leaves the kernel's autotuning; n sets SO_SNDBUF on the sending
# socket and SO_RCVBUF on the listening one (inherited by the accepted socket, before the
# handshake fixes the window scale). Linux doubles the figure and caps it at wmem_max/rmem_max.
SOCKBUFS = {"autotuned": 0, "4 MiB": 4 << 20}
WHERE = {"fresh": "new buffer (block cache off)", "cached": "default (released buffers reused)",
         "caller": "caller's buffer (allocate hook)"}


def _send_all(sock: socket.socket, parts: list) -> None:
    """sendmsg (scatter-gather: the kernel reads each frame where it lies) until all is sent."""
    views = [memoryview(p) for p in parts]
    while views:
        n = sock.sendmsg(views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]


def _serve(listener: socket.socket, mode: str, nbytes: int, reuse: bool) -> None:
    """Receive one stream (or nbytes raw), then answer one byte. reuse: into a buffer that was
    allocated and written before the transfer (a receiver's pool), else into a new one."""
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    resonant.stream.set_buffer_cache(0)  # blocks inherited from the parent would be copy-on-write: new memory only
    slot = None
    if reuse:
        slot = np.empty(nbytes, np.uint8)
        slot[:] = 0
    conn.sendall(b"r")  # ready: the sender starts its clock now
    if mode == "raw":
        buf = np.empty(nbytes, np.uint8) if slot is None else slot
        view, got = memoryview(buf), 0
        while got < nbytes:
            got += conn.recv_into(view[got:], min(_READ, nbytes - got))
    else:
        # The TCP transport's receive path, sans-IO over a blocking socket: the kernel writes
        # straight into the session's record buffer and frames are parsed there in place.
        session = Session(role="server", allocate=None if slot is None else (lambda sid, layout: slot))
        done = False
        while not done:
            n = conn.recv_into(session.get_buffer())
            if n == 0:
                raise ConnectionError("the sender closed the connection before the stream completed")
            for event in session.buffer_updated(n, 0.0):
                if isinstance(event, (ConnectionBroken, StreamFailed, FrameRejected)):
                    raise RuntimeError(f"the stream failed: {event}")
                done = done or isinstance(event, StreamComplete)
    conn.sendall(b"k")
    conn.close()


def _tcp(mode: str, tensor: np.ndarray, reuse: bool = False, sockbuf: int = 0) -> float:
    """Seconds from the first byte sent to the receiver's answer, through loopback TCP.
    sockbuf: SO_SNDBUF of the sender and SO_RCVBUF of the receiver (0: the kernel's autotuning)."""
    listener = socket.socket()
    if sockbuf:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sockbuf)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    server = multiprocessing.get_context("fork").Process(target=_serve, args=(listener, mode, tensor.nbytes, reuse))
    server.start()
    sock = socket.socket()
    if sockbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sockbuf)
    sock.connect(listener.getsockname())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sock.recv(1) != b"r":
        raise ConnectionError("the receiver did not get ready")
    t = time.perf_counter()
    if mode == "raw":
        sock.sendall(memoryview(tensor.view(np.uint8)))
    else:
        session = Session(role="client")  # no handshake: the server accepts data without one by default
        for parts in session.stream_records(1, [tensor]):  # 8 records per sendmsg, payloads not copied
            _send_all(sock, parts)
    if sock.recv(1) != b"k":
        raise ConnectionError("no answer from the receiver")
    elapsed = time.perf_counter() - t
    sock.close()
    server.join(30)
    listener.close()
    if server.exitcode != 0:
        raise RuntimeError(f"the receiving process failed (exit code {server.exitcode})")
    return elapsed


def _aio_serve(pipe, nbytes: int) -> None:
    """resonant.serve() over TCP: receive one stream (into new memory), answer with a Think."""
    async def run() -> None:
        resonant.stream.set_buffer_cache(0)
        async with resonant.serve("tcp://127.0.0.1:0") as server:
            pipe.send(tuple(server.address))
            async for addr, event in server:
                if isinstance(event, (StreamFailed, FrameRejected, ConnectionBroken)):
                    raise RuntimeError(f"the stream failed: {event}")
                if isinstance(event, StreamComplete):
                    if sum(o.nbytes for o in event.objects) != nbytes:
                        raise RuntimeError("the stream carried the wrong number of bytes")
                    await server.reply(addr, resonant.Think(np.zeros((1, 1), np.float16)))
                    return
    asyncio.run(run())


def _aio(tensor: np.ndarray) -> float:
    """Seconds for Peer.send_stream of the tensor through resonant.connect()/serve() (asyncio,
    TCP, after the handshake) until the receiver's answer."""
    here, there = multiprocessing.Pipe()
    server = multiprocessing.get_context("fork").Process(target=_aio_serve, args=(there, tensor.nbytes))
    server.start()
    if not here.poll(30):
        raise RuntimeError("the asyncio receiver did not start")
    host, port = here.recv()

    async def run() -> float:
        async with resonant.connect(f"tcp://{host}:{port}") as peer:
            t = time.perf_counter()
            await peer.send_stream([tensor])
            while True:
                event = await peer.next_event(30)
                if isinstance(event, MessageReceived):
                    return time.perf_counter() - t
    elapsed = asyncio.run(run())
    server.join(30)
    if server.exitcode != 0:
        raise RuntimeError(f"the asyncio receiver failed (exit code {server.exitcode})")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=256, help="tensor size in MiB (default 256)")
    ap.add_argument("--repeat", type=int, default=3, help="samples; the best is kept")
    ap.add_argument("--tcp-repeat", type=int, default=7,
                    help="loopback TCP samples per row and socket-buffer setting (default 7)")
    ap.add_argument("--json", help="write the results as JSON to PATH, or - for stdout")
    args = ap.parse_args(argv)

    tensor = np.random.default_rng(0).standard_normal(args.mib << 19).astype(np.float16)  # MiB * 2^20 / 2
    nbytes = tensor.nbytes

    slot = np.zeros(nbytes, np.uint8)  # a receiver's own reused output buffer (Reassembler's allocate hook)

    def reassembler(where: str) -> Reassembler:
        return Reassembler(allocate=(lambda sid, layout: slot) if where == "caller" else None)

    def stream(where: str = "fresh") -> list:
        r = reassembler(where)
        events = []
        for frame in StreamSender(1, [tensor]):
            events = r.receive(frame, 0.0)
        return events

    def pipelined(where: str = "fresh") -> list:
        """The same, with the sender on a second thread (both cores): batches of 32 frames
        cross a bounded queue; copies, CRCs and hashes run without the GIL."""
        q: queue.Queue = queue.Queue(maxsize=8)

        def produce() -> None:
            batch = []
            for frame in StreamSender(1, [tensor]):
                batch.append(frame)
                if len(batch) == 32:
                    q.put(batch)
                    batch = []
            q.put(batch)
            q.put(None)

        th = threading.Thread(target=produce)
        th.start()
        r = reassembler(where)
        events = []
        while (batch := q.get()) is not None:
            for frame in batch:
                events = r.receive(frame, 0.0)
        th.join()
        return events

    def timed(run, where: str) -> float:
        """Best time of run(where); "fresh": the block cache off, so every stream's buffer is new
        memory; "cached": the default, the previous stream's released buffer is reused."""
        cache = resonant.stream.set_buffer_cache(0 if where == "fresh" else 1 << 30)
        try:
            return best_of(lambda: run(where), args.repeat)
        finally:
            resonant.stream.set_buffer_cache(cache)

    for where in WHERE:  # checked once, outside the timed runs: the hash was verified, and the bytes match
        for run in (stream, pipelined):
            done = run(where)[-1]
            assert isinstance(done, StreamComplete)
            assert done.objects[0].tobytes() == tensor.tobytes()
            del done
            slot[:] = 0

    dst = np.empty_like(tensor)
    dst[:] = 0
    rows = {
        "memcpy (warm destination)": best_of(lambda: np.copyto(dst, tensor), args.repeat),
        "memcpy (fresh destination)": best_of(lambda: np.copyto(np.empty_like(tensor), tensor), args.repeat),
        "crc32 (one pass)": best_of(lambda: resonant.crc32(tensor), args.repeat),
        "xxh3_64 (one pass)": best_of(lambda: resonant._codec.xxh3_64(tensor), args.repeat),
        **{f"V-Stream, {threads}, {WHERE[where]}": timed(run, where)
           for where in WHERE for threads, run in (("one thread", stream), ("two threads", pipelined))},
    }
    runs: dict[tuple[str, str], list[float]] = {(b, k): [] for b in SOCKBUFS for k in TCP_ROWS}
    for i in range(args.tcp_repeat):  # interleaved, so that a noisy spell hits all; order reversed every other pass
        pairs = list(runs)
        for b, key in (pairs if i % 2 == 0 else pairs[::-1]):
            mode, reuse = TCP_ROWS[key]
            runs[(b, key)].append(_tcp(mode, tensor, reuse, SOCKBUFS[b]))
    aio = [_aio(tensor) for _ in range(args.tcp_repeat)]
    best = {bk: min(v) for bk, v in runs.items()}
    median = {bk: statistics.median(v) for bk, v in runs.items()}
    tcp = {k: min(best[(b, k)] for b in SOCKBUFS) for k in TCP_ROWS}  # each row under the setting that suits it
    tcp_median = {k: min(median[(b, k)] for b in SOCKBUFS) for k in TCP_ROWS}
    gbps = {k: nbytes / v / 1e9 for k, v in rows.items()}
    by_where = {w: max(gbps[f"V-Stream, one thread, {label}"], gbps[f"V-Stream, two threads, {label}"])
                for w, label in WHERE.items()}
    out = sys.stderr if args.json == "-" else sys.stdout
    print_machine(machine(), out)
    print(f"\n{args.mib} MiB float16, best of {args.repeat}; crc32 backend {resonant.crc32_backend()}, "
          f"xxh3 backend {resonant._codec.xxh3_backend()}\n", file=out)
    print("| operation | seconds | GB/s |\n|---|--:|--:|", file=out)
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} | {gbps[k]:.2f} |", file=out)
    tcp_gbps = {k: nbytes / v / 1e9 for k, v in tcp.items()}
    print(f"\n| over loopback TCP, {args.tcp_repeat} samples each | socket buffers | best s | median s | best GB/s |"
          "\n|---|---|--:|--:|--:|", file=out)
    for k in TCP_ROWS:
        for b in SOCKBUFS:
            print(f"| {k} | {b} | {best[(b, k)]:.3f} | {median[(b, k)]:.3f} | {nbytes / best[(b, k)] / 1e9:.2f} |",
                  file=out)
    print(f"| V-Stream through resonant.connect/serve (asyncio), new output buffer (information) | autotuned | "
          f"{min(aio):.3f} | {statistics.median(aio):.3f} | {nbytes / min(aio) / 1e9:.2f} |", file=out)
    ratio = tcp[TCP_RAW] / tcp[TCP_STREAM]
    ratio_reused = tcp[TCP_RAW_REUSED] / tcp[TCP_STREAM_REUSED]
    same = {b: (best[(b, TCP_RAW)] / best[(b, TCP_STREAM)], best[(b, TCP_RAW_REUSED)] / best[(b, TCP_STREAM_REUSED)])
            for b in SOCKBUFS}
    ratio_median = (tcp_median[TCP_RAW] / tcp_median[TCP_STREAM],
                    tcp_median[TCP_RAW_REUSED] / tcp_median[TCP_STREAM_REUSED])
    print("\nV-Stream / raw throughput, each side under its best socket-buffer setting: "
          f"best times {ratio:.2f}× (new buffers), {ratio_reused:.2f}× (reused); medians "
          f"{ratio_median[0]:.2f}×, {ratio_median[1]:.2f}×; under the same setting (best times): "
          + "; ".join(f"{b} {r[0]:.2f}×, {r[1]:.2f}×" for b, r in same.items()), file=out)
    ok = by_where["cached"] >= TARGET_GBPS
    tcp_ok = ratio >= TARGET_TCP_RATIO
    tcp_reused_ok = ratio_reused >= TARGET_TCP_RATIO
    for w, label in WHERE.items():
        memcpy = "memcpy (fresh destination)" if w == "fresh" else "memcpy (warm destination)"
        print(f"{chr(10) if w == 'fresh' else ''}- {'PASS' if by_where[w] >= TARGET_GBPS else 'FAIL'} in-process stream, "
              f"{label}: {by_where[w]:.2f} GB/s (target >= {TARGET_GBPS}); {by_where[w] / gbps[memcpy]:.2f}× a {memcpy}",
              file=out)
    print(f"- {'PASS' if tcp_ok else 'FAIL'} loopback TCP, new buffers: V-Stream throughput is {ratio:.2f}× raw "
          f"sendall/recv_into (target >= {TARGET_TCP_RATIO}; best times, each side under its best socket-buffer setting; "
          f"medians {ratio_median[0]:.2f}×)", file=out)
    print(f"- {'PASS' if tcp_reused_ok else 'FAIL'} loopback TCP, reused buffers: {ratio_reused:.2f}× raw "
          f"(target >= {TARGET_TCP_RATIO}; medians {ratio_median[1]:.2f}×)", file=out)
    if args.json:
        doc = {"mib": args.mib, "seconds": rows, "gbps": gbps, "target_gbps": TARGET_GBPS, "pass": ok,
               "gbps_by_buffer": by_where, "crc32_backend": resonant.crc32_backend(),
               "tcp_seconds": tcp, "tcp_gbps": tcp_gbps, "tcp_ratio": ratio, "tcp_ratio_reused": ratio_reused,
               "tcp_samples": {f"{k} | socket buffers {b}": v for (b, k), v in runs.items()},
               "tcp_ratio_median": ratio_median[0], "tcp_ratio_reused_median": ratio_median[1],
               "tcp_ratio_same_setting": {b: {"new": r[0], "reused": r[1]} for b, r in same.items()},
               "aio_seconds": aio, "aio_gbps": nbytes / min(aio) / 1e9,
               "tcp_target": TARGET_TCP_RATIO, "tcp_pass_reused": tcp_reused_ok,
               "tcp_pass": tcp_ok}
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
