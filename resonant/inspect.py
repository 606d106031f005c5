"""Annotated dumps of V-Frames: every field with its offset, size, value and meaning.

    from resonant import inspect as vinspect
    for field in vinspect.annotate(data):          # Field(path, offset, size, value, note)
        print(field)
    print(vinspect.render_text(data))              # a table, a summary line, the JSON of Sync frames
    json.dumps(vinspect.render_json(data))         # {"fields": [...], "frame": {...}, "error": ...}

The fields tile the input exactly: each starts where the previous one ended and the last
ends at len(data), malformed input included. Bytes that cannot be laid out (after an unknown
version, a count over its limit, or a field that does not fit) form one `unparsed` field, and
bytes between the last slice and the CRC one `trailing` field. Version 2 frames are annotated
down to their envelope and the transformed body (its zstd segments when it is only compressed;
ciphertext and tag when it is encrypted): no key is needed. Whether the frame is valid is
decided by the decoder alone: `inspect()` calls `resonant.decode` (or `codec.decode`) and
reports its error (type, path, offset, message) next to the fields.

Field paths and names come from the layout in `resonant._spec` (generated from
schema/vframe.yaml): `header.<name>` and `header.slice_len[i]`, `envelope.<name>`,
`slices[i].<name>` and `slices[i].shape[k]`, `body.segment_count`, `body.segment_len[i]`,
`body.segments[i]`, `body` and `tag` (encrypted), `crc32`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import zstandard

from resonant import _codec
from resonant._spec import (
    ENVELOPE_FIELDS,
    HEADER_FIELDS,
    MAX_DIMS,
    MAX_FRAME_BYTES,
    MAX_SEGMENTS,
    MAX_SLICES,
    NUMPY_DTYPES,
    SEGMENT_FIELDS,
    SLICE_FIELDS,
    TAG_BYTES,
    TRAILER_FIELDS,
    VERSION,
    VERSION_TRANSFORMED,
    DType,
    Filters,
    Flags,
    LayoutField,
    Modality,
)
from resonant.errors import ResonantError
from resonant.refcodec import LAYOUTS

__all__ = ["Field", "ErrorInfo", "Inspection", "annotate", "inspect", "render_text", "render_json"]

_SUMMARY_BYTES = 8  # payload summaries show this many leading bytes
_TEXT_CHARS = 200  # JSON/text shown by render_text is cut after this many characters
_ELEMENTS = 6  # payload elements shown by render_text

_CRC = TRAILER_FIELDS[0]
_COUNTED = next(f for f in HEADER_FIELDS if f.count)
_PREFIX = HEADER_FIELDS[: HEADER_FIELDS.index(_COUNTED)]
_SUFFIX = HEADER_FIELDS[HEADER_FIELDS.index(_COUNTED) + 1:]
_DTYPE, _SHAPE_LEN, _SHAPE, _PAYLOAD = SLICE_FIELDS
_SEG_COUNT, _SEG_LEN, _SEGMENTS = SEGMENT_FIELDS
_BODY_TRANSFORMS = Flags.ZSTD | Flags.XCHACHA


@dataclass(frozen=True)
class Field:
    """One field of a frame: where it is, what it holds and what that means."""

    path: str  #: e.g. "header.stream_id", "slices[1].shape[0]", "slices[0].payload", "crc32"
    offset: int  #: from the start of the frame
    size: int  #: bytes
    value: int | str  #: the integer; for byte strings (payloads, nonce, body) a short summary
    note: str = ""  #: enum or flag names, dtype name, "ok"/"mismatch" for the CRC, why parsing stopped

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "offset": self.offset, "size": self.size, "value": self.value,
                "note": self.note}


@dataclass(frozen=True)
class ErrorInfo:
    """The decoder's verdict on a frame that does not decode."""

    type: str  #: the exception class, e.g. "ChecksumMismatch"
    path: str  #: the field path the decoder names, e.g. "slices[0].payload" or "body.slices[0].dtype"
    offset: int | None  #: byte offset the decoder names (into the decoded body for "body." paths)
    message: str  #: the full message, "path: detail (at byte N)"

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "path": self.path, "offset": self.offset, "message": self.message}


@dataclass(frozen=True)
class Inspection:
    """Everything `inspect()` learns about a frame."""

    fields: tuple[Field, ...]
    frame: Any  #: the decoded message, or None when decoding failed
    error: ErrorInfo | None  #: the decode error, or None when the frame decodes
    header: dict[str, int]  #: the integer header and envelope fields that could be read, by name ("slice_len[0]", ...)
    slices: tuple[dict[str, Any], ...]  #: version 1 slices read whole: dtype, shape, payload_len, payload offset


