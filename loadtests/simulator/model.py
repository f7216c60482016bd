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

Shared prefixes (``Workload.groups > 0``): each request belongs to a tenant whose system prompt
(``prefix_tokens``) leads its prompt, followed by ``own_tokens`` of its own. A replica's KV cache
is an LRU of tenants' prefixes (``PrefixCache``, ``cache_prefixes`` of them); a request pays the
prefill of its own tokens, plus the prefix's when the replica did not hold it at admission (the
replica then holds it: a FIFO replica runs the requests ahead first). Prompts without a tenant
(and every request's own tokens) are never reused, and the model does not let them take cache
room.

Simplifications (documented in the README): no step granularity (a request joins the batch at
once, not at the next step boundary); prefill is a per-request cost (``BatchReplica``: extra
tokens of that request) rather than an extra cost of the admitting step; no network or proxy
time; replicas never fail.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import OrderedDict, deque
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
    groups: int = 0
    """Tenants sharing a system prompt (0: no shared prefixes)."""
    hot_share: float = 0.0
    """Share of the requests from tenant 0 (the rest spread evenly; 0: all even)."""
    prefix_tokens: int = 0
    """Tokens of each tenant's system prompt."""
    own_tokens: int = 0
    """Prompt tokens of each request's own (never cached)."""
    prefill_ms_per_token: float = 0.0
    """Prefill time per uncached prompt token at speed 1 (on top of ``prefill_ms``)."""

    def __post_init__(self) -> None:
        if not (self.service_s > 0 and self.decode_ms_per_token > 0 and self.prefill_ms >= 0):
            raise ValueError("service_s and decode_ms_per_token must be > 0, prefill_ms >= 0")
        if not self.sigma > 0:
            raise ValueError("sigma must be > 0")
        if self.groups < 0 or self.prefix_tokens < 0 or self.own_tokens < 0:
            raise ValueError("groups, prefix_tokens and own_tokens must be >= 0")
        if not 0.0 <= self.hot_share < 1.0 or self.prefill_ms_per_token < 0:
            raise ValueError("hot_share must be in [0, 1), prefill_ms_per_token >= 0")

    @property
    def prompt_tokens(self) -> int:
        """Every request's prompt length (its tenant's prefix + its own tokens)."""
        return (self.prefix_tokens if self.groups else 0) + self.own_tokens

    def prefill_s(self, uncached_tokens: float) -> float:
        """Prefill of a request at speed 1 with ``uncached_tokens`` of its prompt to compute."""
        return (self.prefill_ms + self.prefill_ms_per_token * uncached_tokens) / 1000.0

    def uncached_tokens(self, prefix_cached: bool) -> int:
        return self.prompt_tokens - (self.prefix_tokens if prefix_cached else 0)

    def draw_groups(self, rng: random.Random, n: int) -> list[int]:
        """``n`` requests' tenants (-1: none), tenant 0 with ``hot_share`` of them if set."""
        if self.groups == 0:
            return [-1] * n
        out = []
        for _ in range(n):
            if self.hot_share > 0.0 and rng.random() < self.hot_share:
                out.append(0)
            else:
                out.append(rng.randrange(self.groups))
        return out

    @property
    def mean_tokens(self) -> float:
        return self.service_s * 1000.0 / self.decode_ms_per_token

    def mean_total_s(self) -> float:
        """Mean service time (prefill + decode) of one request at speed 1, every prefix
        cached (a fleet's capacity when affinity holds: the figure loads are relative to)."""
        return self.service_s + self.prefill_s(self.uncached_tokens(prefix_cached=True))

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


class PrefixCache:
    """The tenants' prefixes a replica's KV cache holds: an LRU of ``capacity`` of them (0:
    holds none). ``use`` answers whether it held the prefix and makes it the newest."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, group: int) -> bool:
        return group in self.held

    def use(self, group: int) -> bool:
        if group < 0 or self.capacity == 0:
            return False
        if group in self.held:
            self.held.move_to_end(group)
            return True
        self.held[group] = None
        if len(self.held) > self.capacity:
            self.held.popitem(last=False)
        return False


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
    cache: PrefixCache = field(default_factory=lambda: PrefixCache(0))
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

    def admit(
        self, now: float, tokens: float, prefill_s: float | None = None
    ) -> tuple[float, float, float] | None:
        """Assign a request: ``(start, first token, finish)``, or None when the queue is full.
        ``prefill_s``: its prefill here (default: the replica's per-request ``prefill_s``)."""
        if self.queue_limit is not None and self.n - self.slots >= self.queue_limit:
            return None
        prefill = self.prefill_s if prefill_s is None else prefill_s
        slot_free = heapq.heappop(self.free)
        start = slot_free if slot_free > now else now
        finish = start + prefill + tokens * self.step_s
        heapq.heappush(self.free, finish)
        if self.n == 0:
            self.busy_since = now
        self.n += 1
        first = start + prefill + min(tokens, 1.0) * self.step_s
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
    cache: PrefixCache = field(default_factory=lambda: PrefixCache(0))
    clock: float = 0.0
    clock_t: float = 0.0
    running: list[tuple[float, int]] = field(default_factory=list)
    """Heap of (end clock, request index) of the active sequences."""
    queue: deque[tuple[int, float, float]] = field(default_factory=deque)
    """Waiting (request index, tokens, prefill s), FIFO."""
    version: int = 0
    n: int = 0

    def step(self, active: int) -> float:
        return self.step_s * (1.0 + self.slowdown * (max(active, 1) - 1))

    def _advance(self, now: float) -> None:
        if self.running and now > self.clock_t:
            self.clock += (now - self.clock_t) / self.step(len(self.running))
        self.clock_t = now

    def _start(
        self,
        now: float,
        req: int,
        tokens: float,
        prefill_s: float,
        started: list[tuple[int, float, float]],
    ) -> None:
        work = tokens + prefill_s / self.step_s
        heapq.heappush(self.running, (self.clock + work, req))
        first = min(work, 1.0 + prefill_s / self.step_s)
        started.append((req, now, now + first * self.step(len(self.running))))

    def wake_time(self, now: float) -> float | None:
        """When the next sequence ends at the current pace (None when idle)."""
        if not self.running:
            return None
        remaining = max(0.0, self.running[0][0] - self.clock)
        return now + remaining * self.step(len(self.running))

    def admit(
        self,
        now: float,
        req: int,
        tokens: float,
        started: list[tuple[int, float, float]],
        prefill_s: float | None = None,
    ) -> bool:
        """Assign request ``req``; started sequences are appended as (req, start, first token).
        ``prefill_s``: its prefill here (default: the replica's per-request ``prefill_s``)."""
        if self.queue_limit is not None and self.n - self.slots >= self.queue_limit:
            return False
        prefill = self.prefill_s if prefill_s is None else prefill_s
        self._advance(now)
        self.n += 1
        if len(self.running) < self.slots:
            self._start(now, req, tokens, prefill, started)
        else:
            self.queue.append((req, tokens, prefill))
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
            req, tokens, prefill = self.queue.popleft()
            self._start(now, req, tokens, prefill, started)
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
