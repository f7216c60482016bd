"""Benchmark of the routing plugin against LiteLLM's own strategies, on one real fleet.

One ``Stack`` (Redis, N Triton stand-in replicas, a sidecar each, the LiteLLM proxy with the
triage plugin and a virtual key) is started once; then, on that same fleet:

1. **Decision time**, in this process against the stack's Redis and the real replica ids:
   ``LeastBusyStrategy.choose_deployment`` (the ``pick.lua`` pick-and-reserve round trip
   included; each reservation released afterwards, release timed apart), sequential and with
   many concurrent coroutines; LiteLLM's ``simple_shuffle`` on the same deployment list; and the
   whole ``Router.async_get_available_deployment`` (LiteLLM's own filters before the choice) with
   either chooser.
2. **Proxy throughput and latency**: the same closed-loop load (N OpenAI-SDK clients for T
   seconds, short completions) through one proxy per strategy (``triage``, ``simple-shuffle``,
   ``least-busy``), all on the same replicas and key store, loaded one after another (``--rounds``
   repeats the pass, odd rounds reversed). The CPU time of every part of the stack is read from
   ``/proc`` around each measured window, and whatever else ran on the machine is shown apart.

Run: ``.venv/bin/triage bench decisions [--speeds 1,1,0.5] [--json out.json]``; ``--help``
lists the settings (also env ``TRIAGE_BENCH_DECISIONS_*``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
from openai import AsyncOpenAI
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import CliApp, SettingsConfigDict, SettingsError
from redis.asyncio import Redis

from core.keyschema import KeySchema
from core.settings_errors import report_invalid
from devstack.proxy_launcher import LiteLLMProxy, start_proxy
from devstack.stack import Stack
from devstack.stack_settings import StackSettings
from loadtests.bench_fleet import cpu_groups
from loadtests.bench_settings import FleetSettings, Strategy, check_strategies
from loadtests.measure import (
    REST,
    bench_logging,
    cpu_cores,
    fmt_ratio,
    jsonable,
    machine_busy_cores,
    percentile,
)
from loadtests.measure import (
    ratio as ratio_of,
)
from plugins.proxy_config import (
    ProxyOptions,
    ReplicaEndpoint,
    build_proxy_config,
    proxy_env,
    write_proxy_config,
)
from plugins.routing.store import RoutingStore

if TYPE_CHECKING:  # imports litellm: done at run time only after LITELLM_LOCAL_MODEL_COST_MAP
    from plugins.routing.strategy import LeastBusyStrategy

log = logging.getLogger("bench_routing")

MESSAGES = [{"role": "user", "content": "Tell me about the fleet."}]


class BenchSettings(FleetSettings):
    """Settings of ``triage bench decisions``: flags (``--max-tokens 16``) or
    ``TRIAGE_BENCH_DECISIONS_*``."""

    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_BENCH_DECISIONS_",
        cli_kebab_case=True,
        cli_prog_name="triage bench decisions",
        cli_shortcuts={"json-path": "json"},
        extra="forbid",
    )

    # equal replicas by default: this bench measures the decision and the proxy's cost, not
    # the skew (``triage bench compare`` does)
    speeds: list[float] = Field(
        default_factory=list, description="speed per replica, e.g. 1,1,0.5; default all 1.0"
    )
    # a fresher snapshot than the stack's default: the closed loop reads it every few ms
    poll_interval_ms: int = Field(default=100, ge=20, description="sidecar poll period")
    clients: int = Field(default=16, ge=1, le=1024, description="closed-loop OpenAI clients")
    seconds: float = Field(default=15.0, gt=0, description="measured window per strategy")
    warmup_s: float = Field(default=2.0, ge=0, description="unmeasured load before the window")
    pause_s: float = Field(default=1.0, ge=0, description="idle time before each run")
    rounds: int = Field(default=1, ge=1, le=20, description="passes over the strategies")
    max_tokens: int = Field(default=16, ge=1, le=4096, description="tokens per completion")
    strategies: list[Strategy] = Field(
        default_factory=lambda: ["triage", "simple-shuffle", "least-busy"],
        description="proxies to load, in this order",
    )
    decisions: int = Field(default=5000, ge=100, description="decisions per in-process variant")
    concurrency: int = Field(default=64, ge=1, le=4096, description="coroutines, concurrent run")
    engine_queue_size: int = Field(default=16, ge=0, description="engine queue per replica")
    decode_ms_per_token: float = Field(
        default=10.0, gt=0, description="stand-in ms per token at speed 1"
    )
    request_timeout_s: float = Field(default=60.0, gt=0, description="client timeout")
    json_path: Path | None = Field(default=None, description="write the figures here (JSON)")

    @field_validator("strategies")
    @classmethod
    def _strategies(cls, strategies: list[Strategy]) -> list[Strategy]:
        return check_strategies(strategies)

    def stack_settings(self, **specific: Any) -> StackSettings:
        return super().stack_settings(
            engine_queue_size=self.engine_queue_size,
            decode_ms_per_token=self.decode_ms_per_token,
            proxies=1,
            routing="triage",
            **specific,
        )


# -- statistics ---------------------------------------------------------------------------------


def summary_us(samples_ns: Sequence[int], wall_ns: int | None = None) -> dict[str, float]:
    """n, p50/p99/max/mean in µs (and per second when ``wall_ns`` is the run's wall time)."""
    us = [v / 1000.0 for v in samples_ns]
    out = {
        "n": float(len(us)),
        "p50_us": percentile(us, 50),
        "p99_us": percentile(us, 99),
        "max_us": max(us, default=float("nan")),
        "mean_us": statistics.fmean(us) if us else float("nan"),
    }
    if wall_ns is not None:
        out["per_s"] = len(us) / (wall_ns / 1e9) if wall_ns > 0 else float("nan")
    return out


# -- 1. decision time ---------------------------------------------------------------------------


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
) -> dict[str, dict[str, float]]:
    """Where the plugin's time goes: a bare PING round trip with redis-py, and the time
    ``pick.lua`` itself runs inside Redis (picks with a 1 ms lease, so none needs a release)."""
    assert stack.redis is not None
    client = Redis.from_url(stack.redis.url)
    out: dict[str, dict[str, float]] = {}
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
        out["pick.lua inside Redis (INFO commandstats)"] = {
            "n": float(calls),
            "p50_us": nan,
            "p99_us": nan,
            "max_us": nan,
            "mean_us": mean,
        }
    finally:
        await client.aclose()
    return out