# --------------------------------------------------------------------------- walking the bytes


def _hexsum(view: memoryview, start: int, size: int) -> str:
    head = view[start:start + min(size, _SUMMARY_BYTES)].hex(" ")
    more = " …" if size > _SUMMARY_BYTES else ""
    return f"{head}{more} ({size} bytes)" if size else "(0 bytes)"


def _flag_names(enum: type, value: int) -> str:
    if value == 0:
        return "none"
    names = [m.name for m in enum if value & m.value]
    unknown = value & ~sum(m.value for m in enum)
    if unknown:
        names.append(f"0x{unknown:x}?")
    return "|".join(names)


def _enum_note(enum: type | None, value: int) -> str:
    if enum is None:
        return ""
    if enum in (Flags, Filters):
        return _flag_names(enum, value)
    try:
        return enum(value).name
    except ValueError:
        return "unknown"


class _Stop(Exception):
    """Parsing cannot go on; the message says why."""


class _Walker:
    def __init__(self, data: memoryview, end: int):
        self.view = data
        self.end = end  # exclusive bound of everything before the CRC
        self.pos = 0
        self.fields: list[Field] = []
        self.values: dict[str, int] = {}

    def add(self, path: str, size: int, value: int | str, note: str = "") -> None:
        self.fields.append(Field(path, self.pos, size, value, note))
        self.pos += size

    def need(self, path: str, size: int) -> None:
        if self.pos + size > self.end:
            remain = max(self.end - self.pos, 0)
            raise _Stop(f"{path} needs {size} bytes, {remain} remain before the {_CRC.size}-byte {_CRC.name}")

    def int(self, path: str, f: LayoutField, note: str | None = None) -> int:
        self.need(path, f.size)
        (value,) = struct.unpack_from(f.format, self.view, self.pos)
        self.add(path, f.size, value, _enum_note(f.enum, value) if note is None else note)
        return value

    def renote(self, note: str) -> None:
        """Replace the note of the field just read."""
        self.fields[-1] = Field(**{**self.fields[-1].as_dict(), "note": note})

    def raw(self, path: str, size: int, note: str = "") -> None:
        self.need(path, size)
        self.add(path, size, _hexsum(self.view, self.pos, size), note)


def _walk_header(w: _Walker) -> None:
    for f in _PREFIX:
        value = w.values[f.name] = w.int(f"header.{f.name}", f)
        if f.name == "version":
            w.renote(_note_version(value))
            if value not in (VERSION, VERSION_TRANSFORMED):
                raise _Stop(f"version {value} is unknown: the layout of the rest is not defined")
    nslices = w.values["num_slices"]
    if nslices > MAX_SLICES:
        raise _Stop(f"num_slices {nslices} is more than max_slices ({MAX_SLICES}): the {_COUNTED.name} table is not read")
    for i in range(nslices):  # the slice_len rule: N = num_slices
        w.values[f"{_COUNTED.name}[{i}]"] = w.int(f"header.{_COUNTED.name}[{i}]", _COUNTED)
    suffix = sum(f.size for f in _SUFFIX)
    if (nslices == 0 and w.values["version"] == VERSION and w.end - w.pos == _COUNTED.size + suffix
            and not any(w.view[w.pos:w.pos + _COUNTED.size])):  # the reference's Rust form (spec: two forms)
        w.int(f"header.{_COUNTED.name}[0]", _COUNTED, "no slice: one entry of 0 (the Rust encoder's form)")
    for f in _SUFFIX:
        w.values[f.name] = w.int(f"header.{f.name}", f)


def _note_version(value: int) -> str:
    if value == VERSION:
        return "raw body"
    if value == VERSION_TRANSFORMED:
        return "envelope + transformed body"
    return "unknown version"


