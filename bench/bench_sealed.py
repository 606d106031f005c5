"""Sealed and compressed V-Streams over loopback TCP, against the plain V-Stream and a raw socket.

    python3 bench/bench_sealed.py [--mib 256] [--repeat 5] [--data minilm|normal] [--threads N] [--json PATH|-]

Each row sends one `--mib` MiB float16 tensor between two processes through the real API:
`resonant.serve("tcp://127.0.0.1:0", ...)` in a child process, `resonant.connect(...)` then
`peer.send_stream([tensor])` in the parent, timed from the call until the receiver's answer (a
one-element Think sent when StreamComplete arrives); the receiver then checks the bytes it got
against the tensor (outside the timing) and the run fails if they differ. The raw row is
sendall/recv_into of the same bytes between the same two kinds of process. Rows:

- raw socket; plain V-Stream (compress "none", no key);
- zstd (both sides compress=("zstd",), level 3), key (a resonant.Key on both sides:
  xchacha20poly1305 with session keys), zstd+key;
- zstd and zstd+key again on random float16 bits (zstd saves nothing there).

Data (--data): "minilm" (the default when the model is installed, see bench/_minilm.py):
real MiniLM-L6 hidden states of all 7 layers for a few hundred generated sentences, as
float16, tiled to the size; "normal": standard-normal values times per-channel scales, as
float16 (zstd level 3 with byte shuffle saves about as much as on the real states).

Samples are interleaved (row order reversed every other pass); best and median per row; ratios
to the plain V-Stream and to the raw socket of the same run. --threads sets RESONANT_THREADS
for both processes (the encode pool's size; 1 = serial); --serial adds the zstd/key rows with one
thread, in the same run. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import socket
import statistics
import sys
import time

import numpy as np

import resonant
from bench_codec import machine, print_machine, write_json  # noqa: E402  (bench/ is sys.path[0] for a script)
from resonant import ConnectionBroken, FrameRejected, StreamComplete, StreamFailed, StreamStarted, parallel
from resonant.session import MessageReceived

_READ = 4 << 20
KEY = resonant.Key(bytes(range(32)))
# row: (data, compress, key, threads: None = RESONANT_THREADS / cpu_count, 1 = serial)
ROWS = {
    "raw socket (sendall/recv_into)": ("real", None, False, None),
    "plain V-Stream": ("real", ("none",), False, None),
    "zstd": ("real", ("zstd",), False, None),
    "key (xchacha20poly1305)": ("real", ("none",), True, None),
    "zstd+key": ("real", ("zstd",), True, None),
    "zstd, random f16 bits": ("random", ("zstd",), False, None),
    "zstd+key, random f16 bits": ("random", ("zstd",), True, None),
}
SERIAL_ROWS = {  # --serial: the same, with one thread on both sides (the serial path)
    "zstd, 1 thread": ("real", ("zstd",), False, 1),
    "key, 1 thread": ("real", ("none",), True, 1),
    "zstd+key, 1 thread": ("real", ("zstd",), True, 1),
}
PLAIN, RAW = "plain V-Stream", "raw socket (sendall/recv_into)"
TARGET = 0.8


def _sentences(n: int) -> list[str]:
    rng = np.random.default_rng(1)
    words = ("the model reads a long document about rivers cities music proteins markets weather code "
             "history physics language travel food sport energy law health art war peace data "
             "quickly slowly carefully never always often under over between after before").split()
    return [" ".join(rng.choice(words, int(rng.integers(6, 30)))).capitalize() + "." for _ in range(n)]


def make_data(kind: str, nbytes: int) -> tuple[np.ndarray, str]:
    """The realistic tensor (float16, nbytes) and a description of it."""
    n = nbytes // 2
    if kind == "minilm":
        import _minilm
        states = _minilm.hidden_states(_sentences(400))
        base = np.concatenate([_minilm.as_f16(s).reshape(-1) for s in states])
        what = f"MiniLM-L6 hidden states (7 layers, {states[0].shape[0]} tokens x 384, float16, {base.nbytes >> 20} MiB tiled)"
        return np.resize(base, n), what
    rng = np.random.default_rng(0)
    scales = rng.lognormal(0.0, 1.0, 384).astype(np.float32)
    rows = -(-n // 384)
    x = (rng.standard_normal((rows, 384), dtype=np.float32) * scales).reshape(-1)[:n]
    return x.astype(np.float16), "standard normal x per-channel lognormal scales (384 channels), float16"


def _serve(pipe, compress, key: bool, nbytes: int, expected: np.ndarray, threads: int | None) -> None:
    """resonant.serve over TCP: receive one stream, answer, then check the bytes."""
    parallel.set_threads(threads)
    cpu = [0.0, 0.0]  # process CPU time at the stream's HEAD and at its completion

    async def run() -> bool:
        kw = {"compress": compress, **({"key": KEY} if key else {})}
        async with resonant.serve("tcp://127.0.0.1:0", **kw) as server:
            pipe.send(tuple(server.address))
            async for addr, event in server:
                if isinstance(event, (StreamFailed, FrameRejected, ConnectionBroken)):
                    raise RuntimeError(f"the stream failed: {event}")
                if isinstance(event, StreamStarted):
                    cpu[0] = time.process_time()
                if isinstance(event, StreamComplete):
                    cpu[1] = time.process_time()
                    await server.reply(addr, resonant.Think(np.zeros((1, 1), np.float16)))
                    got = event.objects[0]
                    return got.nbytes == nbytes and got.tobytes() == expected.tobytes()
        return False
    ok = asyncio.run(run())
    pipe.send((ok, cpu[1] - cpu[0]))


def _raw_serve(listener: socket.socket, nbytes: int, expected: np.ndarray, pipe) -> None:
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = np.empty(nbytes, np.uint8)
    conn.sendall(b"r")
    view, got = memoryview(buf), 0
    while got < nbytes:
        n = conn.recv_into(view[got:], min(_READ, nbytes - got))
        if n == 0:
            break
        got += n
    conn.sendall(b"k")
    conn.close()
    cpu = time.process_time()  # (the receive only: measured before the check)
    pipe.send((got == nbytes and buf.tobytes() == expected.view(np.uint8).tobytes(), cpu))


def run_raw(tensor: np.ndarray) -> tuple[float, float, float]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    here, there = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(target=_raw_serve, args=(listener, tensor.nbytes, tensor, there))
    child.start()
    sock = socket.create_connection(listener.getsockname())
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sock.recv(1) != b"r":
        raise ConnectionError("the receiver did not get ready")
    t, cpu = time.perf_counter(), time.process_time()
    sock.sendall(memoryview(tensor.view(np.uint8)))
    if sock.recv(1) != b"k":
        raise ConnectionError("no answer from the receiver")
    elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
    sock.close()
    ok, rcpu = here.recv() if here.poll(60) else (False, 0.0)
    child.join(30)
    listener.close()
    if not ok or child.exitcode != 0:
        raise RuntimeError("the raw receiver got the wrong bytes")
    return elapsed, cpu, rcpu


def run_stream(tensor: np.ndarray, compress, key: bool, threads: int | None) -> tuple[float, float, float]:
    here, there = multiprocessing.Pipe()
    child = multiprocessing.get_context("fork").Process(target=_serve, args=(there, compress, key, tensor.nbytes, tensor,
                                                                              threads))
    child.start()
    if not here.poll(30):
        raise RuntimeError("the receiver did not start")
    host, port = here.recv()

    async def run() -> tuple[float, float]:
        kw = {"compress": compress, **({"key": KEY} if key else {})}
        async with resonant.connect(f"tcp://{host}:{port}", **kw) as peer:
            t, cpu = time.perf_counter(), time.process_time()
            await peer.send_stream([tensor])
            while True:
                event = await peer.next_event(120)
                if isinstance(event, MessageReceived):
                    return time.perf_counter() - t, time.process_time() - cpu
    parallel.set_threads(threads)
    try:
        elapsed, cpu = asyncio.run(run())
    finally:
        parallel.set_threads(None)
    ok, rcpu = here.recv() if here.poll(120) else (False, 0.0)
    child.join(30)
    if not ok or child.exitcode != 0:
        raise RuntimeError(f"the receiver got the wrong bytes (compress={compress}, key={key})")
    return elapsed, cpu, rcpu


def zstd_saving(tensor: np.ndarray, sample: int = 8 << 20) -> float:
    """1 - compressed/raw of the chunk frames of the first `sample` bytes, zstd level 3 + shuffle."""
    part = tensor[: sample // 2]
    sender = resonant.StreamSender(1, [part], codec=resonant.Codec(3))
    sizes = [len(f) for f in sender.chunks()]
    return 1 - sum(sizes) / part.nbytes


def bare_costs(tensor: np.ndarray, piece: int = 65000, repeat: int = 3) -> dict[str, float]:
    """CPU seconds of the bare library calls over the tensor's bytes in 65,000-byte pieces (a chunk's
    payload): libsodium's XChaCha20-Poly1305 seal and open (PyNaCl), zstd level 3 on byte-shuffled
    pieces and its decompression (zstandard); best of `repeat`, one thread."""
    import zstandard
    from nacl import bindings
    buf = memoryview(tensor.reshape(-1).view(np.uint8))
    pieces = [bytes(buf[i:i + piece]) for i in range(0, len(buf), piece)]  # (PyNaCl takes bytes; made untimed)
    key, nonce = bytes(32), bytes(24)
    cctx, dctx = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    shuffled = [resonant.byte_shuffle(p, 2) for p in pieces]
    sealed = [bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(p, None, nonce, key) for p in pieces]
    packed = [cctx.compress(p) for p in shuffled]

    def best(fn) -> float:
        times = []
        for _ in range(repeat):
            t = time.process_time()
            fn()
            times.append(time.process_time() - t)
        return min(times)

    return {
        "xchacha20poly1305 seal": best(lambda: [bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(p, None, nonce, key)
                                                for p in pieces]),
        "xchacha20poly1305 open": best(lambda: [bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(c, None, nonce, key)
                                                for c in sealed]),
        "zstd compress (level 3, shuffled)": best(lambda: [cctx.compress(resonant.byte_shuffle(p, 2)) for p in pieces]),
        "zstd decompress": best(lambda: [dctx.decompress(c) for c in packed]),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=256, help="tensor size in MiB (default 256)")
    ap.add_argument("--repeat", type=int, default=5, help="samples per row (default 5)")
    ap.add_argument("--data", choices=("minilm", "normal"), default=None,
                    help="the realistic data (default: minilm when installed, else normal)")
    ap.add_argument("--threads", type=int, default=None, help="RESONANT_THREADS for both sides (default: unset)")
    ap.add_argument("--rows", help="comma-separated row numbers to run (0-based; default all)")
    ap.add_argument("--serial", action="store_true", help="also the zstd/key rows with one thread (the serial path)")
    ap.add_argument("--json", help="write the results as JSON to PATH, or - for stdout")
    args = ap.parse_args(argv)
    if args.threads is not None:
        os.environ["RESONANT_THREADS"] = str(args.threads)

    nbytes = args.mib << 20
    kind = args.data
    if kind is None:
        try:
            import _minilm
            _minilm.model_dir()
            kind = "minilm"
        except (ImportError, RuntimeError):
            kind = "normal"
    real, what = make_data(kind, nbytes)
    rand = np.frombuffer(np.random.default_rng(2).bytes(nbytes), np.float16)
    data = {"real": real, "random": rand}
    savings = {k: zstd_saving(v) for k, v in data.items()}
    rows = {**ROWS, **(SERIAL_ROWS if args.serial else {})}
    if args.rows:
        keep = {int(i) for i in args.rows.split(",")} | {0, 1}
        rows = {k: v for i, (k, v) in enumerate(rows.items()) if i in keep}

    samples: dict[str, list[float]] = {k: [] for k in rows}
    cpus: dict[str, list[tuple[float, float]]] = {k: [] for k in rows}
    for i in range(args.repeat):
        order = list(rows) if i % 2 == 0 else list(rows)[::-1]
        for name in order:
            d, compress, key, threads = rows[name]
            t = run_raw(data[d]) if compress is None else run_stream(data[d], compress, key, threads)
            samples[name].append(t[0])
            cpus[name].append(t[1:])
    best = {k: min(v) for k, v in samples.items()}
    median = {k: statistics.median(v) for k, v in samples.items()}
    out = sys.stderr if args.json == "-" else sys.stdout
    print_machine(machine(("zstandard", ("nacl", "PyNaCl"))), out)
    threads = f"{os.environ.get('RESONANT_THREADS', 'unset')} (pool of {parallel.threads()})"
    print(f"\n{args.mib} MiB float16 over loopback TCP (resonant.connect/serve), {args.repeat} samples each, "
          f"interleaved; RESONANT_THREADS={threads}; aead backend {resonant._codec.aead_backend()}", file=out)
    print(f"data: {what}; zstd level 3 saves {savings['real']:.1%} of its chunk frames; "
          f"random f16 bits: {savings['random']:.1%}\n", file=out)
    print("| row | best s | median s | best GB/s | / plain (best) | / plain (median) | / raw (best) | / raw (median) "
          "| CPU s sender | CPU s receiver |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|", file=out)
    cpu_median = {k: (statistics.median(c[0] for c in v), statistics.median(c[1] for c in v)) for k, v in cpus.items()}
    ratios = {}
    for k in rows:
        ratios[k] = {"plain": best[PLAIN] / best[k], "plain_median": median[PLAIN] / median[k],
                     "raw": best[RAW] / best[k], "raw_median": median[RAW] / median[k]}
        r = ratios[k]
        print(f"| {k} | {best[k]:.3f} | {median[k]:.3f} | {nbytes / best[k] / 1e9:.2f} | {r['plain']:.2f}x | "
              f"{r['plain_median']:.2f}x | {r['raw']:.2f}x | {r['raw_median']:.2f}x | {cpu_median[k][0]:.3f} | "
              f"{cpu_median[k][1]:.3f} |", file=out)
    print("(CPU s: median process CPU time of the sending process, pool threads included, from send_stream to the "
          "answer; of the receiving process, from StreamStarted to StreamComplete)", file=out)
    # The floor: what the bare library calls cost on the same bytes (one thread, in this process), added
    # to what the plain V-Stream's two processes take; spread perfectly over this machine's cores, that
    # is the least wall time a sealed or compressed transfer can take here, whatever the code around it.
    bare = bare_costs(real)
    cores = os.cpu_count() or 1
    plain_cpu = sum(cpu_median[PLAIN])
    floors = {"zstd": bare["zstd compress (level 3, shuffled)"] + bare["zstd decompress"],
              "key (xchacha20poly1305)": bare["xchacha20poly1305 seal"] + bare["xchacha20poly1305 open"]}
    floors["zstd+key"] = floors["zstd"] + floors["key (xchacha20poly1305)"]
    print(f"\nThe floor on this machine ({cores} cores shared by both processes): the bare library calls on the same "
          f"{args.mib} MiB, one thread, in this process (best of 3):\n\n| call | CPU s |\n|---|--:|", file=out)
    for k, v in bare.items():
        print(f"| {k} | {v:.3f} |", file=out)
    print(f"\n| row | plain V-Stream CPU s (both sides) + bare calls CPU s | / {cores} cores = least wall s | "
          f"most it can reach / plain (best {best[PLAIN]:.3f} s) |\n|---|--:|--:|--:|", file=out)
    ceilings = {}
    for k, extra in floors.items():
        least = (plain_cpu + extra) / cores
        ceilings[k] = best[PLAIN] / least
        print(f"| {k} | {plain_cpu:.3f} + {extra:.3f} | {least:.3f} | {ceilings[k]:.2f}x |", file=out)
    sealed = [k for k in rows if k not in (PLAIN, RAW) and rows[k][0] == "real" and rows[k][3] is None]
    ok = all(ratios[k]["plain"] >= TARGET for k in sealed)
    print(f"\n- {'PASS' if ok else 'FAIL'} every sealed/compressed row on the realistic data >= {TARGET}x the plain "
          "V-Stream (best times): " + ", ".join(f"{k} {ratios[k]['plain']:.2f}x" for k in sealed), file=out)
    if args.json:
        doc = {"mib": args.mib, "data": what, "zstd_saving": savings, "threads": threads,
               "bare_cpu_seconds": bare, "ceiling_vs_plain": ceilings,
               "seconds": samples, "cpu_seconds": cpus, "cpu_median": cpu_median, "best": best, "median": median, "ratios": ratios, "target": TARGET, "pass": ok}
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
