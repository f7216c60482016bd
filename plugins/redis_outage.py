"""Fail-open bookkeeping while Redis is unreachable, for each plugin that falls back.

Each plugin keeps serving by its own per-process rule while Redis is down (routing: its own
in-flight counts; admission: a bound on this process's outstanding requests), logs the outage
once per interval under its own name, and tries Redis again after ``retry_ms``: the fleet-wide
behaviour resumes by itself when Redis is back.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class RedisOutage:
    """Whether to try Redis now, how many decisions used the fallback, rate-limited logs.

    ``owner`` names the plugin in the logs ("routing", "admission"), ``fallback`` what it does
    meanwhile ("routing by per-process in-flight counts"), ``unit`` what it counts ("picks")."""

    def __init__(
        self,
        retry_ms: int,
        log_interval_s: float,
        *,
        owner: str,
        fallback: str,
        unit: str,
    ) -> None:
        self._retry_s = retry_ms / 1000.0
        self._log_interval_s = log_interval_s
        self.owner, self.fallback, self.unit = owner, fallback, unit
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._last_log = -float("inf")
        self.fallbacks = 0
        """Decisions taken by the fallback since Redis was last reachable."""

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
                "%s: redis unreachable during %s (%s: %s); %s (%d such %s so far), retrying "
                "redis every %.1f s",
                self.owner,
                what,
                type(exc).__name__,
                exc,
                self.fallback,
                self.fallbacks,
                self.unit,
                self._retry_s,
            )

    def succeeded(self, now: float | None = None) -> None:
        if self._down_since is not None:
            t = time.monotonic() if now is None else now
            log.warning(
                "%s: redis reachable again after %.1f s; %d %s meanwhile: %s",
                self.owner,
                t - self._down_since,
                self.fallbacks,
                self.unit,
                self.fallback,
            )
            self._down_since = None
            self.fallbacks = 0
        self._retry_at = 0.0
