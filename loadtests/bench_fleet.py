"""The fleet a benchmark runs on: one stack, and per strategy its LiteLLM proxies (``triage bench
compare``); keys, idleness, the proxies' own histograms and counters, the CPU groups measured
per run."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from core.process import start_concurrently
from devstack.proxy_launcher import LiteLLMProxy, start_proxy
from devstack.stack import Stack
from loadtests.bench_settings import (
    KV_TOKENS_PER_BLOCK,
    OURS,
    TRIAGE_KINDS,
    BenchSettings,
    CompareStrategy,
    DecisionSettings,
    Strategy,
)
from loadtests.measure import (
    CpuGroups,
)
from plugins.proxy_config import (
    ProxyOptions,
    ReplicaEndpoint,
    build_proxy_config,
    proxy_env,
    write_proxy_config,
)

log = logging.getLogger("triage.bench")


def pids(parts: Sequence[Any]) -> list[int]:
    """Process-group leaders of the running parts (each part leads its own group)."""
    out = []
    for part in parts:
        process = getattr(part, "process", None)
        if process is not None and getattr(process, "proc", None) is not None:
            out.append(int(process.pid))
    return out


def cpu_groups(
    stack: Stack, measured: Sequence[LiteLLMProxy], idle: Sequence[LiteLLMProxy]
) -> CpuGroups:
    """The CPU groups of one run: the proxies under load, the idle ones, Triton, the rest."""
    return CpuGroups(
        {
            "proxies": pids(measured),
            "idle proxies": pids(idle),
            "triton": pids(list(stack.replicas.values())),
            "sidecars+redis": pids([*stack.sidecars.values(), stack.redis]),
        }
    )


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
    return await stack.create_key(f"bench-{os.getpid()}-{random.randrange(1 << 30)}")


def proxy_options(strategy: CompareStrategy, stack: Stack, settings: BenchSettings) -> ProxyOptions:
    assert stack.redis is not None
    if strategy in TRIAGE_KINDS:
        return ProxyOptions(routing="triage", admission=True, num_retries=settings.num_retries)
    # LiteLLM's own strategy, no plugin; Redis for its router state, as LiteLLM ships it
    return ProxyOptions(
        routing=strategy,
        admission=False,
        num_retries=settings.num_retries,
        router_redis_url=stack.redis.url,
    )


def start_strategy_proxies(
    stack: Stack, strategy: CompareStrategy, settings: BenchSettings
) -> list[LiteLLMProxy]:
    assert stack.redis is not None
    endpoints = [ReplicaEndpoint(rid, s.http_url) for rid, s in stack.replicas.items()]
    options = proxy_options(strategy, stack, settings)
    config = build_proxy_config(
        stack.settings.model,
        stack.settings.model,
        endpoints,
        options,
        # every strategy's answers say how many prompt tokens the replica had cached
        provider_settings={
            "request_kv_cache_stats": True,
            "kv_tokens_per_block": KV_TOKENS_PER_BLOCK,
        },
    )
    path = write_proxy_config(config, stack.workdir / f"proxy-bench-{strategy}.yaml")
    env = proxy_env(stack.redis.url, stack.settings.key_prefix, stack.master_key)
    extra: dict[str, str] = {}
    if strategy in TRIAGE_KINDS:
        extra = {f"TRIAGE_ADMISSION_{k.upper()}": v for k, v in settings.admission.items()}
        # the routing's prefill cost is the stand-in's
        extra["TRIAGE_ROUTING_PREFILL_MS_PER_TOKEN"] = str(settings.standin_prefill_ms_per_token)
        if strategy == "triage-no-affinity":
            extra["TRIAGE_ROUTING_PREFIX_AFFINITY"] = "false"
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


async def litellm_counts(fleet: Fleet) -> dict[str, int | None]:
    """LiteLLM least-busy's in-flight counts in Redis after a run (None: no key): shows that its
    counts are shared through Redis, and that they came back to zero."""

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


def start_extra_proxy(stack: Stack, routing: Strategy, settings: DecisionSettings) -> LiteLLMProxy:
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
