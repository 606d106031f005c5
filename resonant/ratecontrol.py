"""Interim fixed-rate pacer (replaced by the adaptive controller of the rate-control branch)."""

from __future__ import annotations


class RateController:
    def __init__(self, cap: float, *, start: float | None = None, floor: float = 1e6, burst_bytes: int = 256 << 10):
        self.cap = float(cap)
        self.rate = float(start or cap)
        self.burst = burst_bytes
        self._tokens = float(burst_bytes)
        self._at: float | None = None

    def _fill(self, now: float) -> None:
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def allowance(self, now: float) -> int:
        self._fill(now)
        return int(self._tokens)

    def sent(self, nbytes: int, now: float) -> None:
        self._fill(now)
        self._tokens -= nbytes

    def next_time(self, nbytes: int, now: float) -> float:
        self._fill(now)
        need = min(nbytes, self.burst) - self._tokens
        return now if need <= 0 else now + need / self.rate

    def feedback(self, now, *, sent_bytes, delivered_bytes, lost_bytes, rtt) -> None:
        pass

    @property
    def stats(self) -> dict:
        return {"rate": self.rate}
