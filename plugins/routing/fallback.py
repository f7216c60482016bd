"""Fail-open when Redis is unreachable: per-process in-flight counts and a retry window.

While Redis is down each proxy process keeps routing with its own counts of the requests it has
in flight (the policy sees every replica as "unknown", so it spreads by those counts), logs the
outage once per interval, and tries Redis again after ``retry_ms``: routing by the fleet's real
load resumes by itself when Redis is back.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

log = logging.getLogger(__name__)


class RedisOutage:
    """Tracks Redis failures: whether to try Redis now, and rate-limited logging."""

    def __init__(self, retry_ms: int, log_interval_s: float) -> None:
        self._retry_s = retry_ms / 1000.0
        self._log_interval_s = log_interval_s
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._last_log = -float("inf")
        self.fallback_picks = 0

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def should_try(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) >= self._retry_at

    def failed(self, exc: BaseException, what: str, now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        if self._down_since is None:
            self._down_since = t
        self._retry_at = t + self._retry_s
        if t - self._last_log >= self._log_interval_s:
            self._last_log = t
            log.warning(
                "routing: redis unreachable during %s (%s: %s); routing by per-process "
                "in-flight counts (%d such picks so far), retrying redis every %.1f s",
                what,
                type(exc).__name__,
                exc,
                self.fallback_picks,
                self._retry_s,
            )

    def succeeded(self, now: float | None = None) -> None:
        if self._down_since is not None:
            t = time.monotonic() if now is None else now
            log.warning(
                "routing: redis reachable again after %.1f s; %d picks used per-process counts",
                t - self._down_since,
                self.fallback_picks,
            )
            self._down_since = None
            self.fallback_picks = 0
        self._retry_at = 0.0


class LocalCounts:
    """In-flight requests this process sent per replica while Redis was down."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def get(self, replica_id: str) -> int:
        return self._counts[replica_id]

    def take(self, replica_id: str) -> None:
        self._counts[replica_id] += 1

    def give_back(self, replica_id: str) -> None:
        if self._counts[replica_id] > 0:
            self._counts[replica_id] -= 1
