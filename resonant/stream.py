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
This module gathers the names; they live in resonant.stream_layout (StreamLayout), resonant.stream_sender
(StreamSender), resonant.stream_limits (StreamLimits, MemoryBudget) and resonant.reassembler (Reassembler
and its events).
"""

from __future__ import annotations

from resonant.reassembler import (BLOCK_BYTES, STREAMING_STORE_BYTES, ObjectReady, Reassembler, StreamComplete,  # noqa: F401
                                  StreamFailed, StreamStarted, set_buffer_cache)
from resonant.stream_layout import MIN_STREAM_FRAME, STREAM_VERSION, StreamLayout, StreamObject, chunk_bytes_for  # noqa: F401
from resonant.stream_limits import DEFAULT_PROGRESS_TIMEOUT, MemoryBudget, StreamLimits  # noqa: F401
from resonant.stream_sender import StreamSender

__all__ = [
    "StreamSender", "Reassembler", "StreamLimits", "StreamLayout", "StreamObject",
    "StreamStarted", "ObjectReady", "StreamComplete", "StreamFailed",
]
