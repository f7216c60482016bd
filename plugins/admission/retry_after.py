"""The Retry-After policy: one pure function (no I/O), called for every shed request."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryAfterBand:
    min_s: float = 1.0
    """Never ask a client to come back sooner (a retry storm costs more than it saves)."""
    max_s: float = 30.0
    """Never longer: beyond this the client had better fail over or give up."""
    unknown_drain_s: float = 5.0
    """When no drain rate is measured yet (cold fleet, or nothing completed lately)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.min_s <= self.max_s:
            raise ValueError(f"need 0 < min_s <= max_s, got {self.min_s}, {self.max_s}")
        if not self.min_s <= self.unknown_drain_s <= self.max_s:
            raise ValueError("unknown_drain_s must lie in [min_s, max_s]")


def retry_after_s(work_ahead: float, drain_rps: float | None, band: RetryAfterBand) -> float:
    """Seconds until a slot is likely free for a request that was turned away.

    ``work_ahead`` = requests that must finish before this one could be admitted (the queue
    ahead of it plus the outstanding work above capacity, plus itself); ``drain_rps`` = the
    model's measured completions per second (EWMA). The estimate ``work_ahead / drain_rps`` is
    clamped to ``[band.min_s, band.max_s]``; with no usable drain rate, ``band.unknown_drain_s``.
    """
    if not math.isfinite(work_ahead) or work_ahead < 0:
        raise ValueError(f"work_ahead must be finite and >= 0, got {work_ahead}")
    if drain_rps is None or not math.isfinite(drain_rps) or drain_rps <= 0.0:
        return band.unknown_drain_s
    return min(band.max_s, max(band.min_s, work_ahead / drain_rps))


def retry_after_headers(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (rounded up, as RFC 9110 wants an integer) and the
    precise ``retry-after-ms`` that the OpenAI SDKs prefer."""
    return {
        "Retry-After": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, round(seconds * 1000))),
    }


@dataclass
class RetryPromises:
    """Clients told to come back that have not come back yet, by estimate: each Retry-After
    given adds one, and they return at the rate the queue drains (``rate_rps``).

    A burst turns many clients away at once. Told the same Retry-After, they would all return
    together and find room for only as many as drained meanwhile; counted here, the k-th is
    told to come back behind the k - 1 before it (``retry_after_s(work_ahead + pending)``), so
    they return spread at the rate slots free up. Without a rate nothing is counted.
    """

    count: float = 0.0
    at: float = 0.0

    def pending(self, now: float, rate_rps: float | None) -> float:
        if rate_rps is None or not math.isfinite(rate_rps) or rate_rps <= 0.0:
            return 0.0
        return max(0.0, self.count - rate_rps * max(0.0, now - self.at))

    def add(self, now: float, rate_rps: float | None) -> None:
        self.count = self.pending(now, rate_rps) + 1.0
        self.at = now
