"""V-Stream: tensors of any size over frames of at most 64 KiB, verified end to end.

Sans-IO: the sender yields frame bytes, the reassembler takes frame bytes (or decoded
frames) and the time, and returns events. Nothing here reads a clock or touches a socket.

    sender = StreamSender(stream_id=7, objects=[k0, v0, k1, v1], msg_type=MsgType.CACHE)
    for data in sender:                      # HEAD, chunks, TAIL
        transport.send(data)

    r = Reassembler()
    for event in r.receive(data, now=time.monotonic()):
        ...                                  # StreamStarted, ObjectReady, StreamComplete, StreamFailed

The wire rules (HEAD/TAIL documents, chunk numbering and geometry, the hash) are in
schema/handshake.yaml (`streams`, `head`, `tail`) and specs/capability_handshake.md.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from resonant import _codec, handshake
from resonant._codec import Chunk, Frame, Slice, Sync
from resonant._spec import (MAX_FRAME_BYTES, MAX_SHAPE_ELEMENTS, NUMPY_DTYPES, TCP_LENGTH_PREFIX_BYTES, DType, Flags,
                            Modality, MsgType)
from resonant.errors import EncodeError, HandshakeError, ResonantError
from resonant.refcodec import expected_size

__all__ = [
    "StreamSender", "Reassembler", "StreamLimits", "StreamLayout", "StreamObject",
    "StreamStarted", "ObjectReady", "StreamComplete", "StreamFailed",
]

STREAM_VERSION = 1
MIN_STREAM_FRAME = 512  # the smallest max_frame_bytes: a HEAD of one object needs about 200 bytes
_HEAD_PREFIX = re.compile(rb'\s*\{\s*"method"\s*:\s*"head"')  # a head document too broken to validate
# Bytes a Chunk frame needs besides its payload: header with one slice_len (33), the slice's
# dtype, shape_len and one dimension (6), CRC (4); with a Codec, the envelope (33), the tag
# (16) and a segment table for up to 8 byte planes (33).
_CHUNK_OVERHEAD = 43
_TRANSFORM_OVERHEAD = 33 + 16 + 33
# The largest chunk payload a plain (version 1) Chunk frame carries, and so any resonant sender
# makes; a compressed frame may carry more (its body is up to 64 KiB before compression).
_PLAIN_CHUNK_MAX = MAX_FRAME_BYTES - _CHUNK_OVERHEAD
_I8 = DType.I8
# Stream buffers at least this large are written with streaming (non-temporal) stores: they
# exceed the caches, and ordinary stores would first read every destination line.
STREAMING_STORE_BYTES = 8 << 20
# Stream buffers at least this large come from the codec's output blocks, which are kept for
# reuse once the application drops them (see set_buffer_cache): no page faults the next time.
_CHUNK_BATCH = 16  # chunks encoded per C call
BLOCK_BYTES = 8 << 20  # (blocks are whole 2 MiB pages: at most 25% more than asked)


def set_buffer_cache(limit: int) -> int:
    """Keep at most `limit` bytes (default 1 GiB) of released stream buffers for reuse by later
    streams; 0 keeps none. Returns the previous limit."""
    return _codec.set_block_cache(limit)


# ------------------------------------------------------------------ layout


@dataclass(frozen=True)
class StreamObject:
    """One tensor of a stream and where its bytes sit."""

    index: int
    dtype: DType
    shape: tuple[int, ...]
    nbytes: int
    offset: int          # byte offset in the stream (objects laid end to end)
    first_chunk: int     # index of its first chunk
    chunks: int          # number of its chunks
    name: str | None = None
    layer: int | None = None


@dataclass(frozen=True)
class StreamLayout:
    """The geometry of a stream, derived from its HEAD alone."""

    msg_type: int
    chunk_bytes: int
    total_bytes: int
    objects: tuple[StreamObject, ...]
    legacy_md5: bool = False

    @property
    def chunks(self) -> int:
        return self.objects[-1].first_chunk + self.objects[-1].chunks if self.objects else 0

    def chunk(self, k: int) -> tuple[StreamObject, int, int]:
        """(object, offset in the object, length) of chunk k."""
        lo, hi = 0, len(self.objects) - 1
        while lo < hi:  # the last object whose first chunk is <= k
            mid = (lo + hi + 1) // 2
            if self.objects[mid].first_chunk <= k:
                lo = mid
            else:
                hi = mid - 1
        obj = self.objects[lo]
        start = (k - obj.first_chunk) * self.chunk_bytes
        return obj, start, min(self.chunk_bytes, obj.nbytes - start)

    @classmethod
    def build(cls, msg_type: int, chunk_bytes: int, specs: Sequence[tuple[DType, tuple[int, ...], int, str | None, int | None]],
              legacy_md5: bool = False) -> "StreamLayout":
        objects, offset, first = [], 0, 0
        for i, (dtype, shape, nbytes, name, layer) in enumerate(specs):
            n = max(1, math.ceil(nbytes / chunk_bytes))  # an empty object still takes one (empty) chunk
            objects.append(StreamObject(i, DType(dtype), tuple(shape), nbytes, offset, first, n, name, layer))
            offset += nbytes
            first += n
        return cls(int(msg_type), chunk_bytes, offset, tuple(objects), legacy_md5)

    def head_document(self) -> dict:
        doc = {
            "method": "head", "v": STREAM_VERSION, "msg_type": self.msg_type, "chunk_bytes": self.chunk_bytes,
            "total_bytes": self.total_bytes,
            "objects": [{**({"name": o.name} if o.name is not None else {}),
                         **({"layer": o.layer} if o.layer is not None else {}),
                         "dtype": int(o.dtype), "shape": list(o.shape), "nbytes": o.nbytes} for o in self.objects],
            "hash": "xxh3_64",
        }
        if self.legacy_md5:
            doc["legacy_md5"] = True
        return doc

    @classmethod
    def from_head(cls, doc: dict) -> "StreamLayout":
        """Check a validated head document for consistency and derive the layout."""
        if doc["v"] != STREAM_VERSION:
            raise HandshakeError("head.v", f"{doc['v']}: this receiver speaks V-Stream version {STREAM_VERSION}")
        try:
            MsgType(doc["msg_type"])
        except ValueError:
            raise HandshakeError("head.msg_type", f"{doc['msg_type']} is not a message type") from None
        chunk_bytes = doc["chunk_bytes"]
        if not 1 <= chunk_bytes <= MAX_FRAME_BYTES:
            raise HandshakeError("head.chunk_bytes", f"{chunk_bytes} is not in 1..{MAX_FRAME_BYTES}")
        if chunk_bytes < handshake.MIN_CHUNK_BYTES:  # a bitmap and a failure path out of proportion to the stream
            raise HandshakeError("head.chunk_bytes", f"{chunk_bytes} is less than min_chunk_bytes "
                                 f"({handshake.MIN_CHUNK_BYTES})")
        specs, total = [], 0
        for i, o in enumerate(doc["objects"]):
            path = f"head.objects[{i}]"
            try:
                dtype = DType(o["dtype"])
            except ValueError:
                raise HandshakeError(f"{path}.dtype", f"{o['dtype']} is not a dtype") from None
            if math.prod(d or 1 for d in o["shape"]) > MAX_SHAPE_ELEMENTS:  # as for a slice's shape
                raise HandshakeError(f"{path}.shape", f"{tuple(o['shape'])}: the product of the dimensions, each 0 "
                                     f"counted as 1, is more than max_shape_elements ({MAX_SHAPE_ELEMENTS})")
            width = _codec.element_bytes(dtype)
            need = expected_size(int(dtype), math.prod(o["shape"]))  # the dtype's size rule; None: any size
            if need is not None and o["nbytes"] != need:
                raise HandshakeError(f"{path}.nbytes", f"{o['nbytes']}, but {dtype.name} of shape "
                                     f"{tuple(o['shape'])} is {need} bytes")
            if width:
                if chunk_bytes % width:
                    raise HandshakeError("head.chunk_bytes", f"{chunk_bytes} is not a multiple of {dtype.name}'s "
                                         f"{width}-byte elements")
            specs.append((dtype, tuple(o["shape"]), o["nbytes"], o.get("name"), o.get("layer")))
            total += o["nbytes"]
        if total != doc["total_bytes"]:
            raise HandshakeError("head.total_bytes", f"{doc['total_bytes']}, but the objects add up to {total}")
        return cls.build(doc["msg_type"], chunk_bytes, specs, bool(doc.get("legacy_md5", False)))


def _compact(doc: dict) -> bytes:
    """HEAD and TAIL documents as compact UTF-8 JSON (they must fit one frame)."""
    return json.dumps(doc, separators=(",", ":")).encode()


def _chunk_bytes_for(max_frame_bytes: int, dtypes: Iterable[DType], transformed: bool) -> int:
    if not MIN_STREAM_FRAME <= max_frame_bytes <= MAX_FRAME_BYTES:
        raise EncodeError("max_frame_bytes", f"{max_frame_bytes} is not in {MIN_STREAM_FRAME}..{MAX_FRAME_BYTES}")
    unit = math.lcm(1, *(_codec.element_bytes(d) or 1 for d in dtypes))
    room = max_frame_bytes - _CHUNK_OVERHEAD - (_TRANSFORM_OVERHEAD if transformed else 0)
    return max(unit, room // unit * unit)


# ------------------------------------------------------------------ sender


class StreamSender:
    """Splits tensors into the frames of one V-Stream: HEAD, Chunk frames, TAIL.

    objects: numpy arrays (any dtype resonant maps: float16, bfloat16, float32, int8) or
    Slices (any dtype, including Q4 and SparseCoo). Chunks are views of the sources (no copy
    until a frame is encoded); with `codec`, every frame is compressed/encrypted by it.
    """

    def __init__(self, stream_id: int, objects: Sequence, *, msg_type: int = MsgType.CACHE,
                 names: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                 max_frame_bytes: int = MAX_FRAME_BYTES, codec=None, space_hash32: int = 0,
                 modality: int = Modality.TEXT, legacy_md5: bool = False) -> None:
        slices = [_source(o, i) for i, o in enumerate(objects)]
        if not slices:
            raise EncodeError("objects", "a stream needs at least one object")
        if names is not None and len(names) != len(slices):
            raise EncodeError("names", f"{len(names)} names for {len(slices)} objects")
        if layers is not None and len(layers) != len(slices):
            raise EncodeError("layers", f"{len(layers)} layers for {len(slices)} objects")
        self.stream_id = stream_id
        self.codec = codec
        self._header = {"stream_id": stream_id, "space_hash32": space_hash32, "modality": modality}
        self._sources = [s.payload for s in slices]  # zero-copy byte views of the sources
        chunk_bytes = _chunk_bytes_for(max_frame_bytes, [s.dtype for s in slices], codec is not None)
        self.layout = StreamLayout.build(
            msg_type, chunk_bytes,
            [(s.dtype, s.shape, s.nbytes, names[i] if names else None, layers[i] if layers else None)
             for i, s in enumerate(slices)], legacy_md5)
        try:
            handshake.validate(self.layout.head_document())
        except HandshakeError as exc:  # the caller's names/layers/object count: local misuse
            path = exc.path.replace("head.objects", "objects")
            for field_name in ("name", "layer"):
                m = re.match(rf"objects\[(\d+)\]\.{field_name}$", path)
                if m:
                    path = f"{field_name}s[{m.group(1)}]"
            raise EncodeError(path, exc.detail) from None
        self.max_frame_bytes = max_frame_bytes
        self._hearts = 0
        self._digest: tuple[int, str | None] | None = None
        self._heads = self._head_frames()  # one frame, or parts when the HEAD does not fit one
        size = len(self._tail_frame(0, "0" * 32 if legacy_md5 else None))
        if size > max_frame_bytes:
            raise EncodeError("max_frame_bytes", f"{max_frame_bytes} is too small for this stream's TAIL ({size} bytes)")

    def _encode(self, frame: Frame) -> bytes:
        return self.codec.encode(frame) if self.codec is not None else _codec.encode(frame)

    def _head_frame(self, doc: dict) -> bytes:
        return self._encode(Sync(_compact(doc), frame_seq=0, **self._header))

    def _head_frames(self) -> list[bytes]:
        doc = self.layout.head_document()
        try:
            whole = self._head_frame(doc)
            if len(whole) <= self.max_frame_bytes:
                return [whole]
        except EncodeError:  # larger than any frame
            pass
        # Too large for one frame: parts, each as many consecutive objects as fit.
        objects, common = doc["objects"], {k: v for k, v in doc.items() if k != "objects"}
        stub = {**common, "objects": [], "parts": 4096, "part": 4095, "first_object": 65535, "object_count": len(objects)}
        fixed = len(self._head_frame(stub))
        # a part must fit a frame, and its JSON the receivers' max_json_bytes
        limit = min(self.max_frame_bytes, handshake.MAX_JSON_BYTES + fixed - len(_compact(stub)))
        runs, run, size = [], [], fixed
        for i, o in enumerate(objects):
            cost = len(_compact(o)) + 1
            if fixed + cost > limit:
                raise EncodeError("max_frame_bytes", f"{self.max_frame_bytes} is too small for a HEAD part carrying "
                                  f"objects[{i}] ({fixed + cost} bytes)")
            if run and size + cost > limit:
                runs.append(run)
                run, size = [], fixed
            run.append(i)
            size += cost
        runs.append(run)
        return [self._head_frame({**common, "objects": [objects[i] for i in r], "parts": len(runs), "part": k,
                                  "first_object": r[0], "object_count": len(objects)}) for k, r in enumerate(runs)]

    def head(self) -> bytes:
        """The HEAD frame; see heads() for a HEAD sent in parts."""
        if len(self._heads) != 1:
            raise EncodeError("head", f"this stream's HEAD is {len(self._heads)} frames: use heads()")
        return self._heads[0]

    def heads(self) -> list[bytes]:
        """The HEAD frame(s): one, or its parts when it does not fit max_frame_bytes."""
        return list(self._heads)

    def chunks(self) -> Iterator[bytes]:
        """The Chunk frames, in order (send them in any order). Without a codec they are made
        16 at a time, so a paused iteration holds up to 16 frames (1 MiB)."""
        cb = self.layout.chunk_bytes
        h = _codec.Xxh3()  # the stream hash, fed while each chunk is in cache
        md5 = hashlib.md5(usedforsecurity=False) if self.layout.legacy_md5 else None
        for obj in self.layout.objects:
            src = self._sources[obj.index]
            width = _codec.element_bytes(obj.dtype)
            dtype = obj.dtype if width else _I8
            if self.codec is None and md5 is None:  # straight from the source into the frames, 16 per call
                for j in range(0, obj.chunks, _CHUNK_BATCH):
                    yield from _codec._encode_chunks(self.stream_id, obj.first_chunk + j + 1, self._header["space_hash32"],
                                                     self._header["modality"], dtype, width, src, cb, j,
                                                     min(_CHUNK_BATCH, obj.chunks - j), h)
                continue
            for j in range(obj.chunks):
                piece = src[j * cb:(j + 1) * cb]
                n = len(piece) // width if width else len(piece)
                if self.codec is None:  # straight from the source into the frame
                    frame = _codec._encode_chunk(self.stream_id, obj.first_chunk + j + 1, self._header["space_hash32"],
                                                 self._header["modality"], dtype, n, src, j * cb, len(piece), h)
                else:
                    frame = self._encode(Chunk(Slice(dtype, (n,), piece), frame_seq=obj.first_chunk + j + 1,
                                               **self._header))
                    h.update(piece)
                if md5 is not None:
                    md5.update(piece)
                yield frame
        self._digest = (h.intdigest(), md5.hexdigest() if md5 is not None else None)

    def records(self, per_write: int = 8) -> Iterator[list]:
        """The whole stream (HEAD, chunks, TAIL) as TCP records (u32 little-endian length +
        frame), in lists of buffers for one `sendmsg` each: per_write chunks per list. Without a
        codec and MD5, each chunk is its head, a memoryview of the source and its CRC: the payload
        is not copied (the CRC and hash read it just before the kernel does, while it is in
        cache), so the source must not change until the list is sent. With a codec, the encoded
        frames behind their lengths."""
        for parts, _frames, _nbytes in self._record_batches(per_write):
            yield parts

    def _record_batches(self, per_write: int) -> Iterator[tuple[list, int, int]]:
        """records(), with the number of frames and of frame bytes in each list."""
        if not 1 <= per_write <= 1024:
            raise ValueError(f"per_write {per_write} is outside 1..1024")
        parts: list = []
        frames = nbytes = 0
        for f in self._heads:
            parts += [_record_length(f), f]
            frames, nbytes = frames + 1, nbytes + len(f)
        if self.codec is not None or self.layout.legacy_md5:
            for f in self.chunks():
                parts += [_record_length(f), f]
                frames, nbytes = frames + 1, nbytes + len(f)
                if frames % per_write == 0:
                    yield parts, frames, nbytes
                    parts, frames, nbytes = [], 0, 0
        else:
            cb = self.layout.chunk_bytes
            h = _codec.Xxh3()
            for obj in self.layout.objects:
                src = self._sources[obj.index]
                view = memoryview(src)
                width = _codec.element_bytes(obj.dtype)
                dtype = obj.dtype if width else _I8
                for j in range(obj.chunks):
                    start = j * cb
                    n = min(cb, len(view) - start)
                    head, crc = _codec._encode_chunk_parts(self.stream_id, obj.first_chunk + j + 1,
                                                           self._header["space_hash32"], self._header["modality"],
                                                           dtype, n // width if width else n, src, start, n, h, True)
                    parts += [head, view[start:start + n], crc]
                    frames, nbytes = frames + 1, nbytes + len(head) - TCP_LENGTH_PREFIX_BYTES + n + len(crc)
                    if frames % per_write == 0:
                        yield parts, frames, nbytes
                        parts, frames, nbytes = [], 0, 0
            self._digest = (h.intdigest(), None)
        tail = self.tail()
        yield parts + [_record_length(tail), tail], frames + 1, nbytes + len(tail)

    def digest(self) -> tuple[int, str | None]:
        """xxh3_64 of every object's bytes (and their MD5 when HEAD asked for it)."""
        if self._digest is not None:
            return self._digest
        h = _codec.Xxh3()
        md5 = hashlib.md5(usedforsecurity=False) if self.layout.legacy_md5 else None
        for src in self._sources:
            h.update(src)
            if md5 is not None:
                md5.update(src)
        return h.intdigest(), (md5.hexdigest() if md5 is not None else None)

    def tail(self) -> bytes:
        return self._tail_frame(*self.digest())

    def _tail_frame(self, xxh: int, md5: str | None) -> bytes:
        doc = {"method": "tail", "chunks": self.layout.chunks, "total_bytes": self.layout.total_bytes,
               "xxh3_64": f"{xxh:016x}"}
        if md5 is not None:
            doc["md5"] = md5
        return self._encode(Sync(_compact(doc), frame_seq=self.layout.chunks + 1, flags=Flags.STRONG_TAIL,
                                 **self._header))

    def heart(self) -> bytes:
        """A keepalive for this stream (frame_seq above TAIL's)."""
        self._hearts += 1
        return self._encode(Sync(frame_seq=self.layout.chunks + 1 + self._hearts, **self._header))

    def __iter__(self) -> Iterator[bytes]:
        yield from self._heads
        yield from self.chunks()
        yield self.tail()


