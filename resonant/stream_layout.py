"""V-Stream geometry: the objects of a stream, its chunks, and its HEAD document (StreamLayout),
and the chunk size a sender picks for a frame size."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from resonant import _codec, handshake
from resonant._spec import CHUNK_OVERHEAD_BYTES, MAX_FRAME_BYTES, TRANSFORM_OVERHEAD_BYTES, DType, MsgType
from resonant.errors import EncodeError, HandshakeError

__all__ = ["StreamLayout", "StreamObject", "MIN_STREAM_FRAME", "STREAM_VERSION"]

STREAM_VERSION = 1
MIN_STREAM_FRAME = 512  # the smallest max_frame_bytes: a HEAD of one object needs about 200 bytes
# Bytes a Chunk frame needs besides its payload, and what a Codec's transforms add (both from the spec).
_CHUNK_OVERHEAD = CHUNK_OVERHEAD_BYTES
_TRANSFORM_OVERHEAD = TRANSFORM_OVERHEAD_BYTES
# The largest chunk payload a plain (version 1) Chunk frame carries, and so any resonant sender
# makes; a compressed frame may carry more (its body is up to 64 KiB before compression).
PLAIN_CHUNK_MAX = MAX_FRAME_BYTES - _CHUNK_OVERHEAD
I8 = DType.I8


# One tensor of a stream and where its bytes sit (index, dtype, shape, nbytes, offset in the stream,
# first_chunk, chunks, name, layer): made in C, a HEAD's objects in one loop (_codec.layout_objects).
StreamObject = _codec.StreamObject


@dataclass(frozen=True)
class StreamLayout:
    """The geometry of a stream, derived from its HEAD alone."""

    msg_type: int
    chunk_bytes: int
    total_bytes: int
    objects: tuple[StreamObject, ...]
    legacy_md5: bool = False
    fec: tuple[int, int] | None = None  # (k, m): forward error correction (see resonant.fec)
    kv: Any = None  # a resonant.kv.KVInfo: the objects are a KV cache (HEAD's kv), checked against it

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
    def build(cls, msg_type: int, chunk_bytes: int, dtypes: list, shapes: list, nbytes: list,
              names: list | None = None, layers: list | None = None, legacy_md5: bool = False,
              fec: tuple[int, int] | None = None, kv: Any = None) -> "StreamLayout":
        """The layout of objects given column by column (dtype, shape, nbytes; names and layers
        None or one per object), checked as a HEAD's objects are (HandshakeError)."""
        objects, total = _codec.layout_objects(chunk_bytes, dtypes, shapes, nbytes, names, layers)
        return cls(int(msg_type), chunk_bytes, total, objects, legacy_md5, fec, kv)

    def head_document(self) -> dict:
        doc = {
            "method": "head", "v": STREAM_VERSION, "msg_type": self.msg_type, "chunk_bytes": self.chunk_bytes,
            "total_bytes": self.total_bytes,
            "objects": _codec.object_docs(self.objects),
            "hash": "xxh3_64",
        }
        if self.legacy_md5:
            doc["legacy_md5"] = True
        if self.fec is not None:
            doc["fec"] = {"scheme": "rs", "k": self.fec[0], "m": self.fec[1]}
        if self.kv is not None:
            doc["kv"] = self.kv.to_json()
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
        objects, total = _codec.layout_of_items(chunk_bytes, doc["objects"])  # (each item checked by the schema)
        if total != doc["total_bytes"]:
            raise HandshakeError("head.total_bytes", f"{doc['total_bytes']}, but the objects add up to {total}")
        fec = None
        if "fec" in doc:  # (scheme: the schema admits only "rs")
            from resonant import fec as _fec
            k, m = doc["fec"]["k"], doc["fec"]["m"]
            problem = _fec.problem(k, m)
            if problem is None and not _fec.available():
                problem = f"this receiver cannot decode it ({_fec.INSTALL_HINT})"
            if problem is not None:
                raise HandshakeError("head.fec", f"rs k={k} m={m}: {problem}")
            fec = (k, m)
        layout = cls(doc["msg_type"], chunk_bytes, total, objects, bool(doc.get("legacy_md5", False)), fec)
        if "kv" in doc:  # a KV cache: its metadata and objects checked against each other
            from resonant import kv as _kv
            info = _kv.KVInfo.from_json(doc["kv"])
            _kv.check_layout(layout, info)
            layout = replace(layout, kv=info)
        return layout


def compact_json(doc: dict) -> bytes:
    """HEAD and TAIL documents as compact UTF-8 JSON (they must fit one frame)."""
    return handshake.dumps(doc)


def chunk_bytes_for(max_frame_bytes: int, dtypes: Iterable[DType], transformed: bool) -> int:
    if not MIN_STREAM_FRAME <= max_frame_bytes <= MAX_FRAME_BYTES:
        raise EncodeError("max_frame_bytes", f"{max_frame_bytes} is not in {MIN_STREAM_FRAME}..{MAX_FRAME_BYTES}")
    unit = math.lcm(1, *(_codec.element_bytes(d) or 1 for d in set(dtypes)))
    room = max_frame_bytes - _CHUNK_OVERHEAD - (_TRANSFORM_OVERHEAD if transformed else 0)
    return max(unit, room // unit * unit)