def _walk_slices(w: _Walker, slices: list[dict[str, Any]]) -> None:
    for i in range(w.values["num_slices"]):
        base = f"slices[{i}]"
        dtype = w.int(f"{base}.{_DTYPE.name}", _DTYPE)
        ndim = w.int(f"{base}.{_SHAPE_LEN.name}", _SHAPE_LEN)
        if ndim > MAX_DIMS:
            raise _Stop(f"{base}.{_SHAPE_LEN.name} {ndim} is more than max_dims ({MAX_DIMS}): the shape is not read")
        shape = tuple(w.int(f"{base}.{_SHAPE.name}[{k}]", _SHAPE) for k in range(ndim))
        length = w.values[f"{_COUNTED.name}[{i}]"]
        path = f"{base}.{_PAYLOAD.name}"
        try:
            name = DType(dtype).name
        except ValueError:
            name = f"dtype {dtype}"
        if w.pos + length > w.end:  # the part that is there, then stop
            have = max(w.end - w.pos, 0)
            w.add(path, have, _hexsum(w.view, w.pos, have), f"truncated: {have} of {length} bytes")
            raise _Stop(f"{path} needs {length} bytes, {have} remain before the {_CRC.size}-byte {_CRC.name}")
        w.raw(path, length, f"{name} {shape}")
        slices.append({"dtype": dtype, "shape": list(shape), "payload_len": length, "offset": w.pos - length})


def _walk_envelope(w: _Walker) -> None:
    flags = w.values["flags"]
    if not flags & _BODY_TRANSFORMS:
        raise _Stop(f"a version {VERSION_TRANSFORMED} frame sets ZSTD or XCHACHA (or both): the envelope layout is not defined")
    for f in ENVELOPE_FIELDS:
        if f.when is not None and not flags & Flags[f.when]:
            continue
        path = f"envelope.{f.name}"
        if f.format is None:
            w.need(path, f.size)
            w.add(path, f.size, bytes(w.view[w.pos:w.pos + f.size]).hex(), "")
            continue
        value = w.values[f.name] = w.int(path, f)
        if f.name == "key_id":
            w.renote(f"0x{value:08x}")
        if f.name == "body_len" and value > MAX_FRAME_BYTES:
            w.renote(f"more than max_frame_bytes ({MAX_FRAME_BYTES})")


def _walk_body(w: _Walker) -> None:
    flags = w.values["flags"]
    rest = w.end - w.pos
    if flags & Flags.XCHACHA:
        if rest < TAG_BYTES:
            raise _Stop(f"the {TAG_BYTES}-byte tag needs {TAG_BYTES} bytes, {rest} remain before the "
                        f"{_CRC.size}-byte {_CRC.name}")
        what = "ciphertext of the compressed body" if flags & Flags.ZSTD else "ciphertext of the body"
        w.add("body", rest - TAG_BYTES, _hexsum(w.view, w.pos, rest - TAG_BYTES), what)
        w.add("tag", TAG_BYTES, bytes(w.view[w.pos:w.pos + TAG_BYTES]).hex(), "Poly1305 tag")
        return
    # ZSTD only: the segment table, then the segments.
    count = w.int(f"body.{_SEG_COUNT.name}", _SEG_COUNT)
    if not 1 <= count <= MAX_SEGMENTS:
        raise _Stop(f"body.{_SEG_COUNT.name} {count} is not in 1..max_segments ({MAX_SEGMENTS})")
    lengths = [w.int(f"body.{_SEG_LEN.name}[{i}]", _SEG_LEN) for i in range(count)]
    for i, length in enumerate(lengths):
        path = f"body.{_SEGMENTS.name}[{i}]"
        w.need(path, length)
        w.raw(path, length, _zstd_note(w.view[w.pos:w.pos + length]))


def _zstd_note(segment: memoryview) -> str:
    try:
        size = zstandard.frame_content_size(segment)
    except zstandard.ZstdError:  # the decoder reports it
        return "not a zstd frame"
    return f"zstd frame of {size} bytes" if size >= 0 else "zstd frame without content size"


def _walk(view: memoryview) -> tuple[list[Field], dict[str, int], list[dict[str, Any]], bool]:
    """(fields, header values read, complete slices, whether the whole layout was read)."""
    n = len(view)
    crc_w = _CRC.size
    end = n - crc_w if n > crc_w else n
    w = _Walker(view, end)
    slices: list[dict[str, Any]] = []
    complete = False
    stop = None
    try:
        _walk_header(w)
        if w.values["version"] == VERSION:
            _walk_slices(w, slices)
        else:
            _walk_envelope(w)
            _walk_body(w)
        complete = True
    except _Stop as exc:
        stop = str(exc)
    if w.pos < end:
        if complete:
            w.add("trailing", end - w.pos, _hexsum(view, w.pos, end - w.pos),
                  f"bytes after the last {'slice' if w.values['version'] == VERSION else 'segment'}, "
                  f"before the {_CRC.name}")
        else:
            w.add("unparsed", end - w.pos, _hexsum(view, w.pos, end - w.pos), stop or "")
    if end < n:  # the last bytes are the CRC
        (stored,) = struct.unpack_from(_CRC.format, view, end)
        computed = _codec.crc32(view[:end])
        w.add(_CRC.name, crc_w, stored, "ok" if stored == computed else f"mismatch (computed 0x{computed:08x})")
    return w.fields, w.values, slices, complete