def _record_length(frame: bytes) -> bytes:
    """The TCP record prefix of a frame: its length, u32 little-endian."""
    return len(frame).to_bytes(TCP_LENGTH_PREFIX_BYTES, "little")


@dataclass(frozen=True)
class _Source:
    dtype: DType
    shape: tuple[int, ...]
    nbytes: int
    payload: memoryview


def _source(obj, i: int) -> _Source:
    """A stream object as dtype, shape and a zero-copy byte view (a copy only to make an array
    C-contiguous and little-endian)."""
    if isinstance(obj, Slice):
        return _Source(obj.dtype, obj.shape, obj.nbytes, obj.payload)
    arr = np.asarray(obj)
    code = _codec._DTYPE_OF_NUMPY.get(arr.dtype.newbyteorder("="))
    if code is None:
        raise EncodeError(f"objects[{i}].dtype", f"no dtype for numpy {arr.dtype}; convert it (e.g. to float16) first")
    arr = np.asarray(arr, dtype=np.dtype(NUMPY_DTYPES[DType(code)]), order="C")  # keeps 0-d shapes
    return _Source(DType(code), arr.shape, arr.nbytes, memoryview(arr.reshape(-1).view(np.uint8)))


# ------------------------------------------------------------------ events


@dataclass(frozen=True)
class StreamStarted:
    stream_id: int
    layout: StreamLayout


