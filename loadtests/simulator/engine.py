"""The event loop: arrivals, completions, sidecar polls and their delayed visibility.

One ``Scenario`` (fleet, workload, the arrival sequence with each request's length and proxy)
is built once and run under every policy, so all policies see the same requests (common random
numbers). Events live in one ``heapq`` of ``(time, kind, x, version)`` tuples; arrivals are
read from the pre-drawn sequence instead of the heap.

Sidecar model (``sidecar/service.py``): every ``poll_interval_s``, from a random phase per
replica, the sidecar samples the engine (``active``, ``waiting``, ``max_active``,
``kv_fraction``), feeds the engine's iteration counter to the real
``sidecar.service_time.StepTimeWindow`` (busy ms per iteration over a 10 s window, published
from 50 busy iterations on) and publishes a ``core.keyschema.ReplicaState`` with
``ts_ms`` = the poll time. Proxies see it ``staleness_s`` later (Redis / network lag). With
``service_source="true"`` the sidecar publishes the replica's true step time from its first
poll instead.

In-flight reservations (``inflight``) are exact and instant for every proxy, as ``pick.lua``'s
atomic reservations in Redis are: they rise at the pick and fall at the completion.
"""

from __future__ import annotations

import heapq
import json
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from core.keyschema import ReplicaState
from loadtests.simulator.model import BatchReplica, FifoReplica, Fleet, PrefixCache, Workload
from loadtests.simulator.policies import Policy, World, request_size
from sidecar.service_time import StepTimeWindow

ServiceSource = Literal["measured", "true"]
ProxyAssign = Literal["random", "round-robin"]

# event kinds (the order breaks ties at equal times: completions before polls before arrivals)
DONE, WAKE, POLL, SHOW = 0, 1, 2, 3

# independent random streams of one seed
_ARRIVALS, _LENGTHS, _PROXIES, _PHASES, _POLICY, _GROUPS = range(6)


def stream(seed: int, which: int) -> random.Random:
    return random.Random(seed * 7919 + which)


@dataclass(frozen=True)
class Scenario:
    """Everything a run needs except the policy."""

    fleet: Fleet
    workload: Workload
    arrivals: tuple[float, ...]
    """Arrival times (s), ascending."""
    tokens: tuple[float, ...]
    proxy_of: tuple[int, ...]
    proxies: int = 1
    window_s: float = 0.0
    """End of the arrival window (s): goodput counts completions up to here."""
    warmup_s: float = 0.0
    """Requests arriving before this are not measured."""
    poll_interval_s: float = 0.25
    staleness_s: float = 0.0
    service_source: ServiceSource = "measured"
    batch_slowdown: float = 0.0
    queue_limit: int | None = None
    kv_per_active: float = 0.0
    """KV-cache fraction one active sequence holds (0: KV pressure not modelled)."""
    group_of: tuple[int, ...] = ()
    """Each request's tenant (-1: none; empty: no request has one)."""
    cache_prefixes: int = 0
    """Tenants' prefixes each replica's KV cache holds (LRU; 0: none)."""
    seed: int = 1
    service_window_s: float = 10.0
    min_iterations: float = 50.0

    def __post_init__(self) -> None:
        n = len(self.arrivals)
        if len(self.tokens) != n or len(self.proxy_of) != n:
            raise ValueError("one length and one proxy per arrival")
        if self.group_of and len(self.group_of) != n:
            raise ValueError("one tenant (or -1) per arrival")
        if self.cache_prefixes < 0:
            raise ValueError("cache_prefixes must be >= 0")
        if self.proxies < 1 or any(not 0 <= p < self.proxies for p in set(self.proxy_of)):
            raise ValueError("proxy indices must be in [0, proxies)")
        if not (self.poll_interval_s > 0 and self.staleness_s >= 0):
            raise ValueError("poll_interval_s must be > 0, staleness_s >= 0")

    @property
    def capacity_rps(self) -> float:
        return self.fleet.capacity_rps(self.workload)

    @classmethod
    def build(
        cls,
        fleet: Fleet,
        workload: Workload,
        *,
        load: float = 0.85,
        duration_s: float | None = 60.0,
        requests: int | None = None,
        arrival_times: list[float] | None = None,
        proxies: int = 1,
        proxy_assign: ProxyAssign = "random",
        seed: int = 1,
        warmup_s: float = 5.0,
        **options: object,
    ) -> Scenario:
        """Poisson arrivals at ``load`` x capacity for ``duration_s`` (or ``requests`` of them),
        or the given ``arrival_times``; lengths and proxies drawn from ``seed``."""
        if arrival_times is not None:
            arrivals = sorted(float(t) for t in arrival_times)
            window = arrivals[-1] if arrivals else 0.0
        else:
            rate = load * fleet.capacity_rps(workload)
            rng = stream(seed, _ARRIVALS)
            arrivals = []
            t = 0.0
            if requests is not None:
                for _ in range(requests):
                    t += rng.expovariate(rate)
                    arrivals.append(t)
                window = t
            else:
                assert duration_s is not None
                while True:
                    t += rng.expovariate(rate)
                    if t > duration_s:
                        break
                    arrivals.append(t)
                window = duration_s
        n = len(arrivals)
        tokens = workload.draw(stream(seed, _LENGTHS), n)
        groups = workload.draw_groups(stream(seed, _GROUPS), n) if workload.groups else []
        if proxy_assign == "round-robin":
            proxy_of = [i % proxies for i in range(n)]
        else:
            prng = stream(seed, _PROXIES)
            proxy_of = [prng.randrange(proxies) for _ in range(n)]
        return cls(
            fleet=fleet,
            workload=workload,
            arrivals=tuple(arrivals),
            tokens=tuple(tokens),
            proxy_of=tuple(proxy_of),
            group_of=tuple(groups),
            proxies=proxies,
            window_s=window,
            warmup_s=min(warmup_s, window / 2),
            seed=seed,
            **options,  # type: ignore[arg-type]
        )