async def bench_decisions(
    stack: Stack, model_list: list[dict[str, Any]], settings: BenchSettings
) -> dict[str, dict[str, float]]:
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
    results: dict[str, dict[str, float]] = {}
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


# -- 2. proxy load ------------------------------------------------------------------------------


@dataclass
class Sample:
    start_ns: int
    end_ns: int
    replica: str | None
    """The ``x-litellm-model-id`` of a success; None for an error."""
    error: str | None = None


@dataclass
class Window:
    """One measured run of one strategy: its samples, the window [w0, w1) and the CPU used."""

    samples: list[Sample]
    w0: int
    w1: int
    cpu_s: dict[str, float]
    """CPU seconds per role during the window (REST and "machine busy" included)."""
    reservations_left: dict[str, int]


def error_kind(exc: BaseException) -> str:
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}"
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    return type(exc).__name__


async def closed_loop(
    base_url: str, api_key: str, model: str, settings: BenchSettings, w0: int, w1: int
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
    settings: BenchSettings,
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


def summarize(windows: Sequence[Window], replica_ids: Sequence[str]) -> dict[str, Any]:
    """Over all windows of one strategy: req/s = successes that ended inside a window / the
    windows' length; latency, errors and shares over the requests that started inside one."""
    seconds = sum((w.w1 - w.w0) / 1e9 for w in windows)
    started = [s for w in windows for s in w.samples if w.w0 <= s.start_ns < w.w1]
    done = sum(
        1 for w in windows for s in w.samples if s.error is None and w.w0 <= s.end_ns <= w.w1
    )
    ok = [s for s in started if s.error is None]
    latency_ms = [(s.end_ns - s.start_ns) / 1e6 for s in ok]
    picks = Counter(s.replica for s in ok)
    errors = Counter(s.error for s in started if s.error is not None)
    cpu = {role: sum(w.cpu_s[role] for w in windows) / seconds for role in windows[0].cpu_s}
    left: Counter[str] = Counter()
    for w in windows:
        left.update(w.reservations_left)
    rps = done / seconds
    return {
        "windows": len(windows),
        "seconds": seconds,
        "requests": len(started),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "rps": rps,
        "p50_ms": percentile(latency_ms, 50),
        "p95_ms": percentile(latency_ms, 95),
        "p99_ms": percentile(latency_ms, 99),
        "max_ms": max(latency_ms, default=float("nan")),
        "share": {rid: picks.get(rid, 0) / len(ok) if ok else 0.0 for rid in replica_ids},
        "unknown_replica": sum(n for rid, n in picks.items() if rid not in replica_ids),
        "cpu_cores": cpu,
        "proxy_cpu_ms_per_request": 1000 * cpu["proxies"] / rps if rps else float("nan"),
        "reservations_left": {rid: n for rid, n in left.items() if n},
    }


def start_extra_proxy(stack: Stack, routing: Strategy, settings: BenchSettings) -> LiteLLMProxy:
    """A proxy with LiteLLM's own ``routing`` (no plugin) on the stack's replicas and key store."""
    assert stack.redis is not None
    endpoints = [ReplicaEndpoint(rid, s.http_url) for rid, s in stack.replicas.items()]
    options = ProxyOptions(routing=routing, num_retries=settings.num_retries)
    config = build_proxy_config(stack.settings.model, stack.settings.model, endpoints, options)
    path = write_proxy_config(config, stack.workdir / f"proxy-{routing}.yaml")
    env = proxy_env(stack.redis.url, stack.settings.key_prefix, stack.master_key)
    return start_proxy(
        f"bench-{routing}",
        path,
        env,
        stack.workdir,
        ready_timeout_s=stack.settings.proxy_ready_timeout_s,
    )


async def bench_proxies(
    stack: Stack, settings: BenchSettings, proxies: dict[str, LiteLLMProxy]
) -> dict[str, dict[str, Any]]:
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
    return {routing: summarize(ws, ids) for routing, ws in windows.items()}


# -- printing -----------------------------------------------------------------------------------


def ratio(a: float, b: float) -> str:
    return fmt_ratio(ratio_of(a, b))


def print_decisions(results: dict[str, dict[str, float]], settings: BenchSettings) -> None:
    print(
        f"\n1. Routing decision time, in this process, against the stack's Redis "
        f"({settings.replicas} real replica ids, {settings.decisions} decisions per row)"
    )
    width = max(len(k) for k in results) + 2
    print(f"  {'what':<{width}}{'p50 µs':>9}{'p99 µs':>9}{'max µs':>9}{'mean µs':>9}{'per s':>9}")

    def cell(value: float, digits: int = 1) -> str:
        return f"{'-':>9}" if math.isnan(value) else f"{value:>9.{digits}f}"

    for name, r in results.items():
        per_s = cell(r["per_s"], 0) if "per_s" in r else ""
        print(
            f"  {name:<{width}}{cell(r['p50_us'])}{cell(r['p99_us'])}{cell(r['max_us'])}"
            f"{cell(r['mean_us'])}{per_s}"
        )
    pairs = [
        ("chooser alone", "triage choose_deployment, sequential", "simple_shuffle, sequential"),
        (
            "whole Router choice",
            "Router.async_get_available_deployment, triage",
            "Router.async_get_available_deployment, simple-shuffle",
        ),
    ]
    for label, mine, theirs in pairs:
        a, b = results.get(mine), results.get(theirs)
        if a and b:
            print(
                f"  ratio triage/simple_shuffle, {label}: p50 {ratio(a['p50_us'], b['p50_us'])}, "
                f"p99 {ratio(a['p99_us'], b['p99_us'])} (+{a['p50_us'] - b['p50_us']:.0f} µs "
                "at p50)"
            )
    print(
        "  triage = one Redis round trip (EVALSHA pick.lua: read every replica, score, reserve):"
        " roughly the PING\n  baseline + the script's time inside Redis + redis-py's EVALSHA "
        "call; the release is a second round trip,\n  made by the proxy after the response. "
        "Concurrent: per-decision latency includes waiting for the\n  event loop; per s = "
        "pick+release pairs per second."
    )


def print_load(runs: dict[str, dict[str, Any]], stack: Stack, settings: BenchSettings) -> None:
    ids = list(stack.replicas)
    speeds = ",".join(f"{s:g}" for s in stack.settings.speeds)
    rounds = f", {settings.rounds} rounds (odd ones reversed)" if settings.rounds > 1 else ""
    print(
        f"\n2. Proxy load: {settings.clients} closed-loop OpenAI-SDK clients x "
        f"{settings.seconds:g} s (+{settings.warmup_s:g} s warm-up) per strategy{rounds}, "
        f"max_tokens {settings.max_tokens}, no streaming;\n   {len(ids)} replicas, speeds "
        f"{speeds}, {settings.max_active} slots each, {settings.decode_ms_per_token:g} ms/token "
        "at speed 1; one proxy process per strategy, run one after another"
    )
    share_cols = "".join(f"{rid:>11}" for rid in ids)
    print(
        f"  {'routing':<16}{'req/s':>7}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'max ms':>8}"
        f"{'ok':>7}{'errors':>7}{share_cols}{'proxy CPU':>11}"
    )
    for name, r in runs.items():
        shares = "".join(f"{100 * r['share'][rid]:>10.1f}%" for rid in ids)
        print(
            f"  {name:<16}{r['rps']:>7.1f}{r['p50_ms']:>8.0f}{r['p95_ms']:>8.0f}"
            f"{r['p99_ms']:>8.0f}{r['max_ms']:>8.0f}{r['ok']:>7}{r['errors']:>7}{shares}"
            f"{r['proxy_cpu_ms_per_request']:>8.1f} ms"
        )
    print("  (proxy CPU = CPU time of the proxy process per successful request)")
    base = runs.get("simple-shuffle")
    for name, r in runs.items():
        if base is not None and name != "simple-shuffle":
            print(
                f"  ratio {name}/simple-shuffle: req/s {ratio(r['rps'], base['rps'])}, "
                f"p99 {ratio(r['p99_ms'], base['p99_ms'])}"
            )
    for name, r in runs.items():
        if r["error_kinds"]:
            print(f"  errors of {name}: {r['error_kinds']}")
        if r["unknown_replica"]:
            print(f"  {name}: {r['unknown_replica']} successes without a known replica id")
        if r["reservations_left"]:
            print(f"  {name}: reservations left in Redis after its runs: {r['reservations_left']}")
    roles = list(next(iter(runs.values()))["cpu_cores"])
    print(f"\n  CPU during the measured windows, in cores (this machine has {os.cpu_count()}):")
    print(f"  {'routing':<16}" + "".join(f"{role:>{max(len(role), 6) + 2}}" for role in roles))
    for name, r in runs.items():
        print(
            f"  {name:<16}"
            + "".join(f"{r['cpu_cores'][role]:>{max(len(role), 6) + 2}.2f}" for role in roles)
        )
    worst = max(r["cpu_cores"][REST] for r in runs.values())
    if worst > 0.15:
        print(
            f"  WARNING: up to {worst:.2f} cores went to processes outside this benchmark "
            "(rest of the machine): the figures are disturbed; rerun on a quiet machine."
        )
    print(
        f"  NOTE: {os.cpu_count()} cores are shared by the proxy, Triton, the sidecars, Redis "
        "and these clients: req/s is a\n  lower bound set by the proxy's CPU (one LiteLLM "
        "process), not by the replicas."
    )


# -- main ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        settings = CliApp.run(BenchSettings, cli_args=list(sys.argv[1:] if argv is None else argv))
        stack_settings = settings.stack_settings()
    except ValidationError as exc:
        return report_invalid("triage bench decisions", exc)
    except SettingsError as exc:
        print(f"triage bench decisions: {exc}", file=sys.stderr)
        return 2
    bench_logging()
    idle_busy = machine_busy_cores(1.0)
    stack = Stack(stack_settings)
    proxies: dict[str, LiteLLMProxy] = {}
    began = time.perf_counter()
    try:
        log.info("machine busy before start: %.2f cores; starting the stack", idle_busy)
        stack.start()
        log.info("stack up in %.1f s (%s)", time.perf_counter() - began, stack.workdir)
        endpoints = [ReplicaEndpoint(rid, s.http_url) for rid, s in stack.replicas.items()]
        model_list = build_proxy_config(
            stack.settings.model, stack.settings.model, endpoints, ProxyOptions()
        )["model_list"]
        decisions = asyncio.run(bench_decisions(stack, model_list, settings))
        runs = asyncio.run(bench_proxies(stack, settings, proxies))
    finally:
        for proxy in proxies.values():
            if proxy is not (stack.proxies[0] if stack.proxies else None):
                proxy.stop()
        stack.stop()
    print(
        f"\ntriage routing benchmark: {settings.replicas} replicas, speeds "
        f"{','.join(f'{s:g}' for s in stack_settings.speeds)}, {os.cpu_count()} CPU cores "
        f"({idle_busy:.2f} busy before start), total {time.perf_counter() - began:.0f} s"
    )
    print_decisions(decisions, settings)
    print_load(runs, stack, settings)
    if settings.json_path is not None:
        ratios: dict[str, float] = {}
        if "triage" in runs and "simple-shuffle" in runs:
            plugin, shuffle = runs["triage"], runs["simple-shuffle"]
            ratios["rps_triage_over_shuffle"] = plugin["rps"] / shuffle["rps"]
            ratios["p99_triage_over_shuffle"] = plugin["p99_ms"] / shuffle["p99_ms"]
        doc = {
            "settings": settings.model_dump(mode="json"),
            "speeds": stack_settings.speeds,
            "cpu_count": os.cpu_count(),
            "machine_busy_cores_before_start": idle_busy,
            "decisions": decisions,
            "proxy_runs": runs,
            "ratios": ratios,
        }
        settings.json_path.write_text(json.dumps(jsonable(doc), indent=2, allow_nan=False))
        print(f"\nfigures written to {settings.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
