"""Routing policies, from the worst informed to the oracle.

* ``random``: uniform, no information (LiteLLM ``simple-shuffle`` with equal weights).
* ``round-robin``: per proxy, from a random offset.
* ``least-busy``: LiteLLM's ``least_busy.py`` without a shared cache: each proxy counts only
  the requests **it** sent per replica and takes the fewest; ties go to the first in the
  deployment list (``min`` over the list), as LiteLLM does.
* ``least-busy-random``: the same counts, ties at random.
* ``least-busy-redis``: LiteLLM's ``least-busy`` with Redis in ``router_settings``: the counts
  are shared by all proxies (fleet-wide, instant), ties to the first in the list.
* ``best-of-two``: two replicas at random, the one with fewer live fleet-wide in-flight
  requests (ties at random).
* ``jsq``: the fewest live fleet-wide in-flight (= active + waiting, exact and instant; ties at
  random); no speed.
* ``triage``: the published snapshots (polled, stale), the live fleet-wide reservations with
  their sizes and the proxies' shared prefix index, fed to **the real**
  ``plugins.routing.policy.choose`` / ``score``.
* ``triage-no-affinity``: ``triage`` with the prefix index off (every prompt uncached to it).
* ``oracle``: exact instant state, true speeds, each request's own length and every replica's
  cache: earliest completion.
* ``oracle-sed``: exact in-flight and true speeds: ``max(1, (n + 1) / C) * s`` (ties: fewer
  in-flight, then random).
* ``oracle-ps``: the same information, ``(n + 1) * s / C`` (the speed-aware oracle of
  ``loadtests/oracle.py``; same ties).

The ``oracle`` computes, for every replica, when the request would *finish* there: the time its
FIFO slot frees (from the actual remaining service times of the requests already there, the
``FifoReplica`` slot heap) plus its own service time at that replica's true speed, and takes the
earliest (ties: fewer in-flight, then random). It is greedy (it does not reserve capacity for
later arrivals) but uses strictly more information than any real router. With
``batch_slowdown > 0`` (no exact start times) it falls back to ``oracle-sed``'s estimate with the
full-batch step time.

None of the three is best everywhere (greedy earliest completion queues on fast replicas, which
costs the requests behind; the processor-sharing estimate uses slow replicas earliest): see the
README. The report therefore measures against the **best oracle** of a run: the variant with
the lowest p95 (then p99, then p50).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from core.keyschema import ReplicaState
from loadtests.oracle import expected_delay
from loadtests.simulator.model import PrefixCache
from plugins.routing import policy as routing_policy
from plugins.routing.policy import PolicyParams, RequestShape

if TYPE_CHECKING:
    from loadtests.simulator.model import BatchReplica, FifoReplica, Workload


def request_size(tokens: float) -> int:
    """A request's size in whole output tokens (what its ``max_tokens`` would say)."""
    return max(1, math.ceil(tokens))


@dataclass
class World:
    """What the engine shares with a policy (the lists are live: the engine mutates them)."""

    ids: list[str]
    speeds: list[float]
    slots: list[int]
    inflight: list[int]
    """Fleet-wide requests assigned and not finished, per replica (instant, exact)."""
    reserved: list[int]
    """Their output tokens (``request_size``), as their reservations carry them."""
    visible: list[ReplicaState | None]
    """The sidecar snapshots proxies can read now (stale by the poll age + staleness)."""
    replicas: list[FifoReplica] | list[BatchReplica]
    proxies: int
    workload: Workload
    rng: random.Random


class Policy:
    """Base: ``pick`` chooses a replica index; the hooks follow the fleet's changes."""

    name: ClassVar[str] = "policy"

    def bind(self, world: World) -> None:
        self.world = world
        self.size = len(world.ids)
        self.rng = world.rng

    def pick(self, proxy: int, now: float, tokens: float, group: int = -1) -> int:
        """The replica for a request of ``tokens`` output tokens from tenant ``group`` (-1:
        none) arriving at ``proxy``."""
        raise NotImplementedError

    def assigned(self, proxy: int, replica: int, now: float) -> None:
        """A request routed by ``proxy`` was admitted by ``replica``."""

    def completed(self, proxy: int, replica: int, now: float) -> None:
        """A request routed by ``proxy`` finished on ``replica``."""

    def published(self, replica: int, now: float) -> None:
        """A new snapshot of ``replica`` became visible to the proxies."""


