"""KV-cache handoff: prefill here, decode there (SmolLM2-135M-Instruct, two processes).

    python examples/kv_handoff.py                         # 100 / 1,000 / 4,000-token prompts, every dtype, TCP and UDP
    python examples/kv_handoff.py --quick                 # a short prompt, f32, 8 tokens (what the test runs)
    python examples/kv_handoff.py --json --transport udp --tokens 1000 --dtypes f32,q8_0 --new-tokens 16

Process A (this process) loads the model, prefills a prompt and hands the prompt's KV cache
(30 layers of keys and values, 1 x 3 heads x tokens x 64) to process B with
`peer.send_kv_cache(cache, signature=sig, dtype=...)`: a V-Stream of message type Cache whose HEAD
carries the cache's metadata (layers, seq_len, dtype, the model signature), in the wire dtype (f32 as
is, bf16 / f16 casts, q8_0 ggml blocks). Over TCP, and over UDP with resonant's loss recovery
(selective repeat); either way it returns once B has verified the stream's xxh3_64 (its verdict).
B (a subprocess A starts: it loads the model too, serves on 127.0.0.1 port 0 with
expected_signature=sig, so a cache of another model is refused, and tells A its port on stdout)
gets the cache layer by layer (KVLayerReceived) and then ready (KVCacheReceived, a float32
DynamicCache) and continues greedy generation from it: the first new token is the argmax of A's
prefill logits (A sends its id, with the run's parameters, as a JSON control line on B's stdin
before the stream), B computes the rest. B reports the token ids and timings as a JSON line on its
stdout and writes the logits of its decode steps to a .npy file in a temporary directory A made; A
compares both with its own one-process greedy generation from the same cache.

Columns (everything from this one run; CLOCK_MONOTONIC, which both processes share):
  same       tokens identical to A's one-process greedy generation, n of N
  1st diff   the first position (0-based, in the continuation) where B's token differs, "-" if none
  max|dlogit| the largest |logit difference| of B's decode steps vs A's, over the steps whose input
             tokens are still the same as A's (i.e. up to and including the first differing token)
  B/token    growth of A's session.stats["bytes_out"] during the send (HEAD, chunks, TAIL, any
             resends; TCP adds 4 bytes of record length per frame), per token of context. The f32
             payload is 30 layers x 2 x 3 heads x 64 x 4 B = 46,080 B per token
  enc ms     A: the float32 cache -> the wire dtype (cast or quantize), timed on its own
  xfer ms    A calls send_cache (the conversion above included, then the first frame) -> B's event
             loop has the verified stream (StreamComplete: chunk CRCs and the stream's xxh3_64 checked)
  load ms    B: the verified stream (StreamComplete) -> its KVCacheReceived: B's cache is built layer
             by layer while the stream arrives (KVLayerReceived: cast or dequantize per layer), so
             this is only what is left at the end
  ttft ms    B: verified stream -> the id of the first token B computes (load + one decode step)
  prefill ms B: its own prefill of the same prompt -> the first token's id (no handoff)
  speedup    prefill / ttft, and prefill / (xfer + ttft): what B saves by receiving the cache

Exit status 0 only when the f32 continuations are identical, B saw the first token A sent as the
argmax of its own prefill, and B exited cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # (the GGUF conversion's progress bar, in both processes)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

import resonant  # noqa: E402

import _smollm2  # noqa: E402
from _process_b import ProcessB, VerificationError, report, run_a, run_beside, say  # noqa: E402

DTYPES = ("f32", "bf16", "f16", "q8_0")
TOKENS = (100, 1000, 4000)
TIMEOUT = 120.0  # seconds for any one answer from B (its decode of a long prompt included)
F32_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4  # SmolLM2-135M: layers x (K, V) x kv heads x head_dim x 4 B


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # one clock for both processes


# ------------------------------------------------------------------ the handoff: send and receive


def signature(model, tok) -> "resonant.ModelSignature":
    """The model's signature: B serves with it (expected_signature) and refuses a cache of any other."""
    return resonant.ModelSignature.from_hf(model, tok, model_id=_smollm2.GGUF_FILE)


def wire_objects(cache, dtype: str):
    """What send_kv_cache sends for dtype (the conversion alone, timed for the "enc ms" column)."""
    from resonant.torch_utils import kv_objects

    return kv_objects(cache, dtype=dtype)


async def send_cache(peer, cache, dtype: str, stream_id: int | None = None, sig=None) -> int:
    """Stream a KV cache (a DynamicCache or ((k, v), ...)) in the wire dtype; returns the stream
    id once B has verified it (its xxh3_64 verdict). B gets KVLayerReceived events layer by layer
    and a KVCacheReceived with a ready DynamicCache."""
    return await peer.send_kv_cache(cache, signature=sig, dtype=dtype, stream_id=stream_id)


