"""Tickets and reservations that no live request holds stop counting within one lease, while a
live request keeps them however long it runs: the admission controller and the routing strategy
renew what they hold, against a real redis-server (killed and restarted here).

Before, leases were 15 minutes and never renewed: a Redis restart under load left a quarter of
the gate's capacity in phantom tickets for 15 minutes, and so did a proxy killed mid-request.
The leases here are 1 s (renewed every 250 ms) to keep the tests short; the defaults are 10 s
and 2.5 s (``tests/test_leases_policy.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from core.keyschema import KeySchema
from core.redis_client import fail_fast_redis
from devstack.redis_launcher import RedisServer
from plugins.admission.controller import AdmissionController
from plugins.admission.gate import AdmissionGate
from plugins.admission.settings import AdmissionSettings
from plugins.routing.settings import RoutingSettings
from plugins.routing.strategy import LeastBusyStrategy

from replica_states import replica_state

pytestmark = pytest.mark.integration

_prefixes = itertools.count()
IDS = ["h-a", "h-b"]
LEASE_MS, RENEW_MS = 1000, 250
log = logging.getLogger(__name__)


@dataclass
class Proxy:
    """What one proxy process holds Redis entries with: its admission controller and its
    routing strategy."""

    controller: AdmissionController
    strategy: LeastBusyStrategy
    client: Redis

    async def admit_and_route(self, ticket: str) -> str:
        await self.controller.admit("m", IDS, ticket, 0)
        chosen = await self.strategy.choose_deployment("m", deployments(), ticket)
        return str(chosen["model_info"]["id"])

    async def end(self, ticket: str) -> None:
        await self.controller.finish(ticket)
        await self.strategy.release_request(ticket)

    async def crash(self) -> None:
        """SIGKILL: nothing is released, nothing renews any more."""
        await self.controller.renewer.aclose()
        await self.strategy.renewer.aclose()

    async def aclose(self) -> None:
        await self.controller.aclose()
        await self.strategy.aclose()
        await self.client.aclose()


def deployments() -> list[dict[str, Any]]:
    return [{"model_name": "m", "model_info": {"id": rid}} for rid in IDS]


def make_proxy(url: str, key_prefix: str, lease_ms: int = LEASE_MS) -> Proxy:
    common: dict[str, Any] = {
        "redis_url": url,
        "key_prefix": key_prefix,
        "lease_ms": lease_ms,
        "renew_ms": RENEW_MS if lease_ms == LEASE_MS else lease_ms // 4,
        "redis_retry_ms": 100,
    }
    admission = AdmissionSettings(**common, queue_allowance=0)
    client = fail_fast_redis(url, admission.redis_timeout_ms)
    controller = AdmissionController(AdmissionGate(client, admission), admission)
    return Proxy(controller, LeastBusyStrategy(RoutingSettings(**common)), client)


@pytest.fixture
async def proxies() -> AsyncIterator[Callable[..., Proxy]]:
    made: list[Proxy] = []

    def make(url: str, key_prefix: str, lease_ms: int = LEASE_MS) -> Proxy:
        made.append(make_proxy(url, key_prefix, lease_ms))
        return made[-1]

    try:
        yield make
    finally:
        for proxy in made:
            await proxy.aclose()


async def publish(url: str, key_prefix: str) -> None:
    client = Redis.from_url(url)
    try:
        keys = KeySchema(key_prefix)
        for rid in IDS:
            state = replica_state(rid, max_active=8, ts_ms=int(time.time() * 1000) + 600_000)
            await client.hset(keys.replica(rid), mapping=state.to_redis())
    finally:
        await client.aclose()


async def counted(url: str, key_prefix: str) -> tuple[int, int]:
    """(admitted tickets, routing reservations) that count now, from a client of its own."""
    client = Redis.from_url(url)
    try:
        s = AdmissionSettings(redis_url=url, key_prefix=key_prefix)
        outstanding, _ = await AdmissionGate(client, s).counts("m")
        keys = KeySchema(key_prefix)
        now = int(time.time() * 1000)
        reservations = sum([await client.zcount(keys.inflight(r), f"({now}", "+inf") for r in IDS])
        return outstanding, reservations
    finally:
        await client.aclose()


async def seconds_until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> float:
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout_s, f"not true after {timeout_s} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_a_live_request_keeps_its_ticket_and_reservation_past_many_leases(
    redis_server: RedisServer, proxies: Callable[..., Proxy]
) -> None:
    key_prefix = f"test-heal:{next(_prefixes)}:"
    await publish(redis_server.url, key_prefix)
    proxy = proxies(redis_server.url, key_prefix)
    await proxy.admit_and_route("long-stream")
    await asyncio.sleep(2.6 * LEASE_MS / 1000)  # a stream of many minutes, scaled down
    assert await counted(redis_server.url, key_prefix) == (1, 1)
    assert proxy.controller.renewer.renewals >= 5 and proxy.strategy.renewer.renewals >= 5
    await proxy.end("long-stream")
    assert await counted(redis_server.url, key_prefix) == (0, 0)
    await asyncio.sleep(RENEW_MS / 1000 * 1.5)
    assert not proxy.controller.renewer.running  # nothing held: the renewals stop


async def test_a_dead_proxys_entries_stop_counting_within_one_lease(
    redis_server: RedisServer, proxies: Callable[..., Proxy]
) -> None:
    key_prefix = f"test-heal:{next(_prefixes)}:"
    await publish(redis_server.url, key_prefix)
    dead, alive = proxies(redis_server.url, key_prefix), proxies(redis_server.url, key_prefix)
    for i in range(3):
        await dead.admit_and_route(f"dead-{i}")
    await alive.admit_and_route("alive")
    await asyncio.sleep(RENEW_MS / 1000 * 1.2)  # renewed at least once
    await dead.crash()
    crashed = time.monotonic()

    async def healed() -> bool:
        return await counted(redis_server.url, key_prefix) == (1, 1)

    await seconds_until(healed, LEASE_MS / 1000 + 1.0)
    took = time.monotonic() - crashed
    log.info("a dead proxy's entries stopped counting %.2f s after it died", took)
    assert took <= (LEASE_MS + RENEW_MS) / 1000 + 0.3
    await asyncio.sleep(LEASE_MS / 1000)
    assert await counted(redis_server.url, key_prefix) == (1, 1)  # the live one stays
    await alive.end("alive")


async def test_a_redis_restart_drops_lost_releases_and_keeps_live_requests(
    tmp_path: Path, proxies: Callable[..., Proxy]
) -> None:
    """Redis dies under load (SIGKILL) for longer than a lease, then comes back on its data: the
    release that failed meanwhile leaves no phantom, the live request is still counted. Then it
    comes back without its data: the live request is put back."""
    server = RedisServer(tmp_path).start()
    key_prefix = f"test-heal:{next(_prefixes)}:"
    try:
        await publish(server.url, key_prefix)
        proxy = proxies(server.url, key_prefix)
        await proxy.admit_and_route("live")
        await proxy.admit_and_route("lost")
        await asyncio.sleep(1.2)  # the append-only file is synced every second
        server.kill()
        await proxy.end("lost")  # fails: Redis is down (logged; no longer held or renewed)
        await asyncio.sleep(1.5 * LEASE_MS / 1000)
        server.start()  # same port, same data
        restarted = time.monotonic()

        async def healed() -> bool:
            return await counted(server.url, key_prefix) == (1, 1)

        await seconds_until(healed, 3.0)
        log.info("after a restart the counts were right %.2f s later", time.monotonic() - restarted)
        await asyncio.sleep(LEASE_MS / 1000)
        assert await counted(server.url, key_prefix) == (1, 1)
        # again, without the data this time
        server.kill()
        shutil.rmtree(tmp_path / f"redis-{server.port}")
        server.start()
        await seconds_until(healed, 3.0)
        assert proxy.controller.renewer.restored >= 1 and proxy.strategy.renewer.restored >= 1
        await proxy.end("live")
        assert await counted(server.url, key_prefix) == (0, 0)
    finally:
        server.stop()


async def test_a_release_lost_to_a_short_outage_is_done_when_redis_is_back(
    tmp_path: Path, proxies: Callable[..., Proxy]
) -> None:
    """Redis is down for less than a lease: the live proxy retries the release that failed
    meanwhile, so its phantom is gone as soon as Redis answers (not one lease later)."""
    server = RedisServer(tmp_path).start()
    key_prefix = f"test-heal:{next(_prefixes)}:"
    lease_ms = 4000
    try:
        await publish(server.url, key_prefix)
        proxy = proxies(server.url, key_prefix, lease_ms)
        await proxy.admit_and_route("live")
        await proxy.admit_and_route("lost")
        await asyncio.sleep(1.2)  # the append-only file is synced every second
        server.kill()
        await proxy.end("lost")  # fails: retried with the renewals
        await asyncio.sleep(0.3)
        server.start()

        async def healed() -> bool:
            return await counted(server.url, key_prefix) == (1, 1)

        took = await seconds_until(healed, lease_ms / 1000)
        log.info("a release lost to a short outage was done %.2f s after the restart", took)
        assert took < 1.2  # the renewer's next try, not the lost lease's end (~2.5 s)
        # the ticket and the reservation, each by its own component's renewer
        assert proxy.controller.renewer.released_late == proxy.strategy.renewer.released_late == 1
        await proxy.end("live")
        assert await counted(server.url, key_prefix) == (0, 0)
    finally:
        server.stop()
