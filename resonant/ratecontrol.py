"""Sans-IO pacing-rate controller for UDP V-Streams (specs/vstream_rate_control.md).

RateController paces a sender with a token bucket at `rate` bytes/s and adapts `rate` to the
receiver's reports (bytes delivered / lost since the previous report, an RTT sample):

- congestion is queueing delay above a target (LEDBAT's signal) or loss clearly above the
  running baseline of loss (the loss the path shows when we are not overrunning it: random,
  non-congestion loss is learned, not punished);
- on congestion the rate drops to just under the measured delivery rate (BBR's bottleneck
  estimate: a windowed max of delivery-rate samples), at least by BETA and at most by half;
- while there is loss to explain, the rate dips to LOW_GAIN x every LOW_PERIOD (BBR's drain
  phase): the loss seen then is a baseline sample, and a delivery rate that did not fall with
  the sending shows an overrun (a backoff);
- otherwise it probes upward: slowly near the rate of the last backoff, doubling its step each
  round beyond it (a rise of the bottleneck is found in a few rounds), never above
  PROBE_CEILING x the delivery estimate, never above `cap`.

No I/O and no clock reads: every method takes `now` (seconds, float, any monotonic origin).
Malformed report values (negative, NaN, infinite, huge, wrong type) are ignored or clamped;
the rate always stays within [floor, cap].
"""

from __future__ import annotations

import math
from collections import deque

__all__ = ["RateController"]

# --- constants (each is explained in specs/vstream_rate_control.md, "Constants") ---
DEFAULT_FLOOR = 65536.0       # bytes/s: the default floor, one maximum-size V-Frame a second
DEFAULT_BURST = 256 * 1024    # bytes: the default token bucket (4 maximum-size frames; ~1.3 ms at 200 MB/s)
BETA = 0.85                   # a backoff cuts the rate to at most BETA x rate ...
DRAIN_GAIN = 0.9              # ... and to at most DRAIN_GAIN x the delivery estimate (the queue drains at 10 %)
MAX_CUT = 0.5                 # one backoff never more than halves the rate
PROBE_CEILING = 1.25          # the rate is never raised above PROBE_CEILING x the delivery estimate (BBR's probe gain)
INC_MIN = 0.01                # increase per round below the rate of the last backoff
INC_MAX = 0.25                # increase per round at most (after doubling each round beyond that rate)
QDELAY_MIN = 0.005            # s: the queueing-delay target is QDELAY_FRAC x min RTT within [QDELAY_MIN, QDELAY_MAX]
QDELAY_MAX = 0.050
QDELAY_FRAC = 0.5
LOSS_MULT = 1.5               # loss is congestion above LOSS_MULT x baseline + LOSS_MARGIN
LOSS_MARGIN = 0.03
LOSS_BASE_MAX = 0.25          # the baseline never exceeds this: more loss than that is always congestion
LOW_GAIN = 0.75               # while there is loss to explain, every LOW_PERIOD s the rate dips to LOW_GAIN x rate
LOW_PERIOD = 2.0              # for max(LOW_TIME, 2 rounds) (BBR's drain phase); the loss seen one lag later
LOW_TIME = 0.1                # (and after each loss backoff) is a baseline sample: loss that does not fall
LOW_TIME_MAX = 1.0            # when we send less is not ours. A sample needs SAMPLE_MIN_BYTES (32 frames);
SAMPLE_MIN_BYTES = 2 << 20    # at low rates the phase lasts longer (up to LOW_TIME_MAX) and comes less often
FIRST_LOW = 0.25              # s: the first low phase comes this long after loss is first seen
LOSS_SEEN = 0.005             # smoothed loss above this is "loss to explain"
DIP_MARGIN = 0.1              # a dip that cut the sending to LOW_GAIN x but the delivery by less (above
DIP_SENT_MARGIN = 0.05        # LOW_GAIN + DIP_MARGIN) shows we were overrunning the path: back off
LOSS_TAU = 0.25               # s: time constant of the smoothed loss fraction
BASE_SAMPLES = 5              # the loss baseline is the median of the last BASE_SAMPLES experiment samples
BW_WINDOW_ROUNDS = 4          # the delivery estimate is the max of the samples of the last rounds
MIN_RTT_WINDOW = 10.0         # s: min RTT is the minimum over this window (BBR's value)
ROUND_MIN = 0.005             # s: a round is max(srtt, report interval, ROUND_MIN)
MAX_DT = 1.0                  # s: a report interval counts as at most this (a gap is not credit)
APP_LIMITED = 0.5             # a report that saw less than this x rate x interval sent is app-limited: no increase
STALE_MIN = 1.0               # s: data sent and no report for max(STALE_MIN, 8 x srtt) halves the rate
MAX_RTT = 60.0                # s: RTT samples outside (0, MAX_RTT] are ignored
MAX_REPORT_BYTES = float(1 << 50)  # a report's byte counts are clamped to this


