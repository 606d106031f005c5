"""The sender's side of a V-Stream with feedback, sans-IO: it keeps the stream (views of the
source tensors) until the receiver's verdict, resends what the receiver's reports list as missing,
paces what it sends, and gives the stream up when the receiver falls silent.

A Session creates one for each stream() once its handshake agreed feedback (supports.feedback);
Session.delivery(stream_id) returns it. Over UDP, the adapter sends what poll(now) returns and calls
poll again at next_time(now) (or when a datagram came); over TCP it writes the stream's records
itself (nothing is lost) and only waits for the verdict. Reports and the verdict reach it through
the Session (receive_datagram / receive_data), which returns StreamDelivered / StreamUndelivered.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from resonant import handshake
from resonant.ratecontrol import RateController

__all__ = ["Delivery", "StreamDelivered", "StreamUndelivered", "REPORT_INTERVAL", "FEEDBACK_TIMEOUT",
           "MAX_RETRANSMITS"]

REPORT_INTERVAL = handshake.REPORT_INTERVAL_MS / 1000    # seconds (schema/handshake.yaml)
FEEDBACK_TIMEOUT = handshake.FEEDBACK_TIMEOUT_MS / 1000  # seconds
MAX_RETRANSMITS = handshake.MAX_RETRANSMITS
MAX_RESEND_RANGES = handshake.MAX_RESEND_RANGES
_FIRST_RTO = 0.1      # seconds before HEAD or TAIL is sent again while no round trip has been measured
_MIN_RTO = 0.01       # the least wait before a chunk, HEAD or TAIL is sent again


@dataclass(frozen=True)
class StreamDelivered:
    """The receiver verified the whole stream: its xxh3_64 equals the one this side sent."""

    stream_id: int
    xxh3_64: int
    nbytes: int
    seconds: float        # from the first frame sent to the verdict
    retransmitted: int    # chunk frames sent again
    pacing: dict | None = None  # UDP: the rate controller's figures at the end (rate, srtt, loss, backoffs...)


@dataclass(frozen=True)
class StreamUndelivered:
    """The stream did not arrive verified. remote: the receiver's verdict said so (reason is its
    StreamFailed reason or its application's, e.g. save_failed); otherwise this side gave up:
    'no_feedback' (nothing from the receiver for feedback_timeout_ms), 'retransmits' (a chunk was
    sent max_retransmits times), 'hash_mismatch' (the receiver verified other bytes), 'closed'."""

    stream_id: int
    reason: str
    detail: str
    remote: bool = False


class Delivery:
    """One outgoing V-Stream with feedback. See the module docstring."""

    def __init__(self, sender, *, rate: float | None = None, feedback_timeout: float = FEEDBACK_TIMEOUT,
                 max_retransmits: int = MAX_RETRANSMITS) -> None:
        self.sender = sender
        self.stream_id = sender.stream_id
        layout = sender.layout
        self.chunks = layout.chunks
        self.total_bytes = layout.total_bytes
        self._chunk_bytes = layout.chunk_bytes
        self.feedback_timeout = feedback_timeout
        self.max_retransmits = max_retransmits
        self.result: StreamDelivered | StreamUndelivered | None = None
        self.pacer = RateController(rate) if rate else None
        self._heads = sender.heads()
        self._new = None                      # the first pass: (frame, is a data chunk), made at the first poll
        self._next_new = 0                    # data chunks sent by the first pass
        self._first_done = False              # the first pass is over (every chunk, and parity with fec, sent once)
        self._tail: bytes | None = None
        self._sent_at = np.full(self.chunks, -np.inf)      # when each chunk was last sent (-inf: never)
        self._sends = np.zeros(self.chunks, np.uint8)      # how often
        self._resend: deque[tuple[int, int]] = deque()     # ranges a report asked for (at most MAX_RESEND_RANGES)
        self._queued: set[tuple[int, int]] = set()          # ... the same, to find one at once
        self._head_at: float | None = None
        self._tail_at: float | None = None
        self._open = False                    # a report showed the stream open (HEAD arrived)
        self._tail_seen = False
        self.started: float | None = None
        self._heard: float | None = None      # the last feedback (or the start)
        self.srtt: float | None = None
        self.min_rtt: float | None = None
        self._last_bytes = 0                  # the receiver's bytes and skipped at its previous report
        self._last_skipped = 0
        self._sent_since = 0                  # bytes sent since the previous report
        self._paced_at = -math.inf            # when the pacer had its last sample
        self.frames_sent = 0
        self.bytes_sent = 0
        self.retransmitted = 0
        self.reports = 0
        self.held = False                     # the receiver verified it; its application holds the verdict
        self._unreported = None               # an end poll() came to, for tick() to report
        self._probe = 2 * REPORT_INTERVAL     # the wait before TAIL goes again once a report showed it arrived

    # -------------------------------------------------------------- state

    @property
    def done(self) -> bool:
        return self.result is not None

    def _rto(self) -> float:
        if self.srtt is None:
            return _FIRST_RTO
        return max(_MIN_RTO, 2 * self.srtt + REPORT_INTERVAL)

    def start(self, now: float) -> None:
        """The stream begins (the first poll, or a TCP adapter that writes the records itself):
        the feedback deadline counts from here."""
        if self.started is None:
            self.started = self._heard = now

    def sent_all(self, now: float) -> None:
        """A transport that wrote every frame itself (TCP records): nothing is left to send."""
        self.start(now)
        self._next_new = self.chunks
        self._first_done = True
        self._head_at = self._tail_at = now

    # -------------------------------------------------------------- sending (UDP)

    def _due(self, now: float) -> bool:
        """Whether poll would give a frame now, pacing aside."""
        if self.result is not None:
            return False
        if self._head_at is None or not self._open and now - self._head_at >= self._rto():
            return True
        if self._resend or not self._first_done:
            return True
        if self._tail_at is None or now - self._tail_at >= self._tail_wait():
            return True
        return False

    def _tail_wait(self) -> float:
        """How long after TAIL it goes again: a round trip while no report showed it arrived; once
        one did, as a probe for a verdict that may have been lost, less and less often."""
        return self._rto() if not self._tail_seen else self._probe

    def next_time(self, now: float) -> float:
        """When poll() may give frames again: now when some are due (or when pacing lets them go);
        otherwise when HEAD or TAIL would be sent again, at the latest a report interval away."""
        if self.result is not None:
            return math.inf
        if self._due(now):
            return self.pacer.next_time(self._chunk_bytes, now) if self.pacer is not None else now
        t = now + REPORT_INTERVAL
        if self._head_at is not None and not self._open:
            t = min(t, self._head_at + self._rto())
        if self._tail_at is not None:
            t = min(t, self._tail_at + self._tail_wait())
        return t

    def poll(self, now: float, max_frames: int = 64) -> list[bytes]:
        """The frames to send now (at most max_frames, within the pacing rate): HEAD (again while no
        report shows the stream open), the chunks reports asked for (each at most once per round
        trip), the next new chunks, TAIL (again while no report shows it arrived)."""
        self.start(now)
        out: list[bytes] = []
        if self.result is not None:
            return out
        budget = self.pacer.allowance(now) if self.pacer is not None else math.inf
        rto = self._rto()
        if self._head_at is None or (not self._open and now - self._head_at >= rto):
            out += self._heads
            budget -= sum(map(len, self._heads))
            self._head_at = now
        while self._resend and budget > 0 and len(out) < max_frames:
            a, b = self._resend[0]
            # the chunks of the range not sent lately (the others are in flight still), found at once:
            # a range of many chunks all in flight costs one pass in C, not one Python step per chunk
            at = self._sent_at[a:b]
            due = np.flatnonzero(now - at >= rto)  # (never sent: -inf)
            k, i = b, 0
            while i < len(due) and budget > 0 and len(out) < max_frames:
                k = a + int(due[i])
                i += 1
                if self._sends[k] >= self.max_retransmits:
                    self._unreported = self.result = StreamUndelivered(self.stream_id, "retransmits", f"chunk {k} was sent "
                                                   f"{self.max_retransmits} times and never arrived")
                    self._finish(self.result, now)
                    return out
                frame = self.sender.chunk_frame(k)
                out.append(frame)
                budget -= len(frame)
                self._mark(k, now)
                self.retransmitted += 1
                k += 1
            if i >= len(due):
                self._queued.discard(self._resend.popleft())
            else:
                self._queued.discard(self._resend[0])
                self._resend[0] = (k, b)
                self._queued.add((k, b))
        if self._new is None and not self._first_done:
            self._new = self.sender.chunks_tagged()  # (data chunks, and parity after each block with fec)
        while not self._first_done and budget > 0 and len(out) < max_frames:
            try:
                frame, data = next(self._new)
            except StopIteration:
                self._first_done = True
                break
            out.append(frame)
            budget -= len(frame)
            if data:
                self._mark(self._next_new, now)
                self._next_new += 1
        if self._first_done and budget > 0 and len(out) < max_frames:
            if self._tail_at is None or now - self._tail_at >= self._tail_wait():
                if self._tail_seen:  # (a probe: the receiver answers a TAIL of a finished stream with its verdict)
                    self._probe = min(2 * self._probe, self.feedback_timeout / handshake.FEEDBACK_PROBES)
                if self._tail is None:
                    self._tail = self.sender.tail()  # (the first pass fed the stream hash)
                out.append(self._tail)
                self._tail_at = now
        n = sum(map(len, out))
        self.frames_sent += len(out)
        self.bytes_sent += n
        self._sent_since += n
        if self.pacer is not None and n:
            self.pacer.sent(n, now)
        return out

    def _mark(self, k: int, now: float) -> None:
        self._sent_at[k] = now
        self._sends[k] += 1

    # -------------------------------------------------------------- feedback

    def on_report(self, doc: dict, now: float) -> list:
        """A report from the receiver (validated against the schema): the stream is open, these
        chunks are missing, this much arrived."""
        if self.result is not None:
            return []
        self.start(now)
        self._heard = now
        self._open = True
        self.reports += 1
        if doc.get("held"):
            self.held = True
            return []
        if doc["tail"] and not self._tail_seen:
            self._tail_seen = True
            self._probe = max(2 * REPORT_INTERVAL, self._rto())
        highest = min(doc["highest"], self.chunks)
        rtt = None
        if highest and self._sent_at[highest - 1] > -math.inf:
            sample = now - self._sent_at[highest - 1] - doc["age_ms"] / 1000
            if 0 <= sample < self.feedback_timeout:
                rtt = sample
                self.srtt = sample if self.srtt is None else 0.875 * self.srtt + 0.125 * sample
                self.min_rtt = sample if self.min_rtt is None else min(self.min_rtt, sample)
        delivered = max(0, doc["bytes"] - self._last_bytes)
        lost = max(0, doc["skipped"] - self._last_skipped) * self._chunk_bytes
        if self.pacer is not None and now - self._paced_at >= REPORT_INTERVAL / 2:
            # (one sample per report interval: a burst of reports listing more holes is one report to the pacer)
            self.pacer.feedback(now, sent_bytes=self._sent_since, delivered_bytes=delivered, lost_bytes=lost, rtt=rtt)
            self._paced_at = now
            self._sent_since = 0
            self._last_bytes = max(self._last_bytes, doc["bytes"])
            self._last_skipped = max(self._last_skipped, doc["skipped"])
        missing = doc["missing"]
        queued = self._queued
        for i in range(0, len(missing), 2):
            a, b = missing[i], min(missing[i + 1], self._next_new)  # never "resend" what was never sent
            if a < b and (a, b) not in queued:
                if len(queued) >= MAX_RESEND_RANGES:  # (bounded: the receiver lists the others again)
                    break
                self._resend.append((a, b))
                queued.add((a, b))
        return []

    def on_verdict(self, doc: dict, now: float) -> list:
        """The receiver's verdict: delivered (when its hash is the one this side sent) or not."""
        if self.result is not None:
            return []
        if doc["ok"]:
            got = doc.get("xxh3_64")
            # (the sources' hash, also when this Delivery did not send the frames itself: a caller that
            # iterated the StreamSender or wrote its records, e.g. TCP, whose verdict may come first)
            want = self.sender.digest()[0]
            if got == f"{want:016x}" and doc.get("bytes", self.total_bytes) == self.total_bytes:
                event = StreamDelivered(self.stream_id, want, self.total_bytes,
                                        now - self.started if self.started is not None else 0.0,
                                        self.retransmitted, self.pacer.stats if self.pacer is not None else None)
            else:
                event = StreamUndelivered(self.stream_id, "hash_mismatch", f"the receiver verified xxh3_64 {got} of "
                                          f"{doc.get('bytes')} bytes; this side sent "
                                          f"{want:016x} of "
                                          f"{self.total_bytes} bytes")
        else:
            event = StreamUndelivered(self.stream_id, doc.get("reason") or "failed", doc.get("detail") or "",
                                      remote=True)
        return self._finish(event, now)

    def tick(self, now: float) -> list:
        """Gives the stream up when the receiver has been silent for feedback_timeout; reports an end
        that poll() came to (max_retransmits)."""
        if self._unreported is not None:
            event, self._unreported = self._unreported, None
            return [event]
        if self.result is not None:
            return []
        if self._heard is None:  # (a caller that sends the frames itself: the deadline counts from here)
            self.start(now)
            return []
        if now - self._heard > self.feedback_timeout:
            what = "a verdict" if self._first_done else "a report"
            return self._finish(StreamUndelivered(self.stream_id, "no_feedback", f"nothing from the receiver for "
                                                  f"{now - self._heard:.1f} s (feedback_timeout {self.feedback_timeout} "
                                                  f"s) while waiting for {what}: it is gone or unreachable"), now)
        return []

    def close(self, detail: str, now: float = 0.0) -> list:
        """The connection is gone: the stream cannot be delivered."""
        if self.result is not None:
            return []
        return self._finish(StreamUndelivered(self.stream_id, "closed", detail), now)

    def _finish(self, event, now: float) -> list:
        self.result = event
        self.sender = None  # the source tensors are the caller's again
        self._new = None
        self._resend.clear()
        self._queued.clear()
        return [event]
