"""The speed-aware oracle, replayed exactly on a recorded arrival sequence (no proxy, no network).

Each arrival goes, at its arrival time, to the replica with the least expected delay
(plugins/routing/README.md):
``argmin_i (n_i + 1) × s_i / C_i``, where ``n_i`` is the replica's requests not finished yet
(running or queued), ``C_i`` its batch slots and ``s_i`` its mean service time (ties: fewer
requests, then the lower index). A replica serves FCFS with ``C_i`` slots; a request's service
time is its own ``max_tokens`` × the replica's step time (the stand-in's timing with no batch
slowdown and no prefill: deterministic). TTFT = wait + one step.

This is a computation, not a simulation of the gateway: the oracle knows every replica's true
state at every instant. The discrete-event simulator (``loadtests/simulator``) models more (stale
snapshots, many proxies, the real policy); its ``oracle-ps`` policy scores replicas with the
same function, ``expected_delay``, so the bench and the simulator compare against one oracle.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from loadtests.arrivals import Arrival
from loadtests.report import Record


@dataclass(frozen=True)
class OracleReplica:
    name: str
    slots: int
    step_s: float
    """Seconds per generated token at this replica's speed."""


def expected_delay(in_system: int, slots: int, service_s: float) -> float:
    """The oracle's score of a replica for one more request: ``(n + 1) × s / C`` (processor
    sharing over its ``C`` slots, ``n`` requests not finished there, ``s`` its mean service)."""
    return (in_system + 1) * service_s / slots


def replay_oracle(
    arrivals: Sequence[Arrival], replicas: Sequence[OracleReplica], mean_tokens: float
) -> list[Record]:
    """One record per arrival (``t`` = its arrival time), in arrival order."""
    if not replicas:
        raise ValueError("no replicas")
    busy: list[list[float]] = [[] for _ in replicas]  # finish times of unfinished requests
    slots: list[list[float]] = [[0.0] * r.slots for r in replicas]  # next free time per slot
    for heap in slots:
        heapq.heapify(heap)
    mean_s = [mean_tokens * r.step_s for r in replicas]
    out: list[Record] = []
    for arrival in arrivals:
        now = arrival.t
        for finishing in busy:
            while finishing and finishing[0] <= now:
                heapq.heappop(finishing)
        best = min(
            range(len(replicas)),
            key=lambda i: (
                expected_delay(len(busy[i]), replicas[i].slots, mean_s[i]),
                len(busy[i]),
                i,
            ),
        )
        replica = replicas[best]
        start = max(now, heapq.heappop(slots[best]))
        finish = start + arrival.max_tokens * replica.step_s
        heapq.heappush(slots[best], finish)
        heapq.heappush(busy[best], finish)
        out.append(
            Record(
                t=now,
                latency_s=finish - now,
                outcome="ok",
                status=200,
                replica=replica.name,
                ttft_s=(start - now + replica.step_s) if arrival.stream else None,
                tokens=arrival.max_tokens,
                stream=arrival.stream,
            )
        )
    return out
