"""What the simulator simulates: the workload, the fleet, and one replica's engine.

Times are seconds (floats) from the start of the run; the policy's ``now_ms`` / ``ts_ms`` are
``int(t * 1000)``. A request's size is its output length in tokens (a float: "work"); at speed 1
one token takes ``decode_ms_per_token``, and the replica's speed divides every cost, as in the
CPU stand-in (``triton_models/README.md``).

Two engine models:

* ``FifoReplica`` (``batch_slowdown == 0``, the default): ``C`` batch slots, a FIFO waiting queue,
  and a request's service time independent of how many slots are busy (in-flight batching at a
  fixed step time). Then the replica is a FIFO ``C``-server queue and a request's start and finish
  are known the moment it is assigned (the slot-free-time heap, Kiefer-Wolfowitz), which makes
  the simulation exact and cheap; ``active = min(n, C)``, ``waiting = n - active``.
* ``BatchReplica`` (``batch_slowdown > 0``): the stand-in's step time
  ``decode_ms * (1 + batch_slowdown * (active - 1)) / speed``, shared by every sequence in the
  batch, so a start or an end changes everyone's pace; kept as a per-replica iteration clock
  and one rescheduled wake-up event per replica.

Simplifications (documented in the README): no step granularity (a request joins the batch at
once, not at the next step boundary); prefill is a per-request cost (``BatchReplica``: extra
tokens of that request) rather than an extra cost of the admitting step; no network or proxy
time; replicas never fail.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

LengthDist = Literal["fixed", "exponential", "lognormal"]


@dataclass(frozen=True)
class Workload:
    """Request sizes: the mean service time at speed 1 and how lengths vary around it."""

    service_s: float = 0.5
    """Mean decode time of one request at speed 1 (prefill excluded)."""
    decode_ms_per_token: float = 20.0
    """One engine iteration (one token of every sequence in the batch) at speed 1."""
    prefill_ms: float = 0.0
    """Per-request prefill at speed 1, before the first token."""
    lengths: LengthDist = "fixed"
    sigma: float = 1.0
    """Shape of the lognormal lengths (``sigma`` of the underlying normal)."""

    def __post_init__(self) -> None:
        if not (self.service_s > 0 and self.decode_ms_per_token > 0 and self.prefill_ms >= 0):
            raise ValueError("service_s and decode_ms_per_token must be > 0, prefill_ms >= 0")
        if not self.sigma > 0:
            raise ValueError("sigma must be > 0")

    @property
    def mean_tokens(self) -> float:
        return self.service_s * 1000.0 / self.decode_ms_per_token

    def mean_total_s(self) -> float:
        """Mean service time (prefill + decode) of one request at speed 1."""
        return self.service_s + self.prefill_ms / 1000.0

    def draw(self, rng: random.Random, n: int) -> list[float]:
        """``n`` request lengths in tokens (floats), mean ``mean_tokens``."""
        mean = self.mean_tokens
        if self.lengths == "fixed":
            return [mean] * n
        if self.lengths == "exponential":
            rate = 1.0 / mean
            return [rng.expovariate(rate) for _ in range(n)]
        mu = math.log(mean) - self.sigma * self.sigma / 2.0
        return [rng.lognormvariate(mu, self.sigma) for _ in range(n)]


@dataclass(frozen=True)
class Fleet:
    """Replicas: one speed and one slot count each; ids ``r000``, ``r001``, ..."""

    speeds: tuple[float, ...]
    slots: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.speeds or len(self.speeds) != len(self.slots):
            raise ValueError("one speed and one slot count per replica, at least one replica")
        if any(not (math.isfinite(s) and s > 0) for s in self.speeds):
            raise ValueError("speeds must be finite and > 0")
        if any(c < 1 for c in self.slots):
            raise ValueError("slots must be >= 1")

    def __len__(self) -> int:
        return len(self.speeds)

    @property
    def ids(self) -> list[str]:
        width = max(3, len(str(len(self.speeds) - 1)))
        return [f"r{i:0{width}d}" for i in range(len(self.speeds))]

    def capacity_rps(self, workload: Workload) -> float:
        """Completions per second with every slot busy: sum of C_i * speed_i / mean service."""
        per_slot = 1.0 / workload.mean_total_s()
        return sum(c * s for c, s in zip(self.slots, self.speeds, strict=True)) * per_slot


@dataclass
class FifoReplica:
    """``C`` slots + FIFO queue, service time fixed at admission (no batch slowdown)."""

    index: int
    speed: float
    slots: int
    step_s: float
    """Seconds per engine iteration (one token) at this replica's speed."""
    prefill_s: float
    queue_limit: int | None = None
    free: list[float] = field(default_factory=list)
    """Heap of the times each slot is free for the next request in FIFO order."""
    n: int = 0
    """Requests assigned and not finished (active + waiting)."""
    busy_since: float = 0.0
    busy_total: float = 0.0

    def __post_init__(self) -> None:
        self.free = [0.0] * self.slots

    def service_s(self, tokens: float) -> float:
        return self.prefill_s + tokens * self.step_s

    def admit(self, now: float, tokens: float) -> tuple[float, float, float] | None:
        """Assign a request: ``(start, first token, finish)``, or None when the queue is full."""
        if self.queue_limit is not None and self.n - self.slots >= self.queue_limit:
            return None
        slot_free = heapq.heappop(self.free)
        start = slot_free if slot_free > now else now
        finish = start + self.prefill_s + tokens * self.step_s
        heapq.heappush(self.free, finish)
        if self.n == 0:
            self.busy_since = now
        self.n += 1
        first = start + self.prefill_s + min(tokens, 1.0) * self.step_s
        return start, first, finish

    def release(self, now: float) -> None:
        self.n -= 1
        if self.n == 0:
            self.busy_total += now - self.busy_since

    def earliest_start(self, now: float) -> float:
        """When a request assigned now would start (FIFO behind everything already here)."""
        slot_free = self.free[0]
        return slot_free if slot_free > now else now

    @property
    def active(self) -> int:
        return min(self.n, self.slots)

    def iterations(self, now: float) -> float:
        """The engine's cumulative iteration counter: it iterates whenever a sequence runs."""
        busy = self.busy_total + (now - self.busy_since if self.n > 0 else 0.0)
        return busy / self.step_s


