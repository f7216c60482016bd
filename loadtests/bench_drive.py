"""Driving ``triage bench compare``: the open-loop replay of recorded arrivals against each
strategy, the overhead and service-time measurements, one load level, the replayed oracle."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import openai
from openai import AsyncOpenAI
from redis.asyncio import Redis

from core.keyschema import KeySchema
from devstack.proxy_launcher import LiteLLMProxy
from devstack.stack import Stack
from loadtests.bench_fleet import cpu_groups, start_extra_proxy
from loadtests.bench_results import (
    LatencyUs,
    Level,
    LoadFigures,
    ModeOverhead,
    Overhead,
    Paired,
    ProxyOverhead,
    Sample,
    StrategyRun,
    Window,
    decision_figures,
    ratios,
    summarize_windows,
    summary_us,
)
from loadtests.bench_settings import DecisionSettings
from loadtests.measure import (
    cpu_cores,
    percentile,
)
from plugins.routing.store import RoutingStore

if TYPE_CHECKING:  # imports litellm: done at run time only after LITELLM_LOCAL_MODEL_COST_MAP
    from plugins.routing.strategy import LeastBusyStrategy


import random

from loadtests.arrivals import ArrivalSequence
from loadtests.bench_fleet import (
    Fleet,
    fleet_cpu_groups,
    litellm_counts,
    pids,
    proxy_histograms,
    wait_idle,
)
from loadtests.bench_settings import (
    BACK_TO_BACK,
    IDLE,
    KV_TOKENS_PER_BLOCK,
    OURS,
    BenchSettings,
)
from loadtests.measure import (
    group_cpu_s,
    median_standard_error,
)
from loadtests.oracle import OracleReplica, replay_cache_oracle, replay_oracle
from loadtests.report import Record, plot_runs, summarize
from loadtests.traffic import (
    Attempt,
    LengthDist,
    StreamReading,
    completion,
    refusal,
)
from loadtests.workloads import words

log = logging.getLogger("triage.bench")


def chat_body(model: str, sequence: ArrivalSequence, index: int) -> dict[str, Any]:
    arrival = sequence.arrivals[index]
    body: dict[str, Any] = {
        "model": model,
        "messages": sequence.messages(index),
        "max_tokens": arrival.max_tokens,
        "stream": arrival.stream,
    }
    if arrival.stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def send(
    client: httpx.AsyncClient,
    url: str,
    key: str,
    body: dict[str, Any],
    t: float,
    headers: Mapping[str, str] | None = None,
) -> Record:
    """One open-loop request; ``t`` = its scheduled time (kept in the record); ``headers``:
    more request headers than the key's."""
    started = time.perf_counter()
    stream = bool(body.get("stream"))
    sent = {"Authorization": f"Bearer {key}", **(headers or {})}
    try:
        async with client.stream("POST", url, json=body, headers=sent) as response:
            status = response.status_code
            replica = response.headers.get("x-litellm-model-id")
            if status != 200:
                got = refusal(status, replica, await response.aread(), response.headers)
            elif not stream:
                got = completion(status, replica, await response.aread())
            else:
                reading = StreamReading(status, replica, started)
                async for line in response.aiter_lines():
                    if (got_or_none := reading.line(line, time.perf_counter())) is not None:
                        break
                got = got_or_none if got_or_none is not None else reading.cut_short()
    except httpx.TimeoutException:
        got = Attempt("lost", 0, detail="timeout")
    except (httpx.HTTPError, ValueError) as exc:
        got = Attempt("lost", 0, detail=type(exc).__name__)
    return Record.of(got, t, time.perf_counter() - started, stream)


@dataclass
class Replay:
    records: list[Record]
    lag_s: list[float]
    """How late each request left, against its schedule (the client's own delay)."""
    wall_s: float


