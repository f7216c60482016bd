"""The executor's hidden queue, estimated from Triton's request counters.

A TensorRT-LLM executor holds at most ``max`` active requests; the rest wait in its queue, and
no metric exports that queue's depth (``tests/fixtures/upstream/``). Triton's counters do know
how many requests went in and how many came out: the ``preprocessing`` step's successes count
requests handed to the engine, the ensemble's successes and failures count requests that ended.
So ``arrivals - completions - active`` is the queue, plus the few requests between steps, plus a
drift (a request that failed in preprocessing counts as ended but never as arrived).

The drift is measured whenever the queue must be empty, that is while the engine has room
(``active < max``; the executor admits from its queue as soon as a slot frees): the floor is the
median of ``arrivals - completions - active`` seen then over the last ``window_s``. The median,
not the lowest: the counters move at once while the engine's gauges follow its iteration stats,
so a scrape can count a request as ended while it is still active (one low value), or as
arrived before it is active (one high value); such a transient must not move the floor for a
whole window. While the engine is full, the estimate is what exceeds that floor. This sees
requests that reached the replica without passing through any triage proxy, which the proxies'
reservations cannot.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from statistics import median_low


@dataclass
class HiddenQueue:
    window_s: float = 30.0
    floors: deque[tuple[float, float]] = field(default_factory=deque)
    """(t, arrivals - completions - active) while the engine had room, newest last."""
    floor: float = 0.0
    previous: tuple[float, float] | None = None

    def estimate(
        self, t: float, arrivals: float, completions: float, active: int, max_active: int
    ) -> int:
        """Requests waiting in the executor's queue behind ``max`` (0 while it has room)."""
        if self.previous is not None and (
            arrivals < self.previous[0] or completions < self.previous[1]
        ):
            self.floors.clear()  # the server restarted: its counters began again
            self.floor = 0.0
        self.previous = (arrivals, completions)
        raw = arrivals - completions - active
        if active < max_active:
            self.floors.append((t, raw))
            while len(self.floors) > 1 and self.floors[0][0] <= t - self.window_s:
                self.floors.popleft()
            self.floor = median_low(value for _, value in self.floors)
            return 0
        return max(0, round(raw - self.floor))
