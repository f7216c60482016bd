"""The least-busy strategy inside a real LiteLLM ``Router``, against a real redis-server.

The deployments here answer with LiteLLM's own ``mock_response`` (no upstream): these tests are
about how the strategy plugs into LiteLLM (installation, re-initialisation, which hooks release
reservations, fail-open), not about Triton. The end-to-end proof runs a real proxy in front of
real Triton replicas (``test_proxy_routing.py``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import litellm
import pytest
from litellm import Router
from redis.asyncio import Redis

from core.keyschema import KeySchema
from core.paths import free_port
from devstack.redis_launcher import RedisServer
from plugins.routing.hook import RoutingHook
from plugins.routing.settings import RoutingSettings
from plugins.routing.store import RoutingStore
from plugins.routing.strategy import NoEligibleReplica

from replica_states import replica_state

_prefixes = itertools.count()
IDS = ["r-a", "r-b", "r-c"]


def deployments(response: Any = "hello") -> list[dict[str, Any]]:
    return [
        {
            "model_name": "m",
            "litellm_params": {"model": "openai/m", "api_key": "x", "mock_response": response},
            "model_info": {"id": rid},
        }
        for rid in IDS
    ]


def state(replica_id: str, **fields: Any) -> dict[str, str]:
    return replica_state(replica_id, **fields).to_redis()


def unregister(callback: RoutingHook) -> None:
    """LiteLLM copies callbacks into several lists and keeps one instance per class: a test's
    hook must leave all of them, or the next test's hook never hears of its requests."""
    litellm.logging_callback_manager.remove_callback_from_all_lists(callback)
    if callback in litellm.callbacks:
        litellm.callbacks.remove(callback)


@pytest.fixture
async def hook(redis_server: RedisServer) -> AsyncIterator[RoutingHook]:
    settings = RoutingSettings(
        redis_url=redis_server.url, key_prefix=f"test-strategy:{next(_prefixes)}:"
    )
    routing_hook = RoutingHook(settings)
    litellm.callbacks.append(routing_hook)
    try:
        yield routing_hook
    finally:
        unregister(routing_hook)
        await routing_hook.strategy.aclose()


def keys_of(hook: RoutingHook) -> KeySchema:
    return KeySchema(hook.strategy.settings.key_prefix)


async def publish(client: Redis, hook: RoutingHook, **per_replica: dict[str, Any]) -> None:
    keys = keys_of(hook)
    for rid in IDS:
        await client.hset(keys.replica(rid), mapping=state(rid, **per_replica.get(rid, {})))


async def inflight(hook: RoutingHook) -> list[int]:
    # a client of its own: the measurement must not share the plugin's short timeouts
    client = Redis.from_url(str(hook.strategy.settings.redis_url))
    try:
        return await RoutingStore(client, keys_of(hook)).inflight(IDS)
    finally:
        await client.aclose()


async def eventually(check: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout_s} s: {check}")
        await asyncio.sleep(0.02)


def chosen(response: Any) -> str:
    return str(response._hidden_params["model_id"])


async def test_picks_least_busy_and_releases_on_success(client: Redis, hook: RoutingHook) -> None:
    router = Router(model_list=deployments())
    hook.strategy.install(router)
    await publish(
        client, hook, **{"r-a": {"active": 6}, "r-b": {"active": 1}, "r-c": {"active": 5}}
    )
    response = await router.acompletion(model="m", messages=[{"role": "user", "content": "hi"}])
    assert chosen(response) == "r-b"
    await eventually(lambda: _zero(hook))
    assert hook.strategy.held() == []


async def _zero(hook: RoutingHook) -> bool:
    return await inflight(hook) == [0, 0, 0]


async def test_speed_matters_not_only_counts(client: Redis, hook: RoutingHook) -> None:
    router = Router(model_list=deployments())
    hook.strategy.install(router)
    # r-a has fewer requests but is 3x slower: (1+1)*300 = 600 > (2+1)*100 = 300
    await publish(
        client,
        hook,
        **{
            "r-a": {"active": 1, "service_ms": 300.0},
            "r-b": {"active": 2},
            "r-c": {"active": 4},
        },
    )
    response = await router.acompletion(model="m", messages=[{"role": "user", "content": "hi"}])
    assert chosen(response) == "r-b"


