"""KV caches over V-Streams: HEAD's `kv` metadata, its checks, and the receiving side's events.

    await peer.send_kv_cache(cache, signature=sig, dtype="bf16")     # process A (aio.Peer)
    event = await peer.next_event()                                  # process B: ...
    if isinstance(event, resonant.KVCacheReceived): event.cache      # a transformers DynamicCache

A KV stream is a Cache V-Stream whose HEAD carries `kv` (schema/handshake.yaml): the layer count,
seq_len, the sender's torch dtype, the wire dtype and optionally the model signature; its objects are
l{i}.keys, l{i}.values per layer, each (batch, kv_heads, seq_len, head_dim). A receiver checks all
of it at HEAD (bad_head with the field path) and, when it declared its model
(SessionConfig.expected_signature), refuses a stream of another model (model_mismatch) before
allocating anything. KVReceiver turns the stream events of such streams into KVLayerReceived (layer
by layer, while later layers are in flight) and KVCacheReceived (the whole cache, verified).
This module imports torch only when a KV stream's first layer is handed out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from resonant import handshake
from resonant._spec import DTYPE_OF_WIRE_NAME, MsgType
from resonant.errors import HandshakeError
from resonant.reassembler import ObjectReady, StreamComplete, StreamFailed, StreamStarted
from resonant.space import ModelSignature

__all__ = ["KVInfo", "KVLayerReceived", "KVCacheReceived", "KVReceiver", "check_layout", "model_problem",
           "WIRE_DTYPES", "TORCH_DTYPES"]

#: The wire dtypes a KV stream may use (their handshake names), and the torch dtypes a cache may have.
WIRE_DTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
TORCH_DTYPES = ("float32", "float16", "bfloat16")
#: The wire dtype that carries each torch dtype as it is (no conversion, and a zero-copy cache).
SAME_WIRE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
QUANTIZED = ("q8_0", "q4_0")
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KVInfo:
    """HEAD's kv: what the stream's objects form (see schema/handshake.yaml, head.kv)."""

    layers: int
    seq_len: int
    torch_dtype: str
    wire_dtype: str
    signature: ModelSignature | None = None

    def to_json(self) -> dict:
        doc = {"layers": self.layers, "seq_len": self.seq_len, "torch_dtype": self.torch_dtype,
               "wire_dtype": self.wire_dtype}
        if self.signature is not None:
            doc["model_signature"] = self.signature.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: dict, path: str = "head.kv") -> "KVInfo":
        """From a kv object the schema has validated (types, choices); the signature checked here."""
        sig = None
        if "model_signature" in doc:
            try:
                sig = ModelSignature.from_json(doc["model_signature"])
            except HandshakeError as exc:
                raise HandshakeError(f"{path}.{exc.path}", exc.detail) from None
        return cls(doc["layers"], doc["seq_len"], doc["torch_dtype"], doc["wire_dtype"], sig)


def check_layout(layout: Any, kv: KVInfo, path: str = "head") -> None:
    """That the stream's objects are what kv says: Cache message type, 2 x layers objects named
    l{i}.keys / l{i}.values of layer i, all in wire_dtype, of shape (batch, kv_heads, seq_len,
    head_dim) (keys and values alike), and, with a signature, its num_layers, num_kv_heads and
    head_dim. HandshakeError with the field path (a receiver fails the stream as bad_head)."""
    if layout.msg_type != MsgType.CACHE:
        raise HandshakeError(f"{path}.msg_type", f"{layout.msg_type}: a stream with kv is a Cache ({int(MsgType.CACHE)})")
    if not 1 <= kv.layers <= handshake.MAX_KV_LAYERS:
        raise HandshakeError(f"{path}.kv.layers", f"{kv.layers} is not in 1..max_kv_layers ({handshake.MAX_KV_LAYERS})")
    if len(layout.objects) != 2 * kv.layers:
        raise HandshakeError(f"{path}.kv.layers", f"{kv.layers} layers need {2 * kv.layers} objects (keys, values "
                             f"per layer); the stream has {len(layout.objects)}")
    sig = kv.signature
    if sig is not None and sig.num_layers != kv.layers:
        raise HandshakeError(f"{path}.kv.layers", f"{kv.layers}, but the model signature says num_layers "
                             f"{sig.num_layers}")
    code = DTYPE_OF_WIRE_NAME[kv.wire_dtype]
    for o in layout.objects:
        at = f"{path}.objects[{o.index}]"
        layer, part = divmod(o.index, 2)
        want = f"l{layer}.{'values' if part else 'keys'}"
        if o.name != want:
            raise HandshakeError(f"{at}.name", f"{o.name!r}: a KV stream's object {o.index} is {want!r}")
        if o.layer != layer:
            raise HandshakeError(f"{at}.layer", f"{o.layer!r}: {want} belongs to layer {layer}")
        if int(o.dtype) != int(code):
            raise HandshakeError(f"{at}.dtype", f"{int(o.dtype)}: kv.wire_dtype {kv.wire_dtype} is dtype {int(code)}")
        if len(o.shape) != 4:
            raise HandshakeError(f"{at}.shape", f"{list(o.shape)}: KV tensors are (batch, kv_heads, seq_len, head_dim)")
        if o.shape[2] != kv.seq_len:
            raise HandshakeError(f"{at}.shape", f"{list(o.shape)}: dimension 2 must be kv.seq_len ({kv.seq_len})")
        if part and o.shape != layout.objects[o.index - 1].shape:
            raise HandshakeError(f"{at}.shape", f"{list(o.shape)}: the values' shape must be the keys' "
                                 f"({list(layout.objects[o.index - 1].shape)})")
        if sig is not None and (o.shape[1] != sig.num_kv_heads or o.shape[3] != sig.head_dim):
            raise HandshakeError(f"{at}.shape", f"{list(o.shape)}: the model signature says {sig.num_kv_heads} KV heads "
                                 f"of head_dim {sig.head_dim}")


def converted_bytes(layout: Any) -> int:
    """The memory a receiver builds for a KV stream beyond its buffer, charged with it at HEAD: the
    tensors converted from wire_dtype to torch_dtype (q4_0 to float32: ~7x the wire bytes); 0 when
    the wire carries the torch dtype as it is (the tensors are views of the buffer)."""
    kv = layout.kv
    if kv is None or SAME_WIRE[kv.torch_dtype] == kv.wire_dtype:
        return 0
    return _ITEMSIZE[kv.torch_dtype] * sum(math.prod(o.shape) for o in layout.objects)


def model_problem(kv: KVInfo, expected: ModelSignature) -> str | None:
    """Why a receiver that runs `expected` refuses this KV stream (model_mismatch), or None."""
    if kv.signature is None:
        return f"the KV cache names no model; this receiver runs {expected.model_id!r} (send it with signature=)"
    if kv.signature != expected:
        return f"the KV cache is of another model: {expected.explain(kv.signature)}"
    return None


# ------------------------------------------------------------------ events


@dataclass(frozen=True)
class KVLayerReceived:
    """Both tensors of one layer of a KV stream have arrived: keys and values as torch tensors
    (batch, kv_heads, seq_len, head_dim) in the sender's torch dtype, views of the stream's buffer
    when the wire dtype is that dtype. They come in layer order, each as soon as it and every
    earlier layer are in (by default before the stream completes: StreamLimits(release="arrival")).

    Not yet verified: each chunk passed its CRC, but the whole-stream hash is checked only at
    KVCacheReceived; the stream may still fail (StreamFailed, e.g. hash_mismatch) after this event,
    and unencrypted, a forged chunk is handed out as it came. Read-only: clone() before writing."""

    stream_id: int
    layer: int
    keys: Any
    values: Any


@dataclass(frozen=True)
class KVCacheReceived:
    """A KV stream arrived and its hash matched: cache is a transformers DynamicCache whose layer i
    holds the tensors of KVLayerReceived(layer=i) (the same tensors; views of the received buffer
    when wire_dtype carries torch_dtype as it is: f32, f16, bf16). seq_len: the position the next
    token takes. signature: the sender's model signature (None when it sent none). It comes right
    after the stream's StreamComplete."""

    stream_id: int
    cache: Any
    seq_len: int
    signature: ModelSignature | None
    layers: int
    torch_dtype: str
    wire_dtype: str
    nbytes: int


