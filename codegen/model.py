"""Load and validate the YAML schema into a frozen model.

Every problem is reported as a :class:`SchemaError` whose message starts with the
YAML file and path of the offending entry, e.g.
``vframe.yaml: enums.dtype.values[2].size.rule: unknown size rule 'bits' (expected one of element, packed, block, opaque)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

WIDTHS = {"u8": 1, "u16": 2, "u32": 4, "u64": 8}
STRUCT_CHARS = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q"}
C_TYPES = {"u8": "uint8_t", "u16": "uint16_t", "u32": "uint32_t", "u64": "uint64_t"}
SIZE_RULES = ("element", "packed", "block", "opaque")
ROLE_KINDS = ("tensor", "text", "json")
IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
WIRE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
FRAMINGS = ("datagram", "length_prefix")
TRANSPORT_ACTIONS = ("continue", "close", "report")
# hex32 / hex64: a string of exactly 32 / 64 lowercase hexadecimal digits (16 / 32 bytes).
HANDSHAKE_TYPES = ("string", "number", "bool", "u32", "u64", "hex32", "hex64", "object", "list[string]", "list[u32]",
                   "list[object]", "ranges")


#: Header fields the codec lays out (its Frame, encoder and decoder have a place for each).
HEADER_FIELDS = ("version", "msg_type", "flags", "stream_id", "frame_seq", "num_slices", "slice_len", "space_hash32",
                 "modality")

#: Envelope fields the codec lays out (version 2 frames).
ENVELOPE_FIELDS = ("body_len", "filters", "key_id", "nonce")

#: Fields whose `limit:` the decoder checks where it reads the field (before anything it counts is
#: read or allocated), and the limit each must name; a `limit:` anywhere else would not be enforced.
FIELD_LIMITS = {("header", "num_slices"): "max_slices", ("slice", "shape_len"): "max_dims",
                ("transforms.compression.segments", "segment_count"): "max_segments"}

#: Limits of the `limits:` lists that the runtime enforces without a field's `limit:`, and where. A
#: limit that is in neither this table nor a field's `limit:` would be a constant nothing checks
#: (tests/test_codegen.py checks that each constant named here is used by the runtime).
RUNTIME_LIMITS = {
    "vframe.yaml": {
        "max_frame_bytes": "decode and encode (the whole frame), the transports",
        "max_shape_elements": "decode, encode and V-Stream HEAD (the product of a shape)",
        "max_dense_bytes": "resonant.quant.sparse_to_dense",
    },
    "handshake.yaml": {
        "max_json_bytes": "handshake.parse",
        "max_objects": "handshake.validate (list[object])",
        "max_list_items": "handshake.validate (lists)",
        "max_report_ranges": "handshake.validate (ranges), the receiver's reports",
        "report_burst": "resonant.reassembler (the receiver's reports)",
        "max_resend_ranges": "resonant.delivery (the sender's resend queue)",
        "max_kv_layers": "resonant.kv.check_layout (a V-Stream HEAD's kv)",
        "report_interval_ms": "the Session (the receiver's reports)",
        "feedback_timeout_ms": "the Session (resonant.delivery: the sender's deadline)",
        "feedback_probes": "the Session (the receiver's reports), resonant.delivery (the sender's probes)",
        "max_retransmits": "resonant.delivery (the sender)",
        "max_string_chars": "handshake.validate (strings)",
        "min_chunk_bytes": "the V-Stream Reassembler (HEAD)",
        "max_fec_k": "resonant.fec.check_params (V-Stream HEAD's fec, StreamSender)",
        "max_fec_m": "resonant.fec.check_params (V-Stream HEAD's fec, StreamSender)",
        "max_fec_pieces": "resonant.fec.check_params (V-Stream HEAD's fec, StreamSender)",
        "session_random_bytes": "the Session (client_random, server_random)",
        "replay_evicted_ranges": "the Session's replay window",
        "control_tags_remembered": "the Session (sealed control documents)",
        "sent_tags_remembered": "the Session (tags of sent frames)",
        "reference_fallback_ms": "the Session (the reference fallback's wait)",
        "zstd_probe_chunks": "the V-Stream sender (StreamSender, with zstd)",
        "zstd_min_saving_permille": "the V-Stream sender (StreamSender, with zstd)",
    },
}

#: Enum values the hand-written runtime names (e.g. DType.F16, MsgType.SYNC); removing one breaks it.
RUNTIME_ENUM_VALUES = {
    "msg_type": ("CACHE", "SYNC", "CRITIQUE", "CHUNK"),
    "modality": ("TEXT",),
    "flags": ("ZSTD", "XCHACHA", "STRONG_TAIL"),
    "filters": ("BYTE_SHUFFLE",),
    "dtype": ("F16", "I8", "BF16", "F32", "Q8_0", "Q4_0", "SPARSE_COO_U32"),
}

#: Size rules the hand-written runtime implements for a dtype by name (the Q8_0/Q4_0 kernels of
#: resonant/_quant.pxi lay out ggml's blocks; I8 carries UTF-8 text and JSON byte for byte): the YAML
#: may not change them without those kernels.
RUNTIME_SIZE_RULES = {
    "I8": {"rule": "element", "bytes": 1},
    "Q8_0": {"rule": "block", "block_elements": 32, "block_bytes": 34},
    "Q4_0": {"rule": "block", "block_elements": 32, "block_bytes": 18},
}

#: Control documents the Session and the Reassembler build and read.
RUNTIME_MESSAGES = ("ping", "capability", "error", "head", "tail", "confirm")


class SchemaError(Exception):
    """The schema is invalid; the message names the YAML file and path."""


class _Node:
    """A YAML value with the path that leads to it, for error messages."""

    def __init__(self, value: Any, path: str, file: str):
        self.value = value
        self.path = path
        self.file = file

    def fail(self, msg: str) -> "SchemaError":
        return SchemaError(f"{self.file}: {self.path}: {msg}" if self.path else f"{self.file}: {msg}")

    def child(self, key: str | int) -> "_Node":
        if isinstance(key, int):
            path = f"{self.path}[{key}]"
            return _Node(self.value[key], path, self.file)
        path = f"{self.path}.{key}" if self.path else key
        return _Node(self.value.get(key) if isinstance(self.value, dict) else None, path, self.file)

    def mapping(self, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> "_Node":
        if not isinstance(self.value, dict):
            raise self.fail(f"expected a mapping, got {type(self.value).__name__}")
        for key in required:
            if key not in self.value:
                why = " (every entry carries a one-line doc)" if key == "doc" else ""
                raise self.fail(f"missing required key '{key}'{why}")
        allowed = set(required) | set(optional)
        for key in self.value:
            if key not in allowed:
                raise self.child(str(key)).fail(f"unknown key (allowed: {', '.join(sorted(allowed))})")
        return self

    def seq(self) -> list["_Node"]:
        if not isinstance(self.value, list):
            raise self.fail(f"expected a list, got {type(self.value).__name__}")
        return [self.child(i) for i in range(len(self.value))]

    def str(self) -> str:
        if not isinstance(self.value, str) or not self.value.strip():
            raise self.fail(f"expected a non-empty string, got {self.value!r}")
        return self.value

    def ident(self) -> str:
        s = self.str()
        if not IDENT.match(s):
            raise self.fail(f"{s!r} is not a valid identifier")
        return s

    def int(self, lo: int = 0, hi: int | None = None) -> int:
        if not isinstance(self.value, int) or isinstance(self.value, bool):
            raise self.fail(f"expected an integer, got {self.value!r}")
        if self.value < lo or (hi is not None and self.value > hi):
            raise self.fail(f"{self.value} is out of range [{lo}, {hi}]")
        return self.value

    def bool(self, default: bool) -> bool:
        if self.value is None:
            return default
        if not isinstance(self.value, bool):
            raise self.fail(f"expected true or false, got {self.value!r}")
        return self.value

    def doc(self) -> str:
        d = self.child("doc")
        if d.value is None:
            raise self.fail("missing required key 'doc' (every entry carries a one-line doc)")
        s = d.str()
        if "\n" in s.strip():
            raise d.fail("doc must be one line")
        return s.strip()


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Limit:
    name: str
    value: int
    doc: str
    enforced_by: str = ""   # where the runtime checks it (the decoder at a field, or RUNTIME_LIMITS)


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    doc: str
    enum: str | None = None
    count: str | None = None
    limit: str | None = None
    length: str | None = None
    when: str | None = None
    size: int | None = None

    @property
    def width(self) -> int:
        return WIDTHS.get(self.type, self.size or 0)

    @property
    def struct_char(self) -> str:
        return STRUCT_CHARS[self.type]

    @property
    def ctype(self) -> str:
        return C_TYPES[self.type]

    @property
    def max_value(self) -> int:
        return (1 << (8 * self.width)) - 1


@dataclass(frozen=True)
class Role:
    name: str
    kind: str
    doc: str


@dataclass(frozen=True)
class SizeRule:
    rule: str
    bytes: int = 0
    bits: int = 0
    block_elements: int = 0
    block_bytes: int = 0

    def describe(self) -> str:
        if self.rule == "element":
            return f"n × {self.bytes}"
        if self.rule == "packed":
            return f"ceil(n × {self.bits} / 8)"
        if self.rule == "block":
            return f"ceil(n / {self.block_elements}) × {self.block_bytes}"
        return "slice_len (any length)"



@dataclass(frozen=True)
class EnumValue:
    name: str
    value: int
    doc: str
    class_name: str | None = None
    roles: tuple[Role, ...] = ()
    layouts: tuple[tuple[str, ...], ...] = ()
    size: SizeRule | None = None
    numpy: str | None = None
    body_transform: bool = False
    wire: str | None = None               # dtype: its name in handshake documents (supports.dtype)
    reference: bool = False               # dtype: a protocol-1 (reference) peer reads it
    offered: bool = True                  # dtype: in SessionConfig.dtypes by default
    fallback: tuple[str, ...] = ()        # dtype: wire names it is converted to when the peer lacks it
    internal: bool = False                # msg_type: carried by the library itself (control, V-Stream)
    read_layouts: tuple[tuple[tuple[str, ...], str], ...] = ()  # msg_type: (layout, doc) a decoder also reads

    def alternate(self, count: int) -> tuple[str, ...] | None:
        """The read layout with `count` slices (chosen by content over the layout of that count), or None."""
        return next((lay for lay, _ in self.read_layouts if len(lay) == count), None)

    def role(self, name: str) -> Role:
        return next(r for r in self.roles if r.name == name)

    @property
    def smallest_layout(self) -> tuple[str, ...]:
        return min(self.layouts, key=len)

    @property
    def min_slices(self) -> int:
        return min(len(lay) for lay in self.layouts)

    @property
    def max_slices(self) -> int:
        return max(len(lay) for lay in self.layouts)

    def role_index(self, role: str, count: int) -> int | None:
        """Index of `role` in the layout with `count` slices, or None."""
        for lay in self.layouts:
            if len(lay) == count:
                return lay.index(role) if role in lay else None
        return None


@dataclass(frozen=True)
class Enum:
    name: str
    doc: str
    bits: bool
    values: tuple[EnumValue, ...]

    @property
    def mask(self) -> int:
        m = 0
        for v in self.values:
            m |= v.value
        return m

    def by_name(self, name: str) -> EnumValue:
        return next(v for v in self.values if v.name == name)

    def by_wire(self, wire: str) -> EnumValue:
        return next(v for v in self.values if v.wire == wire)


@dataclass(frozen=True)
class Version:
    value: int
    doc: str


@dataclass(frozen=True)
class Transforms:
    compression_flag: str
    compression_doc: str
    segments: tuple[Field, ...]
    encryption_flag: str
    algorithm: str
    key_bytes: int
    nonce_bytes: int
    tag_bytes: int
    encryption_doc: str


@dataclass(frozen=True)
class LengthPrefix:
    """The length before every frame of a length_prefix transport."""

    type: str
    endian: str
    min: int

    @property
    def width(self) -> int:
        return WIDTHS[self.type]

    @property
    def struct_format(self) -> str:
        return "<" + STRUCT_CHARS[self.type]

    @property
    def max_value(self) -> int:
        return (1 << (8 * self.width)) - 1


@dataclass(frozen=True)
class TransportCase:
    """What a receiver does with one kind of bad input."""

    case: str
    action: str
    error: str | None
    doc: str


@dataclass(frozen=True)
class Transport:
    name: str
    doc: str
    framing: str
    max_frame_bytes: int
    length_prefix: LengthPrefix | None
    small_path_frame_bytes: int | None
    rules: tuple[str, ...]
    errors: tuple[TransportCase, ...]

    @property
    def overhead(self) -> int:
        """Bytes the transport adds to each frame."""
        return self.length_prefix.width if self.length_prefix else 0


@dataclass(frozen=True)
class ErrorDef:
    name: str
    bases: tuple[str, ...]
    doc: str


@dataclass(frozen=True)
class VFrame:
    source: str
    id: str
    title: str
    version: int
    doc: str
    limits: tuple[Limit, ...]
    header: tuple[Field, ...]
    slice_len_rule_doc: str
    slice: tuple[Field, ...]
    trailer: tuple[Field, ...]
    enums: dict[str, Enum]
    errors: tuple[ErrorDef, ...]
    versions: tuple[Version, ...]
    envelope: tuple[Field, ...]
    transforms: Transforms
    transports: tuple[Transport, ...] = ()
    slice_len_empty_doc: str = ""          # the two forms of a frame with no slices (reference discrepancy)

    def transport(self, name: str) -> Transport:
        return next(t for t in self.transports if t.name == name)

    @property
    def raw_version(self) -> int:
        return self.versions[0].value

    @property
    def transformed_version(self) -> int:
        return self.versions[1].value

    @property
    def envelope_base(self) -> tuple[Field, ...]:
        """Envelope fields present in every version 2 frame."""
        return tuple(f for f in self.envelope if f.when is None)

    @property
    def envelope_crypto(self) -> tuple[Field, ...]:
        """Envelope fields present only when the frame is encrypted."""
        return tuple(f for f in self.envelope if f.when == self.transforms.encryption_flag)

    def envelope_offset(self, name: str) -> int:
        """Offset of an envelope field from the end of the header."""
        return _offset(self.envelope, name)

    def limit(self, name: str) -> int:
        return next(lim.value for lim in self.limits if lim.name == name)

    @property
    def counted_index(self) -> int:
        return next(i for i, f in enumerate(self.header) if f.count)

    @property
    def prefix(self) -> tuple[Field, ...]:
        """Fixed-width header fields before the slice_len table."""
        return self.header[: self.counted_index]

    @property
    def suffix(self) -> tuple[Field, ...]:
        """Fixed-width header fields after the slice_len table."""
        return self.header[self.counted_index + 1 :]

    @property
    def counted(self) -> Field:
        return self.header[self.counted_index]

    def prefix_offset(self, name: str) -> int:
        """Offset of a prefix field from the start of the frame."""
        return _offset(self.prefix, name)

    @property
    def prefix_size(self) -> int:
        return sum(f.width for f in self.prefix)

    def suffix_offset(self, name: str) -> int:
        """Offset of a suffix field from the end of the slice_len table."""
        return _offset(self.suffix, name)

    @property
    def suffix_size(self) -> int:
        return sum(f.width for f in self.suffix)

    @property
    def crc(self) -> Field:
        return self.trailer[0]

    @property
    def min_frame_bytes(self) -> int:
        return self.prefix_size + self.suffix_size + self.crc.width

    @property
    def message_types(self) -> tuple[EnumValue, ...]:
        return self.enums["msg_type"].values

    @property
    def dtypes(self) -> tuple[EnumValue, ...]:
        return self.enums["dtype"].values

    @property
    def user_message_types(self) -> tuple[EnumValue, ...]:
        """Message types an application sends (not the library's own control and V-Stream frames)."""
        return tuple(v for v in self.message_types if not v.internal)

    @property
    def longest_layout(self) -> int:
        return max(v.max_slices for v in self.message_types)

    def field(self, name: str) -> Field:
        for f in self.header + self.slice + self.trailer:
            if f.name == name:
                return f
        raise KeyError(name)


def _offset(fields: tuple[Field, ...], name: str) -> int:
    off = 0
    for f in fields:
        if f.name == name:
            return off
        off += f.width
    raise KeyError(name)


@dataclass(frozen=True)
class HField:
    name: str
    type: str
    required: bool
    doc: str
    const: str | None = None
    choices: tuple[str, ...] = ()
    fields: tuple["HField", ...] = ()
    has_default: bool = False
    default: Any = field(default=None, compare=False)
    choices_from: str | None = None   # "dtype": the choices are the dtypes' wire names (vframe.yaml)

    def sub(self, name: str) -> "HField | None":
        return next((f for f in self.fields if f.name == name), None)


@dataclass(frozen=True)
class HMessage:
    name: str
    doc: str
    fields: tuple[HField, ...]
    example: Any = field(compare=False, default=None)


@dataclass(frozen=True)
class StateMachine:
    """The session's handshake table: per role, state and input, one action and next state."""

    doc: str
    states: tuple[tuple[str, str], ...]    # (name, doc)
    inputs: tuple[tuple[str, str], ...]
    actions: tuple[tuple[str, str], ...]
    roles: tuple[str, ...]
    transitions: tuple[tuple[str, str, str, str, str], ...]  # (role, state, input, action, next state)

    def row(self, role: str, state: str) -> list[tuple[str, str, str]]:
        return [(i, a, n) for r, st, i, a, n in self.transitions if r == role and st == state]

    def states_of(self, role: str) -> list[str]:
        seen = [st for r, st, *_ in self.transitions if r == role]
        return list(dict.fromkeys(seen))


@dataclass(frozen=True)
class Handshake:
    source: str
    title: str
    version: int
    doc: str
    limits: tuple[Limit, ...]
    flow: tuple[tuple[int, str, str, str], ...]
    streams: tuple[tuple[str, str], ...]
    messages: tuple[HMessage, ...]
    state_machine: StateMachine

    def limit(self, name: str) -> int:
        return next(lim.value for lim in self.limits if lim.name == name)


@dataclass(frozen=True)
class Model:
    vframe: VFrame
    handshake: Handshake


# --------------------------------------------------------------------------- loading


def _read(path: Path) -> _Node:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SchemaError(f"{path.name}: not valid YAML: {exc}") from None
    return _Node(data, "", path.name)


def _limits(node: _Node) -> tuple[Limit, ...]:
    out = []
    seen = set()
    for item in node.seq():
        item.mapping(("name", "value", "doc"))
        name = item.child("name").ident()
        if name in seen:
            raise item.child("name").fail(f"duplicate limit '{name}'")
        seen.add(name)
        out.append(Limit(name, item.child("value").int(1), item.doc()))
    return tuple(out)


def _fields(node: _Node, limits: set[str], counts: set[str]) -> tuple[Field, ...]:
    out = []
    names: set[str] = set()
    for item in node.seq():
        item.mapping(("name", "type", "doc"), ("enum", "count", "limit", "length", "check", "when", "size"))
        name = item.child("name").ident()
        if name in names:
            raise item.child("name").fail(f"duplicate field '{name}'")
        names.add(name)
        ftype = item.child("type").str()
        if ftype not in WIDTHS and ftype != "bytes":
            raise item.child("type").fail(f"unknown type '{ftype}' (expected u8, u16, u32, u64 or bytes)")
        lim = item.child("limit").value
        if lim is not None and lim not in limits:
            raise item.child("limit").fail(f"unknown limit '{lim}' (defined: {', '.join(sorted(limits))})")
        cnt = item.child("count").value
        if cnt is not None and cnt not in counts and cnt not in names:
            raise item.child("count").fail(f"count '{cnt}' names neither an earlier field nor a count rule")
        length = item.child("length").value
        size = item.child("size").int(1, 4096) if item.child("size").value is not None else None
        if ftype == "bytes" and length is None and size is None:
            raise item.fail("a bytes field needs 'length' or 'size'")
        out.append(Field(name, ftype, item.doc(), item.child("enum").value, cnt, lim, length,
                         item.child("when").value, size))
    return tuple(out)


def _roles(node: _Node) -> tuple[Role, ...]:
    out = []
    for item in node.seq():
        item.mapping(("name", "kind", "doc"))
        kind = item.child("kind").str()
        if kind not in ROLE_KINDS:
            raise item.child("kind").fail(f"unknown role kind '{kind}' (expected one of {', '.join(ROLE_KINDS)})")
        out.append(Role(item.child("name").ident(), kind, item.doc()))
    if len({r.name for r in out}) != len(out):
        raise node.fail("duplicate role names")
    return tuple(out)


def _numpy_type(node: _Node, dtype: str, size: SizeRule) -> str:
    """A dtype's numpy type: Slice.numpy() views slice_len bytes as prod(shape) elements of it, so
    its element size must be the size rule's (else a view would reach past the payload)."""
    name = node.str()
    if size.rule != "element":
        raise node.fail(f"a numpy view needs the element size rule, {dtype} has '{size.rule}'")
    import numpy  # (the runtime's resolution: ml_dtypes registers bfloat16, float8_* ...)
    try:
        import ml_dtypes  # noqa: F401
    except ImportError:  # pragma: no cover - a runtime dependency
        pass
    try:
        itemsize = numpy.dtype(name).itemsize
    except TypeError:
        raise node.fail(f"{name!r} is not a numpy dtype") from None
    if itemsize != size.bytes:
        raise node.fail(f"numpy type {name!r} has {itemsize}-byte elements, but the size rule says {size.bytes}")
    return name


def _size(node: _Node) -> SizeRule:
    node.mapping(("rule",), ("bytes", "bits", "block_elements", "block_bytes"))
    rule = node.child("rule").str()
    if rule not in SIZE_RULES:
        raise node.child("rule").fail(f"unknown size rule '{rule}' (expected one of {', '.join(SIZE_RULES)})")
    if rule == "element":
        return SizeRule(rule, bytes=node.child("bytes").int(1, 64))
    if rule == "packed":
        return SizeRule(rule, bits=node.child("bits").int(1, 7))
    if rule == "block":
        return SizeRule(rule, block_elements=node.child("block_elements").int(1, 4096),
                        block_bytes=node.child("block_bytes").int(1, 65536))
    return SizeRule(rule)


#: The keys a value of each enum may carry besides name, value and doc.
_ENUM_KEYS = {"msg_type": ("class", "roles", "layouts", "internal", "read_layouts"),
              "dtype": ("size", "wire", "numpy", "reference", "offered", "fallback"),
              "flags": ("body_transform",)}


def _enum(name: str, node: _Node, width: int) -> Enum:
    node.mapping(("doc", "values"), ("bits",))
    bits = bool(node.child("bits").value)
    values: list[EnumValue] = []
    for item in node.child("values").seq():
        item.mapping(("name", "value", "doc"), _ENUM_KEYS.get(name, ()))
        vname = item.child("name").ident()
        value = item.child("value").int(0, (1 << (8 * width)) - 1)
        if bits and (value == 0 or value & (value - 1)):
            raise item.child("value").fail(f"{value} is not a single bit")
        if any(v.value == value for v in values):
            raise item.child("value").fail(f"duplicate value {value}")
        if any(v.name == vname for v in values):
            raise item.child("name").fail(f"duplicate name '{vname}'")
        extra: dict[str, Any] = {}
        if name == "msg_type":
            item.mapping(("name", "value", "doc", "class", "roles", "layouts"), ("internal", "read_layouts"))
            extra["class_name"] = item.child("class").ident()
            extra["internal"] = item.child("internal").bool(False)
            roles = _roles(item.child("roles"))
            layouts = []
            counts = set()
            for lay in item.child("layouts").seq():
                names = tuple(r.str() for r in lay.seq())
                for i, r in enumerate(names):
                    if r not in {ro.name for ro in roles}:
                        raise lay.child(i).fail(f"unknown role '{r}'")
                if len(names) in counts:
                    raise lay.fail(f"two layouts with {len(names)} slices: slice roles would be ambiguous")
                counts.add(len(names))
                layouts.append(names)
            if not layouts:
                raise item.child("layouts").fail("at least one layout is required")
            extra["roles"] = roles
            extra["layouts"] = tuple(layouts)
            reads = []
            rnode = item.child("read_layouts")
            for alt in (rnode.seq() if rnode.value is not None else []):
                alt.mapping(("layout", "doc"))
                names = tuple(r.str() for r in alt.child("layout").seq())
                for i, r in enumerate(names):
                    if r not in {ro.name for ro in roles}:
                        raise alt.child("layout").child(i).fail(f"unknown role '{r}'")
                base = next((lay for lay in layouts if len(lay) == len(names)), None)
                if base is None or any(len(lay) == len(names) for lay, _ in reads):
                    raise alt.fail(f"a read layout is chosen by content over the one layout with {len(names)} slices")
                kinds = {ro.name: ro.kind for ro in roles}
                diff = [i for i, (a, b) in enumerate(zip(base, names)) if a != b]
                if (len(diff) != 1 or kinds[base[diff[0]]] == "tensor" or kinds[names[diff[0]]] != "tensor"):
                    raise alt.fail("a read layout differs from the layout of its count in one slice, a text role "
                                   "there and a tensor role here (the slice is the text role when it reads as text)")
                reads.append((names, alt.doc()))
            extra["read_layouts"] = tuple(reads)
        if name == "dtype":
            item.mapping(("name", "value", "doc", "size", "wire"), ("numpy", "reference", "offered", "fallback"))
            extra["size"] = _size(item.child("size"))
            if item.child("numpy").value is not None:
                extra["numpy"] = _numpy_type(item.child("numpy"), vname, extra["size"])
            wire = item.child("wire").str()
            if not WIRE_NAME.match(wire):
                raise item.child("wire").fail(f"{wire!r} is not a wire name (lowercase letters, digits and _)")
            if any(v.wire == wire for v in values):
                raise item.child("wire").fail(f"duplicate wire name '{wire}'")
            extra["wire"] = wire
            extra["reference"] = item.child("reference").bool(False)
            extra["offered"] = item.child("offered").bool(True)
            fb = item.child("fallback")
            extra["fallback"] = tuple(n.str() for n in fb.seq()) if fb.value is not None else ()
        if name == "flags":
            item.mapping(("name", "value", "doc"), ("body_transform",))
            extra["body_transform"] = bool(item.child("body_transform").value)
        if name in ("modality", "filters"):
            item.mapping(("name", "value", "doc"))
        values.append(EnumValue(vname, value, item.doc(), **extra))
    if not values:
        raise node.child("values").fail("at least one value is required")
    if name == "dtype":
        _check_dtypes(node.child("values"), values)
    return Enum(name, node.doc(), bits, tuple(values))


def _check_dtypes(node: _Node, values: list[EnumValue]) -> None:
    """Cross-checks of the dtypes' negotiation facts: fallbacks name convertible dtypes, something is offered."""
    wires = {v.wire: v for v in values}
    for i, v in enumerate(values):
        fnode = node.child(i).child("fallback")
        for j, target in enumerate(v.fallback):
            if target not in wires:
                raise fnode.child(j).fail(f"unknown dtype wire name '{target}' (known: {', '.join(wires)})")
            if target == v.wire or target in v.fallback[:j]:
                raise fnode.child(j).fail(f"'{target}' is {v.wire} itself or listed twice")
            if not wires[target].numpy:
                raise fnode.child(j).fail(f"'{target}' has no numpy type: a tensor cannot be converted to it")
        if v.fallback and not v.numpy and v.size.rule != "block":
            raise fnode.fail(f"{v.name} has no numpy type and is not block-quantized: it cannot be converted")
    if not any(v.offered for v in values):
        raise node.fail("no dtype is offered (every one has offered: false): a session could agree to nothing")


def load_vframe(path: Path) -> VFrame:
    root = _read(path).mapping(
        ("meta", "limits", "versions", "header", "slice_len_rule", "slice", "envelope", "transforms", "trailer",
         "transports", "enums", "errors"))
    meta = root.child("meta").mapping(("id", "title", "version", "endian", "doc"))
    if meta.child("endian").value != "little":
        raise meta.child("endian").fail("only little-endian layouts are supported")
    limits = _limits(root.child("limits"))
    lnames = {lim.name for lim in limits}
    for needed in ("max_frame_bytes", "max_slices", "max_dims", "max_shape_elements", "max_segments"):
        if needed not in lnames:
            raise root.child("limits").fail(f"missing limit '{needed}'")
    rule = root.child("slice_len_rule").mapping(("name", "doc"), ("empty_form_doc",))
    rule_name = rule.child("name").ident()
    header = _fields(root.child("header"), lnames, {rule_name})
    slice_ = _fields(root.child("slice"), lnames, set())
    trailer = _fields(root.child("trailer"), lnames, set())

    # The generator renders one family of layouts: fixed header fields, one counted
    # u32 table, fixed fields; slices of (dtype, shape_len, shape[shape_len], payload);
    # a CRC trailer. Anything else is named here rather than mis-rendered.
    hnode = root.child("header")
    counted = [i for i, f in enumerate(header) if f.count]
    if len(counted) != 1 or header[counted[0]].count != rule_name or header[counted[0]].type != "u32":
        raise hnode.fail(f"exactly one header field must be a u32 table with count '{rule_name}'")
    for i, f in enumerate(header):
        if f.type == "bytes":
            raise hnode.child(i).child("type").fail("header fields must be fixed-width integers")
    need = {"version": "u8", "msg_type": "u8", "flags": "u16", "num_slices": "u64", "modality": "u8",
            "space_hash32": "u32", "stream_id": "u32", "frame_seq": "u64"}
    hmap = {f.name: f for f in header}
    for n, t in need.items():
        if n not in hmap:
            raise hnode.fail(f"missing header field '{n}'")
        if hmap[n].type != t:
            raise hnode.child(header.index(hmap[n])).child("type").fail(f"'{n}' must be {t}")
    if header.index(hmap["num_slices"]) > counted[0] or header.index(hmap["version"]) != 0:
        raise hnode.fail("'version' must come first and 'num_slices' before the slice_len table")
    snode = root.child("slice")
    shape_ok = (
        [f.name for f in slice_] == ["dtype", "shape_len", "shape", "payload"]
        and slice_[0].type == "u8" and slice_[1].type == "u8" and slice_[2].type == "u32"
        and slice_[2].count == "shape_len" and slice_[3].type == "bytes"
        and slice_[3].length == header[counted[0]].name
    )
    if not shape_ok:
        raise snode.fail("slice must be dtype u8, shape_len u8, shape u32[shape_len], payload bytes[slice_len]")
    if len(trailer) != 1 or trailer[0].type != "u32" or trailer[0].name != "crc32":
        raise root.child("trailer").fail("trailer must be one u32 field 'crc32'")

    enode = root.child("enums").mapping(("msg_type", "modality", "flags", "filters", "dtype"))
    enums = {name: _enum(name, enode.child(name), hmap[name].width if name in hmap else 1)
             for name in ("msg_type", "modality", "flags", "filters", "dtype")}
    for fld, fnode in ((f, hnode.child(i)) for i, f in enumerate(header)):
        if fld.enum is not None and fld.enum not in enums:
            raise fnode.child("enum").fail(f"unknown enum '{fld.enum}'")
    if not enums["flags"].bits:
        raise enode.child("flags").fail("flags must have 'bits: true'")
    classes = [v.class_name for v in enums["msg_type"].values]
    if len(set(classes)) != len(classes):
        raise enode.child("msg_type").fail("duplicate class names")

    versions = []
    for item in root.child("versions").seq():
        item.mapping(("value", "doc"))
        versions.append(Version(item.child("value").int(1, 255), item.doc()))
    if len(versions) != 2 or versions[1].value != versions[0].value + 1:
        raise root.child("versions").fail("expected two consecutive versions: raw body, then transformed body")

    tnode = root.child("transforms").mapping(("compression", "encryption"))
    comp = tnode.child("compression").mapping(("flag", "doc", "segments"))
    segments = _fields(comp.child("segments"), lnames, set())
    if [(f.name, f.type) for f in segments] != [("segment_count", "u8"), ("segment_len", "u32"), ("segments", "bytes")] \
            or segments[0].limit != "max_segments" or segments[1].count != "segment_count":
        raise comp.child("segments").fail("expected segment_count u8 (limit max_segments), segment_len u32[segment_count], segments bytes")
    enc = tnode.child("encryption").mapping(("flag", "algorithm", "key_bytes", "nonce_bytes", "tag_bytes", "doc"))
    flag_names = {v.name for v in enums["flags"].values}
    for node in (comp.child("flag"), enc.child("flag")):
        if node.value not in flag_names:
            raise node.fail(f"unknown flag '{node.value}'")
    transforms = Transforms(comp.child("flag").str(), comp.doc(), segments, enc.child("flag").str(), enc.child("algorithm").str(),
                            enc.child("key_bytes").int(16, 64), enc.child("nonce_bytes").int(8, 64),
                            enc.child("tag_bytes").int(8, 64), enc.doc())

    envnode = root.child("envelope")
    envelope = _fields(envnode, lnames, set())
    names = [f.name for f in envelope]
    if names[:2] != ["body_len", "filters"] or envelope[0].type != "u32" or envelope[1].type != "u8":
        raise envnode.fail("the envelope starts with body_len u32 and filters u8")
    for i, f in enumerate(envelope):
        if f.when is not None and f.when != transforms.encryption_flag:
            raise envnode.child(i).child("when").fail(f"'when' must name the encryption flag '{transforms.encryption_flag}'")
        if f.type == "bytes" and f.size is None:
            raise envnode.child(i).fail("envelope bytes need a fixed 'size'")
    for i, f in enumerate(envelope):
        if f.name not in ENVELOPE_FIELDS:
            raise envnode.child(i).child("name").fail(
                f"'{f.name}' is not an envelope field the codec lays out (known: {', '.join(ENVELOPE_FIELDS)}); a new "
                "envelope field needs the codec's transforms extended first")
    crypto = [f for f in envelope if f.when]
    if [f.name for f in crypto] != ["key_id", "nonce"] or crypto[1].size != transforms.nonce_bytes:
        raise envnode.fail(f"the encrypted envelope adds key_id u32 and nonce bytes[{transforms.nonce_bytes}]")
    if envelope.index(crypto[0]) < 2 or envelope[1].enum != "filters":
        raise envnode.fail("key_id and nonce follow body_len and filters (enum filters)")

    errors: list[ErrorDef] = []
    known: set[str] = set()
    for item in root.child("errors").seq():
        item.mapping(("name", "doc"), ("base",))
        ename = item.child("name").ident()
        bases = tuple(item.child("base").value or ["Exception"])
        for j, b in enumerate(bases):
            if b not in known and b not in ("Exception", "ValueError", "TypeError", "RuntimeError", "ConnectionError"):
                raise item.child("base").child(j).fail(f"base '{b}' is not an earlier error")
        known.add(ename)
        errors.append(ErrorDef(ename, bases, item.doc()))
    for needed in ("ResonantError", "DecodeError", "EncodeError", "TruncatedFrame", "TrailingBytes",
                   "ChecksumMismatch", "UnknownVersion", "UnknownMessageType", "UnknownFlags",
                   "UnknownModality", "UnknownDType", "SizeMismatch", "LimitExceeded", "LayoutError",
                   "UnsupportedDType", "SpaceMismatch", "UnknownKey", "DecryptionFailed", "DecompressionFailed", "NotEncrypted",
                   "KeyFileError"):
        if needed not in known:
            raise root.child("errors").fail(f"missing error '{needed}' (the codec raises it)")

    for i, f in enumerate(header):
        if f.name not in HEADER_FIELDS:
            raise hnode.child(i).child("name").fail(
                f"'{f.name}' is not a header field the codec lays out (known: {', '.join(HEADER_FIELDS)}); a new "
                "header field needs the codec's Frame, encoder and decoder extended first")
    limits = _check_limits(root, limits, {"header": header, "slice": slice_, "envelope": envelope, "trailer": trailer,
                                 "transforms.compression.segments": segments})
    for ename, needed_values in RUNTIME_ENUM_VALUES.items():
        have = {v.name for v in enums[ename].values}
        for vname in needed_values:
            if vname not in have:
                raise enode.child(ename).child("values").fail(
                    f"missing value '{vname}' (the hand-written runtime uses it by name)")
    for i, v in enumerate(enums["dtype"].values):
        want = RUNTIME_SIZE_RULES.get(v.name)
        if want is not None and {k: getattr(v.size, k) for k in want} != want:
            rule = ", ".join(f"{k}: {w}" for k, w in want.items())
            raise enode.child("dtype").child("values").child(i).child("size").fail(
                f"{v.name} must keep {{{rule}}} (the hand-written runtime implements it: "
                "codegen.model.RUNTIME_SIZE_RULES)")
    longest = max(enums["msg_type"].values, key=lambda v: v.max_slices)
    if longest.max_slices > _lim(limits, "max_slices"):
        raise _limit_node(root, limits, "max_slices").fail(
            f"max_slices ({_lim(limits, 'max_slices')}) is less than the longest layout "
            f"({longest.max_slices} slices, {longest.class_name})")
    largest = max((v.size.bytes or v.size.block_bytes or 1) for v in enums["dtype"].values)
    if _lim(limits, "max_shape_elements") * largest >= 1 << 63:
        raise _limit_node(root, limits, "max_shape_elements").fail(
            f"max_shape_elements times the largest element or block ({largest} bytes) does not fit int64")
    if _lim(limits, "max_frame_bytes") > header[counted[0]].max_value:
        raise _limit_node(root, limits, "max_frame_bytes").fail(
            f"a slice_len ({header[counted[0]].type}) cannot hold max_frame_bytes")
    if _lim(limits, "max_frame_bytes") > envelope[0].max_value:
        raise _limit_node(root, limits, "max_frame_bytes").fail(
            f"body_len ({envelope[0].type}) cannot hold max_frame_bytes")

    min_frame = sum(f.width for f in header if not f.count) + trailer[0].width
    transports = _transports(root.child("transports"), min_frame, next(lim.value for lim in limits
                                                                       if lim.name == "max_frame_bytes"), known)

    return VFrame(
        source=path.name,
        id=meta.child("id").ident(),
        title=meta.child("title").str(),
        version=meta.child("version").int(1, 255),
        doc=meta.doc(),
        limits=limits,
        header=header,
        slice_len_rule_doc=rule.doc(),
        slice_len_empty_doc=rule.child("empty_form_doc").str() if rule.child("empty_form_doc").value is not None else "",
        slice=slice_,
        trailer=trailer,
        enums=enums,
        errors=tuple(errors),
        versions=tuple(versions),
        envelope=envelope,
        transforms=transforms,
        transports=transports,
    )


def _lim(limits: tuple[Limit, ...], name: str) -> int:
    return next(lim.value for lim in limits if lim.name == name)


def _limit_node(root: _Node, limits: tuple[Limit, ...], name: str) -> _Node:
    i = next(i for i, lim in enumerate(limits) if lim.name == name)
    return root.child("limits").child(i).child("value")


def _check_limits(root: _Node, limits: tuple[Limit, ...], sections: dict[str, tuple[Field, ...]],
                  runtime: dict[str, str] | None = None) -> tuple[Limit, ...]:
    """Every `limit:` names a field the decoder checks, and every limit is checked somewhere."""
    used: dict[str, str] = {}
    for section, fields in sections.items():
        snode = root
        for part in section.split("."):
            snode = snode.child(part)
        for i, f in enumerate(fields):
            expected = FIELD_LIMITS.get((section, f.name))
            lnode = snode.child(i).child("limit")
            if f.limit is not None and expected is None:
                sites = ", ".join(f"{s}.{n} ({lim})" for (s, n), lim in FIELD_LIMITS.items())
                raise lnode.fail(f"no generated check enforces a limit on {section}.{f.name} (limits are checked at "
                                 f"{sites})")
            if expected is not None and f.limit != expected:
                raise lnode.fail(f"{section}.{f.name} must carry 'limit: {expected}' (the decoder checks it there)")
            if f.limit is not None:
                used[f.limit] = f"the decoder, at {section}.{f.name}"
                if _lim(limits, f.limit) > f.max_value:
                    raise _limit_node(root, limits, f.limit).fail(
                        f"{f.limit} ({_lim(limits, f.limit)}) does not fit {section}.{f.name} ({f.type})")
    return _check_unenforced(root, limits, used, RUNTIME_LIMITS["vframe.yaml"] if runtime is None else runtime)


def _check_unenforced(root: _Node, limits: tuple[Limit, ...], used: dict[str, str],
                      runtime: dict[str, str]) -> tuple[Limit, ...]:
    """Every limit is checked at a field or by the runtime (RUNTIME_LIMITS); returns the limits with
    where each is enforced."""
    for i, lim in enumerate(limits):
        if lim.name not in used and lim.name not in runtime:
            raise root.child("limits").child(i).child("name").fail(
                f"nothing enforces limit '{lim.name}': name it in a field's 'limit:' that the decoder checks, or "
                f"enforce it in the runtime and list it in codegen.model.RUNTIME_LIMITS (enforced there: "
                f"{', '.join(runtime)})")
    return tuple(replace(lim, enforced_by=used.get(lim.name) or runtime[lim.name]) for lim in limits)


def _transports(node: _Node, min_frame: int, max_frame: int, errors: set[str]) -> tuple[Transport, ...]:
    out = []
    for item in node.seq():
        item.mapping(("name", "doc", "framing", "max_frame_bytes", "rules", "errors"),
                     ("length_prefix", "small_path_frame_bytes"))
        name = item.child("name").ident()
        if any(t.name == name for t in out):
            raise item.child("name").fail(f"duplicate transport '{name}'")
        framing = item.child("framing").str()
        if framing not in FRAMINGS:
            raise item.child("framing").fail(f"unknown framing '{framing}' (expected one of {', '.join(FRAMINGS)})")
        max_bytes = item.child("max_frame_bytes").int(min_frame, max_frame)
        small = None
        if item.child("small_path_frame_bytes").value is not None:
            small = item.child("small_path_frame_bytes").int(min_frame, max_bytes)
        prefix = None
        pnode = item.child("length_prefix")
        if framing == "length_prefix":
            if pnode.value is None:
                raise item.fail("missing required key 'length_prefix' (framing is length_prefix)")
            pnode.mapping(("type", "endian", "min"))
            ptype = pnode.child("type").str()
            if ptype not in WIDTHS:
                raise pnode.child("type").fail(f"unknown type '{ptype}' (expected u8, u16, u32 or u64)")
            if pnode.child("endian").value != "little":
                raise pnode.child("endian").fail("only little-endian length prefixes are supported")
            prefix = LengthPrefix(ptype, "little", pnode.child("min").int(1, max_bytes))
            if prefix.max_value < max_bytes:
                raise pnode.child("type").fail(f"a {ptype} cannot hold max_frame_bytes ({max_bytes})")
        elif pnode.value is not None:
            raise pnode.fail(f"only a length_prefix transport has a length prefix (framing is {framing})")
        rules = tuple(r.str().strip() for r in item.child("rules").seq())
        for i, r in enumerate(rules):
            if "\n" in r:
                raise item.child("rules").child(i).fail("a rule must be one line")
        cases = []
        for case in item.child("errors").seq():
            case.mapping(("case", "action", "doc"), ("error",))
            action = case.child("action").str()
            if action not in TRANSPORT_ACTIONS:
                raise case.child("action").fail(
                    f"unknown action '{action}' (expected one of {', '.join(TRANSPORT_ACTIONS)})")
            if action == "close" and framing != "length_prefix":
                raise case.child("action").fail("only a connection (framing length_prefix) can be closed")
            err = case.child("error").value
            if err is not None and err not in errors:
                raise case.child("error").fail(f"unknown error '{err}' (not in errors)")
            cases.append(TransportCase(case.child("case").str(), action, err, case.doc()))
        out.append(Transport(name, item.doc(), framing, max_bytes, prefix, small, rules, tuple(cases)))
    if not out:
        raise node.fail("at least one transport is required")
    return tuple(out)


#: Where `choices_from:` may take a field's choices from: the wire names of a vframe.yaml enum.
CHOICES_FROM = ("dtype",)


def _hfields(node: _Node, ctx: dict[str, Any]) -> tuple[HField, ...]:
    out = []
    for item in node.seq():
        item.mapping(("name", "type", "required", "doc"), ("const", "choices", "choices_from", "fields", "default"))
        name = item.child("name").str()
        if any(f.name == name for f in out):
            raise item.child("name").fail(f"duplicate field '{name}'")
        htype = item.child("type").str()
        if htype not in HANDSHAKE_TYPES:
            raise item.child("type").fail(f"unknown type '{htype}' (expected one of {', '.join(HANDSHAKE_TYPES)})")
        req = item.child("required").value
        if not isinstance(req, bool):
            raise item.child("required").fail("expected true or false")
        choices = tuple(c.str() for c in item.child("choices").seq()) if item.child("choices").value else ()
        source = item.child("choices_from").value
        if source is not None:
            if choices:
                raise item.child("choices_from").fail("give either choices or choices_from, not both")
            if source not in CHOICES_FROM or source not in ctx["wire_names"]:
                raise item.child("choices_from").fail(
                    f"unknown source '{source}' (expected one of {', '.join(CHOICES_FROM)})")
            choices = ctx["wire_names"][source]
        if choices and htype not in ("string", "list[string]"):
            raise item.fail("only a string or a list of strings has choices")
        sub = _hfields(item.child("fields"), ctx) if item.child("fields").value is not None else ()
        if sub and htype not in ("object", "list[object]"):
            raise item.child("fields").fail("only an object or a list of objects has fields")
        const = item.child("const").value
        hf = HField(name, htype, req, item.doc(), const, choices, sub, choices_from=source)
        if "default" in item.value:
            dnode = item.child("default")
            if req:
                raise dnode.fail("a required field has no default")
            value = dnode.value
            if htype in ("u32", "u64") and isinstance(value, str):  # a limit's name: its value
                if value not in ctx["limits"]:
                    raise dnode.fail(f"unknown limit '{value}' (defined: {', '.join(sorted(ctx['limits']))})")
                value = ctx["limits"][value]
            problem = _value_problem(value, hf, ctx)
            if problem:
                raise dnode.fail(f"default {value!r} does not fit the field: {problem}")
            hf = HField(name, htype, req, hf.doc, const, choices, sub, True, value, source)
        out.append(hf)
    return tuple(out)


_HEX_DIGITS = {"hex32": 32, "hex64": 64}


def _value_problem(value: Any, f: HField, ctx: dict[str, Any], path: str = "") -> str | None:
    """Why `value` breaks field `f` (what handshake.validate would refuse), or None."""
    t = f.type
    at = f"{path}: " if path else ""
    if t == "string":
        if not isinstance(value, str):
            return f"{at}expected a string"
        if len(value) > ctx["limits"].get("max_string_chars", len(value)):
            return f"{at}longer than max_string_chars"
        if f.const is not None and value != f.const:
            return f"{at}must be {f.const!r}"
        if f.choices and value not in f.choices:
            return f"{at}{value!r} is not one of {', '.join(f.choices)}"
    elif t in _HEX_DIGITS:
        if not isinstance(value, str) or not re.fullmatch(f"[0-9a-f]{{{_HEX_DIGITS[t]}}}", value):
            return f"{at}expected {_HEX_DIGITS[t]} lowercase hexadecimal digits"
    elif t == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{at}expected a number"
    elif t == "bool":
        if not isinstance(value, bool):
            return f"{at}expected true or false"
    elif t in ("u32", "u64"):
        top = (1 << (32 if t == "u32" else 64)) - 1
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
            return f"{at}expected an integer in [0, {top}]"
    elif t == "ranges":
        return _ranges_problem(value, ctx["limits"].get("max_report_ranges", 0), at)
    elif t.startswith("list["):
        if not isinstance(value, list):
            return f"{at}expected a list"
        item = HField(f.name, t[5:-1], True, f.doc, None, f.choices, f.fields)
        for i, v in enumerate(value):
            problem = _value_problem(v, item, ctx, f"{path}[{i}]")
            if problem:
                return problem
    elif t == "object":
        if not isinstance(value, dict):
            return f"{at}expected an object"
        return _document_problem(value, f.fields, ctx, path, open_keys=True)
    return None


def _ranges_problem(value: Any, cap: int, at: str) -> str | None:
    """The `ranges` type: [a0, b0, a1, b1, ...], u64 integers, a_i < b_i <= a_(i+1), at most cap pairs."""
    if not isinstance(value, list) or len(value) % 2:
        return f"{at}expected a list of an even number of integers"
    if len(value) > 2 * cap:
        return f"{at}more than max_report_ranges ({cap}) ranges"
    last = -1
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 64:
            return f"{at}item {i} is not a u64"
        if (v <= last) if i % 2 else (v < last):
            return f"{at}ranges must be ascending, non-empty and apart"
        last = v
    return None


def _document_problem(doc: dict, fields: tuple[HField, ...], ctx: dict[str, Any], path: str,
                      open_keys: bool) -> str | None:
    names = {f.name for f in fields}
    for key in doc:
        if key not in names and not (open_keys and str(key).startswith("x-")):
            return f"{path}.{key}: not a field of the schema".lstrip(".")
    for f in fields:
        if f.name in doc:
            problem = _value_problem(doc[f.name], f, ctx, f"{path}.{f.name}".lstrip("."))
            if problem:
                return problem
        elif f.required:
            return f"{path}.{f.name}: required field is missing".lstrip(".")
    return None


def load_handshake(path: Path, vframe: VFrame | None = None) -> Handshake:
    root = _read(path).mapping(("meta", "limits", "flow", "streams", "state_machine", "messages"))
    meta = root.child("meta").mapping(("id", "title", "version", "doc"))
    limits = _limits(root.child("limits"))
    for needed in ("max_json_bytes", "max_list_items", "max_string_chars", "max_objects"):
        if needed not in {lim.name for lim in limits}:
            raise root.child("limits").fail(f"missing limit '{needed}'")
    limits = _check_unenforced(root, limits, {}, RUNTIME_LIMITS["handshake.yaml"])
    known = {lim.name: lim.value for lim in limits}
    if vframe is not None:
        known.update({lim.name: lim.value for lim in vframe.limits if lim.name not in known})
    ctx = {"limits": known,
           "wire_names": {"dtype": tuple(v.wire for v in vframe.dtypes)} if vframe is not None else {}}
    flow = []
    for item in root.child("flow").seq():
        item.mapping(("step", "sender", "message", "doc"))
        flow.append((item.child("step").int(1), item.child("sender").str(),
                     item.child("message").str(), item.doc()))
    streams = []
    for item in root.child("streams").seq():
        item.mapping(("name", "doc"))
        streams.append((item.child("name").ident(), item.doc()))
    messages = []
    for i, item in enumerate(root.child("messages").seq()):
        item.mapping(("name", "doc", "fields"), ("example",))
        mname = item.child("name").ident()
        if any(m.name == mname for m in messages):
            raise item.child("name").fail(f"duplicate message '{mname}'")
        fields = _hfields(item.child("fields"), ctx)
        if not fields or fields[0].name != "method" or fields[0].const != item.child("name").value:
            raise item.child("fields").fail("the first field must be 'method' with const equal to the message name")
        example = item.child("example").value
        if example is not None:
            if not isinstance(example, dict):
                raise item.child("example").fail("expected a mapping (a JSON object)")
            problem = _document_problem(example, fields, ctx, "", open_keys=False)
            if problem:
                raise item.child("example").fail(f"the example breaks the message's fields: {problem}")
        messages.append(HMessage(mname, item.doc(), fields, example))
    for i, (_, _, message, _) in enumerate(flow):
        if message != "data" and message not in {m.name for m in messages}:
            raise root.child("flow").child(i).child("message").fail(
                f"'{message}' is neither a message nor data (messages: {', '.join(m.name for m in messages)})")
    for needed in RUNTIME_MESSAGES:
        if needed not in {m.name for m in messages}:
            raise root.child("messages").fail(f"missing message '{needed}' (the Session or the V-Stream uses it)")
    if messages[0].name != "ping" or messages[0].example is None:
        raise root.child("messages").fail("the first message must be ping, with an example (the spec's worked example)")
    hs = Handshake(path.name, meta.child("title").str(), meta.child("version").int(1), meta.doc(),
                   limits, tuple(flow), tuple(streams), tuple(messages), _state_machine(root.child("state_machine")))
    _check_handshake(root, hs, vframe)
    return hs


def _check_handshake(root: _Node, hs: Handshake, vf: VFrame | None) -> None:
    """Cross-file facts: a control document fits one frame, every list of choices fits the list limit,
    every choice fits the string limit, the hex types hold the random and tag sizes."""
    def lnode(name: str) -> _Node:
        return root.child("limits").child(next(i for i, lim in enumerate(hs.limits) if lim.name == name)).child("value")

    def walk(fields: tuple[HField, ...], path: str):
        for f in fields:
            yield f, f"{path}.{f.name}"
            yield from walk(f.fields, f"{path}.{f.name}")

    for m in hs.messages:
        for f, where in walk(m.fields, m.name):
            if f.type == "list[string]" and len(f.choices) > hs.limit("max_list_items"):
                raise lnode("max_list_items").fail(
                    f"max_list_items ({hs.limit('max_list_items')}) is less than the {len(f.choices)} choices of {where}")
            for c in f.choices:
                if len(c) > hs.limit("max_string_chars"):
                    raise lnode("max_string_chars").fail(f"the choice {c!r} of {where} is longer than max_string_chars")
            if f.type == "hex64" and "session_random_bytes" in {lim.name for lim in hs.limits} \
                    and 2 * hs.limit("session_random_bytes") != _HEX_DIGITS["hex64"]:
                raise lnode("session_random_bytes").fail(
                    f"{where} is hex64 ({_HEX_DIGITS['hex64']} digits): session_random_bytes must be "
                    f"{_HEX_DIGITS['hex64'] // 2}")
            if f.type == "hex32" and vf is not None and 2 * vf.transforms.tag_bytes != _HEX_DIGITS["hex32"]:
                raise root.child("messages").fail(
                    f"{where} is hex32 ({_HEX_DIGITS['hex32']} digits) but tag_bytes is {vf.transforms.tag_bytes}")
    if vf is not None:
        # a control document travels as one json slice of one Sync frame
        overhead = vf.min_frame_bytes + vf.counted.width + sum(f.width for f in vf.slice if f.type != "bytes")
        if hs.limit("max_json_bytes") + overhead > vf.limit("max_frame_bytes"):
            raise lnode("max_json_bytes").fail(
                f"max_json_bytes ({hs.limit('max_json_bytes')}) plus a one-slice frame's {overhead} bytes is more "
                f"than max_frame_bytes ({vf.limit('max_frame_bytes')}): a control document must fit one frame")
        if "min_chunk_bytes" in {lim.name for lim in hs.limits} and hs.limit("min_chunk_bytes") > vf.limit("max_frame_bytes"):
            raise lnode("min_chunk_bytes").fail("min_chunk_bytes is more than max_frame_bytes")


def _state_machine(node: "_Node") -> StateMachine:
    node.mapping(("doc", "states", "inputs", "actions", "transitions"))
    lists = {}
    for key in ("states", "inputs", "actions"):
        items = []
        for item in node.child(key).seq():
            item.mapping(("name", "doc"))
            name = item.child("name").ident()
            if name in {n for n, _ in items}:
                raise item.child("name").fail(f"'{name}' is listed twice")
            items.append((name, item.doc()))
        if not items:
            raise node.child(key).fail("must not be empty")
        lists[key] = tuple(items)
    states = {n for n, _ in lists["states"]}
    inputs = [n for n, _ in lists["inputs"]]
    actions = {n for n, _ in lists["actions"]}
    out, roles, seen = [], [], set()
    for row in node.child("transitions").seq():
        row.mapping(("role", "state", "row"))
        role = row.child("role").ident()
        state = row.child("state").ident()
        if state not in states:
            raise row.child("state").fail(f"'{state}' is not one of the states")
        if (role, state) in seen:
            raise row.fail(f"a second row for {role} in {state}")
        seen.add((role, state))
        if role not in roles:
            roles.append(role)
        cells = row.child("row").mapping(tuple(inputs))
        for inp in inputs:
            cell = cells.child(inp)
            parts = cell.str().split()
            if len(parts) != 2:
                raise cell.fail("expected 'action next_state'")
            action, nxt = parts
            if action not in actions:
                raise cell.fail(f"'{action}' is not one of the actions")
            if nxt not in states:
                raise cell.fail(f"'{nxt}' is not one of the states")
            out.append((role, state, inp, action, nxt))
    for role, state, inp, action, nxt in out:  # every next state of a role has its own row
        if (role, nxt) not in seen:
            raise node.child("transitions").fail(f"{role} can reach '{nxt}' ({state} + {inp}) but has no row for it")
    return StateMachine(node.doc(), lists["states"], lists["inputs"], lists["actions"], tuple(roles), tuple(out))


def load(schema_dir: Path) -> Model:
    vframe = load_vframe(schema_dir / "vframe.yaml")
    return Model(vframe, load_handshake(schema_dir / "handshake.yaml", vframe))
