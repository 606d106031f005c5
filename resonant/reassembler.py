"""V-Stream receiver: the Reassembler rebuilds the tensors of any number of streams from their
frames, in any order, and reports StreamStarted, ObjectReady, StreamComplete and StreamFailed."""

from __future__ import annotations

import hashlib
import heapq
import math
import re
from dataclasses import dataclass, field

import numpy as np

from resonant import _codec, fec, handshake
from resonant._spec import MAX_FRAME_BYTES
from resonant._codec import Chunk, Frame, Slice, Sync
from resonant.errors import HandshakeError, ResonantError
from resonant.replay import IdRanges
from resonant.stream_layout import I8, PLAIN_CHUNK_MAX, StreamLayout
from resonant.stream_limits import (EARLY_FRAME_BYTES, EARLY_STREAM_BYTES, PARITY_BLOCK_BYTES, PARITY_CHUNK_BYTES,
                                    PART_BYTES, MemoryBudget, StreamLimits, committed_bytes)

__all__ = ["Reassembler", "StreamStarted", "ObjectReady", "StreamComplete", "StreamFailed", "set_buffer_cache"]

_HEAD_PREFIX = re.compile(rb'\s*\{\s*"method"\s*:\s*"head"')  # a head document too broken to validate
# Stream buffers at least this large are written with streaming (non-temporal) stores: they
# exceed the caches, and ordinary stores would first read every destination line.
STREAMING_STORE_BYTES = 8 << 20
# Stream buffers at least this large come from the codec's output blocks, which are kept for
# reuse once the application drops them (see set_buffer_cache): no page faults the next time.
BLOCK_BYTES = 8 << 20  # (blocks are whole 2 MiB pages: at most 25% more than asked)


def set_buffer_cache(limit: int) -> int:
    """Keep at most `limit` bytes (default 1 GiB) of released stream buffers for reuse by later
    streams; 0 keeps none. Returns the previous limit."""
    return _codec.set_block_cache(limit)


# ------------------------------------------------------------------ events


@dataclass(frozen=True)
class StreamStarted:
    stream_id: int
    layout: StreamLayout


# Every chunk of one object has arrived (stream_id, index, name, layer, array; its docstring says
# more): made in C with the stream's views at HEAD (_codec.object_views), handed out when the
# object is in.
ObjectReady = _codec.ObjectReady


@dataclass(frozen=True)
class StreamComplete:
    stream_id: int
    objects: list[np.ndarray]
    xxh3_64: int
    nbytes: int


@dataclass(frozen=True)
class StreamFailed:
    """The stream was dropped and its memory released. reason: 'hash_mismatch', 'gap_after_tail',
    'timeout', 'limit', 'bad_head', 'bad_chunk', 'bad_tail', 'closed', 'model_mismatch' (a KV stream of another
    model than expected_signature: refused at HEAD, nothing allocated). missing: the byte ranges
    never received, (start, end) with start < end, in order (at most
    StreamLimits.max_missing_ranges; an empty object's missing chunk is no bytes and is not listed);
    missing_more: how many more ranges there were beyond those listed."""

    stream_id: int
    reason: str
    detail: str
    missing: list[tuple[int, int]] = field(default_factory=list)
    missing_more: int = 0