def held_bytes(e: KVCacheReceived) -> int:
    """What a queued KVCacheReceived keeps alive: its cache's tensors (views of the stream's buffer,
    or the tensors converted from the wire dtype), charged to a server's max_memory until taken."""
    from resonant.torch_utils import kv_layers

    return sum(k.nbytes + v.nbytes for k, v in kv_layers(e.cache))


_READY: list = []


def _torch_ready() -> bool:
    """Whether torch and transformers are installed (checked once, without importing them)."""
    if not _READY:
        import importlib.util
        _READY.append(all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers")))
    return _READY[0]


_INPUT = frozenset((StreamStarted, ObjectReady, StreamComplete, StreamFailed))  # the events feed() looks at


class _Open:
    __slots__ = ("info", "layout", "arrays", "tensors")

    def __init__(self, info: KVInfo, layout: Any) -> None:
        self.info = info
        self.layout = layout
        self.arrays: list = [None] * (2 * info.layers)
        self.tensors: list = []  # (keys, values) of the layers handed out, in order


class KVReceiver:
    """Sans-IO: pass a session's events through expand() and get them back with KVLayerReceived /
    KVCacheReceived added after the events that complete them (for streams whose HEAD has kv; every
    other event passes unchanged). A Session has one (Session.kv); resonant.connect / serve use it.
    Without torch and transformers installed it adds nothing: the application sees the stream's
    plain events (StreamComplete's objects are the keys and values, layer by layer)."""

    def __init__(self) -> None:
        self._open: dict[int, _Open] = {}

    def expand(self, events: list) -> list:
        if not events or (not self._open and StreamStarted not in map(type, events)):
            return events  # (no KV stream open or opening: nothing to add)
        out: list | None = None
        for i, e in enumerate(events):
            more = self.feed(e) if type(e) in _INPUT else None
            if more:
                if out is None:
                    out = list(events[:i])
                out.append(e)
                out += more
            elif out is not None:
                out.append(e)
        return events if out is None else out

    def feed(self, e: Any) -> list:
        """The KV events that event e completes (usually none)."""
        t = type(e)
        if t is ObjectReady:
            st = self._open.get(e.stream_id)
            if st is None:
                return []
            st.arrays[e.index] = e.array
            return self._layers(e.stream_id, st)
        if t is StreamStarted:
            kv = getattr(e.layout, "kv", None)
            if kv is not None and _torch_ready():  # (without torch and transformers: the plain events only)
                self._open[e.stream_id] = _Open(kv, e.layout)
            return []
        if t is StreamComplete:
            st = self._open.pop(e.stream_id, None)
            if st is None:
                return []
            for j in range(2 * len(st.tensors), len(st.arrays)):  # (release="verified": every ObjectReady came
                if st.arrays[j] is None:                             # just before; else the layers still held)
                    st.arrays[j] = e.objects[j]
            out = self._layers(e.stream_id, st)
            from resonant.torch_utils import dynamic_cache

            kv = st.info
            return out + [KVCacheReceived(e.stream_id, dynamic_cache(st.tensors), kv.seq_len, kv.signature, kv.layers,
                                          kv.torch_dtype, kv.wire_dtype, e.nbytes)]
        if t is StreamFailed:
            self._open.pop(e.stream_id, None)
        return []

    def _layers(self, sid: int, st: _Open) -> list:
        out = []
        i = len(st.tensors)
        while i < st.info.layers and st.arrays[2 * i] is not None and st.arrays[2 * i + 1] is not None:
            from resonant.torch_utils import kv_tensor

            objs = st.layout.objects
            k = kv_tensor(st.arrays[2 * i], objs[2 * i].shape, st.info.wire_dtype, st.info.torch_dtype)
            v = kv_tensor(st.arrays[2 * i + 1], objs[2 * i + 1].shape, st.info.wire_dtype, st.info.torch_dtype)
            st.arrays[2 * i] = st.arrays[2 * i + 1] = None  # (the tensors keep what they need)
            st.tensors.append((k, v))
            out.append(KVLayerReceived(sid, i, k, v))
            i += 1
        return out