async def test_unhealthy_and_expired_are_excluded_unknown_not_preferred(
    client: Redis, hook: RoutingHook
) -> None:
    router = Router(model_list=deployments())
    hook.strategy.install(router)
    keys = keys_of(hook)
    await client.hset(keys.replica("r-a"), mapping=state("r-a", healthy=False, state="unhealthy"))
    await client.hset(keys.replica("r-b"), mapping=state("r-b", active=4, waiting=6))
    # r-c: no hash at all (sidecar down or expired) -> unknown, usable but not preferred
    picks = Counter()
    for _ in range(6):
        response = await router.acompletion(model="m", messages=[{"role": "user", "content": "x"}])
        picks[chosen(response)] += 1
    assert picks == {"r-b": 6}
    await client.delete(keys.replica("r-b"))
    response = await router.acompletion(model="m", messages=[{"role": "user", "content": "x"}])
    assert chosen(response) in {"r-b", "r-c"}  # both unknown now; r-a stays excluded
    await client.hset(keys.replica("r-b"), mapping=state("r-b", healthy=False, state="unhealthy"))
    await client.hset(keys.replica("r-c"), mapping=state("r-c", healthy=False, state="unhealthy"))
    with pytest.raises(NoEligibleReplica):
        await router.acompletion(
            model="m", messages=[{"role": "user", "content": "x"}], num_retries=0
        )


async def reserve(hook: RoutingHook, replica_id: str, call_id: str) -> str:
    """A reservation as the admission gate's script takes it (a ``plan_pick`` plan), adopted."""
    plan = hook.strategy.plan_pick(call_id)
    assert plan is not None
    store = hook.strategy.store
    reservation = await store.pick_planned([replica_id], plan)
    assert reservation is not None and reservation.replica_id == replica_id
    hook.strategy.adopt("m", hook.strategy.book.open(call_id), reservation)
    return reservation.reservation_id


async def test_a_replica_reserved_with_the_admission_is_routed_to_then_released(
    client: Redis, hook: RoutingHook
) -> None:
    """The admission gate reserved r-c for this request: its attempt goes there (though r-a is
    less busy now), with no second pick, and the reservation is given back at the end."""
    router = Router(model_list=deployments())
    hook.strategy.install(router)
    assert hook.strategy.installed_on(router) and hook.strategy.book.picker is hook.strategy
    assert not hook.strategy.installed_on(Router(model_list=deployments()))  # LiteLLM's own
    await publish(client, hook, **{"r-b": {"active": 6}, "r-c": {"active": 5}})
    await reserve(hook, "r-c", "pre-1")
    assert await inflight(hook) == [0, 0, 1]
    response = await router.acompletion(
        model="m", messages=[{"role": "user", "content": "x"}], litellm_call_id="pre-1"
    )
    assert chosen(response) == "r-c"
    await eventually(lambda: _zero(hook))
    assert hook.strategy.held() == [] and hook.strategy.book.get("pre-1") is None
    response = await router.acompletion(model="m", messages=[{"role": "user", "content": "x"}])
    assert chosen(response) == "r-a"  # the others pick as before


async def test_the_request_end_gives_back_the_adopted_reservation_once(
    client: Redis, hook: RoutingHook
) -> None:
    """Without the admission plugin's release, the routing plugin gives the gate's reservation
    back when the request ends (once: a second end finds the ticket ended)."""
    router = Router(model_list=deployments())
    hook.strategy.install(router)
    await publish(client, hook)
    await reserve(hook, "r-b", "pre-4")
    ticket = hook.strategy.book.get("pre-4")
    response = await router.acompletion(
        model="m", messages=[{"role": "user", "content": "x"}], litellm_call_id="pre-4"
    )
    assert chosen(response) == "r-b"
    await eventually(lambda: _zero(hook))
    assert ticket is not None and ticket.ended and hook.strategy.held() == []
    assert not await hook.strategy.book.end("pre-4")  # ended once
    await hook.on_request_end({"litellm_call_id": "pre-4"})
    assert await inflight(hook) == [0, 0, 0]


