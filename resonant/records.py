"""TCP records: each frame on a byte stream is a u32 little-endian length, then the frame.

frame_record() makes one; RecordReader splits a byte stream back into frames, checking every
length against max_frame_bytes before anything is kept."""

from __future__ import annotations

import struct

from resonant import _codec
from resonant._spec import MAX_FRAME_BYTES, TCP_LENGTH_PREFIX_BYTES, TCP_LENGTH_PREFIX_FORMAT
from resonant.errors import FramingError

__all__ = ["RecordReader", "frame_record"]

_LEN_BYTES = TCP_LENGTH_PREFIX_BYTES
_read_length = struct.Struct(TCP_LENGTH_PREFIX_FORMAT).unpack_from  # the record length prefix
assert _LEN_BYTES == 4
_FAST = bool(_codec.fast_paths())  # False with RESONANT_PURE=1: feed() always takes the general path


def frame_record(frame: bytes) -> bytes:
    """A frame as one TCP record: its u32 little-endian length, then the frame."""
    return len(frame).to_bytes(_LEN_BYTES, "little") + frame


class RecordReader:
    """Splits a TCP byte stream into frames: each record is a u32 little-endian length, then
    that many bytes. Lengths are checked (1..max_frame_bytes) before anything is kept, so a
    4 GiB prefix costs nothing; records may be split over reads and share reads.

    `feed(data)` copies into one reusable buffer and returns the complete records as views of
    it: they stay valid until the next feed, so decode or copy them before feeding again.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES, read_size: int = 256 << 10) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._size = read_size + max_frame_bytes + _LEN_BYTES
        self._buf = bytearray()  # allocated on first use: a UDP session never needs it
        self._view = memoryview(self._buf)
        self._start = 0  # first unparsed byte
        self._end = 0    # end of the data
        self.consumed = 0  # bytes of the stream parsed so far (for error offsets)
        self.broken: FramingError | None = None

    def _alloc(self) -> None:
        if not self._buf:
            self._buf = bytearray(self._size)
            self._view = memoryview(self._buf)

    def _compact(self, need: int) -> None:
        self._alloc()
        if self._end + need <= len(self._buf):
            return
        n = self._end - self._start
        self._view[:n] = self._view[self._start:self._end]
        self._start, self._end = 0, n

    def feed(self, data) -> list[memoryview]:
        """Take bytes; return the complete records' frames. A bad length makes the stream
        unusable: FramingError, now and on every later call; when whole records came before
        it in the same bytes, those are returned first (with `broken` set) and the error is
        raised by the next call."""
        if self.broken is not None:
            raise self.broken
        if _FAST and self._start == self._end and type(data) is bytes and len(data) > _LEN_BYTES:
            size = _read_length(data, 0)[0]  # the common case, exactly one record: no buffer, no loop
            if size == len(data) - _LEN_BYTES and size <= self.max_frame_bytes:
                self.consumed += len(data)
                return [memoryview(data)[_LEN_BYTES:]]
        mv = memoryview(data).cast("B")
        out: list[memoryview] = []
        if self._start == self._end:  # nothing pending: whole records are views of the input itself
            out, pos = self._split(mv, 0, len(mv))
            mv = mv[pos:]  # a partial record, if any, goes to the buffer
        while len(mv) and self.broken is None:
            if out:  # the buffer is about to move: records already found must not change under the caller
                out = [bytes(v) for v in out]  # type: ignore[misc]
            self._compact(min(len(mv), len(self._buf) - (self._end - self._start)))
            take = min(len(self._buf) - self._end, len(mv))  # the buffer always holds a whole record
            self._view[self._end:self._end + take] = mv[:take]
            self._end += take
            mv = mv[take:]
            out += self._records()
        if self.broken is not None and not out:
            raise self.broken
        return out

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Free space to receive into (asyncio.BufferedProtocol style): the kernel writes
        straight into this buffer and `buffer_updated(n)` parses in place."""
        if self.broken is not None:
            raise self.broken
        self._compact(self.max_frame_bytes + _LEN_BYTES)
        return self._view[self._end:]

    def buffer_updated(self, n: int) -> list[memoryview]:
        """n bytes were written into the last get_buffer(); returns the complete records."""
        self.add(n)
        return self._records()

    def add(self, n: int) -> None:
        """n bytes were written into the last get_buffer(); nothing is parsed yet."""
        if self.broken is not None:
            raise self.broken
        self._end += n

    def parse(self) -> list[memoryview]:
        """The complete records held, as views (see feed)."""
        if self.broken is not None:
            raise self.broken
        return self._records()

    def next_record(self) -> memoryview | None:
        """The next complete record held (a view), or None; FramingError for a bad length."""
        if self.broken is not None:
            raise self.broken
        pos = self._start
        if self._end - pos < _LEN_BYTES:
            return None
        size = self._length(self._view, pos)
        if self._end - pos - _LEN_BYTES < size:
            return None
        self._start = pos + _LEN_BYTES + size
        self.consumed += _LEN_BYTES + size
        return self._view[pos + _LEN_BYTES:self._start]

    def skip(self, pos: int) -> None:
        """Records up to pos were taken by a fast path."""
        self.consumed += pos - self._start
        self._start = pos

    def settle(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0

    def _split(self, view: memoryview, pos: int, end: int) -> tuple[list[memoryview], int]:
        """The whole records in view[pos:end] (as views) and where the first incomplete one starts."""
        out = []
        while end - pos >= _LEN_BYTES:
            try:
                size = self._length(view, pos)
            except FramingError:
                break  # broken: what came before is still delivered
            if end - pos - _LEN_BYTES < size:
                break
            out.append(view[pos + _LEN_BYTES:pos + _LEN_BYTES + size])
            pos += _LEN_BYTES + size
            self.consumed += _LEN_BYTES + size
        return out, pos

    def _length(self, view: memoryview, pos: int) -> int:
        """The record length at view[pos:], checked (1..max_frame_bytes) before anything is kept."""
        size = _read_length(view, pos)[0]
        if not 1 <= size <= self.max_frame_bytes:
            raise self._break("record.length", f"{size} is outside 1..max_frame_bytes ({self.max_frame_bytes}); "
                              "the connection cannot be resynchronised")
        return size

    def _records(self) -> list[memoryview]:
        out, pos = self._split(self._view, self._start, self._end)
        if self.broken is None:
            self._start = pos
            if self._start == self._end:
                self._start = self._end = 0
        return out

    def eof(self) -> None:
        """The peer closed the connection: FramingError when it stopped inside a record."""
        left = self._end - self._start
        if left and self.broken is None:
            need = (int.from_bytes(self._buf[self._start:self._start + _LEN_BYTES], "little") + _LEN_BYTES
                    if left >= _LEN_BYTES else _LEN_BYTES)
            raise self._break("record", f"the connection ended {left} bytes into a record of {need} bytes")

    @property
    def pending(self) -> int:
        """Bytes of an incomplete record held."""
        return self._end - self._start

    def _break(self, path: str, detail: str) -> FramingError:
        self.broken = FramingError(path, detail, self.consumed)
        self._start = self._end = 0
        return self.broken