@dataclass(frozen=True)
class ObjectReady:
    """Every chunk of one object has arrived (each checked by its CRC; the stream hash is checked
    at StreamComplete). `array` is the object, a view of the stream's one output buffer.

    By default (StreamLimits(release="arrival")) it comes as soon as the object's chunks are in,
    before the TAIL's hash is checked: a CRC only catches accidents, so on frames that are not
    encrypted (no Codec with a key) a forged chunk is handed out as it came, and the stream may
    still fail (hash_mismatch, or never complete). With release="verified", every ObjectReady of a
    stream comes at once when its hash has matched, just before StreamComplete, and never for a
    stream that fails. (Unencrypted, a forger who also sends a TAIL with the hash of the forged
    bytes passes that check too: only a Codec with a key authenticates the sender.)"""

    stream_id: int
    index: int
    name: str | None
    layer: int | None
    array: np.ndarray


@dataclass(frozen=True)
class StreamComplete:
    stream_id: int
    objects: list[np.ndarray]
    xxh3_64: int
    nbytes: int


@dataclass(frozen=True)
class StreamFailed:
    """The stream was dropped and its memory released. reason: 'hash_mismatch', 'gap_after_tail',
    'timeout', 'limit', 'bad_head', 'bad_chunk', 'bad_tail', 'closed'. missing: the byte ranges
    never received, (start, end) with start < end, in order (at most
    StreamLimits.max_missing_ranges; an empty object's missing chunk is no bytes and is not listed);
    missing_more: how many more ranges there were beyond those listed."""

    stream_id: int
    reason: str
    detail: str
    missing: list[tuple[int, int]] = field(default_factory=list)
    missing_more: int = 0


