"""The `resonant` command: recv, send, inspect, demo.

    resonant recv --listen udp://0.0.0.0:7000 [--json] [--save DIR [--max-bytes N]] [--count N]
    resonant send --to tcp://127.0.0.1:7000 kv.npy --type cache --zstd
    resonant inspect frame.bin [--json]
    resonant keygen peer.key
    resonant demo
    resonant --version
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from resonant import _codec
from resonant._spec import (DTYPE_FALLBACK, DTYPE_WIRE_NAMES, MESSAGE_CLASSES, NUMPY_DTYPES, REQUIRED_ROLES,
                            USER_MESSAGE_TYPES, DType, Flags, Modality, MsgType)
from resonant.errors import (DecryptionFailed, EncodeError, HandshakeRefused, LocalProtocolError, NotEncrypted,
                             ResonantError, UnknownKey)
from resonant.reassembler import ObjectReady, StreamComplete, StreamFailed, StreamStarted
from resonant.session import (
    ConnectionBroken,
    FrameRejected,
    HandshakeComplete,
    HandshakeFailed,
    MessageReceived,
    REFERENCE_ONE_FRAME,
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
    """The header fields as integers named as in the spec, and the slices (each dtype's code, and
    beside it its wire name from the spec)."""
    return {"version": frame.version, "msg_type": int(frame.msg_type), "flags": int(frame.flags),
            "stream_id": frame.stream_id, "frame_seq": frame.frame_seq, "space_hash32": frame.space_hash32,
            "modality": int(frame.modality),
            "slices": [{"dtype": int(s.dtype), "dtype_name": DTYPE_WIRE_NAMES.get(int(s.dtype)), "shape": list(s.shape),
                        "payload_len": s.nbytes} for s in frame.slices]}


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
    if not frame.layout_ok:
        parts.append(f"(layout: {frame.layout_reason})")
    if doc is not None:
        parts.append(json.dumps(doc, separators=(",", ":")))  # whole: a cut document is not JSON
    elif isinstance(frame, _codec.Sync) and not frame.slices:
        parts.append("(heartbeat)")
    elif isinstance(frame, _codec.Sync):  # a Sync that is no control document: its payload, as such
        raw = bytes(frame.slices[0].payload)
        try:
            json.loads(raw.decode("utf-8"))
            what = "(JSON)"
        except ValueError:  # (UnicodeDecodeError is one)
            what = "(not JSON)"
        parts.append(f"{what} {raw[:120].decode('utf-8', 'backslashreplace')!r}")
    elif mt in ("THINK", "ASK", "CRITIQUE", "CACHE") and frame.slices:
        s = frame.slices[0]
        try:
            a = s.numpy().astype(np.float32, copy=False).ravel()
            if a.size:
                with np.errstate(all="ignore"):  # a peer's values may overflow the sums: inf/nan, no warning
                    parts.append(f"mean={float(a.mean()):.4g} norm={float(np.linalg.norm(a)):.4g}")
        except ResonantError:
            pass  # Q4 / sparse payloads have no element view
    return " ".join(parts)


# What `resonant recv --save` writes in total unless --max-bytes says otherwise.
DEFAULT_SAVE_MAX_BYTES = 1 << 30
# The exit status of `resonant recv` when a stream was not saved because of --max-bytes.
EXIT_SAVE_QUOTA = 3


def _save_plan(directory: Path, ev: StreamComplete, layout) -> list[tuple[Path, str, np.ndarray]]:
    """The .npy files a completed stream becomes: (path without its extension, extension, array as
    written); _save numbers the name (-1, -2, ...) when a file of that name exists."""
    plan = []
    for obj, arr in zip(layout.objects if layout is not None else [], ev.objects):
        name = obj.name or f"object{obj.index}"
        safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
        stem = directory / f"stream{ev.stream_id}_{obj.index:04d}_{safe}"
        if obj.dtype == DType.BF16:  # .npy has no bfloat16: keep the bits, say so in the name
            plan.append((stem, ".bf16.npy", arr.view(np.uint16)))
        elif arr.dtype.kind == "V":  # Q4 / sparse: the raw payload bytes
            plan.append((stem, f".{DType(obj.dtype).name.lower()}.npy", arr.view(np.uint8)))
        else:
            plan.append((stem, ".npy", arr))
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


# How many numbered names (NAME-1.npy, NAME-2.npy, ...) --save tries when NAME.npy exists.
_SAVE_NUMBERED_NAMES = 10_000


def _save(plan: list[tuple[Path, str, np.ndarray]]) -> list[str]:
    """Write each array to a new file: an existing file is never replaced (the name is numbered,
    and the file is created with O_EXCL, so that a file appearing meanwhile is not replaced either)."""
    paths = []
    for stem, ext, arr in plan:
        for n in range(_SAVE_NUMBERED_NAMES):
            path = stem.with_name(stem.name + (f"-{n}" if n else "") + ext)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except FileExistsError:
                continue
            break
        else:
            raise OSError(f"{stem}{ext} and {_SAVE_NUMBERED_NAMES - 1} numbered names after it exist already")
        with os.fdopen(fd, "wb") as f:
            np.save(f, arr, allow_pickle=False)
        paths.append(str(path))
    return paths


def _check_save_dir(save: Path) -> None:
    """Make sure --save DIR can take files before anything is received: create it if missing, then
    create and remove a file in it. A clear error, exit status 2, otherwise."""
    try:
        save.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=save, prefix=".resonant-probe-"):
            pass
    except OSError as exc:
        raise _UsageError(f"--save {save}: cannot write files there: {exc.strerror or exc}") from None


# ------------------------------------------------------------------ recv


def _rejection(ev: FrameRejected) -> tuple[str, str]:
    """What recv says of a rejected frame: (what, detail), in the command line's terms."""
    exc = ev.error
    if isinstance(exc, NotEncrypted):
        return ev.reason, (f"{exc.path}: the frame is not encrypted, and this receiver requires encryption (it was "
                           "started with --key-file): send with --key-file, or start recv without --key-file")
    if isinstance(exc, UnknownKey):
        return "wrong key", f"{exc}: the sender's --key-file is another key; use the same key file on both sides"
    if isinstance(exc, DecryptionFailed):
        return "wrong key", f"{exc}: the sender's --key-file holds another key (or the frame was altered)"
    return ev.reason, ev.detail


