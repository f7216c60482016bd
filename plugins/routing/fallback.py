"""Routing's fail-open when Redis is unreachable: per-process in-flight counts.

While Redis is down each proxy process keeps routing with its own counts of the requests it has
in flight (the policy sees every replica as "unknown", so it spreads by those counts); the
outage itself (retry window, logs) is ``plugins/redis_outage.py``'s ``RedisOutage``, and routing
by the fleet's real load resumes by itself when Redis is back.
"""

from __future__ import annotations

from collections import Counter


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
