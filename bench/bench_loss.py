"""V-Streams over an impaired UDP path: completion time, goodput and peak memory at each loss
rate, with selective repeat (resonant's reports and resends), with forward error correction on
top, the ideal (1 - loss) x rate, and QUIC (aioquic: one QUIC stream through the same relay) as
the standard transport's figure, all in the same run.

Not part of the test suite. Run from the repository root:

    python3 bench/bench_loss.py [--mib 64] [--loss 0,0.01,0.05,0.2] [--rate 100M] [--frame 65507]
                                [--fec 16,2] [--no-quic] [--repeat 1] [--json PATH|-]

Each row sends one float16 tensor of --mib MiB from this process (resonant.connect ->
send_stream, which returns once the receiver verified the xxh3_64 of every byte) to a receiver
process (resonant.serve) through resonant.relay (its own process), which drops datagrams at
random with the loss rate in both directions (seeded: every row sees the same decisions for the
same datagrams). Goodput = tensor bytes / time from the first datagram to the verdict. The
sender's pacing cap is --rate; the ideal row is (1 - loss) x rate, the most any scheme that sends
at the rate can deliver; the target is goodput >= 0.8 x ideal at 5% loss. Peak RSS (VmHWM): the
receiver process's, and this process's from the start of the transfer (the tensor included).
QUIC's row uses aioquic's defaults for loss recovery and congestion control (Reno), 1,200-byte
datagrams, flow-control windows raised to 16 MiB (bench/bench_quic.py); it is not paced to --rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import resonant  # noqa: E402
from resonant._codec import xxh3_64  # noqa: E402
from resonant.cli import _rate  # noqa: E402
from resonant.delivery import StreamDelivered  # noqa: E402
from resonant.relay import Impairment, Relay  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "bench"))
from bench_codec import peak_rss_mb, write_json  # noqa: E402

TARGET = 0.8  # goodput / ideal at 5% loss

_RECEIVER = r"""
import asyncio, json, sys
sys.path.insert(0, sys.argv[2])  # bench/
from bench_codec import peak_rss_mb
import resonant
from resonant.reassembler import StreamComplete, StreamFailed
async def main():
    async with resonant.serve("udp://127.0.0.1:0", max_frame_bytes=int(sys.argv[1])) as server:
        print(json.dumps({"port": server.address[1]}), flush=True)
        async for addr, ev in server:
            if isinstance(ev, (StreamComplete, StreamFailed)):
                doc = {"ok": isinstance(ev, StreamComplete), "xxh3_64": getattr(ev, "xxh3_64", None),
                       "reason": getattr(ev, "reason", None),
                       "peak_rss_mb": peak_rss_mb()}
                del ev
                print(json.dumps(doc), flush=True)