# ------------------------------------------------------------------ reassembler


@dataclass(frozen=True)
class StreamLimits:
    """Hard limits of a Reassembler; every one is checked before memory is committed."""

    max_stream_bytes: int = 4 << 30       # the largest stream accepted (HEAD's total_bytes)
    max_streams: int = 64                 # streams open at once
    max_buffered_bytes: int = 8 << 30     # output buffers of open streams + frames held before their HEAD
    max_early_bytes: int = 16 << 20       # frames held because they arrived before their HEAD
    idle_timeout: float = 30.0            # seconds without a frame before a stream fails
    tail_grace: float = 5.0               # seconds after TAIL for missing chunks to arrive
    max_missing_ranges: int = 1024        # byte ranges a StreamFailed lists (the rest are counted)
    progress_timeout: float | None = None  # seconds without a new chunk (keepalives or not) before it fails;
    #                                        None: max(DEFAULT_PROGRESS_TIMEOUT, idle_timeout)
    release: str = "arrival"              # ObjectReady on "arrival" of an object, or once the hash is "verified"

    def __post_init__(self) -> None:
        if self.release not in _RELEASES:
            raise ValueError(f"release {self.release!r} is not one of {', '.join(map(repr, _RELEASES))}")
        if self.max_missing_ranges < 0:
            raise ValueError("max_missing_ranges must be >= 0")
        if self.progress_timeout is None:
            object.__setattr__(self, "progress_timeout", max(DEFAULT_PROGRESS_TIMEOUT, self.idle_timeout))
        if self.progress_timeout < self.idle_timeout:
            raise ValueError(f"progress_timeout ({self.progress_timeout} s) must be at least idle_timeout "
                             f"({self.idle_timeout} s): it bounds a stream kept open by keepalives alone")


_RELEASES = ("arrival", "verified")
DEFAULT_PROGRESS_TIMEOUT = 120.0  # StreamLimits.progress_timeout when not given (or idle_timeout, if longer)

# What the Reassembler holds besides payload bytes, charged with them (measured with tracemalloc
# on CPython 3.11, rounded up): an open stream (its _Stream, layout and per-object arrays);
# each of its objects (its StreamObject, array view and C geometry; plus the bytes of its name
# and 40 per dimension, charged as they come); each frame held before its HEAD (a bytes object
# and its (bytes, time) entry); each HEAD part held; each stream id with held frames or parts
# (its dict entry, list or dict, and deadline).
_STREAM_BYTES = 5632
_OBJECT_BYTES = 440
_EARLY_FRAME_BYTES = 96
_PART_BYTES = 200
_EARLY_STREAM_BYTES = 320


class _Stream(_codec.ChunkSink):
    """An open stream. The fields the chunk fast path writes (buffer, have, have_count,
    object_left, hasher, hashed, streaming, last) are the ChunkSink's, shared by both paths."""

    __slots__ = ("stream_id", "layout", "arrays", "tail_at", "charged")

    def __init__(self, stream_id: int, layout: StreamLayout, now: float, buffer: np.ndarray | None = None) -> None:
        self.stream_id = stream_id
        self.layout = layout
        self.charged = _committed(layout, buffer is None)
        # the one copy: chunks land here (in the caller's buffer when its allocate hook gave one)
        if buffer is None:
            n = layout.total_bytes
            buffer = np.frombuffer(_codec.output_block(n), np.uint8) if n >= BLOCK_BYTES else np.empty(n, np.uint8)
        objs = layout.objects
        self._geometry(buffer, np.array([o.first_chunk for o in objs], np.int64),
                       np.array([o.offset for o in objs], np.int64), np.array([o.nbytes for o in objs], np.int64),
                       np.array([o.dtype if _codec.element_bytes(o.dtype) else _I8 for o in objs], np.uint8),
                       layout.chunk_bytes, layout.chunks)
        self.object_left[:] = [o.chunks for o in objs]
        self.streaming = layout.total_bytes >= STREAMING_STORE_BYTES
        self.arrays = [_object_view(self.buffer, o) for o in objs]
        self.tail: dict | None = None
        self.tail_at = 0.0
        self.last = now
        self.progress = now  # the last new chunk (set by the commit of each)
        self.hasher = _codec.Xxh3()  # fed while chunks arrive in order (cache-hot); else one pass at the end
        self.hashed = 0                 # bytes of the stream's prefix already hashed

    def deadline(self, limits: StreamLimits) -> float:
        """When tick() fails it: idle_timeout after its last frame, progress_timeout after its last
        new chunk, or tail_grace after TAIL."""
        idle = min(self.last + limits.idle_timeout, self.progress + limits.progress_timeout)
        return idle if self.tail is None else min(idle, self.tail_at + limits.tail_grace)


