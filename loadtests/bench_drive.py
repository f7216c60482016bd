"""Driving ``triage bench compare``: the open-loop replay of recorded arrivals against each
strategy, the overhead and service-time measurements, one load level, the replayed oracle."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from loadtests.arrivals import Arrival, ArrivalSequence
from loadtests.bench_fleet import (
    Fleet,
    fleet_cpu_groups,
    litellm_counts,
    pids,
    proxy_histograms,
    wait_idle,
)
from loadtests.bench_results import decision_figures, ratios
from loadtests.bench_settings import BACK_TO_BACK, IDLE, OURS, BenchSettings
from loadtests.measure import (
    cpu_cores,
    group_cpu_s,
    median_standard_error,
    percentile,
)
from loadtests.oracle import OracleReplica, replay_oracle
from loadtests.report import Record, plot_runs, summarize
from loadtests.traffic import (
    LengthDist,
    openai_error,
    parse_sse_line,
    prompt_text,
    retry_after_s,
)

log = logging.getLogger("triage.bench")


def chat_body(model: str, arrival: Arrival, index: int, seed: int) -> dict[str, Any]:
    rng = random.Random(f"{seed}-{index}")
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt_text(arrival.prompt_tokens, rng)}],
        "max_tokens": arrival.max_tokens,
        "stream": arrival.stream,
    }
    if arrival.stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def send(
    client: httpx.AsyncClient, url: str, key: str, body: dict[str, Any], t: float
) -> Record:
    """One open-loop request; ``t`` = its scheduled time (kept in the record)."""
    headers = {"Authorization": f"Bearer {key}"}
    started = time.perf_counter()
    stream = bool(body.get("stream"))

    def done(outcome: Any, status: int, replica: str | None, **kw: Any) -> Record:
        return Record(
            t=t,
            latency_s=time.perf_counter() - started,
            outcome=outcome,
            status=status,
            replica=replica,
            stream=stream,
            **kw,
        )

    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            status = response.status_code
            replica = response.headers.get("x-litellm-model-id")
            if status != 200:
                error = openai_error(await response.aread())
                if error is None:
                    return done("lost", status, replica, detail=f"HTTP {status} malformed")
                code = str(error.get("code") or error.get("type") or status)
                if status in (429, 503):
                    wait = retry_after_s(response.headers)
                    return done(
                        "shed", status, replica, retry_after_s=wait, detail=f"{status} {code}"
                    )
                return done("error", status, replica, detail=f"{status} {code}")
            if not stream:
                data = json.loads(await response.aread())
                choices = data.get("choices") or []
                if not choices or choices[0].get("message", {}).get("content") is None:
                    return done("lost", status, replica, detail="malformed completion")
                tokens = int((data.get("usage") or {}).get("completion_tokens") or 0)
                return done("ok", status, replica, tokens=tokens)
            ttft: float | None = None
            chunks, usage = 0, None
            async for line in response.aiter_lines():
                event = parse_sse_line(line)
                if event is None:
                    continue
                if event.error is not None:
                    code = str(event.error.get("code") or event.error.get("type") or "error")
                    return done("error", status, replica, ttft_s=ttft, detail=f"stream {code}")
                if event.done:
                    if ttft is None:
                        return done("lost", status, replica, detail="empty stream")
                    return done("ok", status, replica, ttft_s=ttft, tokens=usage or chunks)
                if event.content:
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - started
                if event.completion_tokens is not None:
                    usage = event.completion_tokens
            return done("lost", status, replica, ttft_s=ttft, detail="stream truncated")
    except httpx.TimeoutException:
        return done("lost", 0, None, detail="timeout")
    except (httpx.HTTPError, ValueError) as exc:
        return done("lost", 0, None, detail=type(exc).__name__)


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
            body = chat_body(model, arrival, index, sequence.seed)
            tasks.append(asyncio.create_task(send(client, url, key, body, arrival.t)))
        records = list(await asyncio.gather(*tasks))
    return Replay(records, lags, time.perf_counter() - t0)


async def measure_overhead(fleet: Fleet, settings: BenchSettings) -> dict[str, Any]:
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

    out: dict[str, Any] = {
        "requests": n,
        "gap_ms": settings.overhead_gap_ms,
        "modes": modes,
        "direct_p50_ms": {k: 1000 * v for k, v in base.items()},
    }
    for strategy in strategies:
        figures: dict[str, Any] = {}
        for mode in modes:
            values = extras(strategy, mode)
            key = "" if mode == modes[0] else "back_to_back_"
            figures[f"{key}n"] = len(values)
            figures[f"{key}overhead_p50_ms"] = 1000 * percentile(values, 50)
            figures[f"{key}overhead_p95_ms"] = 1000 * percentile(values, 95)
        cpu_s = cpu1[strategy] - cpu0[strategy]
        figures["cpu_ms_per_request"] = 1000 * cpu_s / max(1, sent[strategy])
        out[strategy] = figures
    if OURS in out and "simple-shuffle" in out:
        for mode in modes:
            key = "" if mode == modes[0] else "back_to_back_"
            differences = paired(mode)
            out[f"plugins_added_{key}p50_ms"] = 1000 * percentile(differences, 50)
            out[f"plugins_added_{key}se_ms"] = 1000 * median_standard_error(differences)
        out["plugins_added_cpu_ms"] = (
            out[OURS]["cpu_ms_per_request"] - out["simple-shuffle"]["cpu_ms_per_request"]
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
) -> dict[str, Any]:
    sequence = sequence_for(settings, level, load)
    order = list(settings.strategies)
    order = order[level % len(order) :] + order[: level % len(order)]  # spread the drift
    bound = settings.max_wait_s + max(service_s, settings.service_s(min(settings.speeds)))
    out: dict[str, Any] = {
        "load": load,
        "offered_rps": sequence.rate_rps,
        "requests": len(sequence.arrivals),
        "seed": sequence.seed,
        "order": order,
        "answer_bound_s": bound,
        "strategies": {},
    }
    runs: dict[str, list[Record]] = {}
    for strategy in order:
        waited = await wait_idle(fleet.stack, settings.idle_timeout_s)
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
        summary["cpu_cores"] = cores
        summary["proxy_cores_max_process"] = max(
            ((b - a) / (t1 - t0) for a, b in zip(proxy0, proxy1, strict=True)), default=0.0
        )
        summary["client_lag_p99_ms"] = 1000 * percentile(result.lag_s, 99)
        summary["wall_s"] = result.wall_s
        if strategy == OURS:
            hists_after = await proxy_histograms(proxies, fleet.stack.master_key, strategy)
            for name, before in hists_before.items():
                summary[name] = decision_figures(before, hists_after[name])
            summary["shed_decision"]["memo"] = summary.pop("shed_memo")
        if strategy == "least-busy":
            summary["litellm_redis_counts"] = await litellm_counts(fleet)
        out["strategies"][strategy] = summary
        runs[strategy] = result.records
    oracle = replay_oracle_records(sequence, fleet, settings)
    out["oracle"] = summarize(oracle, replica_ids=fleet.replica_ids, window_s=sequence.seconds)
    runs["oracle (replayed)"] = oracle
    out["ratios"] = ratios(out["strategies"], out["oracle"])
    prefix = f"load{round(100 * load)}-"
    plot_runs(
        runs,
        settings.out_dir,
        fleet.replica_ids,
        t0={name: 0.0 for name in runs},
        title=f"{100 * load:.0f} % of capacity:",
        prefix=prefix,
    )
    out["plots"] = [f"{prefix}latency.png", f"{prefix}replicas.png"]
    return out


def replay_oracle_records(
    sequence: ArrivalSequence, fleet: Fleet, settings: BenchSettings
) -> list[Record]:
    timing = settings.timing()
    replicas = [
        OracleReplica(rid, settings.max_active, timing.step_s(settings.max_active, speed))
        for rid, speed in zip(fleet.replica_ids, settings.speeds, strict=True)
    ]
    return replay_oracle(
        sequence.arrivals, replicas, LengthDist.parse(settings.output_tokens).mean()
    )
