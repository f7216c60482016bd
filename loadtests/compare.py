"""``triage bench``: LiteLLM's own routing vs this project's plugins, on one fleet, one arrival
sequence per load level, in one run.

One embedded fleet (Redis, Triton stand-in replicas of unequal speed, a sidecar each) and, per
strategy, ``--proxies`` LiteLLM proxy processes on it:

* ``simple-shuffle``: LiteLLM's default router, no plugin;
* ``least-busy``: LiteLLM's ``least-busy`` with Redis in ``router_settings`` (its in-flight counts
  shared through Redis, as LiteLLM ships it), no plugin;
* ``triage``: the routing plugin and the admission plugin.

For each load level (a fraction of the fleet's capacity) a Poisson arrival sequence is recorded
(``arrivals-<load>.json``) and replayed open-loop against each strategy in turn (asyncio + httpx;
arrival ``i`` goes to proxy ``i mod --proxies``; no client retries: a 503 is an answer). The fleet
drains between runs. The stand-in's timing is the reference's (4 slots, 25 tokens, 0.5 s per
request at speed 1) times ``--time-scale`` so that the proxies are not the bottleneck on a small
machine; the CPU of every part is read from ``/proc`` during each run to show it. The
speed-aware oracle is replayed exactly on the same sequence (``loadtests/oracle.py``).

Run: ``triage bench [compare]`` (``--help``; every flag is also ``TRIAGE_BENCH_*``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import CliApp, SettingsConfigDict, SettingsError

from core.process import start_concurrently
from core.settings_errors import report_invalid
from devstack.proxy_launcher import LiteLLMProxy, start_proxy
from devstack.stack import Stack
from devstack.stack_settings import StackSettings
from loadtests.arrivals import Arrival, ArrivalSequence
from loadtests.bench_fleet import (
    OURS,
    FleetSettings,
    Strategy,
    check_strategies,
    cpu_groups,
    pids,
)
from loadtests.measure import (
    REST,
    STOLEN,
    CpuGroups,
    bench_logging,
    cpu_cores,
    fmt_ratio,
    group_cpu_s,
    histogram_quantile,
    jsonable,
    machine_busy_cores,
    median_standard_error,
    percentile,
    ratio,
)
from loadtests.oracle import OracleReplica, replay_oracle
from loadtests.report import Record, fmt_s, plot_runs, summarize
from loadtests.traffic import (
    LengthDist,
    StandinTiming,
    openai_error,
    parse_sse_line,
    prompt_text,
    retry_after_s,
)
from plugins.proxy_config import (
    ProxyOptions,
    ReplicaEndpoint,
    build_proxy_config,
    proxy_env,
    write_proxy_config,
)

log = logging.getLogger("triage.bench")

REFERENCE_DECODE_MS = 20.0  # 25 tokens x 20 ms = the reference's 0.5 s per request at speed 1
REFERENCE_ORACLE_85 = (1.00, 1.23)  # p95, p99 s: the reference's simulated speed-aware oracle
IDLE, BACK_TO_BACK = "idle", "back-to-back"  # the overhead's two kinds of rounds


class BenchSettings(FleetSettings):
    """Settings of ``triage bench compare``: flags (``--seconds 20``) or ``TRIAGE_BENCH_*``."""

    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_BENCH_",
        cli_kebab_case=True,
        cli_prog_name="triage bench compare",
        extra="forbid",
    )

    time_scale: float = Field(
        default=4.0,
        gt=0,
        le=100,
        description="stand-in time per token = 20 ms x this (1 = the reference's 0.5 s/request)",
    )
    output_tokens: str = Field(default="fixed:25", description="max_tokens distribution")
    prompt_tokens: str = Field(default="uniform:16,64", description="prompt length distribution")
    stream_fraction: float = Field(default=0.5, ge=0, le=1, description="share of streams")
    loads: list[float] = Field(
        default=[0.5, 0.85, 1.5], description="offered fractions of capacity"
    )
    seconds: float = Field(default=35.0, gt=0, description="arrival window per run")
    seed: int = Field(default=7, description="arrival sequence seed (level k uses seed + k)")
    proxies: int = Field(default=1, ge=1, le=8, description="proxy processes per strategy")
    strategies: list[Strategy] = Field(
        default=["simple-shuffle", "least-busy", "triage"], description="what to compare"
    )
    engine_queue_size: int = Field(
        default=4096, ge=0, description="stand-in engine queue: large, the fleet never sheds"
    )
    admission: dict[str, str] = Field(
        default={},
        description="admission settings of the triage proxies (TRIAGE_ADMISSION_<NAME>), e.g. "
        '{"max_wait_ms": "5000", "queue_allowance": "0"}; default the plugin\'s defaults',
    )
    overhead_requests: int = Field(
        default=200, ge=0, description="idle sequential requests per target for the overhead"
    )
    overhead_gap_ms: float = Field(
        default=50.0,
        ge=0,
        description="pause before each idle request, so the proxy has finished the previous "
        "one's background work (logging); every other round is sent back to back instead",
    )
    request_timeout_s: float = Field(default=600.0, gt=0, description="client timeout")
    idle_timeout_s: float = Field(default=600.0, gt=0, description="wait for the fleet to drain")
    pause_s: float = Field(default=2.0, ge=0, description="idle time before each run")
    arrivals_dir: Path | None = Field(
        default=None, description="replay arrivals-<load>.json recorded here before"
    )
    out_dir: Path = Field(
        default=Path("run/bench"), description="JSON, arrivals and PNG plots (run/ is ignored)"
    )
    results: Path | None = Field(
        default=None, description="also write the compact results here (loadtests/results/)"
    )

    @field_validator("loads")
    @classmethod
    def _loads(cls, loads: list[float]) -> list[float]:
        if not loads or any(not (math.isfinite(x) and 0 < x <= 10) for x in loads):
            raise ValueError("loads: one or more fractions of capacity in (0, 10]")
        return loads

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, strategies: list[Strategy]) -> list[Strategy]:
        return check_strategies(strategies)

    @field_validator("admission", mode="before")
    @classmethod
    def _admission(cls, value: Any) -> Any:
        from plugins.admission.settings import AdmissionSettings

        if isinstance(value, dict):
            value = {str(k).lower(): str(v) for k, v in value.items()}
            unknown = set(value) - set(AdmissionSettings.model_fields) | (
                set(value) & {"redis_url", "key_prefix"}
            )
            if unknown:
                raise ValueError(f"not admission settings (or set by the bench): {sorted(unknown)}")
            AdmissionSettings(redis_url="redis://127.0.0.1:6379/0", **value)  # type: ignore[arg-type]
        return value

    @property
    def max_wait_s(self) -> float:
        from plugins.admission.settings import AdmissionSettings

        default = AdmissionSettings.model_fields["max_wait_ms"].default
        return float(self.admission.get("max_wait_ms", default)) / 1000

    @field_validator("output_tokens", "prompt_tokens")
    @classmethod
    def _dist(cls, spec: str) -> str:
        return str(LengthDist.parse(spec))

    @property
    def decode_ms_per_token(self) -> float:
        return REFERENCE_DECODE_MS * self.time_scale

    def timing(self) -> StandinTiming:
        return StandinTiming(
            max_active=self.max_active,
            decode_ms_per_token=self.decode_ms_per_token,
            batch_slowdown=0.0,
            prefill_ms_per_token=0.0,
        )

    def capacity_rps(self) -> float:
        output = LengthDist.parse(self.output_tokens).mean()
        return self.timing().fleet_rps(self.speeds, output, 0.0)

    def service_s(self, speed: float = 1.0) -> float:
        return self.timing().service_s(LengthDist.parse(self.output_tokens).mean(), 0.0, speed)

    def stack_settings(self) -> StackSettings:
        return StackSettings(
            replicas=self.replicas,
            speeds=self.speeds,
            max_active=self.max_active,
            engine_queue_size=self.engine_queue_size,
            decode_ms_per_token=self.decode_ms_per_token,
            batch_slowdown=0.0,
            prefill_ms_per_token=0.0,
            poll_interval_ms=self.poll_interval_ms,
            num_retries=self.num_retries,
            workdir=self.workdir,
            proxies=0,
        )


# -- the fleet and the proxies --------------------------------------------------------------------


@dataclass
class Fleet:
    stack: Stack
    api_key: str
    proxies: dict[str, list[LiteLLMProxy]] = field(default_factory=dict)

    @property
    def replica_ids(self) -> list[str]:
        return list(self.stack.replicas)

    def stop(self) -> None:
        for group in self.proxies.values():
            for proxy in group:
                try:
                    proxy.stop()
                except Exception:
                    log.exception("could not stop %s", proxy.name)
        self.stack.stop()


async def create_key(stack: Stack) -> str:
    from plugins.auth.keystore import KeyStore
    from plugins.auth.settings import KeysSettings

    assert stack.redis is not None
    store = KeyStore.from_settings(
        KeysSettings(redis_url=stack.redis.url, key_prefix=stack.settings.key_prefix)
    )
    try:
        key, _ = await store.create(alias=f"bench-{os.getpid()}-{random.randrange(1 << 30)}")
    finally:
        await store.aclose()
    return key


def proxy_options(strategy: Strategy, stack: Stack, settings: BenchSettings) -> ProxyOptions:
    assert stack.redis is not None
    if strategy == "triage":
        return ProxyOptions(routing="triage", admission=True, num_retries=settings.num_retries)
    # LiteLLM's own strategy, no plugin; Redis for its router state, as LiteLLM ships it
    return ProxyOptions(
        routing=strategy,
        admission=False,
        num_retries=settings.num_retries,
        router_redis_url=stack.redis.url,
    )


def start_strategy_proxies(
    stack: Stack, strategy: Strategy, settings: BenchSettings
) -> list[LiteLLMProxy]:
    assert stack.redis is not None
    endpoints = [ReplicaEndpoint(rid, s.http_url) for rid, s in stack.replicas.items()]
    options = proxy_options(strategy, stack, settings)
    config = build_proxy_config(stack.settings.model, stack.settings.model, endpoints, options)
    path = write_proxy_config(config, stack.workdir / f"proxy-bench-{strategy}.yaml")
    env = proxy_env(stack.redis.url, stack.settings.key_prefix, stack.master_key)
    extra: dict[str, str] = {}
    if strategy == "triage":
        extra = {f"TRIAGE_ADMISSION_{k.upper()}": v for k, v in settings.admission.items()}
    started = start_concurrently(
        {
            name: partial(
                start_proxy,
                name,
                path,
                env,
                stack.workdir,
                ready_timeout_s=stack.settings.proxy_ready_timeout_s,
                extra_env=extra,
            )
            for name in (f"bench-{strategy}-{index}" for index in range(settings.proxies))
        }
    )
    proxies = list(started.values())
    return proxies


async def start_all_proxies(fleet: Fleet, settings: BenchSettings) -> None:
    """Every strategy's processes, started side by side (threads); all stopped on a failure."""
    results = await asyncio.gather(
        *(
            asyncio.to_thread(start_strategy_proxies, fleet.stack, s, settings)
            for s in settings.strategies
        ),
        return_exceptions=True,
    )
    failure: BaseException | None = None
    for strategy, result in zip(settings.strategies, results, strict=True):
        if isinstance(result, BaseException):
            failure = failure or result
        else:
            fleet.proxies[strategy] = result
    if failure is not None:
        raise failure