def cache_from(event):
    """The DynamicCache of a KVCacheReceived (in the sender's dtype, float32: bf16 / f16 cast back,
    q8_0 dequantized, f32 the received bytes themselves)."""
    if not isinstance(event, resonant.KVCacheReceived):
        raise VerificationError(f"expected a KVCacheReceived, got {type(event).__name__}")
    return event.cache


# ------------------------------------------------------------------ generation


def greedy(model, cache, first_token: int, n: int):
    """n tokens by greedy decoding from a cache whose next token is first_token: (ids, the
    float32 logits of the n - 1 decode steps, n-1 x vocab, time of the first computed id)."""
    import torch

    ids, logits, t_first = [first_token], [], None
    nxt = torch.tensor([[first_token]])
    with torch.no_grad():
        for _ in range(n - 1):
            out = model(nxt, cache=cache, use_cache=True)
            cache = out.cache
            step = out.logits[0, -1].float()
            nxt = step.argmax().view(1, 1)
            ids.append(int(nxt))
            if t_first is None:
                t_first = now_ns()
            logits.append(step.numpy())
    arr = np.stack(logits) if logits else np.zeros((0, model.config.vocab_size), np.float32)
    return ids, arr, t_first


def prefill(model, prompt):
    """(DynamicCache, argmax of the last position's logits) of a prompt."""
    import torch

    with torch.no_grad():
        out = model(prompt, use_cache=True)
    return out.cache, int(out.logits[0, -1].argmax())


# ------------------------------------------------------------------ process B: decode there