def _random_min(values: list[int], rng: random.Random) -> int:
    low = min(values)
    tied = [i for i, v in enumerate(values) if v == low]
    return tied[0] if len(tied) == 1 else tied[rng.randrange(len(tied))]


class RandomPolicy(Policy):
    name = "random"

    def pick(self, proxy: int, now: float, tokens: float, group: int = -1) -> int:
        return self.rng.randrange(self.size)


class RoundRobinPolicy(Policy):
    name = "round-robin"

    def bind(self, world: World) -> None:
        super().bind(world)
        self.next = [self.rng.randrange(self.size) for _ in range(world.proxies)]

    def pick(self, proxy: int, now: float, tokens: float, group: int = -1) -> int:
        r = self.next[proxy]
        self.next[proxy] = (r + 1) % self.size
        return r


class LeastBusyPolicy(Policy):
    """LiteLLM ``least-busy`` without a shared Redis cache: each proxy process counts only the
    requests it sent itself (``log_pre_api_call`` +1, success/failure -1)."""

    name = "least-busy"
    random_ties: bool = False

    def bind(self, world: World) -> None:
        super().bind(world)
        self.counts = [[0] * self.size for _ in range(world.proxies)]

    def pick(self, proxy: int, now: float, tokens: float, group: int = -1) -> int:
        counts = self.counts[proxy]
        if self.random_ties:
            return _random_min(counts, self.rng)
        return counts.index(min(counts))

    def assigned(self, proxy: int, replica: int, now: float) -> None:
        self.counts[proxy][replica] += 1

    def completed(self, proxy: int, replica: int, now: float) -> None:
        self.counts[proxy][replica] -= 1


class LeastBusyRandomPolicy(LeastBusyPolicy):
    name = "least-busy-random"
    random_ties = True


class LeastBusyRedisPolicy(Policy):
    """LiteLLM ``least-busy`` with a Redis cache: every proxy reads the shared counts."""

    name = "least-busy-redis"

    def pick(self, proxy: int, now: float, tokens: float, group: int = -1) -> int:
        inflight = self.world.inflight
        return inflight.index(min(inflight))


class BestOfTwoPolicy(Policy):
    name = "best-of-two"

    def pick(self, proxy: int, now: float, tokens: float, group: int = -1) -> int:
        if self.size == 1:
            return 0
        rng = self.rng
        a = rng.randrange(self.size)
        b = rng.randrange(self.size - 1)
        if b >= a:
            b += 1
        na, nb = self.world.inflight[a], self.world.inflight[b]
        if na == nb:
            return a if rng.random() < 0.5 else b
        return a if na < nb else b


class JsqPolicy(Policy):
    name = "jsq"

    def pick(self, proxy: int, now: float, tokens: float, group: int = -1) -> int:
        return _random_min(self.world.inflight, self.rng)


class OracleSedPolicy(Policy):
    """Shortest expected delay with exact counts and true speeds."""

    name = "oracle-sed"

    def bind(self, world: World) -> None:
        super().bind(world)
        mean = world.workload.mean_total_s()
        self.service = [mean / s for s in world.speeds]
        slowdown = getattr(world.replicas[0], "slowdown", 0.0)
        self.service = [
            s * (1.0 + slowdown * (c - 1)) for s, c in zip(self.service, world.slots, strict=True)
        ]

    def pick(self, proxy: int, now: float, tokens: float, group: int = -1) -> int:
        inflight = self.world.inflight
        est = [
            max(1.0, (n + 1) / c) * s
            for n, c, s in zip(inflight, self.world.slots, self.service, strict=True)
        ]
        return self._best(est)

    def _best(self, est: list[float]) -> int:
        low = min(est)
        tied = [i for i, e in enumerate(est) if e == low]
        if len(tied) == 1:
            return tied[0]
        inflight = self.world.inflight
        fewest = min(inflight[i] for i in tied)
        tied = [i for i in tied if inflight[i] == fewest]
        return tied[self.rng.randrange(len(tied))]