async def replay(
    sequence: ArrivalSequence,
    urls: Sequence[str],
    key: str,
    model: str,
    settings: BenchSettings,
) -> Replay:
    """Open loop: request ``i`` leaves at its time, whatever the answers so far."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=512, keepalive_expiry=4.0)
    timeout = httpx.Timeout(settings.request_timeout_s, connect=10.0)
    lags: list[float] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter() + 0.2
        tasks: list[asyncio.Task[Record]] = []
        for index, arrival in enumerate(sequence.arrivals):
            delay = t0 + arrival.t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(max(0.0, time.perf_counter() - (t0 + arrival.t)))
            url = f"{urls[index % len(urls)]}/v1/chat/completions"
            body = chat_body(model, sequence, index)
            tasks.append(asyncio.create_task(send(client, url, key, body, arrival.t)))
        records = list(await asyncio.gather(*tasks))
    return Replay(records, lags, time.perf_counter() - t0)


async def measure_overhead(fleet: Fleet, settings: BenchSettings) -> Overhead:
    """Sequential requests (``max_tokens`` 1, no stream), interleaved in rounds: one through the
    first proxy of each strategy (rotating order), and every fourth round one straight to each
    replica's Triton. A proxy's overhead = its latency minus the direct p50 of the replica that
    served it. The plugins' cost is the median of the per-round differences (ours minus
    simple-shuffle, paired: both saw the same machine state), with the standard error of that
    median; and each proxy's CPU per request (its process group's CPU over the run, background
    logging included), the steadier figure on a busy 2-core machine.

    Rounds alternate between two modes (each with every strategy first in turn). **Idle** (the
    target's): each request waits ``overhead_gap_ms`` first, so it finds the proxy idle. **Back
    to back**: the measured request follows another one to the same proxy at once, while
    LiteLLM still runs that one's logging (~5-10 ms of CPU); a plugin that awaits Redis before
    the upstream call lets that work run inside the request's latency, where without the await
    it would overlap the upstream wait."""
    n, gap = settings.overhead_requests, settings.overhead_gap_ms / 1000
    modes = [IDLE, BACK_TO_BACK] if gap > 0 else [BACK_TO_BACK]
    stack, model = fleet.stack, fleet.stack.settings.model
    direct: dict[str, list[float]] = {rid: [] for rid in stack.replicas}
    rounds: list[tuple[str, dict[str, tuple[float, str]]]] = []
    headers = {"Authorization": f"Bearer {fleet.api_key}"}
    body = {"model": model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
    strategies = list(fleet.proxies)
    groups = {s: pids(fleet.proxies[s][:1]) for s in strategies}
    async with httpx.AsyncClient(timeout=30.0) as client:

        async def via(strategy: str, pause: float) -> tuple[float, str] | None:
            await asyncio.sleep(pause)
            t = time.perf_counter()
            r = await client.post(
                f"{fleet.proxies[strategy][0].base_url}/v1/chat/completions",
                json=body,
                headers=headers,
            )
            if r.status_code != 200:
                return None
            return time.perf_counter() - t, r.headers.get("x-litellm-model-id") or "?"

        for _ in range(3):  # warm every path (the first requests are slow)
            for strategy in strategies:
                await via(strategy, gap)
        cpu0 = {s: group_cpu_s(g) for s, g in groups.items()}
        sent = dict.fromkeys(strategies, 0)
        for i in range(n):
            mode = modes[i % len(modes)]
            pause = gap if mode == IDLE else 0.0
            if i % 4 == 0:
                for rid, server in stack.replicas.items():
                    await asyncio.sleep(gap)  # the replicas' own time, always at idle
                    t = time.perf_counter()
                    r = await client.post(
                        f"{server.http_url}/v2/models/{model}/generate",
                        json={"text_input": "<|im_start|>user\nping<|im_end|>", "max_tokens": 1},
                    )
                    if r.status_code == 200:
                        direct[rid].append(time.perf_counter() - t)
            row: dict[str, tuple[float, str]] = {}
            turn = (i // len(modes)) % len(strategies)  # the order must not follow the mode
            for strategy in strategies[turn:] + strategies[:turn]:
                if mode == BACK_TO_BACK:  # the measured request follows this one at once
                    await via(strategy, 0.0)
                    sent[strategy] += 1
                sample = await via(strategy, pause)
                sent[strategy] += 1
                if sample is not None:
                    row[strategy] = sample
            rounds.append((mode, row))
        cpu1 = {s: group_cpu_s(g) for s, g in groups.items()}
    base = {rid: percentile(v, 50) for rid, v in direct.items()}

    def extra(sample: tuple[float, str]) -> float | None:
        latency, rid = sample
        return latency - base[rid] if rid in base else None

    def extras(strategy: str, mode: str) -> list[float]:
        return [
            e
            for m, row in rounds
            if m == mode and strategy in row
            if (e := extra(row[strategy])) is not None
        ]

    def paired(mode: str) -> list[float]:
        return [
            a - b
            for m, row in rounds
            if m == mode and OURS in row and "simple-shuffle" in row
            if (a := extra(row[OURS])) is not None
            if (b := extra(row["simple-shuffle"])) is not None
        ]

    proxies = {
        strategy: ProxyOverhead(
            by_mode={
                mode: ModeOverhead(
                    n=len(values := extras(strategy, mode)),
                    p50_ms=1000 * percentile(values, 50),
                    p95_ms=1000 * percentile(values, 95),
                )
                for mode in modes
            },
            cpu_ms_per_request=1000 * (cpu1[strategy] - cpu0[strategy]) / max(1, sent[strategy]),
        )
        for strategy in strategies
    }
    out = Overhead(
        requests=n,
        gap_ms=settings.overhead_gap_ms,
        modes=modes,
        direct_p50_ms={k: 1000 * v for k, v in base.items()},
        proxies=proxies,
    )
    if OURS in proxies and "simple-shuffle" in proxies:
        for mode in modes:
            differences = paired(mode)
            out.plugins_added[mode] = Paired(
                p50_ms=1000 * percentile(differences, 50),
                se_ms=1000 * median_standard_error(differences),
            )
        out.plugins_added_cpu_ms = (
            proxies[OURS].cpu_ms_per_request - proxies["simple-shuffle"].cpu_ms_per_request
        )
    return out


def sequence_for(settings: BenchSettings, level: int, load: float) -> ArrivalSequence:
    name = f"arrivals-{load:g}.json"
    if settings.arrivals_dir is not None:
        sequence = ArrivalSequence.load(settings.arrivals_dir / name)
        if settings.arrivals_dir.resolve() != settings.out_dir.resolve():
            sequence.save(settings.out_dir / name)  # the run's folder holds what it replayed
        return sequence
    capacity = settings.capacity_rps()
    sequence = ArrivalSequence.poisson(
        rate_rps=load * capacity,
        seconds=settings.seconds,
        seed=settings.seed + level,
        prompt=settings.prompt_tokens,
        output=settings.output_tokens,
        stream_fraction=settings.stream_fraction,
        meta={"load": load, "capacity_rps": capacity, "time_scale": settings.time_scale},
        workload=settings.workload_shape(),
    )
    sequence.save(settings.out_dir / name)
    return sequence


async def measure_service(fleet: Fleet, settings: BenchSettings) -> dict[str, float]:
    """Each replica's real time for one request of the bench's mean output length, alone (the
    stand-in's per-step overhead makes it ~10 % longer than the nominal tokens x ms/token):
    the median of 3, all replicas at once."""
    stack, model = fleet.stack, fleet.stack.settings.model
    tokens = math.ceil(LengthDist.parse(settings.output_tokens).mean())
    body = {"text_input": "<|im_start|>user\nping<|im_end|>", "max_tokens": tokens}

    async def one(client: httpx.AsyncClient, url: str) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            response = await client.post(f"{url}/v2/models/{model}/generate", json=body)
            response.raise_for_status()
            times.append(time.perf_counter() - t)
        return percentile(times, 50)

    async with httpx.AsyncClient(timeout=120.0) as client:
        measured = await asyncio.gather(
            *(one(client, server.http_url) for server in stack.replicas.values())
        )
    return dict(zip(stack.replicas, measured, strict=True))


async def run_level(
    fleet: Fleet, settings: BenchSettings, level: int, load: float, service_s: float
) -> Level:
    sequence = sequence_for(settings, level, load)
    order = list(settings.strategies)
    order = order[level % len(order) :] + order[: level % len(order)]  # spread the drift
    bound = settings.max_wait_s + max(service_s, settings.service_s(min(settings.speeds)))
    out = Level(
        load=load,
        offered_rps=sequence.rate_rps,
        requests=len(sequence.arrivals),
        seed=sequence.seed,
        order=order,
        answer_bound_s=bound,
    )
    runs: dict[str, list[Record]] = {}
    for strategy in order:
        waited = await wait_idle(fleet.stack, settings.idle_timeout_s)
        await forget_caches(fleet, settings)  # every strategy starts with cold caches
        await asyncio.sleep(settings.pause_s)
        proxies = fleet.proxies[strategy]
        hists_before = await proxy_histograms(proxies, fleet.stack.master_key, strategy)
        groups = fleet_cpu_groups(fleet, strategy)
        per_proxy = [[pid] for pid in pids(proxies)]
        log.info(
            "load %.0f %%: %s (%d requests, %d proxies; fleet drained in %.1f s)",
            100 * load,
            strategy,
            len(sequence.arrivals),
            len(proxies),
            waited,
        )
        task = asyncio.create_task(
            replay(
                sequence,
                [p.base_url for p in proxies],
                fleet.api_key,
                fleet.stack.settings.model,
                settings,
            )
        )
        before, t0 = groups.sample(), time.perf_counter()
        proxy0 = [group_cpu_s(g) for g in per_proxy]
        await asyncio.sleep(sequence.seconds + 0.2)
        after, t1 = groups.sample(), time.perf_counter()
        proxy1 = [group_cpu_s(g) for g in per_proxy]
        result = await task
        cores = cpu_cores(before, after, t1 - t0)
        summary = summarize(
            result.records,
            replica_ids=fleet.replica_ids,
            window_s=sequence.seconds,
            answer_bound_s=bound,
        )
        run = StrategyRun(
            summary=summary,
            cpu_cores=cores,
            proxy_cores_max_process=max(
                ((b - a) / (t1 - t0) for a, b in zip(proxy0, proxy1, strict=True)), default=0.0
            ),
            client_lag_p99_ms=1000 * percentile(result.lag_s, 99),
            wall_s=result.wall_s,
        )
        if strategy == OURS:
            hists_after = await proxy_histograms(proxies, fleet.stack.master_key, strategy)
            seen = {n: decision_figures(b, hists_after[n]) for n, b in hists_before.items()}
            run.admission_decision = seen["admission_decision"]
            run.shed_decision = seen["shed_decision"]
            run.shed_decision.memo = seen["shed_memo"]
            run.event_loop_lag = seen["event_loop_lag"]
        if strategy == "least-busy":
            run.litellm_redis_counts = await litellm_counts(fleet)
        out.runs[strategy] = run
        runs[strategy] = result.records
        with open(settings.out_dir / f"load{round(100 * load)}-{strategy}.records.jsonl", "w") as f:
            f.writelines(json.dumps(r.row()) + "\n" for r in result.records)
    oracles = {
        kind: (
            records,
            summarize(records, replica_ids=fleet.replica_ids, window_s=sequence.seconds),
        )
        for kind, records in replay_oracle_records(sequence, fleet, settings).items()
    }
    # the best oracle of the level: the lowest p95, then p99
    out.oracle_kind = min(oracles, key=lambda k: (oracles[k][1].p95_s, oracles[k][1].p99_s))
    oracle, out.oracle = oracles[out.oracle_kind]
    runs["oracle (replayed)"] = oracle
    out.ratios = ratios({name: r.summary for name, r in out.runs.items()}, out.oracle)
    prefix = f"load{round(100 * load)}-"
    plot_runs(
        runs,
        settings.out_dir,
        fleet.replica_ids,
        t0={name: 0.0 for name in runs},
        title=f"{100 * load:.0f} % of capacity:",
        prefix=prefix,
    )
    out.plots = [f"{prefix}latency.png", f"{prefix}replicas.png"]
    return out


def replay_oracle_records(
    sequence: ArrivalSequence, fleet: Fleet, settings: BenchSettings
) -> dict[str, list[Record]]:
    """The replayed oracles: ``ps`` (processor sharing over the mean size) and ``cache``
    (earliest completion, knowing every request's size and every replica's cached prefixes)."""
    timing = settings.timing()
    running = settings.max_active * (
        LengthDist.parse(settings.prompt_tokens).mean()
        + sequence.workload.mean_shared_tokens()
        + LengthDist.parse(settings.output_tokens).mean()
    )
    cache_tokens = max(0, round(settings.standin_kv_cache_blocks * KV_TOKENS_PER_BLOCK - running))
    replicas = [
        OracleReplica(
            rid,
            settings.max_active,
            timing.step_s(settings.max_active, speed),
            timing.prefill_ms_per_token / speed / 1000,
            cache_tokens,
        )
        for rid, speed in zip(fleet.replica_ids, settings.speeds, strict=True)
    ]
    mean_tokens = LengthDist.parse(settings.output_tokens).mean()
    return {
        "ps": replay_oracle(sequence.arrivals, replicas, mean_tokens, sequence.workload),
        "cache": replay_cache_oracle(sequence.arrivals, replicas, sequence.workload),
    }


async def forget_caches(fleet: Fleet, settings: BenchSettings) -> None:
    """Empty every replica's KV cache and the prefix index, so that each strategy starts cold:
    each replica prefills unique prompts filling its whole cache (TensorRT-LLM has no call that
    drops it), then the index keys go."""
    stack, model = fleet.stack, fleet.stack.settings.model
    chunk = 1024
    count = math.ceil(settings.standin_kv_cache_blocks * KV_TOKENS_PER_BLOCK / chunk) + 1

    async def fill(client: httpx.AsyncClient, url: str, replica: int) -> None:
        for i in range(count):
            text = words(random.Random(f"forget-{replica}-{i}-{time.time_ns()}"), chunk)
            body = {"text_input": text, "max_tokens": 1}
            response = await client.post(f"{url}/v2/models/{model}/generate", json=body)
            response.raise_for_status()

    async with httpx.AsyncClient(timeout=120.0) as client:
        await asyncio.gather(
            *(fill(client, s.http_url, i) for i, s in enumerate(stack.replicas.values()))
        )
    assert stack.redis is not None
    redis = Redis.from_url(stack.redis.url)
    try:
        keys = KeySchema(stack.settings.key_prefix)
        await redis.delete(*(keys.prefix_index(rid) for rid in fleet.replica_ids))
    finally:
        await redis.aclose()


MESSAGES = [{"role": "user", "content": "Tell me about the fleet."}]


async def timed_loop(
    count: int, body: Callable[[int], Awaitable[tuple[int, int]]], concurrency: int
) -> tuple[list[int], list[int], int]:
    """Run ``body(i)`` ``count`` times on ``concurrency`` coroutines.

    ``body`` returns (decision ns, release ns); returns both lists and the wall time in ns.
    """
    decide: list[int] = []
    release: list[int] = []
    next_index = iter(range(count))

    async def worker() -> None:
        for i in next_index:
            d, r = await body(i)
            decide.append(d)
            release.append(r)

    started = time.perf_counter_ns()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return decide, release, time.perf_counter_ns() - started


async def evalsha_server_us(client: Redis) -> tuple[int, int]:
    """(calls, µs) of EVALSHA inside Redis so far (``INFO commandstats``)."""
    stats = (await client.info("commandstats")).get("cmdstat_evalsha") or {}
    return int(stats.get("calls", 0)), int(stats.get("usec", 0))


async def redis_baseline(
    stack: Stack, strategy: LeastBusyStrategy, deployments: list[dict[str, Any]], n: int
) -> dict[str, LatencyUs]:
    """Where the plugin's time goes: a bare PING round trip with redis-py, and the time
    ``pick.lua`` itself runs inside Redis (picks with a 1 ms lease, so none needs a release)."""
    assert stack.redis is not None
    client = Redis.from_url(stack.redis.url)
    out: dict[str, LatencyUs] = {}
    try:
        for _ in range(200):
            await client.ping()
        ping_ns: list[int] = []
        started = time.perf_counter_ns()
        for _ in range(n):
            t0 = time.perf_counter_ns()
            await client.ping()
            ping_ns.append(time.perf_counter_ns() - t0)
        out["redis-py PING round trip (baseline)"] = summary_us(
            ping_ns, time.perf_counter_ns() - started
        )
        ids = [str(d["model_info"]["id"]) for d in deployments]
        store = strategy.store
        calls0, usec0 = await evalsha_server_us(client)
        for i in range(n):
            await store.pick(ids, strategy.params, i, lease_ms=1)
        calls1, usec1 = await evalsha_server_us(client)
        calls = calls1 - calls0
        mean = (usec1 - usec0) / calls if calls else float("nan")
        nan = float("nan")
        out["pick.lua inside Redis (INFO commandstats)"] = LatencyUs(
            n=calls, p50_us=nan, p99_us=nan, max_us=nan, mean_us=mean
        )
    finally:
        await client.aclose()
    return out


async def bench_decisions(
    stack: Stack, model_list: list[dict[str, Any]], settings: DecisionSettings
) -> dict[str, LatencyUs]:
    """Time the plugin's decision vs LiteLLM's simple_shuffle, in this process."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm
    from litellm import Router
    from litellm.router_strategy.simple_shuffle import simple_shuffle

    from plugins.routing.settings import RoutingSettings
    from plugins.routing.strategy import LeastBusyStrategy
    from plugins.triton_provider.handler import register

    litellm.suppress_debug_info = True
    register()  # the deployments' provider, as the proxy config does
    logging.getLogger("LiteLLM Router").setLevel(logging.WARNING)
    assert stack.redis is not None
    model = stack.settings.model
    n = settings.decisions
    routing = RoutingSettings(redis_url=stack.redis.url, key_prefix=stack.settings.key_prefix)
    strategy = LeastBusyStrategy(routing)
    routed = LeastBusyStrategy(routing)
    shuffle_router = Router(model_list=model_list, routing_strategy="simple-shuffle")
    triage_router = Router(model_list=model_list, routing_strategy="simple-shuffle")
    routed.install(triage_router)
    deployments = [dict(d) for d in shuffle_router.get_model_list(model_name=model) or []]
    if len(deployments) != len(model_list):
        raise RuntimeError(f"router has {len(deployments)} deployments, expected {len(model_list)}")
    results: dict[str, LatencyUs] = {}
    try:

        async def plugin(i: int) -> tuple[int, int]:
            call_id = f"bench-{i}-{uuid.uuid4().hex[:8]}"
            t0 = time.perf_counter_ns()
            await strategy.choose_deployment(model, deployments, call_id)
            t1 = time.perf_counter_ns()
            await strategy.release_request(call_id)
            return t1 - t0, time.perf_counter_ns() - t1

        await timed_loop(200, plugin, 1)  # connection, script load, warm caches
        decide, release, wall = await timed_loop(n, plugin, 1)
        results["triage choose_deployment, sequential"] = summary_us(decide, wall)
        results["triage release, sequential"] = summary_us(release)
        decide, release, wall = await timed_loop(n, plugin, settings.concurrency)
        results[f"triage choose_deployment, {settings.concurrency} concurrent"] = summary_us(
            decide, wall
        )
        if strategy.outage.fallbacks:
            raise RuntimeError(
                f"{strategy.outage.fallbacks} picks fell back to local counts: Redis failed"
            )
        results.update(await redis_baseline(stack, strategy, deployments, n))

        resolve = shuffle_router.get_model_from_alias
        shuffle_ns: list[int] = []
        for _ in range(200):
            simple_shuffle(resolve, deployments, model, {})
        started = time.perf_counter_ns()
        for _ in range(n):
            t0 = time.perf_counter_ns()
            simple_shuffle(
                resolve_model_alias=resolve,
                healthy_deployments=deployments,
                model=model,
                request_kwargs={},
            )
            shuffle_ns.append(time.perf_counter_ns() - t0)
        wall = time.perf_counter_ns() - started
        results["simple_shuffle, sequential"] = summary_us(shuffle_ns, wall)

        async def full_triage(i: int) -> tuple[int, int]:
            call_id = f"bench-router-{i}-{uuid.uuid4().hex[:8]}"
            t0 = time.perf_counter_ns()
            await triage_router.async_get_available_deployment(
                model=model, messages=MESSAGES, request_kwargs={"litellm_call_id": call_id}
            )
            t1 = time.perf_counter_ns()
            await routed.release_request(call_id)
            return t1 - t0, time.perf_counter_ns() - t1

        async def full_shuffle(i: int) -> tuple[int, int]:
            t0 = time.perf_counter_ns()
            await shuffle_router.async_get_available_deployment(
                model=model, messages=MESSAGES, request_kwargs={}
            )
            return time.perf_counter_ns() - t0, 0

        await timed_loop(200, full_triage, 1)
        decide, _, wall = await timed_loop(n, full_triage, 1)
        results["Router.async_get_available_deployment, triage"] = summary_us(decide, wall)
        await timed_loop(200, full_shuffle, 1)
        decide, _, wall = await timed_loop(n, full_shuffle, 1)
        results["Router.async_get_available_deployment, simple-shuffle"] = summary_us(decide, wall)
        left = await strategy.store.inflight([str(d["model_info"]["id"]) for d in deployments])
        if any(left):
            log.warning("reservations left in Redis after the decision benchmark: %s", left)
    finally:
        await strategy.aclose()
        await routed.aclose()
    return results


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}"
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    return type(exc).__name__


async def closed_loop(
    base_url: str, api_key: str, model: str, settings: DecisionSettings, w0: int, w1: int
) -> list[Sample]:
    """``clients`` closed-loop clients from now (warm-up) until ``w1``; every request recorded."""
    limits = httpx.Limits(max_connections=settings.clients, max_keepalive_connections=None)
    client = AsyncOpenAI(
        base_url=f"{base_url}/v1",
        api_key=api_key,
        max_retries=0,
        timeout=settings.request_timeout_s,
        http_client=httpx.AsyncClient(limits=limits, timeout=settings.request_timeout_s),
    )
    samples: list[Sample] = []

    async def worker() -> None:
        while (started := time.perf_counter_ns()) < w1:
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=model,
                    messages=MESSAGES,  # type: ignore[arg-type]
                    max_tokens=settings.max_tokens,
                )
                completion = raw.parse()
                if not completion.choices or completion.choices[0].message.content is None:
                    raise ValueError("empty completion")
                replica = raw.headers.get("x-litellm-model-id") or "?"
                samples.append(Sample(started, time.perf_counter_ns(), replica))
            except Exception as exc:
                samples.append(Sample(started, time.perf_counter_ns(), None, error_kind(exc)))
                await asyncio.sleep(0.05)  # no hot loop on instant failures

    try:
        await asyncio.gather(*(worker() for _ in range(settings.clients)))
    finally:
        await client.close()
    return samples