def _committed(layout: StreamLayout, buffer: bool = True) -> int:
    """Memory a stream takes once open, charged before any of it is allocated: its output
    buffer (unless the caller's), its chunk bitmap (a bit per chunk), its objects and the rest."""
    objects = sum(_OBJECT_BYTES + len(o.name or "") + 40 * len(o.shape) for o in layout.objects)
    return ((layout.total_bytes if buffer else 0) + _codec.ChunkSink.bitmap_bytes(layout.chunks)
            + _STREAM_BYTES + objects)


def _caller_buffer(buffer, layout: StreamLayout) -> np.ndarray | None:
    """The bytes of the buffer an allocate hook returned, checked: None, or writable,
    C-contiguous and exactly layout.total_bytes long (a mistake there is the caller's: ValueError)."""
    if buffer is None:
        return None
    try:
        view = memoryview(buffer)
    except TypeError:
        raise ValueError(f"allocate returned a {type(buffer).__name__}, not a buffer") from None
    if view.readonly or not view.c_contiguous:
        raise ValueError("allocate must return a writable, C-contiguous buffer")
    if view.nbytes != layout.total_bytes:
        raise ValueError(f"allocate returned {view.nbytes} bytes; the stream needs exactly {layout.total_bytes}")
    return np.frombuffer(view.cast("B"), np.uint8)


def _object_view(buffer: np.ndarray, o: StreamObject) -> np.ndarray:
    raw = buffer[o.offset:o.offset + o.nbytes]
    npdt = NUMPY_DTYPES.get(o.dtype)
    if npdt is None:
        return raw
    return raw.view(np.dtype(npdt)).reshape(o.shape)


