"""The cost of many small objects: a KV cache (60 tensors) as one V-Stream, against the same
bytes as ONE object, in the same run.

    python3 bench/bench_kv_stream.py [--tokens 121] [--repeat 21] [--net-repeat 41] [--json PATH|-]

The cache has SmolLM2-135M's shapes (30 layers x keys, values of (1, 3, tokens, 64) float32:
46,080 B per token; 121 tokens = 5.58 MB), seeded standard-normal values (the model is not
needed: only the shapes and bytes matter here). The single object is a float32 array of the
same byte count. Rows:

(a) in one process: StreamSender(1, objects) -> Reassembler.receive of every frame (the block
    cache off: every stream's buffer is new memory, as a receiver's); also the sender alone
    (encoding every frame) and the receiver alone (frames made beforehand); each in wall time
    and in this thread's CPU time (time.thread_time: on a shared machine a run of a few ms is
    often one scheduler time slice longer in wall time, which the CPU time leaves out);
(b) loopback TCP: Peer.send_stream(objects) through resonant.connect() to a resonant.serve()
    in a forked process, until send_stream returns (the receiver's verified-delivery report);
(c) the same over UDP.

Each row: median (and best) of the repeats, 60 objects and 1 object interleaved sample by
sample; ratio = median(60 objects) / median(1 object), target <= 1.2x. Not part of the suite.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import statistics
import sys
import time

import numpy as np

import resonant
import resonant.stream
from bench_codec import machine, print_machine, write_json  # noqa: E402  (bench/ is sys.path[0] for a script)
from resonant import ConnectionBroken, FrameRejected, Reassembler, StreamComplete, StreamFailed, StreamSender

LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
TARGET = 1.2


def kv_cache(tokens: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, KV_HEADS, tokens, HEAD_DIM), dtype=np.float32)
            for _ in range(2 * LAYERS)]


def one_object(objs: list[np.ndarray]) -> list[np.ndarray]:
    return [np.concatenate([o.reshape(-1) for o in objs])]


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of fn(): on a shared machine the wall time of a
    few milliseconds is often a scheduler time slice longer, the CPU time is not."""
    gc.disable()
    try:
        t, c = time.perf_counter(), time.thread_time()
        fn()
        return time.perf_counter() - t, time.thread_time() - c
    finally:
        gc.enable()


def in_process(objs: list[np.ndarray]) -> list:
    r = Reassembler()
    events = []
    for frame in StreamSender(1, objs):
        events = r.receive(frame, 0.0)
    return events


def sender_only(objs: list[np.ndarray]) -> None:
    for _ in StreamSender(1, objs):
        pass


def receiver_only(frames: list[bytes]) -> None:
    r = Reassembler()
    for frame in frames:
        r.receive(frame, 0.0)


def _serve(scheme: str, pipe, streams: int) -> None:
    async def run() -> None:
        resonant.stream.set_buffer_cache(0)
        async with resonant.serve(f"{scheme}://127.0.0.1:0") as server:
            pipe.send(tuple(server.address))
            done = 0
            async for _addr, event in server:
                if isinstance(event, (StreamFailed, FrameRejected, ConnectionBroken)):
                    raise RuntimeError(f"the stream failed: {event}")
                if isinstance(event, StreamComplete):
                    done += 1
                    if done == streams:
                        await asyncio.sleep(0.5)  # (let the last delivery report go out)
                        return
    asyncio.run(run())