# -- one request, one replay ----------------------------------------------------------------------


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


# -- fleet state, metrics, CPU --------------------------------------------------------------------


async def fleet_busy(client: httpx.AsyncClient, stack: Stack) -> int:
    """Requests active in the stand-ins' engines (Triton metrics); their executor queues are
    empty once none is active (the executor admits from its queue whenever it has room)."""
    total = 0
    for server in stack.replicas.values():
        text = (await client.get(server.metrics_url)).text
        for family in text_string_to_metric_families(text):
            if family.name != "nv_trt_llm_request_metrics":
                continue
            for sample in family.samples:
                if sample.labels.get("request_type") == "active":  # `waiting` is a subset
                    total += int(sample.value)
    return total


async def wait_idle(stack: Stack, timeout_s: float) -> float:
    """Until every engine is empty; returns the seconds waited."""
    began = time.perf_counter()
    async with httpx.AsyncClient(timeout=5.0) as client:
        while (busy := await fleet_busy(client, stack)) > 0:
            if time.perf_counter() - began > timeout_s:
                raise RuntimeError(f"the fleet still has {busy} requests after {timeout_s:.0f} s")
            await asyncio.sleep(0.5)
    return time.perf_counter() - began


DECISION_METRIC = "triage_admission_decision_seconds"
LOOP_LAG_METRIC = "triage_proxy_event_loop_lag_seconds"
PROXY_HISTOGRAMS: dict[str, tuple[str, dict[str, str]]] = {
    "admission_decision": (DECISION_METRIC, {}),
    # the decisions that answered 503 at once (queue full, expected wait), from Redis or memo
    "shed_decision": (DECISION_METRIC, {"outcome": "shed"}),
    # those of them the proxy took alone (its memo of Redis's last answer, no round trip)
    "shed_memo": (DECISION_METRIC, {"outcome": "shed", "source": "memo"}),
    "event_loop_lag": (LOOP_LAG_METRIC, {}),
}
"""The triage proxies' histograms a run reports: name in the summary -> (metric, labels)."""