async def run_load(
    stack: Stack,
    proxy: LiteLLMProxy,
    proxies: Sequence[LiteLLMProxy],
    settings: DecisionSettings,
    store: RoutingStore,
) -> Window:
    """Warm-up, then the measured window; CPU is sampled around the window only."""
    assert stack.api_key is not None
    ids = list(stack.replicas)
    groups = cpu_groups(stack, [proxy], [p for p in proxies if p is not proxy])
    w0 = time.perf_counter_ns() + int(settings.warmup_s * 1e9)
    w1 = w0 + int(settings.seconds * 1e9)
    task = asyncio.ensure_future(
        closed_loop(proxy.base_url, stack.api_key, stack.settings.model, settings, w0, w1)
    )
    await asyncio.sleep(max(0.0, (w0 - time.perf_counter_ns()) / 1e9))
    before, t0 = groups.sample(), time.perf_counter()
    await asyncio.sleep(max(0.0, (w1 - time.perf_counter_ns()) / 1e9))
    after, t1 = groups.sample(), time.perf_counter()
    samples = await task
    cpu_s = {role: cores * (t1 - t0) for role, cores in cpu_cores(before, after, t1 - t0).items()}
    await asyncio.sleep(0.3)  # the proxy's release callbacks run after the response
    left = dict(zip(ids, await store.inflight(ids), strict=True))
    return Window(samples, w0, w1, cpu_s, left)


