"""Replay protection: a sliding window over frame_seq per stream (ReplayWindow), and the
compact set of stream ids whose window was dropped (IdRanges)."""

from __future__ import annotations

import bisect
from collections import OrderedDict

from resonant import handshake

__all__ = ["ReplayWindow", "IdRanges"]


class IdRanges:
    """A set of u32 ids kept as sorted, disjoint, non-adjacent ranges [lo, hi]: ids handed out in
    order (stream ids from new_stream_id) stay one range however many there are."""

    def __init__(self) -> None:
        self._lo: list[int] = []
        self._hi: list[int] = []

    def __contains__(self, x: int) -> bool:
        i = bisect.bisect_right(self._lo, x) - 1
        return i >= 0 and x <= self._hi[i]

    def needs_range(self, x: int) -> bool:
        """Whether adding x would add a range (x is neither in nor next to one)."""
        i = bisect.bisect_right(self._lo, x) - 1
        if i >= 0 and x <= self._hi[i] + 1:
            return False
        return not (i + 1 < len(self._lo) and self._lo[i + 1] == x + 1)

    def add(self, x: int) -> None:
        i = bisect.bisect_right(self._lo, x) - 1
        if i >= 0 and x <= self._hi[i]:
            return
        joins_left = i >= 0 and self._hi[i] == x - 1
        joins_right = i + 1 < len(self._lo) and self._lo[i + 1] == x + 1
        if joins_left and joins_right:
            self._hi[i] = self._hi[i + 1]
            del self._lo[i + 1], self._hi[i + 1]
        elif joins_left:
            self._hi[i] = x
        elif joins_right:
            self._lo[i + 1] = x
        else:
            self._lo.insert(i + 1, x)
            self._hi.insert(i + 1, x)

    def __len__(self) -> int:
        """The number of ranges."""
        return len(self._lo)


class ReplayWindow:
    """A sliding window over frame_seq per stream, as IPsec and DTLS keep one: a frame whose
    sequence number was seen, or lies more than `size` below the highest seen, is refused.

    Only authenticated (decrypted) frames update it, so a forger cannot move the window. At
    most `max_streams` windows are kept; the least recently used is dropped first, and its
    stream id is remembered (as ranges of ids, at most `max_ranges`) so that the stream's frames
    are refused from then on ('evicted') rather than accepted as new. A new stream that would
    need a window when dropping one would exceed `max_ranges` is refused ('exhausted'): the
    peers must start a new session (a new session key, a new window).
    """

    def __init__(self, size: int = 1024, max_streams: int = 4096,
                 max_ranges: int = handshake.REPLAY_EVICTED_RANGES) -> None:
        if size < 1 or max_streams < 1 or max_ranges < 1:
            raise ValueError("size, max_streams and max_ranges must be at least 1")
        self.size = size
        self.max_streams = max_streams
        self.max_ranges = max_ranges
        self._win: OrderedDict[int, tuple[int, int]] = OrderedDict()  # stream -> (highest, bitmap)
        self.evicted = IdRanges()  # the streams whose window was dropped

    def check(self, stream_id: int, seq: int) -> str:
        """'ok' (and the sequence number is recorded), 'replay', 'too_old', 'evicted' or 'exhausted'."""
        entry = self._win.get(stream_id)
        if entry is None:
            if stream_id in self.evicted:
                return "evicted"
            if len(self._win) >= self.max_streams:
                oldest = next(iter(self._win))
                if len(self.evicted) >= self.max_ranges and self.evicted.needs_range(oldest):
                    return "exhausted"
                del self._win[oldest]
                self.evicted.add(oldest)
            self._win[stream_id] = (seq, 1)
            return "ok"
        self._win.move_to_end(stream_id)
        top, bits = entry
        if seq > top:
            shift = seq - top
            bits = ((bits << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self._win[stream_id] = (seq, bits)
            return "ok"
        back = top - seq
        if back >= self.size:
            return "too_old"
        if bits >> back & 1:
            return "replay"
        self._win[stream_id] = (top, bits | (1 << back))
        return "ok"

    def __len__(self) -> int:
        return len(self._win)