async def proxy_histogram(
    proxies: Sequence[LiteLLMProxy],
    master_key: str,
    name: str = DECISION_METRIC,
    labels: Mapping[str, str] | None = None,
) -> dict[float, float]:
    """A histogram's buckets on the proxies' ``/metrics/`` (by default the admission plugin's
    decision times), summed over the proxies and over the series whose labels include
    ``labels`` (cumulative counts by upper bound)."""
    wanted = dict(labels or {})
    buckets: dict[float, float] = {}
    headers = {"Authorization": f"Bearer {master_key}"}
    async with httpx.AsyncClient(timeout=10.0) as client:
        for proxy in proxies:
            text = (await client.get(f"{proxy.base_url}/metrics/", headers=headers)).text
            for family in text_string_to_metric_families(text):
                if family.name != name:
                    continue
                for sample in family.samples:
                    if sample.name.endswith("_bucket") and wanted.items() <= sample.labels.items():
                        bound = float(sample.labels["le"])
                        buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


async def proxy_histograms(
    proxies: Sequence[LiteLLMProxy], master_key: str, strategy: str
) -> dict[str, dict[float, float]]:
    """``PROXY_HISTOGRAMS`` now, for the triage proxies (none for LiteLLM's strategies)."""
    if strategy != OURS:
        return {}
    return {
        name: await proxy_histogram(proxies, master_key, metric, labels)
        for name, (metric, labels) in PROXY_HISTOGRAMS.items()
    }