def _as_view(data: Any) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.format not in ("B", "b", "c") or not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" else view


# --------------------------------------------------------------------------- public API


def annotate(data: Any) -> list[Field]:
    """Every field of the frame in `data` (any bytes-like object), in order, tiling the input exactly.

    Never raises for malformed input: it lays out as much as the bytes allow and puts the rest
    in an `unparsed` field. The decoder's verdict is in `inspect(data).error`.
    """
    return _walk(_as_view(data))[0]


def inspect(data: Any, codec: Any = None) -> Inspection:
    """The fields of the frame, the decoded message (or None) and the decoder's error (or None).

    The frame is decoded with `codec.decode` when a `resonant.Codec` is given (to decrypt with its
    key), else with `resonant.decode`.
    """
    view = _as_view(data)
    fields, values, slices, _ = _walk(view)
    frame, error = None, None
    try:
        frame = codec.decode(view) if codec is not None else _codec.decode(view)
    except ResonantError as exc:
        error = ErrorInfo(type(exc).__name__, exc.path, exc.offset, str(exc))
    return Inspection(tuple(fields), frame, error, dict(values), tuple(slices))


def _header_complete(values: dict[str, int]) -> bool:
    return all(f.name in values for f in _PREFIX + _SUFFIX)


def _frame_dict(ins: Inspection) -> dict[str, Any] | None:
    f = ins.frame
    if f is not None:
        return {
            "version": int(f.version), "msg_type": int(f.msg_type), "flags": int(f.flags),
            "stream_id": int(f.stream_id), "frame_seq": int(f.frame_seq), "space_hash32": int(f.space_hash32),
            "modality": int(f.modality),
            "slices": [{"dtype": int(s.dtype), "shape": [int(d) for d in s.shape], "payload_len": int(s.nbytes)}
                       for s in f.slices],
        }
    v = ins.header
    if not _header_complete(v):
        return None
    out = {name: v[name] for name in ("version", "msg_type", "flags", "stream_id", "frame_seq", "space_hash32",
                                      "modality")}
    if v["version"] == VERSION:  # the slices as laid out in the frame (those that could be read)
        out["slices"] = [{"dtype": s["dtype"], "shape": s["shape"], "payload_len": s["payload_len"]}
                         for s in ins.slices]
    else:  # inside the transformed body: only the lengths are in the clear
        out["slices"] = [{"dtype": None, "shape": None, "payload_len": v[f"{_COUNTED.name}[{i}]"]}
                         for i in range(v["num_slices"])]
    return out


def render_json(data: Any, codec: Any = None) -> dict[str, Any]:
    """`{"fields": [...], "frame": {...} or None, "error": None or {type, path, offset, message}}`.

    Integers stay integers and dtypes are their integer codes; the result is json.dumps-able.
    `frame` comes from the decoded message, or, when decoding fails, from the header as read
    (None when the header is incomplete); slice dtypes and shapes of an undecoded version 2
    frame are inside its transformed body and given as None.
    """
    ins = inspect(data, codec)
    return {
        "fields": [f.as_dict() for f in ins.fields],
        "frame": _frame_dict(ins),
        "error": ins.error.as_dict() if ins.error else None,
    }


def _roles(msg_type: int, count: int) -> tuple[tuple[str, str], ...]:
    entry = LAYOUTS.get(msg_type)
    return entry[1].get(count, ()) if entry else ()


def _elements(s: Any) -> str | None:
    """The first elements of a decoded slice, when its dtype maps to numpy."""
    if s.dtype not in NUMPY_DTYPES:
        return None
    try:
        arr = s.numpy().reshape(-1)
    except (ResonantError, ImportError, ValueError, TypeError):
        return None
    head = " ".join(str(x) for x in arr[:_ELEMENTS])
    more = " …" if arr.size > _ELEMENTS else ""
    return f"[{head}{more}]"