def _session_config(args) -> dict:
    kw: dict[str, Any] = {}
    if getattr(args, "key_file", None):
        kw["key"] = Key.from_file(args.key_file)
    if getattr(args, "space_hash", None) is not None:
        kw["expected_space_hash"] = args.space_hash
        kw["space_hash32"] = args.space_hash
    if getattr(args, "strict", False):
        kw["strict"] = True
        kw["strict_layout"] = True
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
    if save is not None:
        _check_save_dir(save)  # before binding: a bad --save is found before anything is received
    cfg = _session_config(args)
    cfg["compress"] = ("zstd", "none")
    cfg["hold_verdicts"] = True  # a sender's stream is verified once it is printed, or saved (--save)
    failed = 0     # streams that failed or could not be saved: exit 1
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
                why = "save_refused"  # (--max-bytes; "save_failed": the files could not be written)
                if save is not None:
                    plan = _save_plan(save, ev, lay)
                    size = sum(_npy_bytes(a) for *_, a in plan)
                    if written + size > args.max_bytes:
                        refused += 1
                        not_saved = (f"{size} bytes of .npy files would bring what this receiver has written to "
                                     f"{written + size} bytes, over --max-bytes {args.max_bytes}")
                        print(f"resonant recv: stream {ev.stream_id} from {_peer(addr)} not saved: {not_saved}",
                              file=sys.stderr, flush=True)
                    else:
                        try:
                            saved = _save(plan)
                        except OSError as exc:  # e.g. a full disk: the sender learns it from the verdict
                            failed += 1
                            why = "save_failed"
                            not_saved = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
                            print(f"resonant recv: stream {ev.stream_id} from {_peer(addr)} not saved: {not_saved}",
                                  file=sys.stderr, flush=True)
                        else:
                            written += size
                server.verdict(addr, ev.stream_id, not not_saved, why if not_saved else "",
                               f"the receiver could not save it: {not_saved}" if not_saved else "")
                objs = [{"dtype": int(o.dtype), "dtype_name": DTYPE_WIRE_NAMES.get(int(o.dtype)),
                         "shape": list(o.shape), "nbytes": o.nbytes, "name": o.name,
                         "layer": o.layer} for o in (lay.objects if lay else [])]
                line = ({"event": "stream_complete", "peer": _peer(addr), "stream_id": ev.stream_id,
                         "nbytes": ev.nbytes, "xxh3_64": f"{ev.xxh3_64:016x}", "verified": True, "objects": objs,
                         "saved": saved, **({"not_saved": not_saved} if not_saved else {})}
                        if args.json else f"{_peer(addr)} [STREAM] stream={ev.stream_id} complete: {len(ev.objects)} "
                        f"objects, {ev.nbytes} bytes, xxh3_64 {ev.xxh3_64:016x} verified"
                        + (f", saved {len(saved)} .npy files to {save}" if saved else "")
                        + (f", NOT saved ({not_saved})" if not_saved else ""))
            elif isinstance(ev, StreamFailed):
                counted = True
                failed += 1
                layouts.pop((addr, ev.stream_id), None)
                line = ({"event": "stream_failed", "peer": _peer(addr), "stream_id": ev.stream_id,
                         "reason": ev.reason, "detail": ev.detail, "missing": [list(r) for r in ev.missing],
                         "missing_more": ev.missing_more}
                        if args.json else f"{_peer(addr)} [STREAM] stream={ev.stream_id} FAILED ({ev.reason}): "
                        f"{ev.detail}; missing byte ranges {ev.missing[:8]}"
                        + (f" and {len(ev.missing) - 8 + ev.missing_more} more" if len(ev.missing) > 8 or ev.missing_more
                           else ""))
            elif isinstance(ev, FrameRejected):
                # Rejected input is its own event, on stdout with the messages (and logged on stderr).
                what, detail = _rejection(ev)
                print(f"{_peer(addr)} rejected ({what}): {detail}", file=sys.stderr, flush=True)
                line = ({"event": "rejected", "peer": _peer(addr), "reason": ev.reason, "detail": detail}
                        if args.json else f"{_peer(addr)} [REJECTED] ({what}) {detail}")
            elif isinstance(ev, ConnectionBroken):
                print(f"{_peer(addr)} rejected (connection): {ev.error}", file=sys.stderr, flush=True)
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
                    await _linger(server)
                    return 1 if failed else EXIT_SAVE_QUOTA if refused else 0
    return 1 if failed else EXIT_SAVE_QUOTA if refused else 0