async def test_with_admission_one_call_admits_and_picks_and_one_releases_both(
    client: Redis, hook: RoutingHook
) -> None:
    """The admission hook in front of this strategy: its gate call admits and reserves the
    replica, the attempt goes there, and after the success its release gives back the
    admission and the reservation together (``release.lua`` is never called)."""
    from litellm.proxy import proxy_server
    from litellm.proxy._types import UserAPIKeyAuth

    from plugins.admission.hook import AdmissionHook
    from plugins.admission.settings import AdmissionSettings

    settings = hook.strategy.settings
    admission = AdmissionHook(
        AdmissionSettings(redis_url=settings.redis_url, key_prefix=settings.key_prefix)
    )
    router = Router(model_list=deployments())
    hook.strategy.install(router)
    await publish(client, hook, **{"r-a": {"active": 6}, "r-c": {"active": 6}})
    released: list[str] = []

    async def release(replica_id: str, reservation_id: str) -> int:
        released.append(reservation_id)
        return 0

    hook.strategy.store.release = release  # type: ignore[method-assign]
    saved, proxy_server.llm_router = proxy_server.llm_router, router
    try:
        data: dict[str, Any] = {"model": "m", "litellm_call_id": "fold-1"}
        await admission.async_pre_call_hook(UserAPIKeyAuth(), None, data, "acompletion")
        ticket = hook.strategy.book.get("fold-1")
        assert ticket is not None and ticket.routing is not None
        assert ticket.routing.prepicked == "r-b"  # the least busy
        assert ticket.admission is not None and ticket.admission.owner is admission.controller
        assert await inflight(hook) == [0, 1, 0]
        response = await router.acompletion(
            model="m", messages=[{"role": "user", "content": "x"}], litellm_call_id="fold-1"
        )
        assert chosen(response) == "r-b"
        request_data = {**data, "model_info": {"id": "r-b"}}
        await admission.async_post_call_success_deployment_hook(
            request_data, response, "acompletion"
        )
        await eventually(lambda: _zero(hook))
        assert await admission.controller.gate.counts("m") == (0, 0)
        assert released == []  # no release.lua call: the gate's release took the reservation
        await hook.on_request_end(data)  # LiteLLM's success logging: nothing left to release
        await admission.on_request_end(data)
        assert released == [] and hook.strategy.held() == []
    finally:
        proxy_server.llm_router = saved
        await admission.controller.aclose()


async def test_a_reserved_replica_the_router_filtered_out_is_given_back(
    client: Redis, hook: RoutingHook
) -> None:
    """The reserved replica is no longer among the router's deployments (a cooldown, a config
    change): the reservation is given back and the request picked anew."""
    router = Router(model_list=deployments()[:2])  # r-a and r-b only
    hook.strategy.install(router)
    await publish(client, hook, **{"r-a": {"active": 6}})
    await reserve(hook, "r-c", "pre-2")
    response = await router.acompletion(
        model="m", messages=[{"role": "user", "content": "x"}], litellm_call_id="pre-2"
    )
    assert chosen(response) == "r-b"
    await eventually(lambda: _zero(hook))
    assert hook.strategy.held() == []


async def test_a_reservation_of_a_request_that_never_routed_is_released_at_its_end(
    hook: RoutingHook,
) -> None:
    """Admitted and reserved, then the request ended before routing (a later pre-call hook
    refused it, the client left): the request's end gives the reservation back."""
    await reserve(hook, "r-b", "pre-3")
    assert await inflight(hook) == [0, 1, 0]
    await hook.on_request_end({"litellm_call_id": "pre-3"})
    assert await inflight(hook) == [0, 0, 0]
    assert hook.strategy.book.get("pre-3") is None and hook.strategy.held() == []


async def test_failure_releases_every_attempt(client: Redis, hook: RoutingHook) -> None:
    router = Router(
        model_list=deployments(response="litellm.InternalServerError"),
        num_retries=2,
        retry_after=0,
    )
    hook.strategy.install(router)
    await publish(client, hook)
    with pytest.raises(litellm.InternalServerError):
        await router.acompletion(model="m", messages=[{"role": "user", "content": "x"}])
    await eventually(lambda: _zero(hook))
    assert hook.strategy.held() == []


async def test_stream_released_at_end_not_at_start(client: Redis, hook: RoutingHook) -> None:
    router = Router(model_list=deployments(response="one two three four"))
    hook.strategy.install(router)
    await publish(client, hook)
    stream = await router.acompletion(
        model="m", messages=[{"role": "user", "content": "x"}], stream=True
    )
    assert sum(await inflight(hook)) == 1  # held while the stream is open
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == "one two three four"
    await eventually(lambda: _zero(hook))


async def test_client_disconnect_mid_stream_releases(client: Redis, hook: RoutingHook) -> None:
    """The proxy wraps streams with the iterator hook; closing it early is a disconnect."""
    router = Router(model_list=deployments(response="one two three four five six"))
    hook.strategy.install(router)
    await publish(client, hook)
    data: dict[str, Any] = {"litellm_call_id": "disconnect-1"}
    stream = await router.acompletion(
        model="m", messages=[{"role": "user", "content": "x"}], stream=True, **data
    )
    wrapped = hook.async_post_call_streaming_iterator_hook(None, stream, data)  # type: ignore[arg-type]
    await wrapped.__anext__()
    assert sum(await inflight(hook)) == 1
    await wrapped.aclose()  # what the proxy does when the client goes away
    await eventually(lambda: _zero(hook))


