"""The `resonant` command: recv, send, inspect, demo.

    resonant recv --listen udp://0.0.0.0:7000 [--json] [--save DIR [--max-bytes N]] [--count N]
    resonant send --to tcp://127.0.0.1:7000 kv.npy --type cache --zstd
    resonant inspect frame.bin [--json]
    resonant demo
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from resonant import _codec
from resonant._spec import (DTYPE_WIRE_NAMES, MESSAGE_CLASSES, NUMPY_DTYPES, REQUIRED_ROLES,
                            USER_MESSAGE_TYPES, DType, Flags, Modality, MsgType)
from resonant.errors import EncodeError, LocalProtocolError, ResonantError
from resonant.reassembler import ObjectReady, StreamComplete, StreamFailed, StreamStarted
from resonant.session import (
    ConnectionBroken,
    FrameRejected,
    HandshakeComplete,
    HandshakeFailed,
    MessageReceived,
    RemoteError,
)
from resonant.transforms import Key

# From the spec (schema/vframe.yaml): what `send --dtype` converts to (every dtype numpy holds), and
# what `send --type` sends (an application's message types whose smallest layout is tensors only:
# the array, or for several tensors its first axis, one per role).
_DTYPES = {DTYPE_WIRE_NAMES[code]: code for code in NUMPY_DTYPES}  # numpy dtype: _codec.numpy_dtype(code)
_TYPES = {MESSAGE_CLASSES[m].lower(): m for m in USER_MESSAGE_TYPES
          if REQUIRED_ROLES[m] and all(kind == "tensor" for _, kind in REQUIRED_ROLES[m])}


def _bf16():
    return _codec.numpy_dtype(DType.BF16)  # imports ml_dtypes on first use


# ------------------------------------------------------------------ formatting


def _peer(addr) -> str:
    return f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else str(addr)


def frame_json(frame) -> dict:
    """The header fields as integers named as in the spec, and the slices."""
    return {"version": frame.version, "msg_type": int(frame.msg_type), "flags": int(frame.flags),
            "stream_id": frame.stream_id, "frame_seq": frame.frame_seq, "space_hash32": frame.space_hash32,
            "modality": int(frame.modality),
            "slices": [{"dtype": int(s.dtype), "shape": list(s.shape), "payload_len": s.nbytes} for s in frame.slices]}


def frame_line(frame, doc: dict | None) -> str:
    """One human-readable line, in the manner of the reference receiver."""
    mt = MsgType(frame.msg_type).name
    parts = [f"[{mt}] stream={frame.stream_id} seq={frame.frame_seq} space=0x{frame.space_hash32:08x} "
             f"modality={Modality(frame.modality).name}"]
    if int(frame.flags):
        parts.append("flags=" + "|".join(f.name for f in Flags if f & frame.flags))
    if frame.transforms:
        parts.append(f"wire=v{frame.version}")
    for s in frame.slices:
        parts.append(f"{DType(s.dtype).name}{list(s.shape)} {s.nbytes}B")
    if doc is not None:
        parts.append(json.dumps(doc, separators=(",", ":"))[:160])
    elif isinstance(frame, _codec.Sync) and frame.json is None:
        parts.append("(heartbeat)")
    elif mt in ("THINK", "ASK", "CRITIQUE", "CACHE") and frame.slices:
        s = frame.slices[0]
        try:
            a = s.numpy().astype(np.float32, copy=False).ravel()
            if a.size:
                parts.append(f"mean={float(a.mean()):.4g} norm={float(np.linalg.norm(a)):.4g}")
        except ResonantError:
            pass  # Q4 / sparse payloads have no element view
    return " ".join(parts)


# What `resonant recv --save` writes in total unless --max-bytes says otherwise.
DEFAULT_SAVE_MAX_BYTES = 1 << 30
# The exit status of `resonant recv` when a stream was not saved because of --max-bytes.
EXIT_SAVE_QUOTA = 3


def _save_plan(directory: Path, ev: StreamComplete, layout) -> list[tuple[Path, np.ndarray]]:
    """The .npy files a completed stream becomes: (path, array as written)."""
    plan = []
    for obj, arr in zip(layout.objects if layout is not None else [], ev.objects):
        name = obj.name or f"object{obj.index}"
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        if obj.dtype == DType.BF16:  # .npy has no bfloat16: keep the bits, say so in the name
            plan.append((directory / f"stream{ev.stream_id}_{obj.index:04d}_{safe}.bf16.npy", arr.view(np.uint16)))
        elif arr.dtype.kind == "V":  # Q4 / sparse: the raw payload bytes
            plan.append((directory / f"stream{ev.stream_id}_{obj.index:04d}_{safe}.{DType(obj.dtype).name.lower()}.npy",
                         arr.view(np.uint8)))
        else:
            plan.append((directory / f"stream{ev.stream_id}_{obj.index:04d}_{safe}.npy", arr))
    return plan


def _npy_bytes(arr: np.ndarray) -> int:
    """The size of the .npy file np.save writes for arr: its header, then its data."""
    import io
    fmt = np.lib.format
    head = io.BytesIO()
    try:
        fmt.write_array_header_1_0(head, fmt.header_data_from_array_1_0(arr))
    except ValueError:  # a header too long for format 1.0: np.save writes 2.0
        head = io.BytesIO()
        fmt.write_array_header_2_0(head, fmt.header_data_from_array_1_0(arr))
    return len(head.getvalue()) + arr.nbytes


def _save(plan: list[tuple[Path, np.ndarray]]) -> list[str]:
    paths = []
    for path, arr in plan:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, arr, allow_pickle=False)
        paths.append(str(path))
    return paths


# ------------------------------------------------------------------ recv


def _session_config(args) -> dict:
    kw: dict[str, Any] = {}
    if getattr(args, "key_file", None):
        kw["key"] = Key.from_file(args.key_file)
    if getattr(args, "space_hash", None) is not None:
        kw["expected_space_hash"] = args.space_hash
        kw["space_hash32"] = args.space_hash
    if getattr(args, "strict", False):
        kw["strict"] = True
    if getattr(args, "max_frame_bytes", None) is not None:
        kw["max_frame_bytes"] = args.max_frame_bytes
    return kw


async def _recv(args) -> int:
    from resonant.aio import serve

    out = sys.stdout
    count = 0
    written = 0    # bytes of .npy files written (--save), at most args.max_bytes
    refused = 0    # completed streams not saved because of --max-bytes
    layouts: dict[tuple, Any] = {}
    save = Path(args.save) if args.save else None
    cfg = _session_config(args)
    cfg["compress"] = ("zstd", "none")
    async with serve(args.listen, **cfg) as server:
        print(f"listening on {args.listen.split('://')[0]}://{_peer(server.address)}", file=sys.stderr, flush=True)
        async for addr, ev in server:
            line: Any = None
            counted = False
            if isinstance(ev, MessageReceived):
                # Handshake documents are printed (the reference receiver prints every frame)
                # but not counted: --count N waits for N data messages or streams.
                counted = ev.document is None or ev.document.get("method") not in ("ping", "capability", "error")
                line = ({"event": "message", "peer": _peer(addr), **frame_json(ev.frame),
                         **({"document": ev.document} if ev.document is not None else {})}
                        if args.json else f"{_peer(addr)} {frame_line(ev.frame, ev.document)}")
            elif isinstance(ev, StreamStarted):
                layouts[addr, ev.stream_id] = ev.layout
                lay = ev.layout
                line = ({"event": "stream_started", "peer": _peer(addr), "stream_id": ev.stream_id,
                         "objects": len(lay.objects), "total_bytes": lay.total_bytes, "chunks": lay.chunks}
                        if args.json else f"{_peer(addr)} [STREAM] stream={ev.stream_id} started: "
                        f"{len(lay.objects)} objects, {lay.total_bytes} bytes in {lay.chunks} chunks")
            elif isinstance(ev, ObjectReady):
                continue
            elif isinstance(ev, StreamComplete):
                counted = True
                lay = layouts.pop((addr, ev.stream_id), None)
                saved: list[str] = []
                not_saved = None
                if save is not None:
                    plan = _save_plan(save, ev, lay)
                    size = sum(_npy_bytes(a) for _, a in plan)
                    if written + size > args.max_bytes:
                        refused += 1
                        not_saved = (f"{size} bytes of .npy files would bring what this receiver has written to "
                                     f"{written + size} bytes, over --max-bytes {args.max_bytes}")
                        print(f"resonant recv: stream {ev.stream_id} from {_peer(addr)} not saved: {not_saved}",
                              file=sys.stderr, flush=True)
                    else:
                        saved = _save(plan)
                        written += size
                objs = [{"dtype": int(o.dtype), "shape": list(o.shape), "nbytes": o.nbytes, "name": o.name,
                         "layer": o.layer} for o in (lay.objects if lay else [])]
                line = ({"event": "stream_complete", "peer": _peer(addr), "stream_id": ev.stream_id,
                         "nbytes": ev.nbytes, "xxh3_64": f"{ev.xxh3_64:016x}", "verified": True, "objects": objs,
                         "saved": saved, **({"not_saved": not_saved} if not_saved else {})}
                        if args.json else f"{_peer(addr)} [STREAM] stream={ev.stream_id} complete: {len(ev.objects)} "
                        f"objects, {ev.nbytes} bytes, xxh3_64 {ev.xxh3_64:016x} verified"
                        + (f", saved {len(saved)} .npy files to {save}" if saved else "")
                        + (", NOT saved (--max-bytes)" if not_saved else ""))
            elif isinstance(ev, StreamFailed):
                counted = True
                layouts.pop((addr, ev.stream_id), None)
                line = ({"event": "stream_failed", "peer": _peer(addr), "stream_id": ev.stream_id,
                         "reason": ev.reason, "detail": ev.detail, "missing": [list(r) for r in ev.missing],
                         "missing_more": ev.missing_more}
                        if args.json else f"{_peer(addr)} [STREAM] stream={ev.stream_id} FAILED ({ev.reason}): "
                        f"{ev.detail}; missing byte ranges {ev.missing[:8]}"
                        + (f" and {len(ev.missing) - 8 + ev.missing_more} more" if len(ev.missing) > 8 or ev.missing_more
                           else ""))
            elif isinstance(ev, (FrameRejected, ConnectionBroken)):
                what = ev.reason if isinstance(ev, FrameRejected) else "connection"
                detail = ev.detail if isinstance(ev, FrameRejected) else str(ev.error)
                print(f"{_peer(addr)} rejected ({what}): {detail}", file=sys.stderr, flush=True)
                continue
            elif isinstance(ev, HandshakeComplete):
                a = ev.agreement
                print(f"{_peer(addr)} handshake: protocol {a.proto}, compress {a.compress}, crypto {a.crypto}, "
                      f"max_frame_bytes {a.max_frame_bytes}", file=sys.stderr, flush=True)
                continue
            elif isinstance(ev, (HandshakeFailed, RemoteError)):
                print(f"{_peer(addr)} {type(ev).__name__}: {ev.code}: {ev.message}", file=sys.stderr, flush=True)
                continue
            else:
                continue
            print(json.dumps(line) if args.json else line, file=out, flush=True)
            if counted:
                count += 1
                if args.count and count >= args.count:
                    return EXIT_SAVE_QUOTA if refused else 0
    return EXIT_SAVE_QUOTA if refused else 0


# ------------------------------------------------------------------ send


def _load(path: str, dtype: str | None) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"resonant send: cannot read {path}: {exc}")
    if path.endswith(".bf16.npy") and arr.dtype == np.uint16:
        arr = arr.view(_bf16())
    if dtype is not None:
        arr = arr.astype(_codec.numpy_dtype(_DTYPES[dtype]))
    code = _codec.dtype_of_numpy(arr.dtype)
    if code is None or arr.dtype != _codec.numpy_dtype(code):
        raise SystemExit(f"resonant send: {path} holds {arr.dtype}; give --dtype {'|'.join(_DTYPES)} to convert it")
    return np.ascontiguousarray(arr)


def _tensors(kind: str, arr: np.ndarray) -> list[np.ndarray]:
    """The array as the tensors of message type `kind`: itself, or one per role along its first axis."""
    roles = [name for name, _ in REQUIRED_ROLES[_TYPES[kind]]]
    if len(roles) == 1:
        return [arr]
    if arr.ndim == 0 or arr.shape[0] != len(roles):
        raise SystemExit(f"resonant send: --type {kind} takes an array of shape ({len(roles)}, ...): "
                         f"{' then '.join(roles)}")
    return list(arr)


def _message(kind: str, arr: np.ndarray, stream_id: int, space: int):
    cls = getattr(_codec, MESSAGE_CLASSES[_TYPES[kind]])
    return cls(*_tensors(kind, arr), stream_id=stream_id, space_hash32=space)


class _Progress:
    def __init__(self, total: int) -> None:
        self.total = total
        self.start = time.perf_counter()
        self.last = 0.0
        self.tty = sys.stderr.isatty()

    def __call__(self, sent: int, total: int) -> None:
        now = time.perf_counter()
        if sent < total and now - self.last < (0.1 if self.tty else 1.0):
            return
        self.last = now
        frac = sent / total if total else 1.0
        rate = sent / max(now - self.start, 1e-9) / 1e6
        bar = "#" * int(frac * 30)
        end = "\n" if sent >= total or not self.tty else "\r"
        print(f"[{bar:<30}] {frac:6.1%} {sent / 1e6:8.1f}/{total / 1e6:.1f} MB {rate:8.1f} MB/s", end=end,
              file=sys.stderr, flush=True)


async def _send(args) -> int:
    from resonant.aio import connect

    arr = _load(args.file, args.dtype)
    cfg = _session_config(args)
    cfg["compress"] = ("zstd", "none") if args.zstd else ("none", "zstd")
    if args.space_hash is not None:
        cfg.pop("expected_space_hash", None)
        cfg["strict"] = False
    async with connect(args.to, handshake=not args.no_handshake, **cfg) as peer:
        space = args.space_hash or 0
        try:
            frame = _message(args.type, arr, args.stream_id, space)
            await peer.send(frame)
            print(f"sent {MsgType(frame.msg_type).name} {arr.dtype}{list(arr.shape)} ({arr.nbytes} bytes) "
                  f"to {args.to}", file=sys.stderr)
            await asyncio.sleep(0.05)  # let the frame leave before the socket closes
            return 0
        except (EncodeError, LocalProtocolError):
            pass  # larger than one (agreed) frame
        # Too large for one frame: a V-Stream.
        objects = _tensors(args.type, arr)
        names = [name for name, _ in REQUIRED_ROLES[_TYPES[args.type]]] if len(objects) > 1 else [Path(args.file).stem]
        progress = _Progress(arr.nbytes) if arr.nbytes >= (4 << 20) else None
        t = time.perf_counter()
        sid = await peer.send_stream(objects, stream_id=args.stream_id or None, names=names,
                                     msg_type=int(_TYPES[args.type]), progress=progress,
                                     space_hash32=space)
        dt = time.perf_counter() - t
        print(f"sent stream {sid}: {arr.dtype}{list(arr.shape)} ({arr.nbytes} bytes) in {dt:.3f} s "
              f"({arr.nbytes / max(dt, 1e-9) / 1e6:.1f} MB/s) to {args.to}", file=sys.stderr)
        await asyncio.sleep(0.05)  # let the last frames leave before the socket closes
    return 0


# ------------------------------------------------------------------ inspect


def _inspect(args) -> int:
    from resonant import inspect as rinspect

    try:
        data = Path(args.file).read_bytes()
    except OSError as exc:
        raise SystemExit(f"resonant inspect: {exc}")
    codec = None
    if args.key_file:
        from resonant.transforms import Codec
        codec = Codec(key=Key.from_file(args.key_file), require_encryption=False)
    if args.json:
        doc = rinspect.render_json(data, codec=codec)
        print(json.dumps(doc, indent=2))
        return 1 if doc.get("error") else 0
    print(rinspect.render_text(data, codec=codec))
    return 1 if rinspect.inspect(data, codec=codec).error is not None else 0


# ------------------------------------------------------------------ main


def _u32(text: str) -> int:
    v = int(text, 0)
    if not 0 <= v < 1 << 32:
        raise argparse.ArgumentTypeError(f"{text} is not a u32")
    return v


def _size(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not a number of bytes") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resonant", description="Send and receive V-Frames: hidden states, KV caches, "
                                "embeddings and control messages between models.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("recv", help="receive and print messages", description="Listen for frames and print one line "
                       "per message (a V-Stream counts once, when it completes or fails).")
    r.add_argument("--listen", required=True, metavar="URL", help="udp://HOST:PORT or tcp://HOST:PORT")
    r.add_argument("--json", action="store_true", help="one JSON object per line, header fields as integers")
    r.add_argument("--save", metavar="DIR", help="save completed streams as .npy files in DIR")
    r.add_argument("--max-bytes", type=_size, default=DEFAULT_SAVE_MAX_BYTES, metavar="N",
                   help="write at most N bytes of .npy files in total with --save (default 1 GiB = "
                   f"{DEFAULT_SAVE_MAX_BYTES}); a completed stream that would go over it is not saved (nothing of it "
                   f"is written), a line on stderr says so, and the exit status is {EXIT_SAVE_QUOTA}")
    r.add_argument("--count", type=int, metavar="N", help="exit after N messages (data messages and completed or "
                   "failed streams; handshake documents are printed but not counted), with status 0, or 3 if "
                   "--max-bytes kept a stream from being saved")
    r.add_argument("--key-file", metavar="F", help="decrypt with this key (and require encryption)")
    r.add_argument("--space-hash", type=_u32, metavar="H", help="accept only this embedding space (space_hash32)")
    r.add_argument("--max-frame-bytes", type=int, metavar="N", help="largest frame the peers may send (512..65536)")
    r.add_argument("--strict", action="store_true", help="require the handshake before data (the default with a key "
                   "or a space hash)")

    s = sub.add_parser("send", help="send an array (.npy) as one message or a V-Stream",
                       description="Send FILE.npy; arrays too large for one frame go as a V-Stream.")
    s.add_argument("--to", required=True, metavar="URL", help="udp://HOST:PORT or tcp://HOST:PORT")
    s.add_argument("file", metavar="FILE.npy")
    several = [f"{kind} takes an array of shape ({len(REQUIRED_ROLES[m])}, ...): "
               f"{', '.join(name for name, _ in REQUIRED_ROLES[m])}" for kind, m in _TYPES.items()
               if len(REQUIRED_ROLES[m]) > 1]
    s.add_argument("--type", choices=list(_TYPES), default=next(iter(_TYPES)),
                   help="message type" + (f" ({'; '.join(several)})" if several else ""))
    s.add_argument("--dtype", choices=list(_DTYPES), help="convert the array first")
    s.add_argument("--zstd", action="store_true", help="compress (when the receiver supports it)")
    s.add_argument("--key-file", metavar="F", help="encrypt with this key")
    s.add_argument("--space-hash", type=_u32, metavar="H", help="space_hash32 to stamp on the frames and announce")
    s.add_argument("--stream-id", type=_u32, default=1, metavar="ID", help="stream_id (default 1)")
    s.add_argument("--no-handshake", action="store_true", help="send without the handshake (as the reference does)")
    s.add_argument("--max-frame-bytes", type=int, metavar="N", help="largest frame to send, 512..65536 (e.g. 1200 on "
                   "small-MTU UDP paths; the receiver may lower it further)")

    i = sub.add_parser("inspect", help="decode a frame file and annotate every field",
                       description="Print a frame field by field with the spec's names and byte offsets.")
    i.add_argument("file", metavar="FILE")
    i.add_argument("--json", action="store_true", help="JSON output")
    i.add_argument("--key-file", metavar="F", help="decrypt an encrypted (version 2) frame with this key")

    d = sub.add_parser("demo", help="a receiver and a sender on loopback, with a summary table",
                       description="Start a receiver and a sender on loopback: handshake, a Think, a multi-megabyte "
                       "KV cache as a V-Stream, and a Critique; print sizes, latencies, throughput and verification.")
    d.add_argument("--transport", choices=["tcp", "udp"], default="tcp")
    d.add_argument("--layers", type=int, default=24, help="KV cache layers (default 24)")
    d.add_argument("--tokens", type=int, default=512, help="KV cache tokens (default 512)")
    d.add_argument("--zstd", action="store_true", help="compress frames")
    d.add_argument("--encrypt", action="store_true", help="encrypt frames with a fresh key")
    d.add_argument("--json", action="store_true", help="print the summary as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "recv":
            return asyncio.run(_recv(args))
        if args.command == "send":
            return asyncio.run(_send(args))
        if args.command == "inspect":
            return _inspect(args)
        from resonant.demo import run_demo
        return asyncio.run(run_demo(args))
    except KeyboardInterrupt:
        return 130
    except (ResonantError, OSError, ValueError) as exc:
        print(f"resonant {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