async def _linger(server) -> None:
    """--count reached over UDP with feedback: the verdict just sent may be lost, and a sender that has
    not heard it probes with TAIL, which the server answers with the verdict again. So stay while
    frames keep coming: until none came for two of the sender's longest probe gaps (a probe may be
    lost too; feedback_timeout_ms / feedback_probes each, plus a report interval), at most
    feedback_timeout_ms and that gap (the sender gives up feedback_timeout_ms after the last report
    it heard, which came before the verdict). (Exiting at once made `resonant send` fail with
    no_feedback after 5 s for a stream the receiver had verified, once per lost verdict.)"""
    from resonant import handshake

    if server._udp is None or not any(link.session._fb for link in server.links.values()):
        return
    quiet = (2 * handshake.FEEDBACK_TIMEOUT_MS / handshake.FEEDBACK_PROBES + handshake.REPORT_INTERVAL_MS) / 1000
    start = last = time.monotonic()
    seen = -1
    while time.monotonic() - start < handshake.FEEDBACK_TIMEOUT_MS / 1000 + quiet:
        n = sum(link.session.stats["frames_in"] for link in server.links.values())
        now = time.monotonic()
        if n != seen:
            seen, last = n, now
        elif now - last > quiet:
            return
        await asyncio.sleep(handshake.REPORT_INTERVAL_MS / 1000)


# ------------------------------------------------------------------ send


def _load(path: str, dtype: str | None) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as exc:
        raise SystemExit(f"resonant send: cannot read {path}: {exc.strerror or exc}")
    if magic != b"\x93NUMPY":
        what = "a .npz archive (send one of its arrays)" if magic[:2] == b"PK" else "not a .npy file"
        raise SystemExit(f"resonant send: {path} is {what}: it does not start with the .npy magic; write the array "
                         "with numpy.save")
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


