"""Capacity of resonant.relay on this machine: datagrams/s at 1,200 bytes and MB/s at 64 KiB
(65,000-byte datagrams: the largest a UDP/IPv4 datagram carries is 65,507) with no impairment,
against the same sender and receiver talking directly.

The "1% loss + 1 ms delay" rows take the path every datagram of an impaired relay takes
(ImpairmentModel.admit and the delay heap; a perfect path skips both).

Not part of the test suite. Run from the repository root:

    python3 bench/bench_relay.py [--seconds 2] [--json PATH|-]

A sender process writes datagrams as fast as it can (blocking sendto) for --seconds, to the
receiver directly or through a Relay (its own process); the receiver (this process) counts what
arrives and the rate is taken between the first and the last datagram received. Sender,
relay and receiver are three processes: on a 2-core machine they compete for the cores, so
the relayed figures are a lower bound of what the relay alone does.

Measured on the 2-core dev machine (shared): perfect path 1,200 B: 50-90k datagrams/s relayed
(~120k per relay CPU-second); 65,000 B: 1.1-1.8 GB/s (~55k datagrams per CPU-second); 200 MB/s
of 65,000-byte datagrams passes in full using ~7% of a core (1% loss + 1 ms delay: ~22%).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_codec import write_json  # noqa: E402
from resonant.relay import Impairment, Relay  # noqa: E402


def _sender(addr, size, seconds, rate_limit):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    data = os.urandom(size)
    end = time.monotonic() + seconds
    sent = 0
    t0 = time.monotonic()
    while True:
        for _ in range(64):
            try:
                s.sendto(data, addr)
                sent += 1
            except OSError:
                pass
        now = time.monotonic()
        if now >= end:
            break
        if rate_limit:  # bytes/s: pace the sender
            ahead = sent * size / rate_limit - (now - t0)
            if ahead > 0:
                time.sleep(ahead)
    s.close()


def measure(size: int, seconds: float, relay: bool, rate_limit: float | None = None,
            impairment: Impairment | None = None) -> dict:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE (root)
    except OSError:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(0.5)
    r = Relay.start(rx.getsockname(), impairment or Impairment()) if relay else None
    dest = r.address if r else rx.getsockname()
    proc = multiprocessing.get_context("fork").Process(target=_sender, args=(dest, size, seconds, rate_limit))
    proc.start()
    n = 0
    first = last = None
    buf = bytearray(65536)
    while True:
        try:
            rx.recv_into(buf)
        except socket.timeout:
            if not proc.is_alive():
                break
            continue
        last = time.perf_counter()
        if first is None:
            first = last
        n += 1
    proc.join()
    stats = r.stop() if r else None
    rx.close()
    span = (last - first) if first is not None and last > first else float("nan")
    out = {"size": size, "relay": relay, "received": n, "seconds": round(span, 3),
           "datagrams_per_s": round((n - 1) / span), "MB_per_s": round((n - 1) * size / span / 1e6, 1)}
    if impairment is not None:
        out["impairment"] = repr(impairment)
    if stats:
        out["relay_in"] = stats["forward"]["datagrams_in"]
        out["relay_send_errors"] = stats["send_errors"]
        out["relay_cpu_s"] = stats["cpu_seconds"]
        out["relay_dgram_per_cpu_s"] = round(stats["forward"]["datagrams_in"] / max(stats["cpu_seconds"], 1e-9))
    if rate_limit:
        out["offered_MB_per_s"] = rate_limit / 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    lossy = Impairment(loss=0.01, delay=0.001, seed=1)
    for size, rate, imp in ((1200, None, None), (1200, None, lossy), (65000, None, None), (65000, 200e6, None),
                           (65000, 200e6, lossy)):
        for relay in ((False, True) if imp is None else (True,)):
            row = measure(size, args.seconds, relay, rate, imp)
            rows.append(row)
            kind = "direct" if not relay else "relay " if imp is None else "relay, 1% loss + 1 ms delay"
            print(f"{size:>6} B  {kind}  offered {('max' if not rate else f'{rate/1e6:.0f} MB/s'):>9}"
                  f"  {row['datagrams_per_s']:>9,} dgram/s  {row['MB_per_s']:>8.1f} MB/s"
                  f"  (received {row['received']:,}" + (f" of {row['relay_in']:,} the relay read; relay CPU {row['relay_cpu_s']:.2f} s ="
                     f" {row['relay_dgram_per_cpu_s']:,} dgram/CPU-s)" if relay else ")"),
                  flush=True)
    write_json(args.json, rows)


if __name__ == "__main__":
    main()