async def test_survives_router_reinitialisation(client: Redis, hook: RoutingHook) -> None:
    from litellm.proxy import proxy_server

    router = Router(model_list=deployments())
    hook.strategy.install(router)
    router.routing_strategy_init("simple-shuffle", {})  # what a router_settings change does
    assert not hook.strategy.installed_on(router)
    await publish(client, hook, **{"r-a": {"active": 4}, "r-b": {"active": 4}})
    saved = proxy_server.llm_router
    proxy_server.llm_router = router
    try:
        # the proxy runs pre-call hooks before routing every request
        await hook.async_pre_call_hook(None, None, {}, "acompletion")  # type: ignore[arg-type]
    finally:
        proxy_server.llm_router = saved
    assert hook.strategy.installed_on(router)
    for _ in range(3):
        response = await router.acompletion(model="m", messages=[{"role": "user", "content": "x"}])
        assert chosen(response) == "r-c"
    # a brand-new router (config reload) is adopted the same way
    fresh = Router(model_list=deployments())
    hook.ensure_installed(fresh)
    response = await fresh.acompletion(model="m", messages=[{"role": "user", "content": "x"}])
    assert chosen(response) == "r-c"


async def test_fails_open_without_redis_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    settings = RoutingSettings(
        redis_url=f"redis://127.0.0.1:{port}/0", redis_retry_ms=0, log_interval_s=60
    )
    routing_hook = RoutingHook(settings)
    litellm.callbacks.append(routing_hook)
    router = Router(model_list=deployments())
    routing_hook.strategy.install(router)
    server = RedisServer(tmp_path, port=port)
    try:
        with caplog.at_level(logging.WARNING, logger="plugins.routing.fallback"):
            picks = Counter()
            for _ in range(30):
                response = await router.acompletion(
                    model="m", messages=[{"role": "user", "content": "x"}]
                )
                picks[chosen(response)] += 1
        assert set(picks) == set(IDS)  # spread by per-process counts, nobody starved
        outage_logs = [r for r in caplog.records if "redis unreachable" in r.getMessage()]
        assert len(outage_logs) == 1  # once per interval, not once per request
        server.start()
        hash_client = Redis.from_url(server.url)
        try:
            for rid in IDS:
                busy = {"active": 0 if rid == "r-c" else 4}
                await hash_client.hset(KeySchema().replica(rid), mapping=state(rid, **busy))
            for _ in range(3):
                response = await router.acompletion(
                    model="m", messages=[{"role": "user", "content": "x"}]
                )
                assert chosen(response) == "r-c"  # Redis-based routing resumed by itself
            assert not routing_hook.strategy.outage.down
        finally:
            await hash_client.aclose()
    finally:
        unregister(routing_hook)
        await routing_hook.strategy.aclose()
        server.stop()


async def test_a_retry_never_goes_back_to_a_replica_that_refused_the_connection(
    client: Redis, hook: RoutingHook
) -> None:
    """r-a's port refuses connections (a SIGKILLed replica whose sidecar has not noticed yet)
    and it looks the least busy, so every request tries it first. Each retry must go to a
    replica the request has not failed on: LiteLLM logs every failed attempt
    (``async_log_failure_event``, in a task of its own, before the retry's pick at times),
    and that event must not make the request forget where it failed."""
    from plugins.triton_provider.deployments import triton_deployment
    from plugins.triton_provider.handler import register

    register()
    dead = triton_deployment("m", "r-a", f"http://127.0.0.1:{free_port()}", "standin")
    router = Router(model_list=[dead, *deployments()[1:]], num_retries=3, retry_after=0)
    hook.strategy.install(router)
    attempts: list[tuple[str, str]] = []
    choose = hook.strategy.choose_deployment

    async def spy(model: str, candidates: list[dict[str, Any]], call_id: str) -> dict[str, Any]:
        if any(seen == call_id for seen, _ in attempts):  # a retry: r-a's slot is back already
            assert (await inflight(hook))[0] == 0
        chosen_deployment = await choose(model, candidates, call_id)
        attempts.append((call_id, str(chosen_deployment["model_info"]["id"])))
        return chosen_deployment

    hook.strategy.choose_deployment = spy  # type: ignore[method-assign]
    for i in range(6):
        # r-b and r-c saturated, r-a idle: the policy prefers r-a (fresh states each time)
        await publish(client, hook, **{"r-b": {"active": 6}, "r-c": {"active": 6}})
        response = await router.acompletion(
            model="m", messages=[{"role": "user", "content": "x"}], litellm_call_id=f"dead-{i}"
        )
        assert chosen(response) in {"r-b", "r-c"}
        await asyncio.sleep(0.05)  # the failed attempt's logging task runs by now
    on_dead = Counter(call_id for call_id, replica in attempts if replica == "r-a")
    # tried first (until LiteLLM's cooldown drops r-a after a few failures), never again
    assert len(on_dead) >= 3 and set(on_dead.values()) == {1}, attempts
    await eventually(lambda: _zero(hook))
    assert hook.strategy.held() == []
