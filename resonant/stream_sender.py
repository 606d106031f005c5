"""V-Stream sender: tensors split into the frames of one stream (HEAD, chunks, TAIL)."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator, Sequence

from typing import Any, NamedTuple

import numpy as np

from resonant import _codec, handshake, parallel
from resonant import fec as _fec
from resonant._codec import Chunk, Frame, Slice, Sync
from resonant._spec import (HANDSHAKE_ZSTD_MIN_SAVING_PERMILLE as ZSTD_MIN_SAVING_PERMILLE,
                            HANDSHAKE_ZSTD_PROBE_CHUNKS as ZSTD_PROBE_CHUNKS, MAX_FRAME_BYTES,
                            TCP_LENGTH_PREFIX_BYTES, DType, Flags, Modality, MsgType)
from resonant.errors import EncodeError, HandshakeError
from resonant.stream_layout import I8, StreamLayout, chunk_bytes_for, compact_json

__all__ = ["StreamSender"]

_CHUNK_BATCH = 16  # chunks encoded per C call
_FAST = bool(_codec.fast_paths())  # False with RESONANT_PURE=1: every chunk is built as a Chunk and encoded


class StreamSender:
    """Splits tensors into the frames of one V-Stream: HEAD, Chunk frames, TAIL.

    objects: numpy arrays (any dtype resonant maps: float16, bfloat16, float32, int8) or
    Slices (any dtype, including Q4 and SparseCoo). Chunks are views of the sources (no copy
    until a frame is encoded); with `codec`, every frame is compressed/encrypted by it.
    """

    def __init__(self, stream_id: int, objects: Sequence, *, msg_type: int = MsgType.CACHE,
                 names: Sequence[str] | None = None, layers: Sequence[int] | None = None,
                 max_frame_bytes: int = MAX_FRAME_BYTES, codec=None, space_hash32: int = 0,
                 modality: int = Modality.TEXT, legacy_md5: bool = False, fec: tuple[int, int] | None = None,
                 kv: Any = None) -> None:
        dtypes, shapes, sizes, self._sources = _codec.stream_sources(list(objects), _source)  # zero-copy byte views
        code = _fec_code(fec)  # (checked first: a mistake there is the caller's)
        if not dtypes:
            raise EncodeError("objects", "a stream needs at least one object")
        if names is not None and len(names) != len(dtypes):
            raise EncodeError("names", f"{len(names)} names for {len(dtypes)} objects")
        if layers is not None and len(layers) != len(dtypes):
            raise EncodeError("layers", f"{len(layers)} layers for {len(dtypes)} objects")
        self.stream_id = stream_id
        self.codec = codec
        self._header = {"stream_id": stream_id, "space_hash32": space_hash32, "modality": modality}
        chunk_bytes = chunk_bytes_for(max_frame_bytes, dtypes, codec is not None)
        try:  # a receiver's checks of the objects (layout_objects, the schema's): one check for both sides
            self.layout = StreamLayout.build(msg_type, chunk_bytes, dtypes, shapes, sizes,
                                             None if names is None else list(names),
                                             None if layers is None else list(layers), legacy_md5, code, kv)
            doc = self.layout.head_document()
            handshake.validate(doc)
        except HandshakeError as exc:  # the caller's objects, names, layers or object count: local misuse
            path = exc.path.replace("head.objects", "objects")
            for field_name in ("name", "layer"):
                m = re.match(rf"objects\[(\d+)\]\.{field_name}$", path)
                if m:
                    path = f"{field_name}s[{m.group(1)}]"
            raise EncodeError(path, exc.detail) from None
        self._code = None if code is None else _fec.BlockCode(*code, chunk_bytes)
        if kv is not None:  # what a receiver will check: a mistake here is the caller's
            from resonant.kv import check_layout
            try:
                check_layout(self.layout, kv)
            except HandshakeError as exc:
                raise EncodeError(exc.path, exc.detail) from None
        self.max_frame_bytes = max_frame_bytes
        self._hearts = 0
        self._digest: tuple[int, str | None] | None = None
        self._heads = self._head_frames(doc)  # one frame, or parts when the HEAD does not fit one
        size = len(self._tail_frame(0, "0" * 32 if legacy_md5 else None))
        if size > max_frame_bytes:
            raise EncodeError("max_frame_bytes", f"{max_frame_bytes} is too small for this stream's TAIL ({size} bytes)")

    def _encode(self, frame: Frame) -> bytes:
        return self.codec.encode(frame) if self.codec is not None else _codec.encode(frame)

    def _head_frame(self, doc: dict) -> bytes:
        return self._encode(Sync(compact_json(doc), frame_seq=0, **self._header))

    def _head_frames(self, doc: dict) -> list[bytes]:
        try:
            whole = self._encode(Sync(compact_json(doc), frame_seq=0, **self._header))
            if len(whole) <= self.max_frame_bytes:
                return [whole]
        except EncodeError:  # larger than any frame
            pass
        # Too large for one frame: parts, each as many consecutive objects as fit.
        objects, common = doc["objects"], {k: v for k, v in doc.items() if k != "objects"}
        stub = {**common, "objects": [], "parts": 4096, "part": 4095, "first_object": 65535, "object_count": len(objects)}
        fixed = len(self._head_frame(stub))
        # a part must fit a frame, and its JSON the receivers' max_json_bytes
        limit = min(self.max_frame_bytes, handshake.MAX_JSON_BYTES + fixed - len(compact_json(stub)))
        runs, run, size = [], [], fixed
        for i, o in enumerate(objects):
            cost = len(compact_json(o)) + 1
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
        16 at a time, so a paused iteration holds up to 16 frames (1 MiB). With a codec, batches of
        16 are encoded on resonant.parallel's pool (RESONANT_THREADS; 1: in this thread), at most
        2 x threads batches ahead of the frame handed out. With fec, each block's parity frames
        follow its last data chunk."""
        if self._code is None:  # (no parity: the data chunks as they are made)
            return self._data_chunks()
        return (frame for frame, _data in self.chunks_tagged())

    def chunks_tagged(self) -> Iterator[tuple[bytes, bool]]:
        """chunks(), each frame with whether it is a data chunk (False: a parity frame), in the same
        order: the stream hash is fed as the data chunks are made."""
        if self._code is None:
            for frame in self._data_chunks():
                yield frame, True
            return
        k, n = self._code.k, self.layout.chunks
        for i, frame in enumerate(self._data_chunks()):
            yield frame, True
            if (i + 1) % k == 0 or i + 1 == n:
                for parity in self._parity_frames(i // k):
                    yield parity, False

    def _block_data(self, b: int) -> list:
        """Views of the data chunks of block b (no copy)."""
        k, lay, cb = self._code.k, self.layout, self.layout.chunk_bytes
        c, end, out = b * k, min((b + 1) * k, lay.chunks), []
        while c < end:  # one object's run of the block at a time
            obj, start, _ = lay.chunk(c)
            src, stop = self._sources[obj.index], min(end, obj.first_chunk + obj.chunks)
            out += [src[a:a + cb] for a in range(start, start + (stop - c) * cb, cb)]
            c = stop
        return out

    def _parity_frames(self, b: int, which: Sequence[int] | None = None) -> list[bytes]:
        """The parity frames of block b (all m, or parity numbers `which`)."""
        code, lay, cb, h = self._code, self.layout, self.layout.chunk_bytes, self._header
        js = range(code.m) if which is None else which
        out = []
        for j, p in zip(js, code.encode(self._block_data(b), js)):
            seq = _fec.parity_seq(lay.chunks, code.k, code.m, b, j)
            if self.codec is None and _FAST:  # as a chunk: straight from the parity into the frame
                out.append(_codec.encode_chunk(self.stream_id, seq, h["space_hash32"], h["modality"], I8, cb, p, 0, cb))
            else:
                out.append(self._encode(Chunk(Slice(I8, (cb,), p), frame_seq=seq, **h)))
        return out

    def parity_frame(self, b: int, j: int) -> bytes:
        """Parity frame j (0..m-1) of block b (0..blocks-1), e.g. to send it again."""
        if self._code is None:
            raise EncodeError("fec", "this stream has no forward error correction (StreamSender(..., fec=(k, m)))")
        nb = _fec.blocks(self.layout.chunks, self._code.k)
        if not 0 <= b < nb or not 0 <= j < self._code.m:
            raise EncodeError("parity", f"block {b}, parity {j}: blocks are 0..{nb - 1}, parity 0..{self._code.m - 1}")
        return self._parity_frames(b, (j,))[0]

    def _data_chunks(self) -> Iterator[bytes]:
        lay, cb = self.layout, self.layout.chunk_bytes
        h = _codec.Xxh3()  # the stream hash, fed while each chunk is in cache
        md5 = hashlib.md5(usedforsecurity=False) if lay.legacy_md5 else None
        if self.codec is not None:  # every object's chunks, encoded on the pool (parallel.py), in order
            yield from self._codec_chunks(h, md5)
        elif md5 is None and _FAST:  # straight from the sources into the frames, 16 per call across objects
            for k in range(0, lay.chunks, _CHUNK_BATCH):
                yield from _codec.encode_layout_chunks(self.stream_id, self._header["space_hash32"],
                                                       self._header["modality"], lay.objects, self._sources, cb, k,
                                                       min(_CHUNK_BATCH, lay.chunks - k), h)
        else:
            for obj, j, dtype, n, piece in self._pieces():
                if _FAST:  # straight from the source into the frame
                    frame = _codec.encode_chunk(self.stream_id, obj.first_chunk + j + 1, self._header["space_hash32"],
                                                 self._header["modality"], dtype, n, self._sources[obj.index], j * cb,
                                                 len(piece), h)
                else:
                    frame = self._encode(Chunk(Slice(dtype, (n,), piece), frame_seq=obj.first_chunk + j + 1,
                                               **self._header))
                    h.update(piece)
                if md5 is not None:
                    md5.update(piece)
                yield frame
        self._digest = (h.intdigest(), md5.hexdigest() if md5 is not None else None)

    def _pieces(self) -> Iterator[tuple[Any, int, DType, int, memoryview]]:
        """Every chunk in order, as (its object, its index j in the object, the dtype it carries: the
        object's, or I8 for a blocked or opaque one, its element count, its bytes: a view of the source)."""
        cb = self.layout.chunk_bytes
        for obj in self.layout.objects:
            src = self._sources[obj.index]
            width = _codec.element_bytes(obj.dtype)
            dtype = obj.dtype if width else I8
            for j in range(obj.chunks):
                piece = src[j * cb:(j + 1) * cb]
                yield obj, j, dtype, (len(piece) // width if width else len(piece)), piece

    def chunk_frame(self, k: int) -> bytes:
        """Chunk k (0 <= k < layout.chunks) as one encoded frame, again (a resend: the stream hash
        is not fed)."""
        if not 0 <= k < self.layout.chunks:
            raise IndexError(f"chunk {k} is outside this stream (0..{self.layout.chunks - 1})")
        obj, start, length = self.layout.chunk(k)
        src = self._sources[obj.index]
        width = _codec.element_bytes(obj.dtype)
        dtype = obj.dtype if width else I8
        n = length // width if width else length
        if self.codec is None and _FAST:
            return _codec.encode_chunk(self.stream_id, k + 1, self._header["space_hash32"], self._header["modality"],
                                       dtype, n, src, start, length, None)
        return self._encode(Chunk(Slice(dtype, (n,), src[start:start + length]), frame_seq=k + 1, **self._header))

    def _codec_jobs(self, h, md5) -> Iterator[list]:
        """The chunks in batches of _CHUNK_BATCH (frame_seq, dtype, elements, piece, compress),
        fed to the stream hash in order. With zstd, whether a chunk is compressed is decided per
        run of ZSTD_PROBE_CHUNKS chunks of each object by compressing the run's first as a probe
        (the spec's compression rule): here, in order, so the outcome does not depend on the pool."""
        zstd = self.codec.zstd_level is not None
        batch: list = []
        compress = zstd
        for obj, j, dtype, n, piece in self._pieces():
            if zstd and j % ZSTD_PROBE_CHUNKS == 0:
                saving = self.codec.zstd_saving(Chunk(Slice(dtype, (n,), piece), frame_seq=0, **self._header))
                compress = saving * 1000 >= ZSTD_MIN_SAVING_PERMILLE
            batch.append((obj.first_chunk + j + 1, dtype, n, piece, compress))
            h.update(piece)
            if md5 is not None:
                md5.update(piece)
            if len(batch) == _CHUNK_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def _codec_chunks(self, h, md5) -> Iterator[bytes]:
        """The Chunk frames through the codec: batches encoded on parallel.threads() threads, each
        with Codecs of its own (codec.clone(), with and without zstd), handed out in order; the
        codec records the tags of the frames in that order (Codec.note_sent)."""
        codec, header, local = self.codec, self._header, threading.local()
        if codec.keyring is not None:
            codec.keyring.primary  # derived once here, not by the threads at once  # noqa: B018

        def encode(batch: list) -> list[bytes]:
            mine = getattr(local, "codecs", None)
            if mine is None:
                mine = local.codecs = (codec.clone(zstd=False), codec.clone())
            return [mine[compress]._encode(Chunk(Slice(dtype, (n,), piece), frame_seq=seq, **header))
                    for seq, dtype, n, piece, compress in batch]

        for frames in parallel.ordered_map(encode, self._codec_jobs(h, md5)):
            for frame in frames:
                codec.note_sent(frame)
                yield frame

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
        if self.codec is not None or self.layout.legacy_md5 or not _FAST:
            for f in self.chunks():
                parts += [_record_length(f), f]
                frames, nbytes = frames + 1, nbytes + len(f)
                if frames >= per_write:
                    yield parts, frames, nbytes
                    parts, frames, nbytes = [], 0, 0
        else:  # per list, the run of chunks up to per_write frames made in one C call (across objects)
            lay, h, k, n = self.layout, _codec.Xxh3(), 0, self.layout.chunks
            block = self._code.k if self._code is not None else 0
            while k < n:
                take = min(max(1, per_write - frames), n - k)
                if block:  # a block's parity follows its last data chunk
                    take = min(take, (k // block + 1) * block - k)
                more, size = _codec.layout_record_parts(self.stream_id, self._header["space_hash32"],
                                                        self._header["modality"], lay.objects, self._sources,
                                                        lay.chunk_bytes, k, take, h)
                parts += more
                frames, nbytes, k = frames + take, nbytes + size, k + take
                if block and (k % block == 0 or k == n):
                    for f in self._parity_frames((k - 1) // block):
                        parts += [_record_length(f), f]
                        frames, nbytes = frames + 1, nbytes + len(f)
                if frames >= per_write:
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
        return self._encode(Sync(compact_json(doc), frame_seq=self.layout.chunks + 1, flags=Flags.STRONG_TAIL,
                                 **self._header))

    def heart(self) -> bytes:
        """A keepalive for this stream (frame_seq above TAIL's, and above the parity frames' with fec)."""
        self._hearts += 1
        top = self.layout.chunks + 1 if self._code is None else _fec.last_parity_seq(self.layout.chunks, self._code.k,
                                                                                       self._code.m)
        return self._encode(Sync(frame_seq=top + self._hearts, **self._header))

    def __iter__(self) -> Iterator[bytes]:
        yield from self._heads
        yield from self.chunks()
        yield self.tail()


def _fec_code(fec) -> tuple[int, int] | None:
    """StreamSender's fec=(k, m), checked (parameters, zfec installed)."""
    if fec is None:
        return None
    try:
        k, m = fec
    except (TypeError, ValueError):
        raise EncodeError("fec", f"{fec!r}: give (k, m), data and parity chunks per block") from None
    problem = _fec.problem(k, m)
    if problem is not None:
        raise EncodeError("fec", problem)
    if not _fec.available():
        raise EncodeError("fec", _fec.INSTALL_HINT)
    return k, m


def _record_length(frame: bytes) -> bytes:
    """The TCP record prefix of a frame: its length, u32 little-endian."""
    return len(frame).to_bytes(TCP_LENGTH_PREFIX_BYTES, "little")


class _Source(NamedTuple):  # (a tuple: made once per object, cheaper than a frozen dataclass)
    dtype: DType
    shape: tuple[int, ...]
    nbytes: int
    payload: memoryview


# numpy dtype -> DType for the dtypes numpy holds exactly as the wire does (little-endian), numpy's
# own ones (BF16's, ml_dtypes', is not imported with resonant: such arrays take the conversion).
_NATIVE = {np.dtype(_codec.numpy_dtype(d)): d for d in (DType.F16, DType.I8, DType.F32)}


def _source(obj, i: int) -> _Source:
    """A stream object as dtype, shape and a zero-copy byte view (a copy only to make an array
    C-contiguous and little-endian): the general path of _codec.stream_sources, which takes an
    exact, C-contiguous ndarray of a native dtype in C."""
    if isinstance(obj, Slice):
        return _Source(obj.dtype, obj.shape, obj.nbytes, obj.payload)
    arr = np.asarray(obj)
    known = _NATIVE.get(arr.dtype)  # (a C-order array of a wire dtype, as stored: no conversion to check)
    if known is None or not arr.flags.c_contiguous:
        code = _codec.dtype_of_numpy(arr.dtype)
        if code is None:
            raise EncodeError(f"objects[{i}].dtype", f"no dtype for numpy {arr.dtype}; convert it (e.g. to float16) first")
        arr = np.asarray(arr, dtype=_codec.numpy_dtype(code), order="C")  # keeps 0-d shapes
        known = DType(code)
    return _Source(known, arr.shape, arr.nbytes, memoryview(arr.reshape(-1).view(np.uint8)))