def _num(x: object) -> float:
    """A report field as a finite float >= 0 (garbage -> 0, huge -> clamped)."""
    try:
        v = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return 0.0
    if not v >= 0.0:  # negative or NaN
        return 0.0
    return min(v, MAX_REPORT_BYTES)


def _time(now: object) -> float | None:
    try:
        t = float(now)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return t if math.isfinite(t) else None


class RateController:
    """Pacing rate (bytes/s) of one sender, adapted to receiver reports; see the module doc."""

    def __init__(self, cap: float, *, start: float | None = None, floor: float | None = None,
                 burst_bytes: int = DEFAULT_BURST) -> None:
        cap = self._arg("cap", cap)
        if floor is None:
            floor = min(DEFAULT_FLOOR, cap)
        floor = self._arg("floor", floor)
        if floor > cap:
            raise ValueError(f"floor ({floor:g} B/s) must not exceed cap ({cap:g} B/s)")
        start = cap if start is None else self._arg("start", start)
        if not floor <= start <= cap:
            raise ValueError(f"start ({start:g} B/s) must be within [floor, cap] = [{floor:g}, {cap:g}] B/s")
        if isinstance(burst_bytes, bool) or not isinstance(burst_bytes, int) or burst_bytes < 1:
            raise ValueError(f"burst_bytes must be a positive int, not {burst_bytes!r}")
        self.cap = cap
        self.floor = floor
        self.burst_bytes = burst_bytes
        self.rate = start
        # token bucket
        self._tokens = float(burst_bytes)
        self._t_bucket: float | None = None
        # RTT
        self.min_rtt: float | None = None
        self._min_rtt_t = 0.0
        self.srtt: float | None = None
        self._qrtt: float | None = None    # faster EWMA of RTT, for the queueing delay
        self.qdelay = 0.0
        self._q_prev = 0.0                    # qdelay at the report before
        # reports
        self._t_report: float | None = None
        self._interval: float | None = None   # EWMA of the report interval
        self._sent_since_report = 0.0
        self._stale_mark = 0.0
        # loss
        self.loss: float | None = None        # smoothed loss fraction
        self._samples: deque[float] = deque(maxlen=BASE_SAMPLES)  # loss fractions of experiment windows
        # delivery-rate max filter: (time, sample)
        self._bw: deque[tuple[float, float]] = deque()
        # probing / backoff
        self._inc = INC_MIN
        self._w_max = 0.0                     # the rate before the last backoff
        self._next_backoff = -math.inf
        # experiments: a low phase (a dip to LOW_GAIN x rate) or a loss backoff, measured by the
        # reports that arrive in a window one lag later
        self._low_next: float | None = None   # when the next low phase may start
        self._low_end: float | None = None    # the low phase lasts until then
        self._low_base = 0.0                  # the rate to return to
        self._win: tuple[float, float] | None = None  # reports in [a, b) measure the experiment
        self._win_lost = 0.0
        self._win_total = 0.0
        self._win_delivered = 0.0
        self._win_dt = 0.0
        self._dip: tuple[float, float] | None = None  # (delivery, sending rate) before a low phase
        self._dip_sent = 0.0                  # sent while in the low phase, and over what time
        self._dip_dt = 0.0
        self._overrun: float | None = None    # a dip's verdict: the delivery rate we overran
        self._dr: float | None = None         # smoothed delivery and sending rates
        self._sr: float | None = None
        self._counts = {"reports": 0, "ignored_reports": 0, "backoffs": 0, "backoffs_delay": 0,
                        "backoffs_loss": 0, "backoffs_dip": 0, "stale_halvings": 0, "low_phases": 0}

    @staticmethod
    def _arg(name: str, v: object) -> float:
        try:
            f = float(v)  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{name} must be a number of bytes/s, not {v!r}") from None
        if isinstance(v, bool) or not (math.isfinite(f) and f > 0):
            raise ValueError(f"{name} must be a finite positive number of bytes/s, not {v!r}")
        return f

    # --- pacing (token bucket) ---

    def _refill(self, now: float) -> None:
        if self._t_bucket is None:
            self._t_bucket = now
            return
        if now > self._t_bucket:
            self._tokens = min(float(self.burst_bytes), self._tokens + (now - self._t_bucket) * self.rate)
            self._t_bucket = now
        self._check_stale(now)

    def allowance(self, now: float) -> int:
        """Bytes that may be sent at `now` (0 if the bucket is in debt)."""
        t = _time(now)
        if t is not None:
            self._refill(t)
        return max(0, int(self._tokens))

    def sent(self, nbytes: int, now: float) -> None:
        """Account `nbytes` just sent: they take tokens (the bucket may go into debt)."""
        n = _num(nbytes)
        t = _time(now)
        if t is not None:
            self._refill(t)
        # the debt is at most this send plus one bucket (a caller that ignored next_time is not
        # made to wait for ever)
        self._tokens = max(self._tokens - n, -float(self.burst_bytes) - n)
        self._sent_since_report += n

    def next_time(self, nbytes: int, now: float) -> float:
        """When `nbytes` may be sent (`now` if already); a send larger than the bucket waits for a
        full bucket and goes into debt."""
        t = _time(now)
        if t is None:
            return now
        self._refill(t)
        need = min(_num(nbytes), float(self.burst_bytes))
        if self._tokens >= need:
            return t
        return t + (need - self._tokens) / self.rate

    def _check_stale(self, now: float) -> None:
        """Data sent and no report for a long time: halve the rate once per stale period."""
        if self._t_report is None or self._sent_since_report <= 0:
            return
        stale = max(STALE_MIN, 8 * (self.srtt or 0.0))
        if now - max(self._t_report, self._stale_mark) > stale:
            self._stale_mark = now
            self.rate = max(self.floor, self.rate * 0.5)
            self._low_base = max(self.floor, self._low_base * 0.5)  # a low phase ends no higher
            self._counts["stale_halvings"] += 1

    # --- feedback ---

    def _round(self) -> float:
        return max(self.srtt or 0.0, self._interval or 0.0, ROUND_MIN)

    def _loss_base(self) -> float:
        """The loss the path shows when we are not overrunning it: the median of the experiment
        samples; before the first, the smoothed loss itself (no loss backoff yet)."""
        if self._samples:
            ss = sorted(self._samples)
            n = len(ss)
            base = 0.5 * (ss[(n - 1) // 2] + ss[n // 2])  # the median: robust to one noisy or congested sample
        else:
            base = self.loss or 0.0
        return min(base, LOSS_BASE_MAX)

    def _experiment(self, t: float, span: float, dip: bool) -> None:
        lag = (self.srtt or 0.0) + (self._interval or 0.0)
        self._win = (t + lag, t + lag + span)
        self._win_lost = self._win_total = self._win_delivered = self._win_dt = 0.0
        self._dip = (self._dr, self._sr) if dip and self._dr and self._sr else None
        self._dip_sent = self._dip_dt = 0.0

    def _on_window(self, t: float, dt: float, delivered: float, lost: float, sent: float) -> None:
        """Measure an experiment: its loss (a baseline sample) and, for a dip, its delivery."""
        if self._low_end is not None and t <= self._low_end:
            self._dip_sent += sent
            self._dip_dt += dt
        if self._win is None or t < self._win[0]:
            return
        self._win_lost += lost
        self._win_total += delivered + lost
        self._win_delivered += delivered
        self._win_dt += dt
        if t < self._win[1]:
            return
        if self._win_total >= SAMPLE_MIN_BYTES:
            self._samples.append(self._win_lost / self._win_total)
            if self._dip is not None and self._win_dt > 0 and self._dip_dt > 0:
                d_before, s_before = self._dip
                cut = self._dip_sent / self._dip_dt <= (LOW_GAIN + DIP_SENT_MARGIN) * s_before
                if cut and self._win_delivered / self._win_dt > (LOW_GAIN + DIP_MARGIN) * d_before:
                    self._overrun = d_before
        self._win = None
        self._dip = None

    def _bw_est(self) -> float:
        """The delivery rate: the max of the last rounds' samples (BBR's bottleneck estimate)."""
        return max((s for _, s in self._bw), default=0.0)

    def feedback(self, now: float, *, sent_bytes: float, delivered_bytes: float, lost_bytes: float,
                 rtt: float | None) -> None:
        """One receiver report: bytes sent, delivered (newly received, distinct) and newly reported
        lost since the previous report, and an RTT sample in seconds (or None)."""
        t = _time(now)
        if t is None or (self._t_report is not None and t < self._t_report):
            self._counts["ignored_reports"] += 1
            return
        self._counts["reports"] += 1
        sent = _num(sent_bytes)
        delivered = _num(delivered_bytes)
        lost = _num(lost_bytes)
        if self._t_report is None:
            dt = 0.0
        else:
            dt = min(t - self._t_report, MAX_DT)
            self._interval = dt if self._interval is None else 0.875 * self._interval + 0.125 * dt
        self._t_report = t
        self._stale_mark = t
        sent_local = self._sent_since_report
        self._sent_since_report = 0.0
        sent = max(sent, sent_local) if sent > 0 else sent_local

        self._on_rtt(t, rtt)
        self._on_loss(t, dt, delivered, lost)
        self._on_delivery(t, dt, delivered)
        if dt <= 0:
            return
        g = min(1.0, dt / LOSS_TAU)
        self._dr = delivered / dt if self._dr is None else self._dr + g * (delivered / dt - self._dr)
        self._sr = sent / dt if self._sr is None else self._sr + g * (sent / dt - self._sr)
        self._on_window(t, dt, delivered, lost, sent)
        self._adapt(t, dt, sent)

    def _on_rtt(self, t: float, rtt: object) -> None:
        if rtt is None:
            return
        r = _time(rtt)
        if r is None or not 0 < r <= MAX_RTT:
            return
        if self.min_rtt is None or r <= self.min_rtt or t - self._min_rtt_t > MIN_RTT_WINDOW:
            self.min_rtt = r
            self._min_rtt_t = t
        self.srtt = r if self.srtt is None else 0.875 * self.srtt + 0.125 * r
        self._qrtt = r if self._qrtt is None else 0.75 * self._qrtt + 0.25 * r
        self._q_prev = self.qdelay
        self.qdelay = max(0.0, self._qrtt - self.min_rtt)

    def _on_loss(self, t: float, dt: float, delivered: float, lost: float) -> None:
        total = delivered + lost
        if total <= 0:
            return
        frac = lost / total
        if self.loss is None:
            self.loss = frac
        else:
            g = min(1.0, dt / LOSS_TAU) if dt > 0 else 0.0
            self.loss += g * (frac - self.loss)

    def _on_delivery(self, t: float, dt: float, delivered: float) -> None:
        if dt <= 0:
            return
        span = max(dt, 0.5 * (self._interval or dt))
        self._bw.append((t, delivered / span))
        horizon = t - BW_WINDOW_ROUNDS * self._round()
        while len(self._bw) > 1 and self._bw[0][0] < horizon:
            self._bw.popleft()

    def _adapt(self, t: float, dt: float, sent: float) -> None:
        rnd = self._round()
        if self._low_end is not None:
            if t < self._low_end:
                return  # in the low phase: hold
            self.rate = min(max(self._low_base, self.floor), self.cap)
            self._low_end = None
        # an experiment lasts long enough for SAMPLE_MIN_BYTES (at most LOW_TIME_MAX)
        span = min(LOW_TIME_MAX, max(LOW_TIME, 2 * rnd, SAMPLE_MIN_BYTES / (self.rate * LOW_GAIN)))
        if self._win is None and self.loss is not None and self.loss > LOSS_SEEN:
            if self._low_next is None:
                self._low_next = t + FIRST_LOW
            elif t >= self._low_next:
                self._low_base = self.rate
                self.rate = max(self.floor, self.rate * LOW_GAIN)
                self._low_end = t + span
                self._experiment(t, span, dip=True)
                self._low_next = t + max(LOW_PERIOD, LOW_PERIOD / LOW_TIME * span)  # costs <= 1.25 %
                self._counts["low_phases"] += 1
                return
        target = min(max(QDELAY_FRAC * (self.min_rtt or 0.0), QDELAY_MIN), QDELAY_MAX)
        delay_cong = self.min_rtt is not None and self.qdelay > target
        base = self._loss_base()
        loss_cong = (self.loss is not None and self.loss > LOSS_MULT * base + LOSS_MARGIN
                     and self._win is None)  # not while an experiment is being measured
        overrun = self._overrun
        if delay_cong or loss_cong or overrun:
            if t < self._next_backoff:
                return
            if delay_cong and not loss_cong and self.qdelay < self._q_prev:
                return  # the queue is draining (after the last backoff): give it time
            bw = min(self._bw_est(), overrun) if overrun else self._bw_est()
            new = min(self.rate * BETA, bw * DRAIN_GAIN) if bw > 0 else self.rate * BETA
            new = max(new, self.rate * MAX_CUT, self.floor)
            self._w_max = self.rate
            self.rate = min(new, self.cap)
            self._inc = INC_MIN
            self._next_backoff = t + rnd + (self._interval or 0.0)
            self._counts["backoffs"] += 1
            self._counts["backoffs_delay" if delay_cong else "backoffs_loss" if loss_cong else "backoffs_dip"] += 1
            self._overrun = None
            if loss_cong and self._win is None:
                self._experiment(t, span, dip=False)  # did the loss fall? (if not, it was not ours)
            return
        if self.min_rtt is not None and self.qdelay > 0.5 * target:
            return  # some queue: hold
        if sent < APP_LIMITED * self.rate * dt:
            return  # app-limited: the reports say nothing about a higher rate
        frac = min(1.0, dt / rnd)  # one report is at most one round's step (a gap is not credit)
        if self.rate >= self._w_max:
            self._inc = min(INC_MAX, self._inc * 2.0 ** frac)
        else:
            self._inc = INC_MIN
        new = self.rate * (1.0 + self._inc * frac)
        ceiling = self._bw_est() / (1.0 - base) * PROBE_CEILING  # random loss does not hold the probe down
        if new > ceiling:
            new = max(self.rate, ceiling)
        self.rate = min(max(new, self.floor), self.cap)

    @property
    def stats(self) -> dict:
        """A snapshot: rate, cap, floor, min_rtt, srtt, qdelay, loss, loss_base, bw_est and counters."""
        return {"rate": self.rate, "cap": self.cap, "floor": self.floor, "min_rtt": self.min_rtt,
                "srtt": self.srtt, "qdelay": self.qdelay, "loss": self.loss, "loss_base": self._loss_base(),
                "bw_est": self._bw_est(), **self._counts}