async def decoder_main(args) -> int:
    import torch

    tok, model = _smollm2.load()
    sig = signature(model, tok)
    loop = asyncio.get_running_loop()
    control: asyncio.Queue = asyncio.Queue()

    def read_stdin() -> None:  # A's control lines; EOF (A closes our stdin, or dies): time to go
        for line in sys.stdin:
            loop.call_soon_threadsafe(control.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(control.put_nowait, None)


    transports = ["tcp", "udp"] if args.transport == "both" else [args.transport]
    servers = {t: resonant.serve(f"{t}://127.0.0.1:0", expected_signature=sig) for t in transports}
    opened = {t: await s.__aenter__() for t, s in servers.items()}
    events: asyncio.Queue = asyncio.Queue()

    async def pump(server) -> None:
        while True:
            events.put_nowait(await server.next_event())

    pumps = [asyncio.ensure_future(pump(s)) for s in opened.values()]
    threading.Thread(target=read_stdin, daemon=True).start()
    say({"ports": {t: s.address[1] for t, s in opened.items()}, "pid": os.getpid(),
            "torch_threads": torch.get_num_threads()})
    prefills: dict[tuple, tuple[int, int]] = {}
    try:
        layouts, firsts, orders, verified = {}, {}, {}, {}
        stop = asyncio.ensure_future(control_wait(control, orders))
        while True:
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({getter, stop}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return 0
            address, ev = getter.result()
            t = now_ns()
            if isinstance(ev, resonant.StreamStarted):
                layouts[ev.stream_id], firsts[ev.stream_id] = ev.layout, t
            elif isinstance(ev, resonant.StreamComplete):
                verified[ev.stream_id] = t
            elif isinstance(ev, resonant.KVCacheReceived):
                while ev.stream_id not in orders:  # (A writes the control line before the stream)
                    await asyncio.sleep(0.001)
                order = orders.pop(ev.stream_id)
                layout = layouts.pop(ev.stream_id)
                t0 = t = verified.pop(ev.stream_id, t)
                cache = cache_from(ev)
                t_loaded = now_ns()
                ids, logits, t_first = greedy(model, cache, order["first_token"], order["new_tokens"])
                del cache
                path = pathlib.Path(order["tmpdir"]) / f"logits_{ev.stream_id}.npy"
                np.save(path, logits)
                key = tuple(order["prompt"])
                if key not in prefills:  # B's own prefill of the same prompt, once per prompt
                    p0 = now_ns()
                    _, tok0 = prefill(model, torch.tensor([order["prompt"]]))
                    prefills[key] = (now_ns() - p0, tok0)
                prefill_ns, tok0 = prefills[key]
                say({"sid": ev.stream_id, "t_first_frame_ns": firsts.pop(ev.stream_id, t), "t_have_ns": t,
                        "load_ns": t_loaded - t0, "ttft_ns": (t_first - t) if t_first else None,
                        "ids": ids, "logits": str(path), "prefill_ns": prefill_ns, "prefill_token": tok0,
                        "nbytes": ev.nbytes, "dtypes": sorted({resonant.DType(o.dtype).name for o in layout.objects})})
            elif isinstance(ev, (resonant.StreamFailed, resonant.FrameRejected, resonant.RemoteError)):
                say({"error": f"{type(ev).__name__}: {ev}"})
                return 1
    finally:
        for p in pumps:
            p.cancel()
        for s in servers.values():
            await s.__aexit__(None, None, None)


async def control_wait(control: asyncio.Queue, orders: dict) -> None:
    """Collect A's control lines into orders (by stream id) until A closes our stdin."""
    while True:
        doc = await control.get()
        if doc is None:
            return
        orders[doc["sid"]] = doc


# ------------------------------------------------------------------ process A: prefill here


async def head_main(args) -> int:
    t_start = time.monotonic()
    b = ProcessB(__file__, "decoder", "--transport", args.transport, timeout=TIMEOUT)
    result, rc = await run_beside(b, lambda b: run(args, b), t_start)  # (B loads the model while A does)
    result["decoder_exit_status"] = rc
    return report(result, args.json, print_table)


async def run(args, b: ProcessB) -> dict:
    import torch
    from resonant.torch_utils import kv_layers

    tok, model = _smollm2.load()
    sig = signature(model, tok)
    hello = await b.line(180.0)
    failures: list[str] = []
    transports = ["tcp", "udp"] if args.transport == "both" else [args.transport]
    sid = iter(range(1, 1 << 30))
    rows = []
    with tempfile.TemporaryDirectory(prefix="kv_handoff_") as tmp:
        peers = {t: await resonant.connect(f"{t}://127.0.0.1:{hello['ports'][t]}") for t in transports}
        try:
            # One untimed handoff so first-call costs (allocations, lazy init) are not counted.
            warm_prompt = _smollm2.prompt_ids(tok, 32)
            warm_cache, warm_tok = prefill(model, warm_prompt)
            for t in transports:
                await handoff(peers[t], b, next(sid), kv_layers(warm_cache), "f32", warm_tok, 2,
                              warm_prompt, tmp, sig)
            for n in args.tokens:
                prompt = _smollm2.prompt_ids(tok, n)
                t0 = now_ns()
                cache, first = prefill(model, prompt)
                a_prefill_ns = now_ns() - t0
                kv = kv_layers(cache)  # the prefill's tensors: generation concatenates onto copies
                ref_ids, ref_logits, _ = greedy(model, cache, first, args.new_tokens)
                del cache
                for t in transports:
                    for dtype in args.dtypes:
                        r = await handoff(peers[t], b, next(sid), kv, dtype, first, args.new_tokens, prompt, tmp, sig)
                        rows.append(compare(r, t, dtype, prompt.shape[1], ref_ids, ref_logits, first,
                                            a_prefill_ns, failures))
        finally:
            for p in peers.values():
                await p.close()
    return {"model": "SmolLM2-135M-Instruct (float32, CPU)", "new_tokens": args.new_tokens,
            "torch_threads": {"A": torch.get_num_threads(), "B": hello.get("torch_threads")},
            "f32_payload_bytes_per_token": F32_BYTES_PER_TOKEN, "results": rows, "failures": failures}


async def handoff(peer, b: ProcessB, sid: int, kv, dtype: str, first: int, new_tokens: int, prompt, tmp, sig) -> dict:
    await b.order({"sid": sid, "first_token": first, "new_tokens": new_tokens, "tmpdir": tmp,
                   "prompt": prompt[0].tolist()})
    e0 = now_ns()
    wire_objects(kv, dtype)  # (the conversion alone, for the "enc ms" column)
    enc_ns = now_ns() - e0
    before = peer.session.stats["bytes_out"]
    t0 = now_ns()
    await send_cache(peer, kv, dtype, sid, sig)
    t_verdict = now_ns()
    wire = peer.session.stats["bytes_out"] - before
    rep = await b.line()
    if rep.get("sid") != sid:
        raise VerificationError(f"process B reported stream {rep.get('sid')}, expected {sid}")
    logits = np.load(rep["logits"])
    os.unlink(rep["logits"])
    return {"rep": rep, "t0": t0, "t_verdict": t_verdict, "wire": wire, "logits": logits, "enc_ns": enc_ns}


def compare(r: dict, transport: str, dtype: str, n_ctx: int, ref_ids, ref_logits, first: int,
            a_prefill_ns: int, failures: list) -> dict:
    rep, ids, logits = r["rep"], r["rep"]["ids"], r["logits"]
    same = sum(a == b for a, b in zip(ids, ref_ids))
    diff = next((i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b), None)
    # decode step j (0-based) feeds token j and predicts token j + 1: its input prefix matches A's
    # while j < the first differing position (or everywhere, if none differ)
    steps = len(logits) if diff is None else min(len(logits), diff)
    max_dlogit = float(np.abs(logits[:steps] - ref_logits[:steps]).max()) if steps else 0.0
    xfer_ns = rep["t_have_ns"] - r["t0"]
    ttft_ns = rep["ttft_ns"]
    row = {"transport": transport, "tokens": n_ctx, "dtype": dtype, "received_dtypes": rep["dtypes"],
           "same": same, "of": len(ref_ids), "identical": ids == ref_ids, "first_diff": diff,
           "max_abs_dlogit": max_dlogit, "dlogit_steps": steps,
           "wire_bytes": r["wire"], "payload_bytes": rep["nbytes"], "wire_bytes_per_token": r["wire"] / n_ctx,
           "enc_ms": r["enc_ns"] / 1e6, "xfer_ms": xfer_ns / 1e6, "verdict_ms": (r["t_verdict"] - r["t0"]) / 1e6,
           "first_frame_ms": (rep["t_first_frame_ns"] - r["t0"]) / 1e6,
           "load_ms": rep["load_ns"] / 1e6, "ttft_ms": ttft_ns / 1e6 if ttft_ns else None,
           "b_prefill_ms": rep["prefill_ns"] / 1e6, "a_prefill_ms": a_prefill_ns / 1e6,
           "speedup": rep["prefill_ns"] / ttft_ns if ttft_ns else None,
           "speedup_with_xfer": rep["prefill_ns"] / (xfer_ns + ttft_ns) if ttft_ns else None}
    if rep["prefill_token"] != first:
        failures.append(f"{transport} {n_ctx} tokens: B's own prefill gives token {rep['prefill_token']}, A's {first}")
    if dtype == "f32" and not row["identical"]:
        failures.append(f"{transport} {n_ctx} tokens f32: continuation differs at {diff} ({same} of {len(ref_ids)})")
    return row


def print_table(result: dict) -> None:
    th = result["torch_threads"]
    print(f"{result['model']}, {result['new_tokens']} new tokens, torch threads A {th['A']} / B {th['B']}")
    head = ("transport", "tokens", "dtype", "same", "1st diff", "max|dlogit|", "B/token", "enc ms", "xfer ms", "load ms",
            "ttft ms", "prefill ms", "speedup", "w/ xfer")
    rows = []
    for r in result["results"]:
        rows.append((r["transport"], str(r["tokens"]), r["dtype"], f"{r['same']}/{r['of']}",
                     "-" if r["first_diff"] is None else str(r["first_diff"]), f"{r['max_abs_dlogit']:.3g}",
                     f"{r['wire_bytes_per_token']:,.0f}", f"{r['enc_ms']:.1f}", f"{r['xfer_ms']:.1f}", f"{r['load_ms']:.1f}",
                     f"{r['ttft_ms']:.1f}", f"{r['b_prefill_ms']:.1f}", f"{r['speedup']:.1f}x",
                     f"{r['speedup_with_xfer']:.1f}x"))
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    for r in result["results"]:
        verdict = "identical" if r["identical"] else f"differs from position {r['first_diff']}"
        print(f"  {r['transport']} {r['tokens']} tokens {r['dtype']}: continuation {verdict}")
    print(f"(f32 payload: {result['f32_payload_bytes_per_token']:,} B per token of context; "
          f"B exit status {result['decoder_exit_status']}; total {result['elapsed_s']} s)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--transport", choices=("tcp", "udp", "both"), default="both")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="prompt lengths (default: %(default)s)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help=f"wire dtypes of {', '.join(DTYPES)} (default: all)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per handoff (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="a ~64-token prompt, f32, 8 new tokens")
    p.add_argument("--role", choices=("prefill", "decoder"), default="prefill", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "decoder":
        return asyncio.run(decoder_main(args))
    if args.quick:
        args.tokens, args.dtypes, args.new_tokens = "64", "f32", 8
    try:
        args.tokens = [int(x) for x in str(args.tokens).split(",") if x.strip()]
    except ValueError:
        p.error(f"--tokens {args.tokens!r}: comma-separated integers")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or not args.dtypes or not args.tokens or min(args.tokens) < 2 or args.new_tokens < 2:
        p.error(f"--dtypes each of {', '.join(DTYPES)}; --tokens >= 2; --new-tokens >= 2")
    if not _smollm2.available():
        print(f"SmolLM2 is not installed: {_smollm2.INSTALL_HINT}", file=sys.stderr)
        return 2
    return run_a(head_main(args))


if __name__ == "__main__":
    sys.exit(main())