def _sent_dtype(arr: np.ndarray, agreement) -> str:
    """What Session.send converts arr's dtype to when the peer lacks it (the dtype fallback rules)."""
    code = _codec.dtype_of_numpy(arr.dtype)
    name = DTYPE_WIRE_NAMES[code] if code is not None else str(arr.dtype)
    return next((t for t in DTYPE_FALLBACK.get(name, ()) if t in agreement.dtypes), name)


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
        self.done = False

    def __call__(self, sent: int, total: int) -> None:
        now = time.perf_counter()
        if self.done or (sent < total and (not self.tty or now - self.last < 0.1)):
            return  # (without a terminal: one line, at the end; and the end only once)
        self.last = now
        self.done = sent >= total
        frac = sent / total if total else 1.0
        rate = sent / max(now - self.start, 1e-9) / 1e6
        bar = "#" * int(frac * 30)
        end = "\n" if sent >= total else "\r"
        print(f"[{bar:<30}] {frac:6.1%} {sent / 1e6:8.1f}/{total / 1e6:.1f} MB {rate:8.1f} MB/s", end=end,
              file=sys.stderr, flush=True)


def _wire(peer, raw: int, out0: int) -> str:
    """The bytes sent since out0 (frames, as the session counts them), and with zstd their share of raw."""
    wire = peer.session.stats["bytes_out"] - out0
    agreed = peer.agreement
    zstd = agreed is not None and agreed.compress == "zstd"
    return f"{wire} bytes on the wire" + (f" (zstd: {100 * wire / max(raw, 1):.1f}% of the raw size)" if zstd else "")


async def _send(args) -> int:
    from resonant.aio import connect

    arr = _load(args.file, args.dtype)
    cfg = _session_config(args)
    cfg["compress"] = ("zstd", "none") if args.zstd else ("none", "zstd")
    if args.space_hash is not None:
        cfg.pop("expected_space_hash", None)
        cfg["strict"] = args.strict
    # A receiver that never answers the pings (the reference's) gets version-1 frames, unless a key or
    # --strict forbids it (then the handshake fails with TIMEOUT).
    fallback = not (args.key_file or args.strict or args.no_handshake)
    async with connect(args.to, handshake=not args.no_handshake, reference_fallback=fallback, **cfg) as peer:
        if peer.reference_mode:
            a = peer.agreement
            print(f"resonant send: no capability from {args.to} within {peer.session.config.reference_fallback_wait} s: "
                  f"the peer looks like a reference receiver; sending version-1 frames ({'/'.join(a.dtypes)}, one "
                  "frame per message)", file=sys.stderr, flush=True)
        space = args.space_hash or 0
        try:
            frame = _message(args.type, arr, args.stream_id, space)
            converted = peer.session.stats["dtype_converted"]
            out0 = peer.session.stats["bytes_out"]
            await peer.send(frame)
            print(f"sent {MsgType(frame.msg_type).name} {arr.dtype}{list(arr.shape)} ({arr.nbytes} bytes) "
                  + (f"converted to {_sent_dtype(arr, peer.agreement)} (what the peer reads) "
                     if peer.session.stats["dtype_converted"] != converted else "")
                  + f"to {args.to}: {_wire(peer, arr.nbytes, out0)}", file=sys.stderr)
            await asyncio.sleep(0.05)  # let the frame leave before the socket closes
            return 0
        except (EncodeError, LocalProtocolError) as exc:
            if peer.reference_mode:  # one frame per message
                if "max_frame_bytes" not in exc.detail:
                    raise
                raise LocalProtocolError("send", f"{args.file} holds {arr.nbytes} bytes, more than one frame carries "
                                         f"({peer.session.max_frame_bytes} bytes); {REFERENCE_ONE_FRAME}") from None
            # larger than one (agreed) frame
        # Too large for one frame: a V-Stream.
        objects = _tensors(args.type, arr)
        names = [name for name, _ in REQUIRED_ROLES[_TYPES[args.type]]] if len(objects) > 1 else [Path(args.file).stem]
        progress = _Progress(arr.nbytes) if arr.nbytes >= (4 << 20) else None
        t = time.perf_counter()
        out0 = peer.session.stats["bytes_out"]
        sid = await peer.send_stream(objects, stream_id=args.stream_id or None, names=names,
                                     msg_type=int(_TYPES[args.type]), progress=progress,
                                     space_hash32=space, rate=args.rate,
                                     **({"fec": args.fec} if args.fec else {}))
        dt = time.perf_counter() - t
        verified = ("verified by the receiver (xxh3_64)" if peer.agreement is not None and peer.agreement.feedback
                    else "NOT verified (the receiver sends no verdicts" + (": --no-handshake)" if args.no_handshake
                                                                          else ")"))
        print(f"sent stream {sid}: {arr.dtype}{list(arr.shape)} ({arr.nbytes} bytes) in {dt:.3f} s "
              f"({arr.nbytes / max(dt, 1e-9) / 1e6:.1f} MB/s) to {args.to}, {verified}: {_wire(peer, arr.nbytes, out0)}",
              file=sys.stderr)
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


