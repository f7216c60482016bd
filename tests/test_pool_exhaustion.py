"""The proxy's Redis clients under more concurrent commands than their pools hold, against a real
redis-server: the commands wait for a free connection instead of failing with "Too many
connections", and a wait that runs out is back-pressure (a 503 with Retry-After), never taken
for a Redis outage (no fallback to per-process counts).

192 concurrent requests through one proxy used to exhaust redis-py's default pool of 100: a key
on its first use got 503 (auth could not look it up) and a warm key fell back to per-process
counts, bypassing the fleet-wide gate.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest
from redis.asyncio import Redis

from core.keyschema import KeySchema
from core.redis_client import (
    DEFAULT_MAX_CONNECTIONS,
    PoolExhausted,
    RedisPoolSettings,
    SizedConnectionPool,
    fail_fast_redis,
)
from devstack.redis_launcher import RedisServer
from plugins.admission.controller import BUSY_CODE, AdmissionController
from plugins.admission.errors import GatewayError
from plugins.admission.gate import AdmissionGate
from plugins.admission.settings import AdmissionSettings
from plugins.auth.keystore import KeyStore
from plugins.auth.settings import KeysSettings
from plugins.routing.settings import RoutingSettings
from plugins.routing.strategy import LeastBusyStrategy, RedisBusy

from replica_states import replica_state

pytestmark = pytest.mark.integration

_prefixes = itertools.count()
CONCURRENT = 150
"""More commands at once than redis-py's default pool held (100)."""
IDS = ["p-a", "p-b"]


def prefix() -> str:
    return f"test-pool:{next(_prefixes)}:"


@pytest.fixture
def plain(client: Redis) -> Redis:
    """The session's Redis through a client with no pool limits (conftest's ``client``)."""
    return client


def pool_of(client: Redis) -> SizedConnectionPool:
    pool = client.connection_pool
    assert isinstance(pool, SizedConnectionPool)
    return pool


async def hold_connection(client: Redis, seconds: float) -> None:
    """One command that occupies a pooled connection for ``seconds`` (BLPOP on an empty list)."""
    await client.blpop([f"test-pool:empty:{next(_prefixes)}"], timeout=seconds)


async def publish(plain: Redis, key_prefix: str, max_active: int) -> None:
    keys = KeySchema(key_prefix)
    for rid in IDS:
        state = replica_state(rid, max_active=max_active, request_ms=10.0, drain_rps=4.0)
        await plain.hset(keys.replica(rid), mapping=state.to_redis())


async def test_more_concurrent_commands_than_the_pool_holds_all_succeed(
    redis_server: RedisServer,
) -> None:
    client = fail_fast_redis(redis_server.url, 1000)
    try:
        assert pool_of(client).max_connections == DEFAULT_MAX_CONNECTIONS < CONCURRENT
        replies = await asyncio.gather(*(hold_connection(client, 0.05) for _ in range(CONCURRENT)))
        assert replies == [None] * CONCURRENT
        assert len(pool_of(client)._in_use_connections) == 0
    finally:
        await client.aclose()


async def test_a_wait_that_runs_out_is_pool_exhausted_not_a_refused_connection(
    redis_server: RedisServer,
) -> None:
    client = fail_fast_redis(
        redis_server.url, 1000, RedisPoolSettings(max_connections=1, pool_timeout_ms=50)
    )
    try:
        holder = asyncio.ensure_future(hold_connection(client, 0.5))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(PoolExhausted):
            await client.ping()
        assert time.monotonic() - started < 0.4  # the pool's wait, not the holder's command
        await holder
        assert await client.ping()  # the connection is free again
    finally:
        await client.aclose()