def decision_figures(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    diff = {b: after.get(b, 0.0) - before.get(b, 0.0) for b in after}
    total = diff.get(math.inf, 0.0)
    within = diff.get(0.005, float("nan"))
    return {
        "decisions": total,
        "p50_ms": 1000 * histogram_quantile(diff, 0.50),
        "p99_ms": 1000 * histogram_quantile(diff, 0.99),
        "share_within_5ms": within / total if total else float("nan"),
    }


async def litellm_counts(fleet: Fleet) -> dict[str, int | None]:
    """LiteLLM least-busy's in-flight counts in Redis after a run (None: no key): shows that its
    counts are shared through Redis, and that they came back to zero."""
    from redis.asyncio import Redis

    assert fleet.stack.redis is not None
    model = fleet.stack.settings.model
    keys = [f"{model}_request_count:{rid}" for rid in fleet.replica_ids]
    client = Redis.from_url(fleet.stack.redis.url)
    try:
        values = await client.mget(keys)
    finally:
        await client.aclose()
    return {
        rid: None if v is None else int(float(v))
        for rid, v in zip(fleet.replica_ids, values, strict=True)
    }


def fleet_cpu_groups(fleet: Fleet, strategy: str) -> CpuGroups:
    others = [p for s, group in fleet.proxies.items() if s != strategy for p in group]
    return cpu_groups(fleet.stack, fleet.proxies[strategy], others)


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


# -- one load level -------------------------------------------------------------------------------


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


# -- ratios and the table -------------------------------------------------------------------------

RATIO_METRICS = ("p95_s", "p99_s", "ttft_p95_s", "goodput_rps", "shed_share")


def ratios(
    strategies: dict[str, dict[str, Any]], oracle: dict[str, Any] | None = None
) -> dict[str, dict[str, float]]:
    """``{"triage/<other>": {metric: ours / theirs}}`` for every other strategy (and the
    oracle, latency metrics only)."""
    out: dict[str, dict[str, float]] = {}
    ours = strategies.get(OURS)
    if ours is None:
        return out
    for name, theirs in strategies.items():
        if name != OURS:
            out[f"{OURS}/{name}"] = {m: ratio(ours[m], theirs[m]) for m in RATIO_METRICS}
    if oracle is not None:
        out[f"{OURS}/oracle"] = {m: ratio(ours[m], oracle[m]) for m in ("p95_s", "p99_s")}
    return out


def render_level(level: dict[str, Any], replica_ids: Sequence[str]) -> str:
    load = level["load"]
    lines = [
        f"\nload {100 * load:.0f} % of capacity: {level['offered_rps']:.2f} req/s offered, "
        f"{level['requests']} requests (Poisson, seed {level['seed']}), the same sequence for "
        f"each; run order {', '.join(level['order'])}",
    ]
    share_cols = "".join(f"{rid:>10}" for rid in replica_ids)
    lines.append(
        f"  {'strategy':<19}{'p50 s':>7}{'p95 s':>7}{'p99 s':>7}{'TTFT95':>8}{'good r/s':>9}"
        f"{'503 %':>7}{'lost':>5}{share_cols}{'proxy CPU':>10}"
    )
    rows = dict(level["strategies"])
    rows["oracle (replayed)"] = level["oracle"]
    for name, s in rows.items():
        shares = "".join(f"{100 * s['share'].get(rid, 0.0):>9.1f}%" for rid in replica_ids)
        cpu = s.get("cpu_cores", {}).get("proxies")
        lines.append(
            f"  {name:<19}{fmt_s(s['p50_s']):>7}{fmt_s(s['p95_s']):>7}{fmt_s(s['p99_s']):>7}"
            f"{fmt_s(s['ttft_p95_s']):>8}{fmt_s(s['goodput_rps']):>9}"
            f"{100 * s['shed_share']:>7.1f}{s['lost']:>5}{shares}"
            f"{(fmt_s(cpu) + ' c') if cpu is not None else '-':>10}"
        )
    for pair, values in level["ratios"].items():
        cells = "  ".join(
            f"{m.removesuffix('_s').replace('_', ' ')} {fmt_ratio(v)}" for m, v in values.items()
        )
        lines.append(f"  ratio {pair:<26}{cells}")
    return "\n".join(lines)


def render_overhead(overhead: dict[str, Any]) -> str:
    direct = ", ".join(f"{rid} {ms:.0f} ms" for rid, ms in overhead["direct_p50_ms"].items())
    modes = overhead.get("modes", [BACK_TO_BACK])
    spacing = (
        f"half of them {overhead['gap_ms']:g} ms apart (idle), half back to back"
        if IDLE in modes
        else "back to back"
    )
    lines = [
        f"\nproxy overhead ({overhead['requests']} sequential requests per target, {spacing}, "
        f"max_tokens 1; latency minus the serving replica's direct p50: {direct})"
    ]
    for name, f in overhead.items():
        if isinstance(f, dict) and "overhead_p50_ms" in f:
            line = (
                f"  {name:<16} {modes[0]} p50 {f['overhead_p50_ms']:6.1f} ms  "
                f"p95 {f['overhead_p95_ms']:6.1f} ms"
            )
            if "back_to_back_overhead_p50_ms" in f:
                line += (
                    f"   back to back p50 {f['back_to_back_overhead_p50_ms']:6.1f} ms  "
                    f"p95 {f['back_to_back_overhead_p95_ms']:6.1f} ms"
                )
            cpu = f.get("cpu_ms_per_request", float("nan"))
            lines.append(line + f"   proxy CPU {cpu:5.1f} ms/request")
    if "plugins_added_p50_ms" in overhead:
        line = (
            f"  the plugins (triage vs simple-shuffle, paired per round): "
            f"{overhead['plugins_added_p50_ms']:+.1f} ms at p50 {modes[0]} "
            f"(± {overhead.get('plugins_added_se_ms', float('nan')):.1f} ms standard error)"
        )
        if "plugins_added_back_to_back_p50_ms" in overhead:
            line += (
                f", {overhead['plugins_added_back_to_back_p50_ms']:+.1f} ms back to back "
                f"(± {overhead['plugins_added_back_to_back_se_ms']:.1f} ms)"
            )
        cpu = overhead.get("plugins_added_cpu_ms", float("nan"))
        lines.append(line + f"; {cpu:+.1f} ms proxy CPU per request")
    return "\n".join(lines)


def targets(doc: dict[str, Any]) -> list[str]:
    """The issue's targets, checked against this run (benchmarks: reported, never asserted)."""
    lines: list[str] = []
    levels = {lv["load"]: lv for lv in doc["levels"]}

    def verdict(ok: bool) -> str:
        return "MET " if ok else "MISS"

    at85 = levels.get(0.85)
    if at85 and OURS in at85["strategies"]:
        ours, oracle = at85["strategies"][OURS], at85["oracle"]
        lines.append(
            f"  {verdict(ours['p95_s'] <= 1.1 * oracle['p95_s'])} 85 %: triage p95 "
            f"{ours['p95_s']:.2f} s <= 1.1 x oracle p95 {oracle['p95_s']:.2f} s (replayed; the "
            f"reference's oracle {REFERENCE_ORACLE_85[0]:.2f} s x time scale "
            f"{doc['settings']['time_scale']:g} = "
            f"{REFERENCE_ORACLE_85[0] * doc['settings']['time_scale']:.2f} s)"
        )
        lb = at85["strategies"].get("least-busy")
        if lb:
            lines.append(
                f"  {verdict(ours['p99_s'] <= 0.8 * lb['p99_s'])} 85 %: triage p99 "
                f"{ours['p99_s']:.2f} s <= 0.8 x least-busy p99 {lb['p99_s']:.2f} s"
            )
    overhead = doc.get("overhead") or {}
    if "plugins_added_p50_ms" in overhead:
        added = overhead["plugins_added_p50_ms"]
        mode = overhead.get("modes", [BACK_TO_BACK])[0]
        line = (
            f"  {verdict(added <= 1.0)} the plugins add {added:+.1f} ms p50 to the proxy's own "
            f"overhead (triage {overhead[OURS]['overhead_p50_ms']:.1f} ms vs simple-shuffle "
            f"{overhead['simple-shuffle']['overhead_p50_ms']:.1f} ms, {mode}"
        )
        if "plugins_added_back_to_back_p50_ms" in overhead:
            line += f"; back to back {overhead['plugins_added_back_to_back_p50_ms']:+.1f} ms"
        lines.append(line + ")")
    over = [lv for load, lv in levels.items() if load >= 1.5]
    for lv in over:
        ours = lv["strategies"].get(OURS)
        if not ours:
            continue
        within = ours.get("answered_within_bound_share", float("nan"))
        lines.append(
            f"  {verdict(within >= 1.0 and ours['lost'] == 0)} {100 * lv['load']:.0f} %: "
            f"{100 * within:.1f} % of requests answered within max_wait + service "
            f"({lv['answer_bound_s']:.2f} s), {ours['lost']} lost, 503 share "
            f"{100 * ours['shed_share']:.1f} % ({ours['shed_with_retry_after']} of "
            f"{ours['shed']} 503s with Retry-After)"
        )
        for name, theirs in lv["strategies"].items():
            if name != OURS:
                share = theirs.get("answered_within_bound_share", float("nan"))
                lines.append(
                    f"        {name}: {100 * share:.1f} % within that bound, p99 "
                    f"{fmt_s(theirs['p99_s'])} s (it queues without bound)"
                )
        shed = ours.get("shed_decision") or {}
        if shed.get("decisions"):
            lines.append(
                f"  {verdict(shed['p99_ms'] <= 5.0)} {100 * lv['load']:.0f} %: shed decisions "
                f"(503 at arrival) p99 {shed['p99_ms']:.1f} ms at the proxy, p50 "
                f"{shed['p50_ms']:.2f} ms, {100 * shed['share_within_5ms']:.1f} % within 5 ms "
                f"({shed['decisions']:.0f} sheds at arrival; proxy histogram)"
            )
            memo = shed.get("memo") or {}
            if memo.get("decisions"):
                lines.append(
                    f"        {memo['decisions']:.0f} of them from the proxy's memo (no Redis "
                    f"round trip): p99 {memo['p99_ms']:.2f} ms; the rest asked Redis"
                )
        decision = ours.get("admission_decision") or {}
        if decision.get("decisions"):
            lines.append(
                f"        all first decisions (admit/queue/shed): p99 {decision['p99_ms']:.1f} "
                f"ms, {100 * decision['share_within_5ms']:.1f} % within 5 ms "
                f"({decision['decisions']:.0f} decisions)"
            )
            lag = ours.get("event_loop_lag") or {}
            if lag.get("decisions"):
                lines.append(
                    f"        the proxy's event loop itself, meanwhile: a 50 ms timer ran "
                    f"late by p50 {lag['p50_ms']:.1f} ms, p99 {lag['p99_ms']:.1f} ms "
                    f"({100 * (1 - lag['share_within_5ms']):.1f} % of ticks > 5 ms late: "
                    "LiteLLM's own work holding the loop)"
                )
    return lines


def bottleneck_lines(doc: dict[str, Any]) -> list[str]:
    runs = [
        (f"{name} at {100 * lv['load']:.0f} %", s)
        for lv in doc["levels"]
        for name, s in lv["strategies"].items()
    ]
    if not runs:
        return []
    proxy_run, proxy = max(runs, key=lambda r: r[1]["proxy_cores_max_process"])
    lag_run, lag = max(runs, key=lambda r: r[1]["client_lag_p99_ms"])
    worst_proxy, worst_lag = proxy["proxy_cores_max_process"], lag["client_lag_p99_ms"]
    worst_rest = max(s["cpu_cores"][REST] for _, s in runs)
    stolen_run, stolen = max(runs, key=lambda r: r[1]["cpu_cores"].get(STOLEN, 0.0))
    worst_stolen = stolen["cpu_cores"].get(STOLEN, 0.0)
    worst_machine = max(s["cpu_cores"]["machine busy"] for _, s in runs)
    typical = sorted(s["proxy_cores_max_process"] for _, s in runs)[len(runs) // 2]
    lines = [
        f"  proxy process CPU: median run {typical:.2f} cores, busiest {worst_proxy:.2f} cores "
        f"({proxy_run}); one LiteLLM process runs one event loop: near 1.0 it is the bottleneck",
        f"  client: requests left at most {worst_lag:.1f} ms late (p99, {lag_run})",
        f"  machine: up to {worst_machine:.2f} of {doc['cpu_count']} cores busy in a run; "
        f"outside this benchmark up to {worst_rest:.2f} cores (other work on the machine); "
        f"stolen by the hypervisor up to {worst_stolen:.2f} cores ({stolen_run})",
    ]
    if worst_stolen > 0.1:
        lines.append(
            f"  => WARNING: the host took up to {worst_stolen:.2f} cores from this virtual "
            "machine during a run: its latencies are slower and noisier than the code's"
        )
    if worst_proxy < 0.6 and worst_lag < 50:
        lines.append("  => the proxies and the client had headroom: the replicas set the pace")
    else:
        lines.append(
            f"  => WARNING: near saturation in {proxy_run if worst_proxy >= 0.6 else lag_run}; "
            "the other runs had headroom (raise --time-scale to give every run some)"
        )
    if worst_rest > 0.3:
        lines.append(
            f"  => WARNING: {worst_rest:.2f} cores went to other processes: figures disturbed"
        )
    return lines


def compact_results(doc: dict[str, Any]) -> dict[str, Any]:
    """The committed form (``loadtests/results/``): per load level, per strategy, the figures the
    table shows, under stable keys (``p50_s``, ``p95_s``, ``p99_s``, ``ttft_p95_s``, ...)."""
    keys = (
        "p50_s",
        "p95_s",
        "p99_s",
        "ttft_p95_s",
        "goodput_rps",
        "goodput_tokens_per_s",
        "shed_share",
        "lost",
        "started",
        "ok",
        "errors",
        "share",
        "answered_within_bound_share",
        "proxy_cores_max_process",
        "admission_decision",
        "shed_decision",
        "event_loop_lag",
    )
    s = doc["settings"]
    loads: dict[str, Any] = {}
    for lv in doc["levels"]:
        entry = {
            name: {k: v[k] for k in keys if k in v}
            for name, v in [*lv["strategies"].items(), ("oracle", lv["oracle"])]
        }
        entry["ratios"] = lv["ratios"]
        loads[f"{lv['load']:g}"] = entry
    return {
        "meta": {
            "what": "triage bench: LiteLLM simple-shuffle and least-busy (Redis) vs the triage "
            "plugins, same fleet, same recorded Poisson arrivals per load level",
            "date": doc["date"],
            "replicas": s["replicas"],
            "speeds": s["speeds"],
            "max_active": s["max_active"],
            "time_scale": s["time_scale"],
            "service_s_at_speed_1": doc["service_s_at_speed_1"],
            "capacity_rps": doc["capacity_rps"],
            "output_tokens": s["output_tokens"],
            "stream_fraction": s["stream_fraction"],
            "seconds": s["seconds"],
            "proxies_per_strategy": s["proxies"],
            "cpu_count": doc["cpu_count"],
            "machine_busy_cores_before": doc["machine_busy_cores_before"],
            "oracle": "replayed exactly on the same arrivals (loadtests/oracle.py)",
        },
        "overhead": doc.get("overhead"),
        "loads": loads,
    }


# -- main -----------------------------------------------------------------------------------------


async def bench(fleet: Fleet, settings: BenchSettings, doc: dict[str, Any]) -> None:
    await start_all_proxies(fleet, settings)
    log.info("proxies up: %s", {s: [p.base_url for p in ps] for s, ps in fleet.proxies.items()})
    if settings.overhead_requests:
        doc["overhead"] = await measure_overhead(fleet, settings)
        print(render_overhead(doc["overhead"]), flush=True)
    doc["service_measured_s"] = await measure_service(fleet, settings)
    slowest = max(doc["service_measured_s"].values())
    print(
        "\nservice time of one request alone, straight to each replica's Triton (the answer "
        "bound's service time): "
        + ", ".join(f"{rid} {v:.2f} s" for rid, v in doc["service_measured_s"].items()),
        flush=True,
    )
    for level, load in enumerate(settings.loads):
        doc["levels"].append(await run_level(fleet, settings, level, load, slowest))
        print(render_level(doc["levels"][-1], fleet.replica_ids), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        settings = CliApp.run(BenchSettings, cli_args=list(sys.argv[1:] if argv is None else argv))
        stack_settings = settings.stack_settings()
    except ValidationError as exc:
        return report_invalid("triage bench", exc)
    except SettingsError as exc:
        print(f"triage bench: {exc}", file=sys.stderr)
        return 2
    bench_logging()
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    busy_before = machine_busy_cores(1.0)
    began = time.perf_counter()
    doc: dict[str, Any] = {
        "settings": settings.model_dump(mode="json"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "machine_busy_cores_before": busy_before,
        "capacity_rps": settings.capacity_rps(),
        "service_s_at_speed_1": settings.service_s(1.0),
        "levels": [],
    }
    speeds = ",".join(f"{s:g}" for s in settings.speeds)
    print(
        f"triage bench: {settings.replicas} replicas (speeds {speeds}), {settings.max_active} "
        f"slots, {LengthDist.parse(settings.output_tokens)} tokens x "
        f"{settings.decode_ms_per_token:g} ms = {settings.service_s():.2f} s per request at "
        f"speed 1 (reference x {settings.time_scale:g}); capacity {settings.capacity_rps():.2f} "
        f"req/s; {settings.proxies} proxy process(es) per strategy; {settings.seconds:g} s of "
        f"arrivals per run; {100 * settings.stream_fraction:.0f} % streams; machine "
        f"{busy_before:.2f} of {os.cpu_count()} cores busy before start",
        flush=True,
    )
    stack = Stack(stack_settings)
    fleet: Fleet | None = None
    try:
        stack.start()
        fleet = Fleet(stack, asyncio.run(create_key(stack)))
        asyncio.run(bench(fleet, settings, doc))
    finally:
        if fleet is not None:
            fleet.stop()
        else:
            stack.stop()
    doc["total_s"] = time.perf_counter() - began
    print("\ntargets (benchmarks, not tests):")
    for line in targets(doc):
        print(line)
    print("\nis the proxy the bottleneck? (CPU from /proc during each run's arrival window)")
    for line in bottleneck_lines(doc):
        print(line)
    path = settings.out_dir / "bench.json"
    path.write_text(json.dumps(jsonable(doc), indent=2, allow_nan=False))
    compact = jsonable(compact_results(doc))
    if settings.results is not None:
        settings.results.parent.mkdir(parents=True, exist_ok=True)
        settings.results.write_text(json.dumps(compact, indent=2, allow_nan=False) + "\n")
    print(
        f"\nfigures in {path}"
        + (f" and {settings.results}" if settings.results else "")
        + f"; plots load<N>-latency.png / load<N>-replicas.png in {settings.out_dir}/; "
        f"total {doc['total_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