asyncio.run(main())
"""


def _f(v, spec: str) -> str:
    return "" if v is None or v != v else format(v, spec)


def _rss_mb(reset: bool = False) -> float:
    return peak_rss_mb(reset)


def resonant_row(x: np.ndarray, loss: float, rate: float, frame: int, fec: tuple[int, int] | None,
                 seed: int) -> dict:
    recv = subprocess.Popen([sys.executable, "-c", _RECEIVER, str(frame), os.path.join(ROOT, "bench")], stdout=subprocess.PIPE, text=True)
    try:
        port = json.loads(recv.stdout.readline())["port"]
        fwd, back = Impairment(loss=loss, seed=seed), Impairment(loss=loss, seed=seed + 1)
        with Relay.start(("127.0.0.1", port), forward=fwd, backward=back) as relay:
            async def go():
                async with resonant.connect(f"udp://127.0.0.1:{relay.address[1]}", max_frame_bytes=frame,
                                            timeout=10.0) as peer:
                    kw = {"fec": fec} if fec else {}
                    d0 = peer.session.stats["bytes_out"]
                    _rss_mb(reset=True)  # (the sender's peak from here: the tensor, held, and the transfer)
                    t = time.perf_counter()
                    await peer.send_stream([x], rate=rate, **kw)
                    dt = time.perf_counter() - t
                    ev = None
                    while not isinstance(ev, StreamDelivered):
                        ev = await peer.next_event(timeout=5.0)
                    return dt, peer.session.stats["bytes_out"] - d0, ev
            try:
                seconds, wire, ev = asyncio.run(go())
                error = None
            except Exception as exc:  # noqa: BLE001 (a row that fails is reported, not fatal)
                seconds, wire, ev, error = float("nan"), 0, None, f"{type(exc).__name__}: {exc}"
            sender_peak = _rss_mb()
            stats = relay.stats()
        done = json.loads(recv.stdout.readline()) if error is None else {}
    finally:
        recv.kill()
        recv.wait()
    ok = error is None and done.get("ok") and done.get("xxh3_64") == xxh3_64(x)
    return {"seconds": seconds, "goodput_mbs": x.nbytes / seconds / 1e6 if ok else 0.0, "ok": bool(ok),
            "error": error, "wire_bytes": wire, "overhead": wire / x.nbytes - 1 if wire else None,
            "receiver_peak_rss_mb": done.get("peak_rss_mb"), "sender_peak_rss_mb": sender_peak,
            "retransmitted": ev.retransmitted if ev else None, "pacing": ev.pacing if ev else None,
            "relay_dropped": stats["forward"]["dropped"] + stats["backward"]["dropped"]}


def quic_row(nbytes: int, loss: float, seed: int, timeout: float) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from bench_quic import quic_transfer  # aioquic (the bench-net extra)
    r = quic_transfer(nbytes, forward=Impairment(loss=loss, seed=seed), backward=Impairment(loss=loss, seed=seed + 1),
                      timeout=timeout)
    got = r.get("received") or 0
    return {"seconds": r.get("seconds"), "goodput_mbs": r.get("goodput_MBps") or 0.0, "ok": bool(r.get("ok")),
            "error": None if r.get("ok") else f"{got / nbytes:.0%} of the bytes arrived within {timeout:.0f} s",
            "receiver_peak_rss_mb": r.get("rss_server_mb"), "sender_peak_rss_mb": r.get("rss_client_mb")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--loss", default="0,0.01,0.05,0.2")
    ap.add_argument("--rate", type=_rate, default=100e6,  # (resonant send --rate's parser: 50M, 1.5G, ...)
                    help="the sender's pacing cap, bytes/s (default 100M)")
    ap.add_argument("--frame", type=int, default=65507, help="max_frame_bytes (1200 for small-MTU paths)")
    ap.add_argument("--fec", default="16,2", help="k,m for the FEC row ('' for none)")
    ap.add_argument("--no-quic", action="store_true")
    ap.add_argument("--quic-timeout", type=float, default=300.0)
    ap.add_argument("--json", help="write the results as JSON to PATH, or - for stdout")
    args = ap.parse_args(argv)
    losses = [float(v) for v in args.loss.split(",")]
    fec = tuple(int(v) for v in args.fec.split(",")) if args.fec else None
    x = np.random.default_rng(0).standard_normal(args.mib << 19, dtype=np.float32).astype(np.float16)
    rows: dict[str, dict[str, dict]] = {}
    for i, loss in enumerate(losses):
        seed = 100 + i
        key = f"{loss:.0%}"
        rows[key] = {"ideal": {"goodput_mbs": (1 - loss) * args.rate / 1e6, "ok": True}}
        rows[key]["selective repeat"] = resonant_row(x, loss, args.rate, args.frame, None, seed)
        if fec:
            rows[key][f"selective repeat + FEC {fec[0]}+{fec[1]}"] = resonant_row(x, loss, args.rate, args.frame, fec, seed)
        if not args.no_quic:
            rows[key]["QUIC (aioquic)"] = quic_row(x.nbytes, loss, seed, args.quic_timeout)
        print(f"loss {key} done", file=sys.stderr, flush=True)
    print(f"{args.mib} MiB float16 through resonant.relay (random loss both ways), rate cap "
          f"{args.rate / 1e6:.0f} MB/s, max_frame_bytes {args.frame}")
    print("| loss | row | time (s) | goodput (MB/s) | / ideal | wire overhead | final pacing rate (MB/s) | "
          "backoffs | receiver peak RSS (MB) | sender peak RSS (MB) | verified |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|")
    verdict = None
    for key, by_row in rows.items():
        ideal = by_row["ideal"]["goodput_mbs"]
        for name, r in by_row.items():
            ratio = r["goodput_mbs"] / ideal if ideal else None
            sec = r.get("seconds")
            ov = r.get("overhead")
            pc = r.get("pacing") or {}
            backoffs = pc.get("backoffs")
            print(f"| {key} | {name} | {_f(sec, '.2f')} | {r['goodput_mbs']:.1f} | {_f(ratio, '.2f')} | "
                  f"{_f(ov, '.1%')} | {_f(pc.get('rate') and pc['rate'] / 1e6, '.0f')} | {_f(backoffs, 'd')} | "
                  f"{_f(r.get('receiver_peak_rss_mb'), '.0f')} | {_f(r.get('sender_peak_rss_mb'), '.0f')} | "
                  f"{'yes' if r['ok'] else 'NO: ' + str(r.get('error'))} |")
            if key == "5%" and name == "selective repeat":
                verdict = ratio
    if verdict is not None:
        print(f"\ntarget at 5% loss: selective-repeat goodput >= {TARGET} x ideal: {verdict:.2f} "
              f"({'met' if verdict >= TARGET else 'NOT met'})")
    if args.json:
        doc = {"mib": args.mib, "rate": args.rate, "frame": args.frame, "rows": rows, "target_ratio_5pct": verdict}
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