async def bench_proxies(
    stack: Stack, settings: DecisionSettings, proxies: dict[str, LiteLLMProxy]
) -> dict[str, LoadFigures]:
    """Start the other strategies' proxies (in parallel), then load each, round by round;
    odd rounds go in reverse order so that a drift of the machine hits all alike."""
    assert stack.redis is not None
    proxies["triage"] = stack.proxies[0]
    others = [r for r in settings.strategies if r != "triage"]
    started = time.perf_counter()
    results = await asyncio.gather(
        *(asyncio.to_thread(start_extra_proxy, stack, r, settings) for r in others),
        return_exceptions=True,
    )
    for routing, result in zip(others, results, strict=True):
        if isinstance(result, BaseException):
            raise result
        proxies[routing] = result
    log.info("proxies %s ready in %.1f s", others, time.perf_counter() - started)
    redis = Redis.from_url(stack.redis.url)
    store = RoutingStore(redis, KeySchema(stack.settings.key_prefix))
    windows: dict[str, list[Window]] = {r: [] for r in settings.strategies}
    try:
        for round_index in range(settings.rounds):
            order = settings.strategies if round_index % 2 == 0 else settings.strategies[::-1]
            for routing in order:
                await asyncio.sleep(settings.pause_s)
                proxy = proxies[routing]
                log.info("round %d: load through %s (%s)", round_index + 1, routing, proxy.base_url)
                windows[routing].append(
                    await run_load(stack, proxy, list(proxies.values()), settings, store)
                )
    finally:
        await redis.aclose()
    ids = list(stack.replicas)
    return {routing: summarize_windows(ws, ids) for routing, ws in windows.items()}
