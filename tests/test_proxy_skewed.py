"""A skewed fleet (speeds 1, 1, 0.5) under steady load through the real proxy: the speed-aware
plugin gives the slow replica a clearly smaller share than the fast ones, and a smaller share
than LiteLLM's own count-only ``least-busy`` gives it on the same fleet."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator

import pytest
from openai import AsyncOpenAI

from devstack.proxy_launcher import LiteLLMProxy, start_proxy
from devstack.stack import Stack
from devstack.stack_settings import StackSettings
from plugins.proxy_config import (
    ProxyOptions,
    ReplicaEndpoint,
    build_proxy_config,
    proxy_env,
    write_proxy_config,
)

from proxy_helpers import MESSAGES, shares

pytestmark = pytest.mark.integration

MODEL = "standin"
WORKERS = 8
SECONDS = 8.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = StackSettings(
        catalogue=[],  # a stack of one model: no cold catalogue sidecars
        replicas=3,
        speeds=[1.0, 1.0, 0.5],
        proxies=1,
        poll_interval_ms=100,
        decode_ms_per_token=10.0,
        max_active=4,
        engine_queue_size=16,
        workdir=tmp_path_factory.mktemp("skewed-stack"),
    )
    running = Stack(settings).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def least_busy_proxy(stack: Stack) -> Iterator[LiteLLMProxy]:
    """LiteLLM's own least-busy strategy on the same replicas (no routing plugin)."""
    assert stack.redis is not None
    endpoints = [ReplicaEndpoint(rid, s.http_url) for rid, s in stack.replicas.items()]
    config = build_proxy_config(MODEL, MODEL, endpoints, ProxyOptions(routing="least-busy"))
    path = write_proxy_config(config, stack.workdir / "proxy-least-busy.yaml")
    env = proxy_env(stack.redis.url, stack.settings.key_prefix, stack.master_key)
    proxy = start_proxy("least-busy", path, env, stack.workdir)
    try:
        yield proxy
    finally:
        proxy.stop()


async def steady_load(base_url: str, api_key: str) -> tuple[list[str], list[float]]:
    """WORKERS closed-loop clients for SECONDS: the replica of each completion, and latencies."""
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0, timeout=60)
    picks: list[str] = []
    latencies: list[float] = []
    deadline = time.monotonic() + SECONDS

    async def worker() -> None:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            raw = await client.chat.completions.with_raw_response.create(
                model=MODEL, messages=MESSAGES, max_tokens=16
            )
            raw.parse()
            latencies.append(time.perf_counter() - started)
            picks.append(raw.headers["x-litellm-model-id"])

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    await client.close()
    return picks, latencies


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


async def test_slow_replica_gets_a_smaller_share(
    stack: Stack, least_busy_proxy: LiteLLMProxy
) -> None:
    assert stack.api_key is not None
    triage_picks, triage_lat = await steady_load(stack.proxies[0].base_url, stack.api_key)
    await asyncio.sleep(1.0)
    lb_picks, lb_lat = await steady_load(least_busy_proxy.base_url, stack.api_key)
    triage_share, lb_share = shares(triage_picks), shares(lb_picks)
    print(
        f"\nskewed fleet (speeds 1, 1, 0.5), {WORKERS} clients x {SECONDS:.0f} s:\n"
        f"  triage      {len(triage_picks)} requests, shares {triage_share}, "
        f"p50/p99 {p(triage_lat, 50):.0f}/{p(triage_lat, 99):.0f} ms\n"
        f"  least-busy  {len(lb_picks)} requests, shares {lb_share}, "
        f"p50/p99 {p(lb_lat, 50):.0f}/{p(lb_lat, 99):.0f} ms"
    )
    slow = "replica-2"
    fast_mean = (triage_share["replica-0"] + triage_share["replica-1"]) / 2
    assert triage_share.get(slow, 0.0) < 0.6 * fast_mean
    assert triage_share.get(slow, 0.0) < lb_share.get(slow, 0.0)
