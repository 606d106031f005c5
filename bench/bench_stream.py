"""V-Stream throughput, in one process: split + encode + decode + reassemble of one large f16
tensor, against a plain memory copy of the same bytes measured in the same run.

    python3 bench/bench_stream.py [--mib 256] [--repeat 3] [--json PATH|-]

Not part of the test suite. The loopback TCP half of the stream benchmark (ratio to raw
sendall/recv_into) is not written yet.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

import resonant
from resonant import Reassembler, StreamComplete, StreamSender

TARGET_GBPS = 3.0


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mib", type=int, default=256, help="tensor size in MiB (default 256)")
    ap.add_argument("--repeat", type=int, default=3, help="samples; the best is kept")
    ap.add_argument("--json", help="write the results as JSON to PATH, or - for stdout")
    args = ap.parse_args(argv)

    tensor = np.random.default_rng(0).standard_normal(args.mib << 19).astype(np.float16)  # MiB * 2^20 / 2
    nbytes = tensor.nbytes

    def stream() -> list:
        r = Reassembler()
        events = []
        for frame in StreamSender(1, [tensor]):
            events = r.receive(frame, 0.0)
        return events

    done = stream()[-1]  # checked once, outside the timed runs: the hash was verified, and the bytes match
    assert isinstance(done, StreamComplete)
    assert done.objects[0].tobytes() == tensor.tobytes()

    dst = np.empty_like(tensor)
    dst[:] = 0
    rows = {
        "memcpy (warm destination)": best_of(lambda: np.copyto(dst, tensor), args.repeat),
        "memcpy (fresh destination)": best_of(lambda: np.copyto(np.empty_like(tensor), tensor), args.repeat),
        "crc32 (one pass)": best_of(lambda: resonant.crc32(tensor), args.repeat),
        "V-Stream split+encode+decode+reassemble": best_of(stream, args.repeat),
    }
    gbps = {k: nbytes / v / 1e9 for k, v in rows.items()}
    stream_gbps = gbps["V-Stream split+encode+decode+reassemble"]
    out = sys.stderr if args.json == "-" else sys.stdout
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; Python "
          f"{platform.python_version()}; numpy {np.__version__}; crc32 backend {resonant.crc32_backend()}", file=out)
    print(f"\n{args.mib} MiB float16, best of {args.repeat}\n", file=out)
    print("| operation | seconds | GB/s | × V-Stream |\n|---|--:|--:|--:|", file=out)
    for k, v in rows.items():
        print(f"| {k} | {v:.3f} | {gbps[k]:.2f} | {gbps[k] / stream_gbps:.2f}× |", file=out)
    ok = stream_gbps >= TARGET_GBPS
    print(f"\n- {'PASS' if ok else 'FAIL'} in-process stream: {stream_gbps:.2f} GB/s (target >= {TARGET_GBPS}); "
          f"{stream_gbps / gbps['memcpy (warm destination)']:.2f}× a warm memcpy", file=out)
    if args.json:
        doc = {"mib": args.mib, "seconds": rows, "gbps": gbps, "target_gbps": TARGET_GBPS, "pass": ok}
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