class OraclePsPolicy(OracleSedPolicy):
    """The speed-aware oracle of ``triage bench`` (``loadtests/oracle.py``'s
    ``expected_delay``): ``argmin (n + 1) * s / C`` (processor sharing)."""

    name = "oracle-ps"

    def pick(self, proxy: int, now: float, tokens: float, group: int = -1) -> int:
        inflight = self.world.inflight
        est = [
            expected_delay(n, c, s)
            for n, c, s in zip(inflight, self.world.slots, self.service, strict=True)
        ]
        return self._best(est)


class OraclePolicy(OracleSedPolicy):
    """Earliest completion from the exact slot-free times (``FifoReplica``) and true speeds."""

    name = "oracle"

    def bind(self, world: World) -> None:
        super().bind(world)
        self.exact = hasattr(world.replicas[0], "free")
        if self.exact:
            wl = world.workload
            self.frees = [rep.free for rep in world.replicas]  # type: ignore[union-attr]
            self.caches = [rep.cache for rep in world.replicas]
            self.hit = [wl.prefill_s(wl.uncached_tokens(True)) / s for s in world.speeds]
            self.miss = [wl.prefill_s(wl.uncached_tokens(False)) / s for s in world.speeds]
            self.step = [rep.step_s for rep in world.replicas]

    def pick(self, proxy: int, now: float, tokens: float, group: int = -1) -> int:
        if not self.exact:
            return super().pick(proxy, now, tokens, group)
        est = [
            max(f[0], now) + (hit if group >= 0 and group in c else miss) + tokens * s
            for f, c, hit, miss, s in zip(
                self.frees, self.caches, self.hit, self.miss, self.step, strict=True
            )
        ]
        return self._best(est)


@dataclass
class TriagePolicy(Policy):
    """This project's policy: the real ``plugins.routing.policy.choose`` over
    ``(replica_id, published ReplicaState, live fleet-wide reservations)``, with a random 32-bit
    ``tiebreak`` per pick as ``plugins/routing/strategy.py`` draws it.

    Speed-up, exact by construction (``choose`` over all 200 replicas costs ~0.5 ms here, most
    of it ``score()`` calls on replicas that cannot win). ``choose`` returns, among the
    candidates whose score is within ``tie_tolerance`` of the best, one of those with the fewest
    reservations (sorted ids, ``tiebreak`` index); no other candidate affects the result, and a
    candidate's score changes only when its snapshot or its reservations change. So each
    replica's score is kept from the real ``score()`` (recomputed at every publish, pick and
    completion of that replica), and ``choose`` gets exactly the candidates that can win: in
    the tie band of the best kept score, with the fewest reservations among those. It returns
    the same replica as over the whole fleet as long as every snapshot is present, fresh and
    has a service time (each candidate's effective service time is then its own, not the
    candidates' mean); otherwise, and with ``exact=True``, ``choose`` gets the whole fleet.
    ``tests/test_simulator.py`` runs both ways and asserts the same pick for every request.
    """

    params: PolicyParams = field(default_factory=PolicyParams)
    exact: bool = False
    affinity: bool = True
    """Read and write the proxies' shared prefix index (``prefix:{replica}`` in Redis: the
    tenants' prefixes picked onto each replica, an LRU as large as its KV cache), as the pick
    script does; False: ``TRIAGE_ROUTING_PREFIX_AFFINITY=false``."""
    sized: bool = True
    """Each request's size and the sizes its replicas' reservations carry go to ``choose``
    (as the proxies send them): the score then depends on the request, so every pick scores the
    whole fleet. False: every request of unknown size (the request-count score, fast path)."""
    name: ClassVar[str] = "triage"
    full_picks: int = 0
    fast_picks: int = 0

    def bind(self, world: World) -> None:
        super().bind(world)
        self.index = {rid: i for i, rid in enumerate(world.ids)}
        self.cache = [math.inf] * self.size
        self.ts = [-(2**62)] * self.size
        self.known = [False] * self.size
        self.unknown = self.size
        self.full_picks = 0
        self.fast_picks = 0
        capacity = world.replicas[0].cache.capacity
        self.prefixes = [PrefixCache(capacity) for _ in world.ids]

    def _rescore(self, r: int, now: float) -> None:
        state = self.world.visible[r]
        if state is None or state.service_ms is None or not state.service_ms > 0.0:
            return
        self.cache[r] = routing_policy.score(
            state, self.world.inflight[r], state.service_ms, self.params, int(now * 1000.0)
        )

    def published(self, replica: int, now: float) -> None:
        state = self.world.visible[replica]
        known = state is not None and state.service_ms is not None and state.service_ms > 0.0
        if known != self.known[replica]:
            self.known[replica] = known
            self.unknown += -1 if known else 1
        if state is not None:
            self.ts[replica] = state.ts_ms
        self._rescore(replica, now)

    def assigned(self, proxy: int, replica: int, now: float) -> None:
        self._rescore(replica, now)

    def completed(self, proxy: int, replica: int, now: float) -> None:
        self._rescore(replica, now)

    def pick(self, proxy: int, now: float, tokens: float, group: int = -1) -> int:
        world = self.world
        now_ms = int(now * 1000.0)
        tiebreak = self.rng.getrandbits(32)
        params = self.params
        if self.sized:
            self.full_picks += 1
            candidates = list(zip(world.ids, world.visible, world.inflight, strict=True))
            wl = world.workload
            shape = RequestShape(  # the whole prefix as one block
                prompt_tokens=wl.prompt_tokens,
                output_tokens=request_size(tokens),
                tokens_per_block=float(wl.prefix_tokens),
            )
            affine = self.affinity and group >= 0
            cached = [int(group in ix) for ix in self.prefixes] if affine else None
            chosen = routing_policy.choose(
                candidates, params, now_ms, tiebreak, shape, cached, world.reserved
            )
            if chosen is None:
                raise RuntimeError("triage policy found no eligible replica")
            r = self.index[chosen]
            if affine:
                self.prefixes[r].use(group)  # the pick writes the index
            return r
        if self.exact or self.unknown > 0 or min(self.ts) < now_ms - params.stale_after_ms:
            self.full_picks += 1
            candidates = list(zip(world.ids, world.visible, world.inflight, strict=True))
        else:
            self.fast_picks += 1
            cache = self.cache
            best = min(cache)
            limit = best + abs(best) * params.tie_tolerance
            ids, visible, inflight = world.ids, world.visible, world.inflight
            band = [i for i, s in enumerate(cache) if s <= limit]
            fewest = min([inflight[i] for i in band])
            candidates = [(ids[i], visible[i], inflight[i]) for i in band if inflight[i] == fewest]
        chosen = routing_policy.choose(candidates, params, now_ms, tiebreak)
        if chosen is None:  # every replica unhealthy: cannot happen here (replicas never fail)
            raise RuntimeError("triage policy found no eligible replica")
        return self.index[chosen]


