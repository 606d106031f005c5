"""`resonant demo`: a receiver and a sender on loopback, in one command.

The receiver (a resonant server) and the sender (a client) run in one event loop but talk
only through real loopback sockets: the handshake, a Think (one 2048-dim f16 hidden state),
a KV cache of several layers as a V-Stream, and a Critique of the Think. The receiver checks
every payload against what was sent; the summary gives sizes, latencies, throughput and the
verification of each step.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

import resonant
from resonant.aio import connect, serve
from resonant.reassembler import StreamComplete, StreamFailed
from resonant.session import HandshakeComplete, MessageReceived
from resonant.transforms import Key


async def _wait_for(server, kinds, timeout: float = 30.0):
    """The next server event of one of `kinds` (others are skipped)."""
    deadline = time.perf_counter() + timeout
    while True:
        _, ev = await server.next_event(max(0.01, deadline - time.perf_counter()))
        if isinstance(ev, kinds):
            return ev


async def run_demo(args: Any) -> int:
    rng = np.random.default_rng(7)
    key = Key.generate() if args.encrypt else None
    space = resonant.space_hash32("resonant-demo", "demo-arch", "demo-data")
    common: dict[str, Any] = {"space_hash32": space, "expected_space_hash": space}
    if key is not None:
        common["key"] = key
    rows: list[dict] = []
    url_base = f"{args.transport}://127.0.0.1"
    async with serve(f"{url_base}:0", compress=("zstd", "none"), **common) as server:
        url = f"{url_base}:{server.address[1]}"
        print(f"receiver listening on {url}", file=sys.stderr)

        t0 = time.perf_counter()
        async with connect(url, compress=("zstd", "none") if args.zstd else ("none", "zstd"), **common) as peer:
            hs = time.perf_counter() - t0
            await _wait_for(server, HandshakeComplete)
            a = peer.agreement
            rows.append({"step": "handshake (ping -> capability)", "payload_bytes": 0,
                         "wire_bytes": peer.session.stats["bytes_out"] + peer.session.stats["bytes_in"],
                         "seconds": hs, "verified": True,
                         "note": f"protocol {a.proto}, compress {a.compress}, crypto {a.crypto}"})

            # Think: one hidden state.
            hidden = rng.standard_normal((1, 2048)).astype(np.float16)
            out0 = peer.session.stats["bytes_out"]
            t = time.perf_counter()
            await peer.send(resonant.Think(hidden, stream_id=1, space_hash32=space))
            ev = await _wait_for(server, MessageReceived)
            dt = time.perf_counter() - t
            ok = isinstance(ev.frame, resonant.Think) and np.array_equal(ev.frame.hidden.numpy(), hidden)
            rows.append({"step": "Think 1x2048 f16", "payload_bytes": hidden.nbytes,
                         "wire_bytes": peer.session.stats["bytes_out"] - out0, "seconds": dt, "verified": ok,
                         "note": "one frame, sender to receiver event"})

            # KV cache: layers x (K, V) of (8 heads, tokens, 64) f16, as one V-Stream.
            heads, dim = 8, 64
            kv = []
            for _ in range(args.layers):
                kv.append(rng.standard_normal((heads, args.tokens, dim)).astype(np.float16))
                kv.append(rng.standard_normal((heads, args.tokens, dim)).astype(np.float16))
            names = [f"layer{i // 2}.{'keys' if i % 2 == 0 else 'values'}" for i in range(len(kv))]
            layers = [i // 2 for i in range(len(kv))]
            total = sum(x.nbytes for x in kv)
            out0 = peer.session.stats["bytes_out"]
            t = time.perf_counter()
            sid = await peer.send_stream(kv, stream_id=2, names=names, layers=layers,
                                         msg_type=resonant.MsgType.CACHE, space_hash32=space)
            ev = await _wait_for(server, (StreamComplete, StreamFailed), 120.0)
            dt = time.perf_counter() - t
            ok = (isinstance(ev, StreamComplete) and ev.stream_id == sid
                  and all(np.array_equal(x, y) for x, y in zip(ev.objects, kv)))
            note = (f"{len(kv)} tensors, xxh3_64 {ev.xxh3_64:016x} verified" if isinstance(ev, StreamComplete)
                    else f"FAILED: {ev.reason}: {ev.detail}")
            rows.append({"step": f"KV cache {args.layers} layers x (K,V) {heads}x{args.tokens}x{dim} f16",
                         "payload_bytes": total, "wire_bytes": peer.session.stats["bytes_out"] - out0,
                         "seconds": dt, "verified": ok, "note": note})

            # Critique of the Think: divergence, mask, explanation.
            other = (hidden.astype(np.float32) + rng.normal(0, 0.05, hidden.shape)).astype(np.float16)
            divergence = (other.astype(np.float32) - hidden.astype(np.float32)).astype(np.float16).ravel()
            mask = (np.abs(divergence) > 0.1).astype(np.int8)
            explanation = {"note": "demo critique", "magnitude": float(np.linalg.norm(divergence)),
                           "suggested_correction": "shrink dimensions over threshold"}
            out0 = peer.session.stats["bytes_out"]
            t = time.perf_counter()
            await peer.send(resonant.Critique(divergence, mask, explanation, stream_id=3, space_hash32=space))
            ev = await _wait_for(server, MessageReceived)
            dt = time.perf_counter() - t
            f = ev.frame
            ok = (isinstance(f, resonant.Critique) and np.array_equal(f.divergence.numpy(), divergence)
                  and np.array_equal(f.mask.numpy(), mask) and f.explanation.json() == explanation)
            rows.append({"step": "Critique (divergence, mask, explanation)",
                         "payload_bytes": divergence.nbytes + mask.nbytes + len(json.dumps(explanation)),
                         "wire_bytes": peer.session.stats["bytes_out"] - out0, "seconds": dt, "verified": ok,
                         "note": f"{int(mask.sum())} dimensions over 0.1"})

    all_ok = all(r["verified"] for r in rows)
    if args.json:
        print(json.dumps({"transport": args.transport, "rows": rows, "verified": all_ok}, indent=2))
    else:
        print(f"\nresonant demo over loopback {args.transport.upper()}"
              f"{' (zstd)' if args.zstd else ''}{' (encrypted)' if args.encrypt else ''}\n")
        print(f"| {'step':<48} | {'payload':>11} | {'on the wire':>11} | {'time':>9} | {'throughput':>11} | verified |")
        print(f"|{'-' * 50}|{'-' * 13}|{'-' * 13}|{'-' * 11}|{'-' * 13}|----------|")
        for r in rows:
            thr = f"{r['payload_bytes'] / r['seconds'] / 1e6:8.1f} MB/s" if r["payload_bytes"] >= 1 << 20 else ""
            print(f"| {r['step']:<48} | {r['payload_bytes']:>11,} | {r['wire_bytes']:>11,} | "
                  f"{r['seconds'] * 1e3:7.2f} ms | {thr:>11} | {'yes' if r['verified'] else 'NO':>8} |")
        print()
        for r in rows:
            print(f"- {r['step']}: {r['note']}")
        print(f"\n{'all verified' if all_ok else 'VERIFICATION FAILED'}")
    return 0 if all_ok else 1