class _Stream(_codec.ChunkSink):
    """An open stream. The fields the chunk fast path writes (buffer, have, have_count,
    object_left, hasher, hashed, streaming, last) are the ChunkSink's, shared by both paths."""

    __slots__ = ("stream_id", "layout", "arrays", "tail_at", "charged", "reported_at", "report_wait", "cursor",
                 "code", "parity")

    def __init__(self, stream_id: int, layout: StreamLayout, now: float, buffer: np.ndarray | None = None,
                 charged: int | None = None) -> None:
        self.stream_id = stream_id
        self.layout = layout
        self.charged = committed_bytes(layout, buffer is None) if charged is None else charged  # (the caller's charge)
        # the one copy: chunks land here (in the caller's buffer when its allocate hook gave one)
        if buffer is None:
            n = layout.total_bytes
            buffer = np.frombuffer(_codec.output_block(n), np.uint8) if n >= BLOCK_BYTES else np.empty(n, np.uint8)
        self._geometry(buffer, layout.objects, layout.chunk_bytes, layout.chunks)  # (the objects' places, in C arrays)
        self.streaming = layout.total_bytes >= STREAMING_STORE_BYTES
        self.arrays, self.ready = _codec.object_views(self.buffer, layout.objects, stream_id)  # views, ObjectReady events
        self.tail: dict | None = None
        self.tail_at = 0.0
        self.last = now
        self.progress = now  # the last new chunk (set by the commit of each)
        self.hasher = _codec.Xxh3()  # fed while chunks arrive in order (cache-hot); else one pass at the end
        self.hashed = 0                 # bytes of the stream's prefix already hashed
        self.reported_at: float | None = None  # feedback: when this stream was last reported (None: report now)
        self.report_wait = 0.0          # feedback: the wait before the next report without news
        self.cursor = 0                 # feedback: the chunk index the next report's missing ranges start from
        # forward error correction: the block code, and the parity chunks held per incomplete block
        self.code = None if layout.fec is None else fec.BlockCode(*layout.fec, layout.chunk_bytes)
        self.parity: dict[int, dict[int, bytes]] = {}

    def deadline(self, limits: StreamLimits, repair: bool = False) -> float:
        """When tick() fails it: idle_timeout after its last frame, progress_timeout after its last
        new chunk, or tail_grace after TAIL (with repair: after TAIL or the last new chunk, whichever
        is later, as the missing chunks are being resent)."""
        idle = min(self.last + limits.idle_timeout, self.progress + limits.progress_timeout)
        return idle if self.tail is None else min(idle, self.grace_from(repair) + limits.tail_grace)

    def grace_from(self, repair: bool) -> float:
        return max(self.tail_at, self.progress) if repair else self.tail_at


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
                 budget: MemoryBudget | None = None, allocate=None, expected_signature=None) -> None:
        self.limits = limits
        self.expected_signature = expected_signature  # a ModelSignature: KV streams of another model are refused
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
        # Feedback (set by a Session whose handshake agreed it): report documents for each open stream
        # (reports()), a verdict for each stream that completes or fails (verdicts()); hold_verdicts:
        # a verified stream's verdict waits for the application (verdict()), reported as held meanwhile.
        self.feedback = False
        self.hold_verdicts = False
        self.max_frame_bytes = MAX_FRAME_BYTES
        self._verdicts: list[dict] = []       # verdict documents to send
        self._report_now: set[int] = set()    # streams to report at once (opened; TAIL with chunks missing)
        self._probed: set[int] = set()        # of those, streams whose TAIL came again (a probe): one report only
        self._held: dict[int, list] = {}      # verified streams whose verdict the application holds: [doc, last report]
        self._said: dict[int, list] = {}      # closed streams' verdicts, sent again when their frames still come:
        #                                       [doc, when last sent] (a verdict lost on the way)
        self.report_interval = 0.02           # (the Session sets it: report_interval_ms)
        # the streams a HEAD opened (feedback: a keyed Session lets a HEAD the replay window calls too old
        # through only for a stream never opened, see Session._repair_frame); at most replay_evicted_ranges
        # ranges, after which none is let through (opened_overflow)
        self.opened = IdRanges()
        self.opened_overflow = False

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

    def receive(self, data, now: float, doc: dict | None = None) -> list:
        """Take one frame (bytes or a decoded Frame); return the events it causes. doc: a Sync
        frame's document, already parsed and validated (handshake.parse), or None."""
        if isinstance(data, Frame):
            frame = data
        else:
            codec = self.codec
            if codec is None or not codec.require_encryption:  # the bulk of a stream: one C call (receive_chunk)
                st = _codec.place_chunk(self._streams, data, self.expected_space_hash if codec is None
                                        else codec.expected_space_hash, now)
                if st is not None:
                    return [] if st.completed < 0 and st.tail is None and not st.fec_watch else self.chunk_events(st)
            frame = (self.codec.decode(data, strict=True) if self.codec is not None  # (stream frames fit their layouts)
                     else _codec.decode(data, expected_space_hash=self.expected_space_hash, strict=True))
        sid = frame.stream_id
        if sid in self._closed:
            self.dropped_frames += 1  # a late or replayed frame of a finished stream (new streams take new ids)
            if self.feedback:
                self._say_again(sid, now)
            return []
        if isinstance(frame, Sync):
            if frame.json is None:  # HEART
                if sid in self._streams:
                    self._streams[sid].last = now
                return []
            try:
                if doc is None:
                    doc = handshake.parse(frame.json.payload)
            except HandshakeError as exc:
                if exc.path.startswith("tail") and sid in self._streams:
                    return self._fail(sid, "bad_tail", str(exc))
                if sid not in self._streams and (exc.path.startswith("head") or _HEAD_PREFIX.match(frame.json.tobytes()[:64])):
                    self._drop_early(sid)
                    return [self._failed(sid, "bad_head", str(exc))]
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
        st = _codec.place_chunk(self._streams, data, expected_space_hash, now)
        if st is None:
            return None
        return [] if st.completed < 0 and st.tail is None and not st.fec_watch else self.chunk_events(st)

    def place_records(self, buf: bytearray, start: int, end: int, max_frame_bytes: int,
                      expected_space_hash: int | None, now: float) -> tuple[int, int, int, list]:
        """The TCP fast path: the run of whole records (u32 length + frame) at buf[start:end]
        that are plain chunks of open streams, placed in one C call. Returns (the position
        reached, chunks placed, their frame bytes, events); the record at that position, if
        whole, is for the general path."""
        ready = [] if self.limits.release == "arrival" else None  # (objects that come in on the way, C-side)
        pos, count, nbytes, st = _codec.place_records(self._streams, buf, start, end, max_frame_bytes,
                                                       expected_space_hash, now, ready)
        if st is not None:
            return pos, count, nbytes, (ready + self.chunk_events(st) if ready else self.chunk_events(st))
        return pos, count, nbytes, ready or []

    def chunk_events(self, st: _Stream) -> list:
        """The events of a chunk just committed to st: ObjectReady (unless release="verified"),
        then completion or failure."""
        if st.completed < 0 and st.tail is None and not st.fec_watch:
            return []
        if st.tail is None and not st.fec_watch and self.limits.release == "arrival":  # (an object is in: the usual case)
            return [st.ready[st.completed]]
        block = st.last_chunk // st.code.k if st.fec_watch else -1  # (parity held: its block may be complete now)
        sid = st.stream_id
        events: list = []
        if st.completed >= 0 and self.limits.release == "arrival":
            events.append(st.ready[st.completed])
        if block in st.parity:
            events += self._fec_block(st, block, None)
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
                if st.tail is not None and now - st.grace_from(self.feedback) > lim.tail_grace:
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
                    events.append(self._failed(sid, "timeout", f"HEAD never arrived: {len(dropped)} frames held for "
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
                    events.append(self._failed(sid, "timeout", f"HEAD never completed: {got} of {total} parts arrived "
                                               f"(idle_timeout {lim.idle_timeout} s)"))
                else:
                    again.append((kind, sid))
            else:
                when = self._closed.get(sid)
                if when is None:
                    continue
                if now - when > lim.idle_timeout:
                    del self._closed[sid]
                    self._said.pop(sid, None)
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

    # -------------------------------------------------------------- feedback (receiver side)

    def take_verdicts(self) -> list[dict]:
        """The verdict documents due (each handed out once)."""
        out, self._verdicts = self._verdicts, []
        return out

    def verdict(self, sid: int, ok: bool, reason: str = "", detail: str = "") -> dict | None:
        """The application's verdict on a stream whose verdict it held (hold_verdicts): the document
        to send (ok: the verified one), or None when no verdict is held for sid."""
        held = self._held.pop(sid, None)
        if held is None:
            return None
        cut = handshake.MAX_STRING_CHARS
        doc = held[0] if ok else {"method": "verdict", "stream_id": sid, "ok": False,
                                  "reason": (reason or "refused")[:cut], "detail": detail[:cut]}
        self._said[sid] = [doc, -math.inf]
        return doc

    def reports(self, now: float, interval: float, quiet: float) -> list[dict]:
        """The report documents due at `now`: a stream that just opened or whose TAIL came with chunks
        missing at once; one that received frames since its last report after `interval`; one whose
        TAIL came with chunks missing and nothing new since, after a wait that doubles up to `quiet`;
        any other open stream, and every held verdict, after `quiet` (so the sender knows the receiver
        is there)."""
        out = []
        now_set, self._report_now = self._report_now, set()
        probed, self._probed = self._probed, set()
        for sid, st in self._streams.items():
            at = st.reported_at
            burst = REPORT_BURST
            if sid in probed and at is not None and st.progress <= at:  # a repeated TAIL, nothing new: one report,
                wait, burst = max(st.report_wait, interval), 1  # the quiet backoff left as it was
            elif sid in now_set or at is None:
                wait = interval
            elif st.progress > at:  # new chunks since the last report (not HEARTs or duplicates: a peer's few
                if now - at < interval:  # bytes must not buy a burst of reports every interval)
                    continue
                wait = interval
            elif st.tail is not None:  # chunks missing after TAIL, nothing new: less and less often, one at a time
                if now - at < st.report_wait:
                    continue
                wait, burst = min(2 * st.report_wait, quiet), 1
            else:
                if now - at < quiet:
                    continue
                wait, burst = quiet, 1
            st.reported_at, st.report_wait = now, wait
            for _ in range(burst):  # more holes than one report lists: the next ones, in turn
                doc = self._report(sid, st, now)
                out.append(doc)
                if not doc["more"]:
                    break
        for sid, held in self._held.items():
            if now - held[1] >= quiet:
                held[1] = now
                out.append({"method": "report", "stream_id": sid, "received": held[2], "bytes": held[3],
                            "highest": held[2], "skipped": 0, "age_ms": 0, "tail": True, "missing": [], "more": 0,
                            "held": True})
        return out

    def _report(self, sid: int, st: _Stream, now: float) -> dict:
        n = st.layout.chunks
        hi = n if st.tail is not None else st.top
        # as many ranges as fit a frame: each at most two numbers of the stream's digits, a comma and a bracket
        room = max(1, (self.max_frame_bytes - 400) // (2 * len(str(n)) + 2))
        cap = min(handshake.MAX_REPORT_RANGES, room)
        cursor = st.cursor if st.cursor < hi else 0
        first, more = st.missing_chunks(cursor, hi, cap)
        if not more and cursor and len(first) < 2 * cap:  # wrap around: the ranges before the cursor
            second, more = st.missing_chunks(0, cursor, cap - len(first) // 2)
            missing = second + first  # (ascending: second lies below the cursor, first above it)
            st.cursor = second[-1] if more and second else 0
        else:
            missing = first
            st.cursor = first[-1] if more else 0
        age = min(0xFFFFFFFF, max(0, int((now - st.top_at) * 1000))) if st.top else 0
        return {"method": "report", "stream_id": sid, "received": st.have_count, "bytes": st.have_bytes,
                "highest": st.top, "skipped": st.skipped, "age_ms": age, "tail": st.tail is not None,
                "missing": missing, "more": more}

    def _close(self, sid: int, now: float) -> None:
        self._closed[sid] = now
        while len(self._closed) > 4 * self.limits.max_streams + 1024:  # bounded: forget the oldest
            old = next(iter(self._closed))
            del self._closed[old]
            self._said.pop(old, None)
        self._due(_CLOSED, sid)

    # -------------------------------------------------------------- deadlines

    def _deadline(self, kind: int, sid: int) -> float | None:
        """When what (kind, sid) names may expire; None if it is gone."""
        lim = self.limits
        if kind == _STREAM:
            st = self._streams.get(sid)
            return None if st is None else st.deadline(lim, self.feedback)
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
            return [self._failed(sid, "bad_head", f"head.part: {problem}")]
        held = self._parts.get(sid)
        if held is not None and part in held:
            return []  # a duplicate part
        raw = bytes(payload)
        cost = len(raw) + PART_BYTES + (EARLY_STREAM_BYTES if held is None else 0)
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
            return [self._failed(sid, "bad_head", "head.part: parts numbered outside 0..parts-1")]
        # parsed again one at a time, stopping at the first problem: at most max_objects objects are built
        common = ("v", "msg_type", "chunk_bytes", "total_bytes", "hash", "parts", "object_count", "legacy_md5", "fec",
                  "kv")
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
            return [self._failed(sid, "bad_head", f"head.part: {problem}")]
        merged = {k: v for k, v in first.items() if k not in ("parts", "part", "first_object", "object_count")}
        merged["objects"] = objects
        return self._head(sid, merged, now)

    def _drop_parts(self, sid: int) -> None:
        held = self._parts.pop(sid, None)
        if held is None:
            return
        cost = sum(len(raw) + PART_BYTES for raw, _ in held.values()) + EARLY_STREAM_BYTES
        self._early_bytes -= cost
        self._charge(-cost)

    def _head(self, sid: int, doc: dict, now: float) -> list:
        if sid in self._streams:
            return []  # a repeated HEAD
        try:
            layout = StreamLayout.from_head(doc)
        except HandshakeError as exc:
            self._drop_early(sid)
            return [self._failed(sid, "bad_head", str(exc))]
        if layout.kv is not None and self.expected_signature is not None:  # before anything is allocated
            from resonant.kv import model_problem
            mismatch = model_problem(layout.kv, self.expected_signature)
            if mismatch is not None:  # refused for good: its later frames are dropped, not held as early ones
                self._drop_early(sid)
                failed = self._failed(sid, "model_mismatch", mismatch)
                self._close(sid, now)
                return [failed]
        lim = self.limits
        problem = None
        if layout.total_bytes > lim.max_stream_bytes:
            problem = f"{layout.total_bytes} bytes announced, more than max_stream_bytes ({lim.max_stream_bytes})"
        elif len(self._streams) >= lim.max_streams:
            problem = f"{len(self._streams)} streams open, max_streams is {lim.max_streams}"
        buffer = None
        if problem is None and self.allocate is not None:
            buffer = _caller_buffer(self.allocate(sid, layout), layout)
        cost = committed_bytes(layout, buffer is None)
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
            return [self._failed(sid, "limit", problem)]
        self._charge(cost)  # before the buffer, bitmap and arrays are allocated
        try:
            self._streams[sid] = _Stream(sid, layout, now, buffer, cost)
        except BaseException:
            self._charge(-cost)
            raise
        self._due(_STREAM, sid)
        if self.feedback:
            self._report_now.add(sid)
            if not self.opened_overflow:
                if len(self.opened) >= handshake.REPLAY_EVICTED_RANGES and self.opened.needs_range(sid):
                    self.opened_overflow = True
                else:
                    self.opened.add(sid)
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
        if k > st.layout.chunks and st.code is not None:  # above TAIL's frame_seq: a parity chunk
            return self._parity(st, frame, now)
        outcome, o, a = st.check(k, int(s.dtype), s.nbytes)  # the fast path's own check
        if outcome == _CHUNK_OUTSIDE:
            return self._fail(sid, "bad_chunk", f"frame_seq {frame.frame_seq} is not a chunk of this stream "
                              f"(chunks are 1..{st.layout.chunks})")
        if outcome == _CHUNK_DUPLICATE:
            return []
        if outcome == _CHUNK_MISFIT:
            obj, _, length = st.layout.chunk(k)
            want = obj.dtype if _codec.element_bytes(obj.dtype) else I8
            return self._fail(sid, "bad_chunk", f"chunk {k} is {s.dtype.name} of {s.nbytes} bytes, HEAD says "
                              f"{want.name} of {length} bytes")
        # in order: hashed while it is in cache (same GIL-free section); commit hashes the chunks waiting after it
        _codec.copy_payload(s, st.buffer, a, st.hasher if a == st.hashed else None, st.streaming)
        st.commit(k, o, a, s.nbytes, now)
        return self.chunk_events(st)

    def _parity(self, st: _Stream, frame: Chunk, now: float) -> list:
        """A parity chunk of a stream with fec: held (charged first) while its block is incomplete
        and cannot be recovered yet; the block recovered as soon as k of its pieces are in."""
        sid, lay, code, s = st.stream_id, st.layout, st.code, frame.data
        at = fec.parity_of_seq(lay.chunks, code.k, code.m, frame.frame_seq)
        if at is None:
            return self._fail(sid, "bad_chunk", f"frame_seq {frame.frame_seq} is neither a chunk (1..{lay.chunks}) nor "
                              f"a parity chunk ({lay.chunks + 2}..{fec.last_parity_seq(lay.chunks, code.k, code.m)}) "
                              f"of this stream")
        b, j = at
        if s.dtype != I8 or s.nbytes != lay.chunk_bytes:
            return self._fail(sid, "bad_chunk", f"parity chunk {j} of block {b} is {s.dtype.name} of {s.nbytes} bytes, "
                              f"it must be I8 of chunk_bytes ({lay.chunk_bytes})")
        held = st.parity.get(b)
        if held is not None and j in held:
            return []  # a duplicate
        events = self._fec_block(st, b, (j, s.payload))
        return events + self._maybe_complete(sid) if st.tail is not None else events

    def _fec_block(self, st: _Stream, b: int, new: tuple[int, object] | None) -> list:
        """Block b after a new piece (a parity chunk `new`, (j, payload), or a data chunk just
        committed): its parity released when its data is complete; its missing data recovered
        and committed when k pieces are known; else `new` held, charged before it is copied."""
        code, lay = st.code, st.layout
        first, end = b * code.k, min((b + 1) * code.k, lay.chunks)
        missing = [c for c in range(first, end) if not st.has(c)]
        held = st.parity.get(b, {})
        if not missing:
            self._release_parity(st, b)
            return []
        known = code.k - len(missing) + len(held) + (new is not None)
        if known < code.k:
            if new is not None:
                cost = lay.chunk_bytes + PARITY_CHUNK_BYTES + (PARITY_BLOCK_BYTES if not held else 0)
                lim = self.limits
                if (self.buffered_bytes + cost > lim.max_buffered_bytes
                        or (self.budget is not None and self.budget.used + cost > self.budget.limit)):
                    self.dropped_frames += 1  # (optional redundancy: the data chunks may still come)
                    return []
                st.charged += cost
                self._charge(cost)  # before the copy
                st.parity.setdefault(b, {})[new[0]] = bytes(new[1])
                st.fec_watch = True
            return []
        pieces: dict[int, object] = {code.k + j: p for j, p in held.items()}
        if new is not None:
            pieces[code.k + new[0]] = new[1]
        for c in range(first, end):
            if c not in missing:
                obj, start, length = lay.chunk(c)
                pieces[c - first] = st.buffer[obj.offset + start:obj.offset + start + length]
        recovered = code.recover(pieces, end - first)
        self._release_parity(st, b)
        events: list = []
        for c in missing:
            obj, _, length = lay.chunk(c)
            want = obj.dtype if _codec.element_bytes(obj.dtype) else I8
            payload = recovered[c - first][:length]
            self._place(st, Slice(want, (length // (_codec.element_bytes(want) or 1),), payload), c, st.last)
            if st.completed >= 0 and self.limits.release == "arrival":
                events.append(st.ready[st.completed])
        return events

    def _place(self, st: _Stream, s: Slice, k: int, now: float) -> None:
        """A recovered chunk k, committed as a received one (check, copy and hash, commit)."""
        outcome, o, a = st.check(k, int(s.dtype), s.nbytes)
        if outcome != _CHUNK_NEW:  # (recovered from HEAD's geometry: cannot happen)
            raise AssertionError(f"recovered chunk {k}: check says {outcome}")
        _codec.copy_payload(s, st.buffer, a, st.hasher if a == st.hashed else None, st.streaming)
        st.commit(k, o, a, s.nbytes, now)

    def _release_parity(self, st: _Stream, b: int) -> None:
        """Drop the parity chunks held for block b and their charge."""
        held = st.parity.pop(b, None)
        if held:
            cost = len(held) * (st.layout.chunk_bytes + PARITY_CHUNK_BYTES) + PARITY_BLOCK_BYTES
            st.charged -= cost
            self._charge(-cost)
        st.fec_watch = bool(st.parity)

    def _tail(self, sid: int, doc: dict, now: float) -> list:
        st = self._streams[sid]
        st.last = now
        if st.tail is not None:  # a probe of a sender that has not heard of the missing chunks lately
            if self.feedback and sid not in self._report_now and (st.reported_at is None
                                                                  or now - st.reported_at >= self.report_interval):
                self._report_now.add(sid)  # (a report at most once per report interval, however many come)
                self._probed.add(sid)  # (one report, not a burst: a peer's few bytes buy few bytes)
            return []
        if doc["chunks"] != st.layout.chunks or doc["total_bytes"] != st.layout.total_bytes:
            return self._fail(sid, "bad_tail", f"TAIL says {doc['chunks']} chunks of {doc['total_bytes']} bytes, "
                              f"HEAD said {st.layout.chunks} of {st.layout.total_bytes}")
        if len(doc["xxh3_64"]) != 16 or any(c not in "0123456789abcdef" for c in doc["xxh3_64"]):
            return self._fail(sid, "bad_tail", f"xxh3_64 {doc['xxh3_64']!r} is not 16 lowercase hex digits")
        st.tail = doc
        st.tail_at = now
        events = self._maybe_complete(sid)
        if self.feedback and sid in self._streams:
            self._report_now.add(sid)  # chunks are missing: the sender learns which at once
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
        if self.feedback:
            doc = {"method": "verdict", "stream_id": sid, "ok": True, "xxh3_64": f"{got:016x}",
                   "bytes": st.layout.total_bytes}
            if self.hold_verdicts:
                self._held[sid] = [doc, st.last, st.layout.chunks, st.layout.total_bytes]
                if len(self._held) > 4 * self.limits.max_streams + 1024:  # bounded: the oldest is judged as verified
                    old = next(iter(self._held))
                    self._say(self._held.pop(old)[0])
            else:
                self._say(doc)
        events: list = []
        if self.limits.release == "verified":
            events = list(st.ready)
        return events + [StreamComplete(sid, st.arrays, got, st.layout.total_bytes)]

    def _failed(self, sid: int, reason: str, detail: str, missing: list | None = None, more: int = 0) -> StreamFailed:
        """A StreamFailed event; with feedback, its verdict is queued for the sender (not when the
        connection closed: nobody would read it)."""
        if self.feedback and reason != "closed":
            self._say({"method": "verdict", "stream_id": sid, "ok": False, "reason": reason,
                       "detail": detail[:handshake.MAX_STRING_CHARS]})
        return StreamFailed(sid, reason, detail, missing or [], more)

    def _say(self, doc: dict) -> None:
        """Queue a verdict, and remember it while the stream id is remembered as closed."""
        self._verdicts.append(doc)
        self._said[doc["stream_id"]] = [doc, -math.inf]

    def _say_again(self, sid: int, now: float) -> None:
        """A frame of a closed stream came (the sender has not heard the verdict): the verdict again,
        at most once per report interval; or, while the application holds it, a held report."""
        said = self._said.get(sid)
        if said is not None and now - said[1] >= self.report_interval:
            said[1] = now
            self._verdicts.append(said[0])
            return
        held = self._held.get(sid)
        if held is not None and now - held[1] >= self.report_interval:
            held[1] = -math.inf  # the next reports() lists it
            self._report_now.add(sid)

    def _fail(self, sid: int, reason: str, detail: str) -> list:
        st = self._streams.pop(sid, None)
        if st is None:
            return [self._failed(sid, reason, detail)]
        missing, more = st.missing(self.limits.max_missing_ranges)
        self._charge(-st.charged)
        self._close(sid, st.last)
        return [self._failed(sid, reason, detail, missing, more)]

    def _hold(self, frame: Frame, now: float) -> list:
        # an owned copy of what arrived before its HEAD (views would pin the caller's buffers):
        # the plain frame's bytes, decoded again when the HEAD comes, charged what they take. A
        # chunk is kept as the 1-D chunk it stands for (all a chunk is checked on is its dtype and
        # length); one larger than a plain frame carries is dropped (a compressed frame's body may
        # be 64 KiB: re-encoded, it would not fit a frame). Never raises for what a peer sent.
        try:
            if isinstance(frame, Chunk):
                s = frame.data
                if s.nbytes > PLAIN_CHUNK_MAX:
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
        cost = len(raw) + EARLY_FRAME_BYTES + (EARLY_STREAM_BYTES if held is None else 0)
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
        size = sum(len(raw) + EARLY_FRAME_BYTES for raw, _ in held) + EARLY_STREAM_BYTES
        self._early_bytes -= size
        self._charge(-size)
        return held

    def _charge(self, n: int) -> None:
        if self.budget is not None:
            self.budget.used += n


# Reports one stream may send at once when its missing ranges do not fit one (each lists the
# ranges after the last one's): at high loss on small frames, the repair would otherwise be limited
# to max_report_ranges chunks per report interval (schema/handshake.yaml: report_burst).
REPORT_BURST = handshake.REPORT_BURST

# What a deadline names (Reassembler._deadlines), and ChunkSink.check's outcomes.
_STREAM, _EARLY, _PARTS, _CLOSED = range(4)
_CHUNK_NEW, _CHUNK_DUPLICATE, _CHUNK_OUTSIDE, _CHUNK_MISFIT = range(4)