def read_arrivals(path: Path) -> list[float]:
    """Arrival times (s) from JSON: a list of numbers, a list of ``{"t": ...}`` objects, or
    ``{"arrivals_s": [...]}``."""
    data = json.loads(path.read_text())
    if isinstance(data, dict):
        data = data.get("arrivals_s", data.get("arrivals"))
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty list of arrival times")
    out = [float(item["t"]) if isinstance(item, dict) else float(item) for item in data]
    if any(not (math.isfinite(t) and t >= 0) for t in out):
        raise ValueError(f"{path}: arrival times must be finite and >= 0")
    return out


@dataclass
class RunResult:
    """Per request (by arrival index): replica (-1 = rejected), start, first token, finish."""

    policy: str
    scenario: Scenario
    replica_of: list[int]
    start: list[float]
    first: list[float]
    finish: list[float]
    cached: list[int] = field(default_factory=list)
    """Prompt tokens each admitted request found cached on its replica."""
    wall_s: float = 0.0
    events: int = 0
    service_ms: list[float | None] = field(default_factory=list)
    """The last service time each sidecar published."""


def run(scenario: Scenario, policy: Policy) -> RunResult:
    """Simulate every arrival of ``scenario`` under ``policy`` until the fleet has drained."""
    began = time.perf_counter()
    sc = scenario
    fleet, wl = sc.fleet, sc.workload
    size = len(fleet)
    ids = fleet.ids
    batch = sc.batch_slowdown > 0
    replicas: list[FifoReplica] | list[BatchReplica]
    if batch:
        replicas = [
            BatchReplica(
                index=i,
                speed=s,
                slots=c,
                step_s=wl.decode_ms_per_token / 1000.0 / s,
                prefill_s=wl.prefill_ms / 1000.0 / s,
                slowdown=sc.batch_slowdown,
                queue_limit=sc.queue_limit,
                cache=PrefixCache(sc.cache_prefixes),
            )
            for i, (s, c) in enumerate(zip(fleet.speeds, fleet.slots, strict=True))
        ]
    else:
        replicas = [
            FifoReplica(
                index=i,
                speed=s,
                slots=c,
                step_s=wl.decode_ms_per_token / 1000.0 / s,
                prefill_s=wl.prefill_ms / 1000.0 / s,
                queue_limit=sc.queue_limit,
                cache=PrefixCache(sc.cache_prefixes),
            )
            for i, (s, c) in enumerate(zip(fleet.speeds, fleet.slots, strict=True))
        ]
    inflight = [0] * size
    reserved = [0] * size
    visible: list[ReplicaState | None] = [None] * size
    world = World(
        ids=ids,
        speeds=list(fleet.speeds),
        slots=list(fleet.slots),
        inflight=inflight,
        reserved=reserved,
        visible=visible,
        replicas=replicas,
        proxies=sc.proxies,
        workload=wl,
        rng=stream(sc.seed, _POLICY),
    )
    policy.bind(world)

    arrivals, tokens, proxy_of = sc.arrivals, sc.tokens, sc.proxy_of
    sizes = [request_size(x) for x in tokens]
    n = len(arrivals)
    group_of = sc.group_of or (-1,) * n
    cached = [0] * n
    prompt = wl.prompt_tokens
    nan = math.nan
    replica_of = [-1] * n
    start = [nan] * n
    first = [nan] * n
    finish = [nan] * n

    windows = [
        StepTimeWindow(window_s=sc.service_window_s, min_iterations=sc.min_iterations)
        for _ in range(size)
    ]
    true_step_ms = [wl.decode_ms_per_token / s for s in fleet.speeds]
    measured = sc.service_source == "measured"
    pending: list[deque[ReplicaState]] = [deque() for _ in range(size)]
    interval, lag = sc.poll_interval_s, sc.staleness_s
    kv_per = sc.kv_per_active

    heap: list[tuple[float, int, int, int]] = []
    phases = stream(sc.seed, _PHASES)
    for r in range(size):
        heap.append((phases.uniform(0.0, interval), POLL, r, 0))
    heapq.heapify(heap)
    push, pop = heapq.heappush, heapq.heappop
    pick, assigned, completed, published = (
        policy.pick,
        policy.assigned,
        policy.completed,
        policy.published,
    )
    started: list[tuple[int, float, float]] = []
    i = 0
    outstanding = 0
    events = 0
    inf = math.inf
    while True:
        ta = arrivals[i] if i < n else inf
        if heap and heap[0][0] <= ta:
            t, kind, x, version = pop(heap)
            events += 1
            if kind == DONE:
                r = replica_of[x]
                replicas[r].release(t)  # type: ignore[call-arg]
                inflight[r] -= 1
                reserved[r] -= sizes[x]
                outstanding -= 1
                completed(proxy_of[x], r, t)
            elif kind == POLL:
                if i >= n and outstanding == 0:
                    continue  # drained: the sidecars stop
                rep = replicas[x]
                active = rep.active
                window = windows[x]
                window.add(t, rep.iterations(t), active > 0)
                service = window.step_ms if measured else true_step_ms[x]
                ts_ms = int(t * 1000.0)
                state = ReplicaState.model_construct(
                    replica_id=ids[x],
                    model="sim",
                    api_base=ids[x],
                    waiting=rep.n - active,
                    active=active,
                    max_active=rep.slots,
                    kv_fraction=min(1.0, active * kv_per),
                    service_ms=service,
                    drain_rps=None,
                    healthy=True,
                    state="healthy",
                    source="trtllm",
                    ts_ms=ts_ms,
                    sample_ts_ms=ts_ms,
                )
                if lag > 0.0:
                    pending[x].append(state)
                    push(heap, (t + lag, SHOW, x, 0))
                else:
                    visible[x] = state
                    published(x, t)
                push(heap, (t + interval, POLL, x, 0))
            elif kind == SHOW:
                visible[x] = pending[x].popleft()
                published(x, t)
            else:  # WAKE (BatchReplica)
                rep_b: BatchReplica = replicas[x]  # type: ignore[assignment]
                if version != rep_b.version:
                    continue  # superseded by a later start or end
                for req in rep_b.wake(t, started):
                    finish[req] = t
                    inflight[x] -= 1
                    reserved[x] -= sizes[req]
                    outstanding -= 1
                    completed(proxy_of[req], x, t)
                _record_starts(started, start, first)
                _schedule_wake(rep_b, t, heap)
        else:
            if i >= n:
                break
            t = ta
            p = proxy_of[i]
            g = group_of[i]
            r = pick(p, t, tokens[i], g)
            events += 1
            rep = replicas[r]
            held = g >= 0 and g in rep.cache
            uncached = wl.uncached_tokens(held)
            prefill = wl.prefill_s(uncached) / rep.speed
            if batch:
                rep_b = replicas[r]  # type: ignore[assignment]
                if rep_b.admit(t, i, tokens[i], started, prefill):
                    rep_b.cache.use(g)
                    cached[i] = prompt - uncached
                    replica_of[i] = r
                    inflight[r] += 1
                    reserved[r] += sizes[i]
                    outstanding += 1
                    assigned(p, r, t)
                    _record_starts(started, start, first)
                    _schedule_wake(rep_b, t, heap)
            else:
                admitted = replicas[r].admit(t, tokens[i], prefill)  # type: ignore[call-arg]
                if admitted is not None:
                    rep.cache.use(g)
                    cached[i] = prompt - uncached
                    replica_of[i] = r
                    start[i], first[i], finish[i] = admitted
                    push(heap, (admitted[2], DONE, i, 0))
                    inflight[r] += 1
                    reserved[r] += sizes[i]
                    outstanding += 1
                    assigned(p, r, t)
            i += 1
    return RunResult(
        policy=policy.name,
        scenario=sc,
        replica_of=replica_of,
        start=start,
        first=first,
        finish=finish,
        cached=cached,
        wall_s=time.perf_counter() - began,
        events=events,
        service_ms=[
            w.step_ms if measured else s for w, s in zip(windows, true_step_ms, strict=True)
        ],
    )


def _record_starts(
    started: list[tuple[int, float, float]], start: list[float], first: list[float]
) -> None:
    for req, start_t, first_t in started:
        start[req] = start_t
        first[req] = first_t
    started.clear()


def _schedule_wake(rep: BatchReplica, now: float, heap: list[tuple[float, int, int, int]]) -> None:
    when = rep.wake_time(now)
    if when is not None:
        heapq.heappush(heap, (when, WAKE, rep.index, rep.version))