def _cut(text: str, limit: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _summary(ins: Inspection) -> str:
    f = ins.frame
    if f is not None:
        line = repr(f)
        if f.version == VERSION_TRANSFORMED:
            line += f"  [version {f.version}, transforms {_flag_names(Flags, int(f.transforms))} undone]"
        elif f.ignored_flags:
            line += f"  [ignored_flags {_flag_names(Flags, int(f.ignored_flags))}: a version {VERSION} body is raw]"
        return line
    v = ins.header
    if not _header_complete(v):
        return "not decoded; the header is incomplete"
    try:
        name = LAYOUTS[v["msg_type"]][0]
    except KeyError:
        name = f"msg_type {v['msg_type']}"
    parts = [f"version={v['version']}", f"stream_id={v['stream_id']}", f"frame_seq={v['frame_seq']}",
             f"space_hash32={v['space_hash32']}", f"modality={_enum_note(Modality, v['modality'])}"]
    if v["flags"]:
        parts.append(f"flags={_flag_names(Flags, v['flags'])}")
    if v["version"] == VERSION:
        for i, s in enumerate(ins.slices):
            try:
                dt = DType(s["dtype"]).name
            except ValueError:
                dt = f"dtype {s['dtype']}"
            parts.append(f"slices[{i}]={dt} {tuple(s['shape'])}")
    else:
        parts.append(f"{v['num_slices']} slice(s) in the transformed body")
    return f"not decoded; the header says {name}({', '.join(parts)})"


def _printable(text: str) -> str:
    """A peer's text as it may reach a terminal: control characters (escape sequences included)
    shown as Python escapes, never written raw."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def render_text(data: Any, codec: Any = None) -> str:
    """A human-readable dump: one line per field (offset in decimal and hex, size, path, value,
    note), a one-line summary of the message, the slices' first elements and, for JSON and
    text slices, their text (cut after ~200 characters), then the decoder's error if any."""
    view = _as_view(data)
    ins = inspect(view, codec)
    f = ins.frame
    # Values of decoded version 1 payloads: their first elements, when numpy knows the dtype.
    shown: dict[str, str] = {}
    if f is not None and f.version == VERSION:
        for i, s in enumerate(f.slices):
            el = _elements(s)
            if el is not None:
                shown[f"slices[{i}].{_PAYLOAD.name}"] = el
    rows = [("offset", "hex", "size", "path", "value", "note")]
    for fld in ins.fields:
        value = shown.get(fld.path, str(fld.value))
        rows.append((str(fld.offset), f"0x{fld.offset:04x}", str(fld.size), fld.path, _cut(value, 48), fld.note))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for r in rows:
        lines.append(f"{r[0]:>{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  "
                     f"{r[3]:<{widths[3]}}  {r[4]:<{widths[4]}}  {r[5]}".rstrip())
    lines.append("")
    lines.append(_summary(ins))
    # Slices: the first elements of decoded tensors; the text of JSON and text roles.
    if f is not None:
        roles = _roles(int(f.msg_type), len(f.slices))
        every = {r for lay in LAYOUTS[int(f.msg_type)][1].values() for r in lay}
        for i, s in enumerate(f.slices):
            role, kind = roles[i] if i < len(roles) else (f"slices[{i}]", "tensor")
            if getattr(f, role, None) is not s:  # not read in that role (a layout that does not fit; a
                # 2-slice Critique's mask, told by content): the role it is read in, if any
                role, kind = next(((n, k) for n, k in every if getattr(f, n, None) is s), (f"slices[{i}]", "tensor"))
            if kind in ("json", "text"):
                text = _printable(bytes(s.payload).decode("utf-8", errors="replace"))
                lines.append(f"{role}{'' if role == kind else f' ({kind})'}: {_cut(text, _TEXT_CHARS)}")
            elif f.version != VERSION:
                el = _elements(s)
                lines.append(f"{role}: {s.dtype.name} {tuple(s.shape)} {el or '(' + str(s.nbytes) + ' bytes)'}")
    elif _header_complete(ins.header) and ins.header["version"] == VERSION:
        roles = _roles(ins.header["msg_type"], ins.header["num_slices"])
        for i, s in enumerate(ins.slices):
            if i < len(roles) and roles[i][1] in ("json", "text"):
                text = _printable(bytes(view[s["offset"]:s["offset"] + s["payload_len"]]).decode("utf-8", errors="replace"))
                lines.append(f"{roles[i][0]} ({roles[i][1]}, not verified): {_cut(text, _TEXT_CHARS)}")
    if ins.error is not None:
        lines.append(f"error: {ins.error.type}: {ins.error.message}")
    return "\n".join(lines) + "\n"
