"""What a Reassembler may hold: its limits (StreamLimits), a budget shared by several
(MemoryBudget), and what each thing it holds is charged."""

from __future__ import annotations

from dataclasses import dataclass

from resonant import _codec
from resonant.stream_layout import StreamLayout

__all__ = ["StreamLimits", "MemoryBudget", "DEFAULT_PROGRESS_TIMEOUT"]


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
EARLY_FRAME_BYTES = 96
PART_BYTES = 200
EARLY_STREAM_BYTES = 320
# A parity chunk held while its block is incomplete (forward error correction): its bytes object
# and dict entry, charged with its chunk_bytes; and each block holding parity (its dict and entry).
# (tracemalloc, CPython 3.11: about 310 bytes per block holding one parity chunk, 20 per further
# one, besides the payloads; rounded up generously.)
PARITY_CHUNK_BYTES = 160
PARITY_BLOCK_BYTES = 400


def committed_bytes(layout: StreamLayout, buffer: bool = True) -> int:
    """Memory a stream takes once open, charged before any of it is allocated: its output
    buffer (unless the caller's), its chunk bitmap (a bit per chunk), its objects and the rest
    (a KV stream: the tensors its receiver converts from the wire dtype too)."""
    objects = _codec.objects_charge(layout.objects, _OBJECT_BYTES, 40)  # (and each name's characters)
    if getattr(layout, "kv", None) is not None:  # a KV cache converted on arrival (resonant.kv)
        from resonant.kv import converted_bytes
        objects += converted_bytes(layout)
    return ((layout.total_bytes if buffer else 0) + _codec.ChunkSink.bitmap_bytes(layout.chunks)
            + _STREAM_BYTES + objects)


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
