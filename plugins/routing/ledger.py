"""Which reservations this proxy process holds, per request, until the request ends.

LiteLLM tells us a request ended through several hooks (per attempt: success or failure; per
request: stream end, failure, client disconnect), some of which may fire for the same attempt.
The ledger makes each reservation released exactly once by this process: ``take_one`` hands out
one attempt's reservation, ``take_all`` whatever the request still holds; a second hook for the
same attempt finds nothing left. While an entry is in the ledger its lease in Redis is renewed
(``leases.py``): the ledger is what this process holds. Entries older than the longest hold
(``max_hold_ms``) are dropped (taken for a lost release: a request whose end is never reported
cannot grow the ledger, nor hold a reservation in Redis, forever).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Held:
    replica_id: str
    reservation_id: str
    local: bool
    """Taken from the per-process fallback counts (Redis was down), not from Redis."""
    taken_at: float = field(default_factory=time.monotonic)


class ReservationLedger:
    def __init__(self, max_age_s: float) -> None:
        self._max_age_s = max_age_s
        self._by_call: dict[str, list[Held]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_call.values())

    def add(self, call_id: str, held: Held) -> None:
        self._by_call.setdefault(call_id, []).append(held)

    def take_one(self, call_id: str, replica_id: str | None) -> Held | None:
        """The latest reservation of ``call_id`` on ``replica_id`` (any replica if None)."""
        entries = self._by_call.get(call_id)
        if not entries:
            return None
        for index in range(len(entries) - 1, -1, -1):
            if replica_id is None or entries[index].replica_id == replica_id:
                held = entries.pop(index)
                if not entries:
                    del self._by_call[call_id]
                return held
        return None

    def take_all(self, call_id: str) -> list[Held]:
        return self._by_call.pop(call_id, [])

    def in_redis(self) -> dict[str, list[str]]:
        """Replica id -> the ids of the reservations held in Redis (not the local ones)."""
        out: dict[str, list[str]] = {}
        for entries in self._by_call.values():
            for held in entries:
                if not held.local:
                    out.setdefault(held.replica_id, []).append(held.reservation_id)
        return out

    def holds(self, replica_id: str, reservation_id: str) -> bool:
        """Whether the reservation ``reservation_id`` on ``replica_id`` is still held."""
        return any(
            h.reservation_id == reservation_id and h.replica_id == replica_id
            for entries in self._by_call.values()
            for h in entries
        )

    def expire(self, now: float | None = None) -> list[Held]:
        """Drop and return entries older than the longest hold."""
        limit = (time.monotonic() if now is None else now) - self._max_age_s
        dropped: list[Held] = []
        for call_id in list(self._by_call):
            entries = self._by_call[call_id]
            keep = [h for h in entries if h.taken_at >= limit]
            dropped.extend(h for h in entries if h.taken_at < limit)
            if keep:
                self._by_call[call_id] = keep
            else:
                del self._by_call[call_id]
        return dropped