@dataclass
class TriageCountPolicy(TriagePolicy):
    """``triage`` with every request of unknown size: the request-count score (the policy
    before reservations carried sizes), for a side-by-side run."""

    sized: bool = False
    name: ClassVar[str] = "triage-count"


@dataclass
class TriageNoAffinityPolicy(TriagePolicy):
    """``triage`` with the prefix index off: the size-aware score, every prompt uncached."""

    affinity: bool = False
    name: ClassVar[str] = "triage-no-affinity"


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        RandomPolicy,
        RoundRobinPolicy,
        LeastBusyPolicy,
        LeastBusyRandomPolicy,
        LeastBusyRedisPolicy,
        BestOfTwoPolicy,
        JsqPolicy,
        TriagePolicy,
        TriageCountPolicy,
        TriageNoAffinityPolicy,
        OraclePolicy,
        OracleSedPolicy,
        OraclePsPolicy,
    )
}
ORACLES = ("oracle", "oracle-sed", "oracle-ps")
DEFAULT_POLICIES = (
    "random",
    "round-robin",
    "least-busy",
    "best-of-two",
    "jsq",
    "triage",
    *ORACLES,
)
ALIASES = {"simple-shuffle": "random", "shuffle": "random", "least-busy-litellm": "least-busy"}


def make_policy(name: str, params: PolicyParams | None = None, exact: bool = False) -> Policy:
    """A fresh policy by name (or alias, e.g. ``simple-shuffle`` = ``random``)."""
    name = ALIASES.get(name, name)
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; one of {sorted(POLICIES)}")
    policy = POLICIES[name]
    if issubclass(policy, TriagePolicy):
        return policy(params=params or PolicyParams(), exact=exact)
    return policy()