class MemoryBudget:
    """A byte budget shared by several Reassemblers (every peer of one server): stream
    buffers and frames held before their HEAD count against it, and a HEAD that would go
    over it fails with reason 'limit', as each Reassembler's own max_buffered_bytes does."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit
        self.used = 0

    def __repr__(self) -> str:
        return f"MemoryBudget(used={self.used}, limit={self.limit})"


class Reassembler:
    """Receives the frames of any number of V-Streams, in any order, and rebuilds the tensors.

    Each chunk is written straight into a buffer allocated once at HEAD (one copy in all);
    duplicates are ignored. Frames of a stream whose HEAD has not arrived yet are held, up to
    max_early_bytes. Pass the time (`now`, seconds, any monotonic origin) to receive() and call
    tick(now) now and then: idle streams, streams with no new chunk for progress_timeout
    (keepalives notwithstanding), and streams whose TAIL came but whose chunks did not, fail and
    release their memory. tick() costs what expires, not what is held.

    Everything a peer makes it hold is charged (buffered_bytes, and a MemoryBudget) before it
    is allocated: a stream's buffer, bitmap and objects at HEAD, each early frame or HEAD part
    at its real size. ObjectReady comes when an object's chunks are in, before the stream hash
    is checked, unless StreamLimits(release="verified") (see ObjectReady).

    allocate(stream_id, layout), if given, is asked for each stream's output buffer once its
    HEAD has passed the limits: return a writable C-contiguous buffer of exactly
    layout.total_bytes bytes (a KV-cache slot that is reused, say) and the chunks are written
    into it, or None for a new one. The objects handed out are then views of that buffer, and
    only the chunk bitmap and the objects' bookkeeping count against max_buffered_bytes and the budget.
    """

    def __init__(self, limits: StreamLimits = StreamLimits(), *, codec=None, expected_space_hash: int | None = None,
                 budget: MemoryBudget | None = None, allocate=None) -> None:
        self.limits = limits
        self.budget = budget
        self.allocate = allocate
        self.codec = codec
        self.expected_space_hash = expected_space_hash
        self._streams: dict[int, _Stream] = {}
        self._early: dict[int, list[tuple[bytes, float]]] = {}  # plain frame bytes held before their HEAD
        self._parts: dict[int, dict[int, tuple[bytes, float]]] = {}  # HEAD parts' JSON waiting for the rest
        self._early_bytes = 0
        self._closed: dict[int, float] = {}  # stream_id -> when it completed or failed
        # (deadline, sequence, kind, stream_id): when something may expire. Lazy: an entry is
        # checked against what it names when its time comes (re-queued if that moved later,
        # dropped if it is gone), and the heap is rebuilt when stale entries outnumber the live.
        self._deadlines: list[tuple[float, int, int, int]] = []
        self._seq = 0
        self.dropped_frames = 0   # early frames over the limit; late frames of closed streams

    # -------------------------------------------------------------- state

    @property
    def buffered_bytes(self) -> int:
        return sum(s.charged for s in self._streams.values()) + self._early_bytes

    def __contains__(self, stream_id: int) -> bool:
        """Whether stream_id is open (started, not yet complete or failed)."""
        return stream_id in self._streams

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    # -------------------------------------------------------------- input

    def receive(self, data, now: float) -> list:
        """Take one frame (bytes or a decoded Frame); return the events it causes."""
        if isinstance(data, Frame):
            frame = data
        else:
            codec = self.codec
            if codec is None or not codec.require_encryption:  # the bulk of a stream: one C call
                events = self.receive_chunk(data, now, self.expected_space_hash if codec is None
                                            else codec.expected_space_hash)
                if events is not None:
                    return events
            frame = (self.codec.decode(data) if self.codec is not None
                     else _codec.decode(data, expected_space_hash=self.expected_space_hash))
        sid = frame.stream_id
        if sid in self._closed:
            self.dropped_frames += 1  # a late or replayed frame of a finished stream (new streams take new ids)
            return []
        if isinstance(frame, Sync):
            if frame.json is None:  # HEART
                if sid in self._streams:
                    self._streams[sid].last = now
                return []
            try:
                doc = handshake.parse(frame.json.payload)
            except HandshakeError as exc:
                if exc.path.startswith("tail") and sid in self._streams:
                    return self._fail(sid, "bad_tail", str(exc))
                if sid not in self._streams and (exc.path.startswith("head") or _HEAD_PREFIX.match(frame.json.tobytes()[:64])):
                    self._drop_early(sid)
                    return [StreamFailed(sid, "bad_head", str(exc))]
                return []  # not a stream document, or one that is not ours to judge
            if doc["method"] == "head":
                if doc.get("parts", 1) != 1 or "part" in doc:
                    return self._head_part(sid, doc, frame.json.payload, now)
                return self._head(sid, doc, now)
            if doc["method"] == "tail":
                return self._hold(frame, now) if sid not in self._streams else self._tail(sid, doc, now)
            return []  # other control messages (ping, capability...) are the session's business
        if isinstance(frame, Chunk):
            if sid not in self._streams:
                return self._hold(frame, now)
            return self._chunk(sid, frame, now)
        return []  # not a stream frame

    def receive_chunk(self, data, now: float, expected_space_hash: int | None = None) -> list | None:
        """The fast path for the bulk of a stream: a plain Chunk frame (bytes-like) of an open
        stream, new and well-formed, is checked, placed and hashed in one C call; returns its
        events. Returns None, having changed nothing, for any other frame: pass that one to
        receive() (or the Session's general path), which reports it exactly.
        expected_space_hash: a chunk of another space is not taken (None: any)."""
        st = _codec._place_chunk(self._streams, data, expected_space_hash, now)
        if st is None:
            return None
        return self.chunk_events(st)

    def place_records(self, buf: bytearray, start: int, end: int, max_frame_bytes: int,
                      expected_space_hash: int | None, now: float) -> tuple[int, int, int, list]:
        """The TCP fast path: the run of whole records (u32 length + frame) at buf[start:end]
        that are plain chunks of open streams, placed in one C call. Returns (the position
        reached, chunks placed, their frame bytes, events); the record at that position, if
        whole, is for the general path."""
        pos, count, nbytes, st = _codec._place_records(self._streams, buf, start, end, max_frame_bytes,
                                                       expected_space_hash, now)
        return pos, count, nbytes, ([] if st is None else self.chunk_events(st))

    def chunk_events(self, st: _Stream) -> list:
        """The events of a chunk just committed to st: ObjectReady (unless release="verified"),
        then completion or failure."""
        if st.completed < 0 and st.tail is None:
            return []
        sid = st.stream_id
        events: list = []
        if st.completed >= 0 and self.limits.release == "arrival":
            o = st.layout.objects[st.completed]
            events.append(ObjectReady(sid, o.index, o.name, o.layer, st.arrays[o.index]))
        return events + self._maybe_complete(sid) if st.tail is not None else events

    def tick(self, now: float) -> list:
        """Fail idle streams and streams whose TAIL's grace period ran out; drop stale early
        frames and HEAD parts; forget finished streams' ids. Costs what expires (a heap of
        deadlines), not what is held."""
        events: list = []
        again: list[tuple[int, int]] = []
        heap, lim = self._deadlines, self.limits
        while heap and heap[0][0] < now:
            _, _, kind, sid = heapq.heappop(heap)
            if kind == _STREAM:
                st = self._streams.get(sid)
                if st is None:
                    continue
                if st.tail is not None and now - st.tail_at > lim.tail_grace:
                    events += self._fail(sid, "gap_after_tail", f"{st.layout.chunks - st.have_count} of "
                                         f"{st.layout.chunks} chunks never arrived after TAIL")
                elif now - st.last > lim.idle_timeout:
                    events += self._fail(sid, "timeout", f"no frame for {now - st.last:.1f} s "
                                         f"(idle_timeout {lim.idle_timeout} s)")
                elif now - st.progress > lim.progress_timeout:
                    events += self._fail(sid, "timeout", f"no new chunk for {now - st.progress:.1f} s despite "
                                         f"keepalives (progress_timeout {lim.progress_timeout} s)")
                else:
                    again.append((kind, sid))
            elif kind == _EARLY:
                held = self._early.get(sid)
                if not held:
                    continue
                if now - held[-1][1] > lim.idle_timeout:
                    dropped = self._drop_early(sid)
                    events.append(StreamFailed(sid, "timeout", f"HEAD never arrived: {len(dropped)} frames held for "
                                               f"{now - held[0][1]:.1f} s were dropped (idle_timeout "
                                               f"{lim.idle_timeout} s)"))
                else:
                    again.append((kind, sid))
            elif kind == _PARTS:
                parts = self._parts.get(sid)
                if not parts:
                    continue
                if now - max(t for _, t in parts.values()) > lim.idle_timeout:
                    total = handshake.parse(next(iter(parts.values()))[0])["parts"]
                    got = len(parts)
                    self._drop_parts(sid)
                    self._drop_early(sid)
                    events.append(StreamFailed(sid, "timeout", f"HEAD never completed: {got} of {total} parts arrived "
                                               f"(idle_timeout {lim.idle_timeout} s)"))
                else:
                    again.append((kind, sid))
            else:
                when = self._closed.get(sid)
                if when is None:
                    continue
                if now - when > lim.idle_timeout:
                    del self._closed[sid]
                else:
                    again.append((kind, sid))
        for kind, sid in again:  # moved later since queued (after the loop: a tick pops each once)
            self._due(kind, sid)
        return events

    def close(self, detail: str = "the connection closed") -> list:
        """Fail every open stream (reason 'closed') and drop every held frame, releasing their
        memory (and their share of a MemoryBudget); for a peer that is gone."""
        events = []
        for sid in list(self._streams):
            events += self._fail(sid, "closed", detail)
        for sid in list(self._early):
            self._drop_early(sid)
        for sid in list(self._parts):
            self._drop_parts(sid)
        self._rebuild_deadlines()
        return events

    def _close(self, sid: int, now: float) -> None:
        self._closed[sid] = now
        while len(self._closed) > 4 * self.limits.max_streams + 1024:  # bounded: forget the oldest
            del self._closed[next(iter(self._closed))]
        self._due(_CLOSED, sid)

    # -------------------------------------------------------------- deadlines

    def _deadline(self, kind: int, sid: int) -> float | None:
        """When what (kind, sid) names may expire; None if it is gone."""
        lim = self.limits
        if kind == _STREAM:
            st = self._streams.get(sid)
            return None if st is None else st.deadline(lim)
        if kind == _EARLY:
            held = self._early.get(sid)
            return held[-1][1] + lim.idle_timeout if held else None
        if kind == _PARTS:
            parts = self._parts.get(sid)
            return max(t for _, t in parts.values()) + lim.idle_timeout if parts else None
        when = self._closed.get(sid)
        return None if when is None else when + lim.idle_timeout

    def _due(self, kind: int, sid: int) -> None:
        """Queue (kind, sid) for tick() at its deadline."""
        when = self._deadline(kind, sid)
        if when is None:
            return
        self._seq += 1
        heapq.heappush(self._deadlines, (when, self._seq, kind, sid))
        live = len(self._streams) + len(self._early) + len(self._parts) + len(self._closed)
        if len(self._deadlines) > 2 * live + 64:  # mostly stale entries: rebuild (amortised O(1))
            self._rebuild_deadlines()

    def _rebuild_deadlines(self) -> None:
        entries = []
        for kind, ids in ((_STREAM, self._streams), (_EARLY, self._early), (_PARTS, self._parts),
                          (_CLOSED, self._closed)):
            for sid in ids:
                when = self._deadline(kind, sid)
                if when is not None:
                    self._seq += 1
                    entries.append((when, self._seq, kind, sid))
        heapq.heapify(entries)
        self._deadlines = entries

    # -------------------------------------------------------------- steps

    def _head_part(self, sid: int, doc: dict, payload, now: float) -> list:
        """One part of a HEAD sent in parts: its JSON held (as an early frame) until all have come."""
        if sid in self._streams:
            return []  # a repeated part of a started stream
        parts, part = doc.get("parts", 1), doc.get("part")
        missing = [k for k in ("parts", "part", "first_object", "object_count") if k not in doc]
        problem = None
        if missing:
            problem = f"a HEAD part needs parts, part, first_object and object_count ({', '.join(missing)} missing)"
        elif not 1 <= parts <= handshake.MAX_OBJECTS or not part < parts:
            problem = f"part {part} of {parts}: parts must be 1..{handshake.MAX_OBJECTS} and part below it"
        if problem:
            self._drop_early(sid)
            self._drop_parts(sid)
            return [StreamFailed(sid, "bad_head", f"head.part: {problem}")]
        held = self._parts.get(sid)
        if held is not None and part in held:
            return []  # a duplicate part
        raw = bytes(payload)
        cost = len(raw) + _PART_BYTES + (_EARLY_STREAM_BYTES if held is None else 0)
        if not self._room_for_early(cost):
            self.dropped_frames += 1
            return []
        new = held is None
        if new:
            held = self._parts[sid] = {}
        held[part] = (raw, now)
        if new:
            self._due(_PARTS, sid)
        self._early_bytes += cost
        self._charge(cost)
        if len(held) < parts:
            return []
        ordered = [held[k][0] for k in range(parts)] if all(k in held for k in range(parts)) else None
        self._drop_parts(sid)
        if ordered is None:
            self._drop_early(sid)
            return [StreamFailed(sid, "bad_head", "head.part: parts numbered outside 0..parts-1")]
        # parsed again one at a time, stopping at the first problem: at most max_objects objects are built
        common = ("v", "msg_type", "chunk_bytes", "total_bytes", "hash", "parts", "object_count", "legacy_md5")
        objects: list = []
        first: dict = {}
        for k, raw in enumerate(ordered):
            d = handshake.parse(raw)
            if k == 0:
                first = d
            elif any(d.get(c) != first.get(c) for c in common):
                problem = f"part {k} disagrees with part 0 on {', '.join(c for c in common if d.get(c) != first.get(c))}"
                break
            if d["first_object"] != len(objects):
                problem = f"part {k} starts at object {d['first_object']}, expected {len(objects)}"
                break
            objects += d["objects"]
            if len(objects) > handshake.MAX_OBJECTS:
                problem = f"{len(objects)} objects or more, more than max_objects ({handshake.MAX_OBJECTS})"
                break
        if not problem and len(objects) != first["object_count"]:
            problem = f"the parts carry {len(objects)} objects, object_count says {first['object_count']}"
        if problem:
            self._drop_early(sid)
            return [StreamFailed(sid, "bad_head", f"head.part: {problem}")]
        merged = {k: v for k, v in first.items() if k not in ("parts", "part", "first_object", "object_count")}
        merged["objects"] = objects
        return self._head(sid, merged, now)

    def _drop_parts(self, sid: int) -> None:
        held = self._parts.pop(sid, None)
        if held is None:
            return
        cost = sum(len(raw) + _PART_BYTES for raw, _ in held.values()) + _EARLY_STREAM_BYTES
        self._early_bytes -= cost
        self._charge(-cost)

    def _head(self, sid: int, doc: dict, now: float) -> list:
        if sid in self._streams:
            return []  # a repeated HEAD
        try:
            layout = StreamLayout.from_head(doc)
        except HandshakeError as exc:
            self._drop_early(sid)
            return [StreamFailed(sid, "bad_head", str(exc))]
        lim = self.limits
        problem = None
        if layout.total_bytes > lim.max_stream_bytes:
            problem = f"{layout.total_bytes} bytes announced, more than max_stream_bytes ({lim.max_stream_bytes})"
        elif len(self._streams) >= lim.max_streams:
            problem = f"{len(self._streams)} streams open, max_streams is {lim.max_streams}"
        buffer = None
        if problem is None and self.allocate is not None:
            buffer = _caller_buffer(self.allocate(sid, layout), layout)
        cost = _committed(layout, buffer is None)
        if problem is not None:
            pass
        elif self.buffered_bytes + cost > lim.max_buffered_bytes:
            problem = (f"{cost} more bytes would exceed max_buffered_bytes ({lim.max_buffered_bytes}); "
                       f"{self.buffered_bytes} are buffered")
        elif self.budget is not None and self.budget.used + cost > self.budget.limit:
            problem = (f"{cost} more bytes would exceed the shared memory budget ({self.budget.limit}); "
                       f"{self.budget.used} are in use")
        if problem:
            self._drop_early(sid)
            return [StreamFailed(sid, "limit", problem)]
        self._charge(cost)  # before the buffer, bitmap and arrays are allocated
        try:
            self._streams[sid] = _Stream(sid, layout, now, buffer)
        except BaseException:
            self._charge(-cost)
            raise
        self._due(_STREAM, sid)
        events: list = [StreamStarted(sid, layout)]
        for raw, _ in self._drop_early(sid):
            if sid not in self._streams:
                break
            frame = _codec.decode(raw)
            if isinstance(frame, Chunk):
                events += self._chunk(sid, frame, now)
            else:
                events += self._tail(sid, handshake.parse(frame.json.payload), now)
        return events

    def _chunk(self, sid: int, frame: Chunk, now: float) -> list:
        st = self._streams[sid]
        st.last = now
        k = frame.frame_seq - 1
        s = frame.data
        outcome, o, a = st.check(k, int(s.dtype), s.nbytes)  # the fast path's own check
        if outcome == _CHUNK_OUTSIDE:
            return self._fail(sid, "bad_chunk", f"frame_seq {frame.frame_seq} is not a chunk of this stream "
                              f"(chunks are 1..{st.layout.chunks})")
        if outcome == _CHUNK_DUPLICATE:
            return []
        if outcome == _CHUNK_MISFIT:
            obj, _, length = st.layout.chunk(k)
            want = obj.dtype if _codec.element_bytes(obj.dtype) else _I8
            return self._fail(sid, "bad_chunk", f"chunk {k} is {s.dtype.name} of {s.nbytes} bytes, HEAD says "
                              f"{want.name} of {length} bytes")
        # in order: hashed while it is in cache (same GIL-free section); commit hashes the chunks waiting after it
        _codec._copy_payload(s, st.buffer, a, st.hasher if a == st.hashed else None, st.streaming)
        st.commit(k, o, a, s.nbytes, now)
        return self.chunk_events(st)

    def _tail(self, sid: int, doc: dict, now: float) -> list:
        st = self._streams[sid]
        st.last = now
        if st.tail is not None:
            return []
        if doc["chunks"] != st.layout.chunks or doc["total_bytes"] != st.layout.total_bytes:
            return self._fail(sid, "bad_tail", f"TAIL says {doc['chunks']} chunks of {doc['total_bytes']} bytes, "
                              f"HEAD said {st.layout.chunks} of {st.layout.total_bytes}")
        if len(doc["xxh3_64"]) != 16 or any(c not in "0123456789abcdef" for c in doc["xxh3_64"]):
            return self._fail(sid, "bad_tail", f"xxh3_64 {doc['xxh3_64']!r} is not 16 lowercase hex digits")
        st.tail = doc
        st.tail_at = now
        events = self._maybe_complete(sid)
        if sid in self._streams:
            self._due(_STREAM, sid)  # its deadline may be earlier now (tail_grace)
        return events

    def _maybe_complete(self, sid: int) -> list:
        st = self._streams[sid]
        if st.tail is None or st.have_count != st.layout.chunks:
            return []
        got = st.hasher.intdigest() if st.hashed == st.layout.total_bytes else _codec.xxh3_64(st.buffer)
        want = int(st.tail["xxh3_64"], 16)
        if got != want:
            return self._fail(sid, "hash_mismatch", f"xxh3_64 of the received bytes is {got:016x}, TAIL says {want:016x}")
        if st.layout.legacy_md5 and "md5" in st.tail:
            md5 = hashlib.md5(st.buffer, usedforsecurity=False).hexdigest()
            if md5 != st.tail["md5"]:
                return self._fail(sid, "hash_mismatch", f"MD5 of the received bytes is {md5}, TAIL says {st.tail['md5']}")
        del self._streams[sid]
        self._charge(-st.charged)  # the buffer is the caller's now
        self._close(sid, st.last)
        events: list = []
        if self.limits.release == "verified":
            events = [ObjectReady(sid, o.index, o.name, o.layer, st.arrays[o.index]) for o in st.layout.objects]
        return events + [StreamComplete(sid, st.arrays, got, st.layout.total_bytes)]

    def _fail(self, sid: int, reason: str, detail: str) -> list:
        st = self._streams.pop(sid, None)
        if st is None:
            return [StreamFailed(sid, reason, detail)]
        missing, more = st.missing(self.limits.max_missing_ranges)
        self._charge(-st.charged)
        self._close(sid, st.last)
        return [StreamFailed(sid, reason, detail, missing, more)]

    def _hold(self, frame: Frame, now: float) -> list:
        # an owned copy of what arrived before its HEAD (views would pin the caller's buffers):
        # the plain frame's bytes, decoded again when the HEAD comes, charged what they take. A
        # chunk is kept as the 1-D chunk it stands for (all a chunk is checked on is its dtype and
        # length); one larger than a plain frame carries is dropped (a compressed frame's body may
        # be 64 KiB: re-encoded, it would not fit a frame). Never raises for what a peer sent.
        try:
            if isinstance(frame, Chunk):
                s = frame.data
                if s.nbytes > _PLAIN_CHUNK_MAX:
                    self.dropped_frames += 1
                    return []
                if len(s.shape) != 1:
                    frame = Chunk(Slice(s.dtype, (math.prod(s.shape),), s.payload), stream_id=frame.stream_id,
                                  frame_seq=frame.frame_seq, space_hash32=frame.space_hash32,
                                  modality=frame.modality)
            raw = _codec.encode(frame)
        except ResonantError:
            self.dropped_frames += 1
            return []
        held = self._early.get(frame.stream_id)
        cost = len(raw) + _EARLY_FRAME_BYTES + (_EARLY_STREAM_BYTES if held is None else 0)
        if not self._room_for_early(cost):
            self.dropped_frames += 1
            return []
        if held is None:
            held = self._early[frame.stream_id] = []
            held.append((raw, now))
            self._due(_EARLY, frame.stream_id)
        else:
            held.append((raw, now))
        self._early_bytes += cost
        self._charge(cost)
        return []

    def _room_for_early(self, size: int) -> bool:
        """Whether `size` more bytes held before a HEAD stay within every limit."""
        lim = self.limits
        return (self._early_bytes + size <= lim.max_early_bytes and self.buffered_bytes + size <= lim.max_buffered_bytes
                and (self.budget is None or self.budget.used + size <= self.budget.limit))

    def _drop_early(self, sid: int) -> list[tuple[bytes, float]]:
        held = self._early.pop(sid, None)
        if held is None:
            return []
        size = sum(len(raw) + _EARLY_FRAME_BYTES for raw, _ in held) + _EARLY_STREAM_BYTES
        self._early_bytes -= size
        self._charge(-size)
        return held

    def _charge(self, n: int) -> None:
        if self.budget is not None:
            self.budget.used += n


# What a deadline names (Reassembler._deadlines), and ChunkSink.check's outcomes.
_STREAM, _EARLY, _PARTS, _CLOSED = range(4)
_CHUNK_NEW, _CHUNK_DUPLICATE, _CHUNK_OUTSIDE, _CHUNK_MISFIT = range(4)