@dataclass
class BatchReplica:
    """The stand-in's shared step time: ``step(a) = step_s * (1 + slowdown * (a - 1))``.

    Every active sequence advances one token per iteration, so progress is one clock ``V``
    (iterations done) per replica; a sequence started at ``V0`` with ``k`` tokens ends when
    ``V = V0 + k``. Prefill counts as ``prefill_s / step_s`` extra tokens of that request.
    """

    index: int
    speed: float
    slots: int
    step_s: float
    prefill_s: float
    slowdown: float
    queue_limit: int | None = None
    clock: float = 0.0
    clock_t: float = 0.0
    running: list[tuple[float, int]] = field(default_factory=list)
    """Heap of (end clock, request index) of the active sequences."""
    queue: deque[tuple[int, float]] = field(default_factory=deque)
    """Waiting (request index, tokens), FIFO."""
    version: int = 0
    n: int = 0

    def step(self, active: int) -> float:
        return self.step_s * (1.0 + self.slowdown * (max(active, 1) - 1))

    def _advance(self, now: float) -> None:
        if self.running and now > self.clock_t:
            self.clock += (now - self.clock_t) / self.step(len(self.running))
        self.clock_t = now

    def _start(
        self, now: float, req: int, tokens: float, started: list[tuple[int, float, float]]
    ) -> None:
        work = tokens + self.prefill_s / self.step_s
        heapq.heappush(self.running, (self.clock + work, req))
        first = min(work, 1.0 + self.prefill_s / self.step_s)
        started.append((req, now, now + first * self.step(len(self.running))))

    def wake_time(self, now: float) -> float | None:
        """When the next sequence ends at the current pace (None when idle)."""
        if not self.running:
            return None
        remaining = max(0.0, self.running[0][0] - self.clock)
        return now + remaining * self.step(len(self.running))

    def admit(
        self, now: float, req: int, tokens: float, started: list[tuple[int, float, float]]
    ) -> bool:
        """Assign request ``req``; started sequences are appended as (req, start, first token)."""
        if self.queue_limit is not None and self.n - self.slots >= self.queue_limit:
            return False
        self._advance(now)
        self.n += 1
        if len(self.running) < self.slots:
            self._start(now, req, tokens, started)
        else:
            self.queue.append((req, tokens))
        self.version += 1
        return True

    def wake(self, now: float, started: list[tuple[int, float, float]]) -> list[int]:
        """The sequences that ended by ``now`` (their slots go to the queue's head)."""
        self._advance(now)
        done: list[int] = []
        eps = 1e-9 * max(1.0, self.clock)
        while self.running and self.running[0][0] <= self.clock + eps:
            done.append(heapq.heappop(self.running)[1])
        self.n -= len(done)
        while self.queue and len(self.running) < self.slots:
            req, tokens = self.queue.popleft()
            self._start(now, req, tokens, started)
        self.version += 1
        return done

    @property
    def active(self) -> int:
        return len(self.running)

    def iterations(self, now: float) -> float:
        self._advance(now)
        return self.clock

    def expected_s(self, tokens: float) -> float:
        """Service time of a request of ``tokens`` at a full batch (for the oracle's estimate)."""
        return (self.prefill_s + tokens * self.step_s) * (1.0 + self.slowdown * (self.slots - 1))