# ------------------------------------------------------------------ keygen


_KEY_FILE_FORMAT = ("a key file holds one 32-byte XChaCha20-Poly1305 key as 64 hexadecimal characters and a "
                    "newline (32 raw bytes are read too); both peers use the same file")


def _keygen(args) -> int:
    key = Key.generate()
    try:
        key.to_file(args.file, overwrite=False)
    except FileExistsError:
        print(f"resonant keygen: {args.file} exists: a key file is never overwritten", file=sys.stderr)
        return 1
    except OSError as exc:  # no such directory, not writable, an empty name, ...
        print(f"resonant keygen: cannot write {args.file!r}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(f"resonant keygen: wrote key 0x{key.key_id:08x} to {args.file} (mode 0600); give it to both sides "
          "with --key-file", file=sys.stderr)
    return 0


# ------------------------------------------------------------------ main


class _UsageError(Exception):
    """A bad command line found after parsing (e.g. an unusable --save DIR): exit status 2."""


def _int(text: str, what: str) -> int:
    """An integer argument, decimal or 0x hex; else an argparse error saying `text is not {what}`."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text} is not {what}") from None


def _u32(text: str) -> int:
    v = _int(text, "a number: give 0..4294967295, decimal or 0x hex")
    if not 0 <= v < 1 << 32:
        raise argparse.ArgumentTypeError(f"{text} is not a u32")
    return v


def _count(text: str) -> int:
    v = _int(text, "a number")
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text}: N is at least 1 (leave --count out to receive until interrupted)")
    return v


def _fec(text: str) -> tuple[int, int]:
    try:
        k, m = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not K,M: {text!r} (e.g. 16,2)") from None
    from resonant import fec
    problem = fec.problem(k, m)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return k, m


def _rate(text: str) -> float:
    t = text.strip()
    scale = {"k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9}.get(t[-1:], 1.0)
    try:
        v = float(t[:-1] if scale != 1.0 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (bytes per second, e.g. 50M)") from None
    if not v >= 1e4 or v != v or v == float("inf"):
        raise argparse.ArgumentTypeError(f"{text}: give at least 10k bytes per second")
    return v


def _size(text: str) -> int:
    v = _int(text, "a number of bytes")
    if v < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resonant", description="Send and receive V-Frames: hidden states, KV caches, "
                                "embeddings and control messages between models.")
    from resonant import __version__
    p.add_argument("--version", action="version", version=f"resonant {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("recv", help="receive and print messages", description="Listen for frames and print one line "
                       "per message (a V-Stream counts once, when it completes or fails).")
    r.add_argument("--listen", required=True, metavar="URL", help="udp://HOST:PORT or tcp://HOST:PORT")
    r.add_argument("--json", action="store_true", help="one JSON object per line, header fields as integers")
    r.add_argument("--save", metavar="DIR", help="save completed streams as .npy files in DIR (created if missing, "
                   "checked before listening); an existing file is never replaced: NAME-1.npy, NAME-2.npy, ... instead")
    r.add_argument("--max-bytes", type=_size, default=DEFAULT_SAVE_MAX_BYTES, metavar="N",
                   help="write at most N bytes of .npy files in total with --save (default 1 GiB = "
                   f"{DEFAULT_SAVE_MAX_BYTES}); a completed stream that would go over it is not saved (nothing of it "
                   f"is written), a line on stderr says so, and the exit status is {EXIT_SAVE_QUOTA}")
    r.add_argument("--count", type=_count, metavar="N", help="exit after N messages, N at least 1 (data messages and "
                   "completed or failed streams; handshake documents are printed but not counted), with status 0, "
                   "or 3 if --max-bytes kept a stream from being saved; without --count, run until interrupted")
    r.add_argument("--key-file", metavar="F", help="decrypt with this key (and require encryption); "
                   "`resonant keygen F` makes one")
    r.add_argument("--space-hash", type=_u32, metavar="H", help="accept only this embedding space (space_hash32)")
    r.add_argument("--max-frame-bytes", type=int, metavar="N", help="largest frame the peers may send (512..65536)")
    r.add_argument("--strict", action="store_true", help="require the handshake before data (the default with a key "
                   "or a space hash), and refuse messages whose slices fit no layout of their type (printed with "
                   "their layout problem otherwise)")

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
    s.add_argument("--key-file", metavar="F", help="encrypt with this key (the receiver's key file)")
    s.add_argument("--space-hash", type=_u32, metavar="H", help="space_hash32 to stamp on the frames and announce")
    s.add_argument("--stream-id", type=_u32, default=1, metavar="ID", help="stream_id (default 1)")
    s.add_argument("--rate", type=_rate, metavar="BYTES/S", help="the most a V-Stream may send per second, e.g. 50M "
                   "(k, M, G: powers of 1000); UDP adapts below it to loss and delay (default 200M), TCP has no "
                   "default cap")
    s.add_argument("--fec", type=_fec, metavar="K,M", help="forward error correction for a V-Stream: M parity chunks "
                   "per K (e.g. 16,2), for paths where a round trip costs more than the redundancy (docs/fec.md); "
                   "the receiver must support it")
    s.add_argument("--no-handshake", action="store_true", help="send without the handshake (as the reference does)")
    s.add_argument("--strict", action="store_true", help="never fall back to reference mode (a receiver that does not "
                   "answer the handshake is an error); check layouts")
    s.add_argument("--max-frame-bytes", type=int, metavar="N", help="largest frame to send, 512..65536 (e.g. 1200 on "
                   "small-MTU UDP paths; the receiver may lower it further)")

    i = sub.add_parser("inspect", help="decode a frame file and annotate every field",
                       description="Print a frame field by field with the spec's names and byte offsets.")
    i.add_argument("file", metavar="FILE")
    i.add_argument("--json", action="store_true", help="JSON output")
    i.add_argument("--key-file", metavar="F", help="decrypt an encrypted (version 2) frame with this key")

    k = sub.add_parser("keygen", help="write a fresh key file for --key-file",
                       description=f"Write a fresh random key to FILE, readable by its owner only (mode 0600); "
                       f"an existing FILE is never overwritten. Format: {_KEY_FILE_FORMAT}.")
    k.add_argument("file", metavar="FILE")

    rl = sub.add_parser("relay", help="a deterministic UDP impairment relay (loss, bursts, duplication, "
                        "reordering, delay, a bottleneck) for trying transports on loopback", add_help=False,
                        description="Runs resonant.relay: see `resonant relay --help`.")
    rl.add_argument("relay_args", nargs=argparse.REMAINDER)
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["relay"]:  # its own options (resonant.relay's parser)
        from resonant import relay
        return relay.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "recv":
            return asyncio.run(_recv(args))
        if args.command == "send":
            return asyncio.run(_send(args))
        if args.command == "inspect":
            return _inspect(args)
        if args.command == "keygen":
            return _keygen(args)
        from resonant.demo import run_demo
        return asyncio.run(run_demo(args))
    except KeyboardInterrupt:
        return 130
    except _UsageError as exc:
        print(f"resonant {args.command}: {exc}", file=sys.stderr)
        return 2
    except (ResonantError, OSError, ValueError) as exc:
        print(f"resonant {args.command}: {exc}{_advice(args, exc)}", file=sys.stderr)
        return 1


def _advice(args, exc: Exception) -> str:
    """What to do about a refused handshake, in the command line's terms."""
    if args.command != "send" or not isinstance(exc, HandshakeRefused):
        return ""
    if "requires encryption" in exc.detail and not args.key_file:
        return "; send with --key-file (the receiver's key file)"
    if "is not a known key" in exc.detail or "authentication failed" in exc.detail:
        return ("; the receiver does not hold this --key-file's key: use the same key file on both sides "
                "(`resonant keygen FILE` makes one)")
    return ""


if __name__ == "__main__":
    sys.exit(main())
