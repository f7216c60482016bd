"""The speed-aware oracle, replayed exactly on a recorded arrival sequence (no proxy, no network).

Each arrival goes, at its arrival time, to the replica with the least expected delay
(plugins/routing/README.md):
``argmin_i (n_i + 1) × s_i / C_i``, where ``n_i`` is the replica's requests not finished yet
(running or queued), ``C_i`` its batch slots and ``s_i`` its mean service time (ties: fewer
requests, then the lower index). A replica serves FCFS with ``C_i`` slots; a request's service
time is its own ``max_tokens`` × the replica's step time (the stand-in's timing with no batch
slowdown and no prefill: deterministic). TTFT = wait + one step.

``replay_cache_oracle`` is the oracle that knows every cache and every request's size: each
replica's KV cache as a least-recently-used set of the prompt prefixes it has served (a tenant's
system prompt, a conversation so far; ``workloads.py``), bounded by its capacity in tokens; each
arrival goes to the replica where it would *finish* first: its slot's free time, then the
prefill of the prompt tokens that replica does not hold, then its own ``max_tokens`` steps (ties:
fewer requests, then the lower index). Greedy, FIFO per replica, no batch slowdown, and a prefill
stalls only its own request (the stand-in stalls the batch: the oracle is optimistic there).

This is a computation, not a simulation of the gateway: the oracle knows every replica's true
state at every instant. The discrete-event simulator (``loadtests/simulator``) models more (stale
snapshots, many proxies, the real policy); its ``oracle-ps`` policy scores replicas with the
same function, ``expected_delay``, so the bench and the simulator compare against one oracle.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from loadtests.arrivals import Arrival
from loadtests.report import Record
from loadtests.workloads import Workload


@dataclass(frozen=True)
class OracleReplica:
    name: str
    slots: int
    step_s: float
    """Seconds per generated token at this replica's speed."""
    prefill_s: float = 0.0
    """Seconds per prefilled prompt token at this replica's speed."""
    cache_tokens: int = 0
    """Prompt-prefix tokens its KV cache holds besides the running sequences."""


def expected_delay(in_system: int, slots: int, service_s: float) -> float:
    """The oracle's score of a replica for one more request: ``(n + 1) × s / C`` (processor
    sharing over its ``C`` slots, ``n`` requests not finished there, ``s`` its mean service)."""
    return (in_system + 1) * service_s / slots


def replay_oracle(
    arrivals: Sequence[Arrival],
    replicas: Sequence[OracleReplica],
    mean_tokens: float,
    workload: Workload | None = None,
) -> list[Record]:
    """One record per arrival (``t`` = its arrival time), in arrival order. With a
    ``workload``, each replica's cached prefixes are kept as in ``replay_cache_oracle`` and a
    request is charged the prefill of what its replica does not hold (the choice stays
    ``expected_delay``)."""
    mean_s = [mean_tokens * r.step_s for r in replicas]

    def by_expected_delay(busy: list[list[float]], _finish: list[float]) -> int:
        return min(
            range(len(replicas)),
            key=lambda i: (
                expected_delay(len(busy[i]), replicas[i].slots, mean_s[i]),
                len(busy[i]),
                i,
            ),
        )

    return _replay(arrivals, replicas, workload, by_expected_delay)


@dataclass
class PrefixCache:
    """A replica's cached prompt prefixes: group -> tokens held, least recently used first."""

    capacity_tokens: int
    held: dict[int, int] = field(default_factory=dict)

    def hit(self, group: int, shared_tokens: int) -> int:
        """Tokens of a prompt sharing ``shared_tokens`` with ``group`` that are cached here."""
        return min(self.held.get(group, 0), shared_tokens) if group >= 0 else 0

    def use(self, group: int, shared_tokens: int) -> None:
        if group < 0 or shared_tokens <= 0:
            return
        tokens = max(self.held.pop(group, 0), shared_tokens)
        self.held[group] = tokens  # most recent last
        while sum(self.held.values()) > self.capacity_tokens and self.held:
            del self.held[next(iter(self.held))]


def replay_cache_oracle(
    arrivals: Sequence[Arrival], replicas: Sequence[OracleReplica], workload: Workload
) -> list[Record]:
    """One record per arrival (``t`` = its arrival time), in arrival order: earliest
    completion, knowing every request's size and every replica's cached prefixes."""

    def earliest(busy: list[list[float]], finish: list[float]) -> int:
        return min(range(len(replicas)), key=lambda i: (finish[i], len(busy[i]), i))

    return _replay(arrivals, replicas, workload, earliest)


Choice = Callable[[list[list[float]], list[float]], int]
"""Picks a replica from the unfinished requests' finish times per replica and the time each
replica would finish this request."""


def _replay(
    arrivals: Sequence[Arrival],
    replicas: Sequence[OracleReplica],
    workload: Workload | None,
    choose: Choice,
) -> list[Record]:
    """The replay both oracles share: FCFS slots per replica, each replica's cached prefixes
    (without a ``workload``: no prompt, no prefill), one record per arrival."""
    if not replicas:
        raise ValueError("no replicas")
    busy: list[list[float]] = [[] for _ in replicas]  # finish times of unfinished requests
    slots: list[list[float]] = [[0.0] * r.slots for r in replicas]  # next free time per slot
    caches = [PrefixCache(r.cache_tokens) for r in replicas]
    out: list[Record] = []
    for arrival in arrivals:
        now = arrival.t
        for finishing in busy:
            while finishing and finishing[0] <= now:
                heapq.heappop(finishing)
        shared = workload.shared_tokens(arrival.turn) if workload and arrival.group >= 0 else 0
        prompt = shared + (
            workload.own_tokens(arrival.prompt_tokens) if workload else arrival.prompt_tokens
        )
        uncached = [prompt - cache.hit(arrival.group, shared) for cache in caches]
        prefills = [
            u * r.prefill_s if workload is not None else 0.0
            for u, r in zip(uncached, replicas, strict=True)
        ]
        finish = [
            max(now, slots[i][0]) + prefills[i] + arrival.max_tokens * r.step_s
            for i, r in enumerate(replicas)
        ]
        best = choose(busy, finish)
        replica = replicas[best]
        start = max(now, heapq.heappop(slots[best]))
        prefill = prefills[best]
        done = start + prefill + arrival.max_tokens * replica.step_s
        caches[best].use(arrival.group, shared)
        heapq.heappush(slots[best], done)
        heapq.heappush(busy[best], done)
        out.append(
            Record(
                t=now,
                latency_s=done - now,
                outcome="ok",
                status=200,
                replica=replica.name,
                ttft_s=(start - now + prefill + replica.step_s) if arrival.stream else None,
                tokens=arrival.max_tokens,
                stream=arrival.stream,
                prompt_tokens=prompt if workload is not None else 0,
                cached_tokens=prompt - uncached[best] if workload is not None else 0,
            )
        )
    return out