def over_network(scheme: str, cases: dict[str, list[np.ndarray]], repeat: int) -> dict[str, list[float]]:
    """Seconds of Peer.send_stream per case, `repeat` samples each (after one warm-up each),
    the cases interleaved (order reversed every other round), one connection for all."""
    here, there = multiprocessing.Pipe()
    server = multiprocessing.get_context("fork").Process(target=_serve,
                                                         args=(scheme, there, (repeat + 1) * len(cases)))
    server.start()
    if not here.poll(30):
        raise RuntimeError("the receiver did not start")
    host, port = here.recv()
    out: dict[str, list[float]] = {k: [] for k in cases}

    async def run() -> None:
        async with resonant.connect(f"{scheme}://{host}:{port}") as peer:
            for k, objs in cases.items():  # warm-up
                await peer.send_stream(objs)
            for i in range(repeat):
                for k in (list(cases) if i % 2 == 0 else list(cases)[::-1]):
                    gc.disable()
                    t = time.perf_counter()
                    await peer.send_stream(cases[k])
                    out[k].append(time.perf_counter() - t)
                    gc.enable()
    asyncio.run(run())
    server.join(30)
    if server.exitcode != 0:
        raise RuntimeError(f"the receiver failed (exit code {server.exitcode})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=121, help="tokens of context (default 121: 5.58 MB)")
    ap.add_argument("--repeat", type=int, default=21, help="in-process samples per case (default 21)")
    ap.add_argument("--net-repeat", type=int, default=41, help="TCP / UDP samples per case (default 41: a single run of a few ms is noisy here)")
    ap.add_argument("--no-net", action="store_true", help="the in-process rows only")
    ap.add_argument("--json", help="write the results as JSON to PATH, or - for stdout")
    args = ap.parse_args(argv)

    many = kv_cache(args.tokens)
    cases = {"60 objects": many, "1 object": one_object(many)}
    nbytes = sum(o.nbytes for o in many)
    frames = {k: len(list(StreamSender(1, v))) for k, v in cases.items()}
    for k, objs in cases.items():  # checked once, outside the timed runs
        done = in_process(objs)[-1]
        assert isinstance(done, StreamComplete) and len(done.objects) == len(objs)
        assert all(a.tobytes() == np.asarray(b).tobytes() for a, b in zip(done.objects, objs))
    pre = {k: list(StreamSender(1, v)) for k, v in cases.items()}
    inproc = {"(a) in process: StreamSender -> Reassembler": lambda k: in_process(cases[k]),
              "(a) sender alone (encode every frame)": lambda k: sender_only(cases[k]),
              "(a) receiver alone (Reassembler.receive)": lambda k: receiver_only(pre[k])}
    rows: dict[str, dict[str, list[float]]] = {}
    for name in inproc:
        rows[name] = {k: [] for k in cases}
        rows[name.replace("(a)", "(a, CPU time)")] = {k: [] for k in cases}
    cache = resonant.stream.set_buffer_cache(0)
    try:
        for k in cases:  # warm-up
            in_process(cases[k])
        for i in range(args.repeat):
            for k in (list(cases) if i % 2 == 0 else list(cases)[::-1]):
                for name, fn in inproc.items():
                    wall, cpu = _timed(lambda: fn(k))
                    rows[name][k].append(wall)
                    rows[name.replace("(a)", "(a, CPU time)")][k].append(cpu)
    finally:
        resonant.stream.set_buffer_cache(cache)
    if not args.no_net:
        rows["(b) loopback TCP: connect -> serve, send_stream"] = over_network("tcp", cases, args.net_repeat)
        rows["(c) loopback UDP: connect -> serve, send_stream"] = over_network("udp", cases, args.net_repeat)

    out = sys.stderr if args.json == "-" else sys.stdout
    print_machine(machine(), out)
    print(f"\nKV cache of {args.tokens} tokens: {len(many)} float32 tensors of {many[0].shape} = {nbytes:,} B "
          f"({frames['60 objects']} chunk frames), vs one object of the same bytes ({frames['1 object']} chunk frames); "
          "times in ms, median (best) of the samples\n", file=out)
    print("| path | 60 objects | 1 object | ratio (medians) | ratio (best) |\n|---|--:|--:|--:|--:|", file=out)
    doc_rows = {}
    for name, r in rows.items():
        med = {k: statistics.median(v) for k, v in r.items()}
        best = {k: min(v) for k, v in r.items()}
        ratio, ratio_best = med["60 objects"] / med["1 object"], best["60 objects"] / best["1 object"]
        print(f"| {name} | {med['60 objects'] * 1e3:.2f} ({best['60 objects'] * 1e3:.2f}) | "
              f"{med['1 object'] * 1e3:.2f} ({best['1 object'] * 1e3:.2f}) | {ratio:.2f}× | {ratio_best:.2f}× |",
              file=out)
        doc_rows[name] = {"samples_s": r, "median_s": med, "best_s": best, "ratio_median": ratio,
                          "ratio_best": ratio_best}
    print("", file=out)
    for name in rows:
        if "sender" in name or "receiver" in name:
            continue
        ratio = doc_rows[name]["ratio_median"]
        print(f"- {'PASS' if ratio <= TARGET else 'FAIL'} {name}: 60 objects take {ratio:.2f}× one object "
              f"(target <= {TARGET}×)", file=out)
    write_json(args.json, {"tokens": args.tokens, "bytes": nbytes, "objects": len(many), "frames": frames,
                           "target": TARGET, "rows": doc_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