async def test_the_key_store_waits_for_a_connection(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Auth looks keys up on every new key's first request: 150 at once on a pool of 4 all get
    their record (they used to get 503 "key store unavailable")."""
    monkeypatch.setenv("TRIAGE_REDIS_MAX_CONNECTIONS", "4")
    store = KeyStore.from_settings(KeysSettings(redis_url=redis_server.url, key_prefix=prefix()))
    try:
        assert pool_of(store.client).max_connections == 4
        key, record = await store.create("pool-test")
        found = await asyncio.gather(*(store.get(record.key_hash) for _ in range(CONCURRENT)))
        assert all(r is not None and r.key_hash == record.key_hash for r in found)
        assert key  # shown once, never stored
    finally:
        await store.aclose()


def admission_settings(redis_server: RedisServer, **overrides: Any) -> AdmissionSettings:
    base: dict[str, Any] = {
        "redis_url": redis_server.url,
        "key_prefix": prefix(),
        "queue_allowance": 0,
        "max_queue": 4,
        "max_wait_ms": 2000,
        "redis_retry_ms": 60_000,  # one outage would show for the rest of the test
    }
    base.update(overrides)
    return AdmissionSettings(**base)


async def test_admission_waits_for_connections_and_never_falls_back(
    redis_server: RedisServer, plain: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """150 requests admitted at once through a pool of 4 (one of them the grant channel's): all
    through the fleet-wide gate, none by per-process counts."""
    monkeypatch.setenv("TRIAGE_REDIS_MAX_CONNECTIONS", "4")
    s = admission_settings(redis_server)
    await publish(plain, s.key_prefix, max_active=CONCURRENT)
    client = fail_fast_redis(str(s.redis_url), s.redis_timeout_ms)
    controller = AdmissionController(AdmissionGate(client, s), s)
    try:
        tickets = [f"t{i}" for i in range(CONCURRENT)]
        await asyncio.gather(*(controller.admit("m", IDS, t, 0) for t in tickets))
        assert not controller.outage.down and controller.outage.should_try()
        assert controller.outage.owner == "admission"  # its outage logs name it
        assert not any(t.admission and t.admission.local for t in controller.admissions())
        assert await controller.gate.counts("m") == (CONCURRENT, 0)
        assert await asyncio.gather(*(controller.finish(t) for t in tickets)) == [True] * len(
            tickets
        )  # each ticket released once, by this call
        assert await controller.gate.counts("m") == (0, 0)
        assert not controller.outage.down and controller.local["m"] == 0
    finally:
        await controller.aclose()
        await client.aclose()


async def test_admission_answers_503_with_retry_after_when_no_connection_frees_in_time(
    redis_server: RedisServer, plain: Redis
) -> None:
    s = admission_settings(redis_server)
    await publish(plain, s.key_prefix, max_active=4)
    client = fail_fast_redis(
        str(s.redis_url),
        s.redis_timeout_ms,
        RedisPoolSettings(max_connections=2, pool_timeout_ms=50),
    )
    controller = AdmissionController(AdmissionGate(client, s), s)
    try:
        await controller.admit("m", IDS, "first", 0)  # the grant channel takes one connection
        holder = asyncio.ensure_future(hold_connection(client, 0.5))
        await asyncio.sleep(0.05)
        with pytest.raises(GatewayError) as shed:
            await controller.admit("m", IDS, "second", 0)
        assert shed.value.status_code == 503
        assert shed.value.to_dict()["code"] == BUSY_CODE
        assert int((shed.value.headers or {})["Retry-After"]) >= 1
        assert not controller.outage.down and controller.outage.should_try()
        assert not controller.holds("second") and controller.local["m"] == 0
        await holder
        await controller.admit("m", IDS, "third", 0)  # Redis decides again at once
        assert await controller.gate.counts("m") == (2, 0)
    finally:
        await controller.aclose()
        await client.aclose()


def deployments() -> list[dict[str, Any]]:
    return [{"model_name": "m", "model_info": {"id": rid}} for rid in IDS]


async def test_routing_waits_for_connections_and_never_routes_by_local_counts(
    redis_server: RedisServer, plain: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIAGE_REDIS_MAX_CONNECTIONS", "4")
    settings = RoutingSettings(
        redis_url=redis_server.url, key_prefix=prefix(), redis_retry_ms=60_000
    )
    await publish(plain, settings.key_prefix, max_active=CONCURRENT)
    strategy = LeastBusyStrategy(settings)
    try:
        calls = [f"c{i}" for i in range(CONCURRENT)]
        await asyncio.gather(*(strategy.choose_deployment("m", deployments(), c) for c in calls))
        assert not strategy.outage.down and strategy.outage.fallbacks == 0
        assert sum(await strategy.store.inflight(IDS)) == CONCURRENT
        await asyncio.gather(*(strategy.release_request(c) for c in calls))
        assert await strategy.store.inflight(IDS) == [0, 0]
    finally:
        await strategy.aclose()


async def test_routing_answers_busy_when_no_connection_frees_in_time(
    redis_server: RedisServer, plain: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIAGE_REDIS_MAX_CONNECTIONS", "1")
    monkeypatch.setenv("TRIAGE_REDIS_POOL_TIMEOUT_MS", "50")
    settings = RoutingSettings(
        redis_url=redis_server.url, key_prefix=prefix(), redis_retry_ms=60_000
    )
    await publish(plain, settings.key_prefix, max_active=4)
    strategy = LeastBusyStrategy(settings)
    try:
        holder = asyncio.ensure_future(hold_connection(strategy.store.client, 0.5))
        await asyncio.sleep(0.05)
        with pytest.raises(RedisBusy):
            await strategy.choose_deployment("m", deployments(), "busy-1")
        assert not strategy.outage.down and strategy.outage.fallbacks == 0
        assert strategy.held() == []
        await holder
        chosen = await strategy.choose_deployment("m", deployments(), "busy-2")
        assert chosen["model_info"]["id"] in IDS and strategy.outage.fallbacks == 0
        await strategy.release_request("busy-2")
    finally:
        await strategy.aclose()
