"""gate.lua and the controller against a real redis-server: fleet-wide capacity, the priority
FIFO queue, leases, and two proxy processes sharing one budget."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from core.keyschema import KeySchema
from devstack.redis_launcher import RedisServer
from plugins.admission.controller import AdmissionController, QueueRate
from plugins.admission.errors import GatewayError
from plugins.admission.gate import AdmissionGate, Status
from plugins.admission.rules import PRIORITY_UNIT, FlowCall
from plugins.admission.settings import AdmissionSettings
from plugins.routing.policy import PolicyParams
from plugins.routing.store import PickPlan, RoutingStore

from replica_states import replica_state

_prefixes = itertools.count()
IDS = ["a", "b"]
TIER_1, TIER_2 = PRIORITY_UNIT, 2 * PRIORITY_UNIT
"""Queue scores: below TIER_1 is tier 0, below TIER_2 tier 1 or better."""


def settings(redis_server: RedisServer, **overrides: Any) -> AdmissionSettings:
    base: dict[str, Any] = {
        "redis_url": redis_server.url,
        "key_prefix": f"test-adm:{next(_prefixes)}:",
        "queue_allowance": 1,
        "max_queue": 4,
        "max_wait_ms": 2000,
        "poll_ms": 5,
    }
    base.update(overrides)
    return AdmissionSettings(**base)


def state(replica_id: str, **fields: Any) -> dict[str, str]:
    gate_defaults: dict[str, Any] = {
        "max_active": 2,
        "service_ms": 10.0,
        "request_ms": 10.0,
        "drain_rps": 4.0,
    }
    return replica_state(replica_id, **{**gate_defaults, **fields}).to_redis()


@pytest.fixture
async def controllers() -> AsyncIterator[Callable[[Redis, AdmissionSettings], AdmissionController]]:
    """Make controllers (one per simulated proxy process); their grant listeners stop after."""
    made: list[AdmissionController] = []

    def make(redis: Redis, s: AdmissionSettings) -> AdmissionController:
        made.append(AdmissionController(AdmissionGate(redis, s), s))
        return made[-1]

    try:
        yield make
    finally:
        for controller in made:
            await controller.aclose()


async def publish(client: Redis, s: AdmissionSettings, **per: dict[str, Any]) -> None:
    keys = KeySchema(s.key_prefix)
    for rid in IDS:
        await client.hset(keys.replica(rid), mapping=state(rid, **per.get(rid, {})))


async def test_capacity_is_max_active_plus_allowance_of_healthy_replicas(
    client: Redis, redis_server: RedisServer
) -> None:
    s = settings(redis_server)
    gate = AdmissionGate(client, s)
    await publish(client, s)  # 2 x (2 + 1) = 6
    replies = [await gate.enter("m", IDS, f"t{i}", 1) for i in range(6)]
    assert [r.status for r in replies] == [Status.ADMITTED] * 6
    assert replies[-1].capacity == 6 and replies[-1].drain_rps == 8.0
    # with every slot busy: 2 replicas x max_active 2 / 10 ms
    assert replies[-1].throughput_rps == pytest.approx(400.0)
    assert (await gate.enter("m", IDS, "t6", 1)).status == Status.WAITING
    await publish(client, s, b={"healthy": False, "state": "unhealthy"})
    unhealthy_b = await gate.enter("m", IDS, "t7", 1)
    assert unhealthy_b.capacity == 3 and unhealthy_b.throughput_rps == pytest.approx(200.0)
    for i in range(6):
        await gate.release("m", IDS, f"t{i}")
    await gate.leave("m", IDS, "t6")
    await gate.leave("m", IDS, "t7")
    assert await gate.counts("m") == (0, 0)


async def test_unknown_replicas_count_default_slots_and_all_unhealthy_sheds(
    client: Redis, redis_server: RedisServer
) -> None:
    s = settings(redis_server, unknown_replica_slots=3)
    gate = AdmissionGate(client, s)
    reply = await gate.enter("m", IDS, "u0", 1)  # no hashes at all: sidecars down
    assert (reply.status, reply.capacity) == (Status.ADMITTED, 6)
    await gate.release("m", IDS, "u0")
    await publish(client, s, a={"healthy": False}, b={"healthy": False})
    assert (await gate.enter("m", IDS, "u1", 1)).status == Status.NO_CAPACITY


@pytest.mark.parametrize(
    ("field", "value"), [("max_active", "0"), ("kv_fraction", "1.5"), ("active", "-1")]
)
async def test_a_replica_the_router_holds_invalid_is_unknown_to_the_gate_too(
    client: Redis, redis_server: RedisServer, field: str, value: str
) -> None:
    """One reading of a replica hash for routing and admission (pick_lib.lua's read_replica):
    a hash with ``max_active = 0`` used to give the gate a healthy replica with no slots while
    the router took it for unknown."""
    s = settings(redis_server, unknown_replica_slots=3)
    gate = AdmissionGate(client, s)
    await publish(client, s)
    await client.hset(KeySchema(s.key_prefix).replica("a"), field, value)
    reply = await gate.enter("m", IDS, "v0", 1)
    # a: unknown, 3 slots and no allowance; b: 2 slots + 1 allowance
    assert (reply.status, reply.capacity) == (Status.ADMITTED, 6)
    assert reply.throughput_rps == pytest.approx(200.0)  # b alone is measured
    await gate.release("m", IDS, "v0")


async def test_queue_is_fifo_within_priority_and_priority_first(
    client: Redis, redis_server: RedisServer
) -> None:
    s = settings(redis_server, max_queue=10)
    gate = AdmissionGate(client, s)
    await publish(client, s, a={"max_active": 1}, b={"healthy": False})  # capacity 1 + 1 = 2
    for t in ("hold-1", "hold-2"):
        assert (await gate.enter("m", IDS, t, 1)).status == Status.ADMITTED
    arrivals = [("low-1", 2), ("mid-1", 1), ("low-2", 2), ("high-1", 0), ("mid-2", 1)]
    for ticket, priority in arrivals:
        assert (await gate.enter("m", IDS, ticket, priority)).status == Status.WAITING
    order = []
    pending = dict(arrivals)
    await gate.release("m", IDS, "hold-1")  # 1 outstanding, 1 batch slot: no grant yet
    for round_ in range(len(arrivals)):
        await gate.release("m", IDS, "hold-2" if round_ == 0 else order[-1])
        for ticket, priority in list(pending.items()):
            if (await gate.poll("m", IDS, ticket, priority)).status == Status.ADMITTED:
                order.append(ticket)
                del pending[ticket]
    assert order == ["high-1", "mid-1", "mid-2", "low-1", "low-2"]


async def test_a_waiter_gets_any_replicas_free_slot_and_unrouted_tickets_count(
    client: Redis, redis_server: RedisServer
) -> None:
    """Slots count per replica (the routing plugin's reservations): a waiter is granted the slow
    replica's free slot while the router queues briefly on the fast one; an admitted request
    not yet routed holds a slot too."""
    s = settings(redis_server, queue_allowance=1)
    keys = KeySchema(s.key_prefix)
    gate = AdmissionGate(client, s)
    await publish(client, s, b={"max_active": 1})  # 3 slots, capacity 3 + 2 x 1 = 5

    async def route(ticket: str, replica: str) -> None:
        await client.zadd(keys.inflight(replica), {ticket: time.time() * 1000 + 60_000})

    async def end(ticket: str, replica: str) -> None:
        await client.zrem(keys.inflight(replica), ticket)
        await gate.release("m", IDS, ticket)

    for i in range(5):  # the router queues 3 on the fast replica a, behind its 2 slots
        assert (await gate.enter("m", IDS, f"t{i}", 1)).status == Status.ADMITTED
        await route(f"t{i}", "a")
    assert (await gate.enter("m", IDS, "w", 1)).status == Status.WAITING
    await end("t0", "a")  # 4 outstanding > 3 slots, but b's slot is free
    assert (await gate.poll("m", IDS, "w", 1)).status == Status.ADMITTED
    assert (await gate.enter("m", IDS, "x", 1)).status == Status.WAITING
    await end("t1", "a")
    assert (await gate.poll("m", IDS, "x", 1)).status == Status.WAITING  # "w" holds b's slot
    await route("w", "b")
    await end("t2", "a")
    assert (await gate.poll("m", IDS, "x", 1)).status == Status.WAITING  # a: 2 of 2
    await end("t3", "a")
    assert (await gate.poll("m", IDS, "x", 1)).status == Status.ADMITTED  # a: 1 of 2


def plan(reservation_id: str, tiebreak: int = 0) -> PickPlan:
    return PickPlan(PolicyParams(), tiebreak, reservation_id, 60_000)


async def test_the_call_that_admits_also_reserves_the_replica_routing_would_pick(
    client: Redis, redis_server: RedisServer
) -> None:
    """With a ``PickPlan`` the gate picks and reserves in the call that admits (direct, or a
    waiter claiming its grant), choosing what ``pick.lua`` chooses; a waiter gets nothing
    reserved until it is admitted."""
    s = settings(redis_server, queue_allowance=0)
    keys = KeySchema(s.key_prefix)
    gate = AdmissionGate(client, s)
    store = RoutingStore(client, keys)
    await publish(client, s, a={"active": 1}, b={"service_ms": 15.0})  # a faster, 1 busy

    async def what_pick_lua_picks(tiebreak: int) -> tuple[str, float]:
        routed = await store.pick(IDS, PolicyParams(), tiebreak, "probe", 60_000)
        assert routed is not None
        await store.release(routed.replica_id, routed.reservation_id)
        return routed.replica_id, routed.score

    picked = []
    for i, tiebreak in enumerate([0, 1, 2, 3]):  # the same state in pick.lua and in gate.lua
        expected = await what_pick_lua_picks(tiebreak)
        reply = await gate.enter("m", IDS, f"t{i}", 1, None, plan(f"r{i}", tiebreak))
        assert reply.status == Status.ADMITTED and reply.reservation is not None
        assert (reply.reservation.replica_id, reply.reservation.score) == expected
        member = reply.reservation.reservation_id
        assert member == f"r{i}#1" and await client.zscore(keys.inflight(expected[0]), member)
        picked.append(expected[0])
    assert set(picked) == {"a", "b"}  # load-aware: b once a's load outweighs its speed
    assert sum(await store.inflight(IDS)) == 4  # full: capacity 4, no allowance
    waiting = await gate.enter("m", IDS, "w", 1, None, plan("rw"))
    assert waiting.status == Status.WAITING and waiting.reservation is None
    assert sum(await store.inflight(IDS)) == 4
    await store.release(picked[3], "r3#1")
    await gate.release("m", IDS, "t3")  # grants the freed slot to "w"
    expected = await what_pick_lua_picks(0)
    claimed = await gate.poll("m", IDS, "w", 1, plan("rw2"))
    assert claimed.status == Status.ADMITTED and claimed.reservation is not None
    assert (claimed.reservation.replica_id, claimed.reservation.score) == expected
    assert await client.zscore(keys.inflight(expected[0]), "rw2#1") is not None
    plain = await gate.enter("m", IDS, "x", 1)  # no plan: the router picks later, as before
    assert plain.reservation is None


async def test_a_release_gives_back_the_routing_reservation_and_grants_its_slot_at_once(
    client: Redis, redis_server: RedisServer
) -> None:
    """The request's admission and its routing reservation end in one call: the freed batch
    slot goes to the queue's head in that same call."""
    s = settings(redis_server, queue_allowance=0)
    keys = KeySchema(s.key_prefix)
    gate = AdmissionGate(client, s)
    await publish(client, s)  # 2 x 2 slots
    reserved = []
    for i in range(4):
        reply = await gate.enter("m", IDS, f"t{i}", 1, None, plan(f"r{i}", i))
        assert reply.reservation is not None
        reserved.append(reply.reservation)
    assert (await gate.enter("m", IDS, "w", 1)).status == Status.WAITING
    first = reserved[0]
    released = await gate.release("m", IDS, "t0", (first.replica_id, first.reservation_id))
    assert await client.zscore(keys.inflight(first.replica_id), first.reservation_id) is None
    assert (released.outstanding, released.queued) == (4, 0)  # "w" granted in that call
    assert (await gate.poll("m", IDS, "w", 1)).status == Status.ADMITTED


async def test_queue_limits_and_abandoned_places_expire(
    client: Redis, redis_server: RedisServer
) -> None:
    s = settings(redis_server, max_queue=3, priority_max_queue={2: 1}, queue_lease_ms=200)
    gate = AdmissionGate(client, s)
    await publish(client, s, a={"max_active": 1}, b={"healthy": False})
    for t in ("h1", "h2"):
        await gate.enter("m", IDS, t, 1)
    assert (await gate.enter("m", IDS, "low-1", 2)).status == Status.WAITING
    assert (await gate.enter("m", IDS, "low-2", 2)).status == Status.QUEUE_FULL  # tier limit
    assert (await gate.enter("m", IDS, "q1", 1)).status == Status.WAITING
    assert (await gate.enter("m", IDS, "q2", 1)).status == Status.WAITING
    assert (await gate.enter("m", IDS, "q3", 1)).status == Status.QUEUE_FULL  # depth 3
    await asyncio.sleep(0.3)  # nobody polled: the waiting proxies are gone
    assert await gate.counts("m") == (2, 0)
    assert (await gate.poll("m", IDS, "q1", 1)).status == Status.LOST


async def test_two_controllers_share_one_budget(
    client: Redis,
    redis_server: RedisServer,
    controllers: Callable[[Redis, AdmissionSettings], AdmissionController],
) -> None:
    """Two proxy processes (two controllers, two Redis clients): the fleet-wide bound holds."""
    s = settings(redis_server, max_queue=0)
    await publish(client, s)  # capacity 6
    other = Redis.from_url(redis_server.url)
    controllers = [
        controllers(client, s),
        controllers(other, s),
    ]
    try:
        results = await asyncio.gather(
            *(controllers[i % 2].admit("m", IDS, f"c{i}", 1) for i in range(20)),
            return_exceptions=True,
        )
        admitted = [r for r in results if r is None]
        shed = [r for r in results if isinstance(r, GatewayError)]
        assert len(admitted) == 6 and len(shed) == 14
        assert all(e.status_code == 503 and "Retry-After" in e.headers for e in shed)
        for i, r in enumerate(results):
            if r is None:
                await controllers[i % 2].finish(f"c{i}")
        assert await controllers[0].gate.counts("m") == (0, 0)
    finally:
        await other.aclose()


async def test_waiter_admitted_when_a_slot_frees_or_shed_after_max_wait(
    client: Redis,
    redis_server: RedisServer,
    controllers: Callable[[Redis, AdmissionSettings], AdmissionController],
) -> None:
    s = settings(redis_server, max_wait_ms=300)
    await publish(client, s, a={"max_active": 1}, b={"healthy": False})  # 1 slot + 1 allowance
    ctl = controllers(client, s)
    await ctl.admit("m", IDS, "w1", 1)
    await ctl.admit("m", IDS, "w2", 1)  # the allowance: nobody was waiting
    waiter = asyncio.create_task(ctl.admit("m", IDS, "w3", 1))
    await asyncio.sleep(0.05)
    await ctl.finish("w1")
    await asyncio.sleep(0.05)
    assert not waiter.done()  # a waiter takes a batch slot, never the allowance
    await ctl.finish("w2")
    await asyncio.wait_for(waiter, 1.0)  # admitted once the batch slot freed
    await ctl.admit("m", IDS, "w4", 1)  # nobody waits: the allowance again
    started = time.monotonic()
    with pytest.raises(GatewayError) as info:
        await ctl.admit("m", IDS, "w5", 1)
    assert 0.25 < time.monotonic() - started < 1.0
    assert info.value.to_dict()["code"] == "queue_timeout"
    await asyncio.sleep(0.05)  # the timed-out ticket's place is given back
    for t in ("w3", "w4"):
        await ctl.finish(t)
    assert await ctl.gate.counts("m") == (0, 0)


async def test_a_grant_wakes_the_waiter_in_another_process_without_polling(
    client: Redis,
    redis_server: RedisServer,
    controllers: Callable[[Redis, AdmissionSettings], AdmissionController],
) -> None:
    """Two controllers on two connections (two proxies): a release by one hands the slot to
    the other's waiter at once, though that waiter would poll only after 5 s."""
    s = settings(redis_server, poll_ms=5000, queue_lease_ms=20_000, max_wait_ms=10_000)
    await publish(client, s, a={"max_active": 1}, b={"healthy": False})
    other = Redis.from_url(redis_server.url)
    releaser = controllers(client, s)
    waiting = controllers(other, s)
    try:
        await releaser.admit("m", IDS, "g1", 1)
        await releaser.admit("m", IDS, "g2", 1)
        waiter = asyncio.create_task(waiting.admit("m", IDS, "g3", 1))
        await asyncio.sleep(0.1)
        assert await releaser.gate.counts("m") == (2, 1)
        await releaser.finish("g1")
        await releaser.finish("g2")
        released = time.monotonic()
        await asyncio.wait_for(waiter, 2.0)
        assert time.monotonic() - released < 0.5
        assert waiting.holds("g3")
        await waiting.finish("g3")
        assert await releaser.gate.counts("m") == (0, 0)
    finally:
        await other.aclose()


async def test_an_unclaimed_grant_returns_its_slot(
    client: Redis, redis_server: RedisServer
) -> None:
    """A waiting proxy that died after its grant: the slot comes back after queue_lease_ms."""
    s = settings(redis_server, queue_lease_ms=200)
    gate = AdmissionGate(client, s)
    await publish(client, s, a={"max_active": 1}, b={"healthy": False})
    for t in ("h1", "h2"):
        assert (await gate.enter("m", IDS, t, 1)).status == Status.ADMITTED
    assert (await gate.enter("m", IDS, "dead", 1)).status == Status.WAITING
    await gate.release("m", IDS, "h1")
    await gate.release("m", IDS, "h2")  # granted to "dead", which never claims it
    assert await gate.counts("m") == (1, 0)
    await asyncio.sleep(0.3)
    assert await gate.counts("m") == (0, 0)
    assert (await gate.poll("m", IDS, "dead", 1)).status == Status.LOST


async def test_cancelled_waiter_gives_its_place_back(
    client: Redis,
    redis_server: RedisServer,
    controllers: Callable[[Redis, AdmissionSettings], AdmissionController],
) -> None:
    s = settings(redis_server)
    await publish(client, s, a={"max_active": 1}, b={"healthy": False})
    ctl = controllers(client, s)
    await ctl.admit("m", IDS, "k1", 1)
    await ctl.admit("m", IDS, "k2", 1)
    waiter = asyncio.create_task(ctl.admit("m", IDS, "k3", 1))
    await asyncio.sleep(0.05)
    assert await ctl.gate.counts("m") == (2, 1)
    waiter.cancel()  # the client went away
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.sleep(0.05)
    assert await ctl.gate.counts("m") == (2, 0)
    for t in ("k1", "k2"):
        await ctl.finish(t)


async def test_a_cancel_swallowed_by_wait_for_still_ends_the_wait(
    client: Redis,
    redis_server: RedisServer,
    controllers: Callable[[Redis, AdmissionSettings], AdmissionController],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Python 3.11's ``asyncio.wait_for`` may return instead of raising when the task is
    cancelled as its inner wait ends (forced here): the waiter still stops, gives its place
    back, and is never admitted (CI saw a cancelled waiter admitted by the Redis-down path)."""
    s = settings(redis_server)
    await publish(client, s, a={"max_active": 1}, b={"healthy": False})
    ctl = controllers(client, s)
    await ctl.admit("m", IDS, "s1", 1)
    await ctl.admit("m", IDS, "s2", 1)
    real = asyncio.wait_for

    async def swallowing(awaitable: Any, timeout: float | None) -> Any:
        try:
            return await real(awaitable, timeout)
        except asyncio.CancelledError:
            return None

    monkeypatch.setattr("plugins.admission.controller.asyncio.wait_for", swallowing)
    waiter = asyncio.create_task(ctl.admit("m", IDS, "s3", 1))
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    monkeypatch.undo()
    await asyncio.sleep(0.05)
    assert await ctl.gate.counts("m") == (2, 0) and not ctl.holds("s3")
    for t in ("s1", "s2"):
        await ctl.finish(t)


async def test_redis_down_bounds_per_process(
    redis_server: RedisServer,
    controllers: Callable[[Redis, AdmissionSettings], AdmissionController],
) -> None:
    from core.paths import free_port

    s = settings(
        redis_server, redis_url=f"redis://127.0.0.1:{free_port()}/0", unknown_replica_slots=2
    )
    down = Redis.from_url(str(s.redis_url), socket_connect_timeout=0.2)
    ctl = controllers(down, s)
    try:
        for i in range(4):  # 2 replicas x 2 slots
            await ctl.admit("m", IDS, f"d{i}", 1)
        with pytest.raises(GatewayError):
            await ctl.admit("m", IDS, "d4", 1)
        await ctl.finish("d0")
        await ctl.admit("m", IDS, "d5", 1)
    finally:
        await down.aclose()


async def drained(ctl: AdmissionController, timeout_s: float = 2.0) -> None:
    """Until nothing is admitted or queued (places given back by tasks of their own)."""
    deadline = time.monotonic() + timeout_s
    while (counts := await ctl.gate.counts("m")) != (0, 0):
        if time.monotonic() > deadline:
            keys = KeySchema(ctl.settings.key_prefix)
            left = await ctl.gate.client.zrange(keys.admitted("m"), 0, -1, withscores=True)
            raise AssertionError(f"left admitted, queued: {counts}; admitted: {left}")
        await asyncio.sleep(0.02)


def decisions(model: str, outcome: str, source: str) -> float:
    labels = {"model": model, "outcome": outcome, "source": source}
    return REGISTRY.get_sample_value("triage_admission_decision_seconds_count", labels) or 0.0


async def test_the_queue_rate_is_learned_from_granted_waiters(
    client: Redis,
    redis_server: RedisServer,
    controllers: Callable[[Redis, AdmissionSettings], AdmissionController],
) -> None:
    s = settings(redis_server, stale_after_ms=60_000)
    # 1 slot + 1 allowance; no service time measured, so no throughput to start from
    await publish(
        client, s, a={"max_active": 1, "request_ms": None}, b={"healthy": False, "request_ms": None}
    )
    ctl = controllers(client, s)
    await ctl.admit("m", IDS, "r1", 1)
    await ctl.admit("m", IDS, "r2", 1)
    waiters = []
    for i in range(3):  # in this order
        waiters.append(asyncio.create_task(ctl.admit("m", IDS, f"q{i}", 1)))
        await asyncio.sleep(0.02)
    assert ctl.ahead_limit("m", time.monotonic()) is None  # nothing measured yet
    await ctl.finish("r1")
    for previous in ("r2", "q0", "q1"):  # one grant every ~0.1 s
        await asyncio.sleep(0.1)
        await ctl.finish(previous)
    await asyncio.wait_for(asyncio.gather(*waiters), 2.0)
    rate = ctl.queue_rate["m"]
    assert rate.samples == 3
    assert 3.0 < rate.rps < 15.0  # (ahead + 1) / wait: ~1 / 0.15, 2 / 0.25, 3 / 0.35 s
    assert ctl.ahead_limit("m", time.monotonic()) is not None
    await ctl.finish("q2")
    await drained(ctl)


async def test_an_expected_wait_over_the_limit_is_shed_at_once_then_without_redis(
    client: Redis,
    redis_server: RedisServer,
    controllers: Callable[[Redis, AdmissionSettings], AdmissionController],
) -> None:
    s = settings(  # max_wait 2 s: a wait over 1 s is shed; states stay fresh throughout
        redis_server,
        max_queue=10,
        expected_wait_fraction=0.5,
        shed_memo_ms=5000,
        stale_after_ms=60_000,
    )
    await publish(client, s, a={"max_active": 1}, b={"healthy": False})
    ctl = controllers(client, s)
    ctl.queue_rate["m"] = QueueRate(rps=2.0, samples=3, at=time.monotonic())  # limit: 1 ahead
    for t in ("e1", "e2"):
        await ctl.admit("m", IDS, t, 1)
    waiters = []
    for i in range(2):  # in this order
        waiters.append(asyncio.create_task(ctl.admit("m", IDS, f"ew{i}", 1)))
        await asyncio.sleep(0.02)
    assert await ctl.gate.counts("m") == (2, 2)  # ahead 0 and 1: (ahead + 1) / 2 <= 1 s
    from_redis, from_memo = decisions("m", "shed", "redis"), decisions("m", "shed", "memo")
    ctl.memo.clear()  # (the last waiter's answer already says the next one waits too long)
    started = time.monotonic()
    with pytest.raises(GatewayError) as info:
        await ctl.admit("m", IDS, "ew2", 1)  # 2 ahead: 1.5 s expected
    assert time.monotonic() - started < 1.5  # at once, not after max_wait (2 s)
    body = info.value.to_dict()
    assert body["code"] == "expected_wait" and "1.0 s" in str(body["message"])
    assert int((info.value.headers or {})["Retry-After"]) >= 1
    assert decisions("m", "shed", "redis") == from_redis + 1
    with pytest.raises(GatewayError) as info:
        await ctl.admit("m", IDS, "ew3", 1)  # the same answer, from this process's memo
    assert info.value.to_dict()["code"] == "expected_wait"
    assert decisions("m", "shed", "memo") == from_memo + 1
    assert decisions("m", "shed", "redis") == from_redis + 1
    assert await ctl.gate.counts("m") == (2, 2)  # neither took a place
    # past half its life, a memo shed renews the memo off the request's path (gate.peek)
    old = ctl.memo["m", 1, ""]
    ctl.memo["m", 1, ""] = dataclasses.replace(old, at=old.at - 3.0)
    with pytest.raises(GatewayError):
        await ctl.admit("m", IDS, "ew3b", 1)
    await asyncio.sleep(0.05)
    renewed = ctl.memo["m", 1, ""]
    assert renewed.at > old.at - 3.0 and renewed.ahead == 2.0
    assert decisions("m", "shed", "memo") == from_memo + 2
    assert await ctl.gate.counts("m") == (2, 2)  # a peek takes no place
    with pytest.raises(GatewayError):
        await ctl.admit("m", IDS, "ew4", 2)  # the memo is per priority: Redis decides
    assert decisions("m", "shed", "redis") == from_redis + 2
    await ctl.finish("e1")
    await ctl.finish("e2")  # a batch slot frees: the first waiter is granted
    await asyncio.wait_for(waiters[0], 1.0)
    await asyncio.sleep(0.05)  # its grant message counted
    ctl.queue_rate["m"] = QueueRate(rps=2.0, samples=3, at=time.monotonic())
    # the memo (2 ahead) less the grant seen since: 1 ahead, room; but not while another
    # request of this process is on its way into the queue (it will be ahead as well)
    ctl.entering["m", 1, ""] = {"on-its-way"}
    with pytest.raises(GatewayError):
        await ctl.admit("m", IDS, "ew4b", 1)
    ctl.entering["m", 1, ""].clear()
    assert decisions("m", "shed", "memo") == from_memo + 3
    waiters.append(asyncio.create_task(ctl.admit("m", IDS, "ew5", 1)))  # room: Redis queues it
    await asyncio.sleep(0.05)
    assert await ctl.gate.counts("m") == (1, 2)
    assert decisions("m", "shed", "memo") == from_memo + 3
    for task in waiters[1:]:
        task.cancel()
    await asyncio.gather(*waiters[1:], return_exceptions=True)
    await ctl.finish("ew0")
    await drained(ctl)


async def test_the_memo_counts_what_other_proxies_queued_since(
    client: Redis,
    redis_server: RedisServer,
    controllers: Callable[[Redis, AdmissionSettings], AdmissionController],
) -> None:
    """Proxy A's memo says 1 ahead (room under its limit of 1); proxy B then queues 2 more: A
    learns of them on the enqueue channel and sheds its next request without asking Redis."""
    s = settings(
        redis_server, max_queue=10, expected_wait_fraction=0.5, shed_memo_ms=5000,
        stale_after_ms=60_000,
    )  # fmt: skip
    await publish(client, s, a={"max_active": 1}, b={"healthy": False})  # 1 slot + 1 allowance
    a, b = controllers(client, s), controllers(client, s)
    for ctl in (a, b):
        ctl.queue_rate["m"] = QueueRate(rps=2.0, samples=3, at=time.monotonic())  # limit 1
    await a.admit("m", IDS, "full-1", 1)
    await a.admit("m", IDS, "full-2", 1)
    tasks = [asyncio.create_task(a.admit("m", IDS, "a-wait", 1))]
    await asyncio.sleep(0.05)
    assert a.memo["m", 1, ""].ahead == 1.0  # its next request would have 1 ahead: room
    tasks.append(asyncio.create_task(b.admit("m", IDS, "b-wait-1", 1)))
    # until A has heard of B's enqueue on the channel (a fixed 50 ms wait was not always
    # enough on a loaded CI machine: A then asked Redis, and the shed came from there)
    channel = a.gate.enqueues_channel("m")
    deadline = time.monotonic() + 5.0
    while a.grants.enqueued_since(channel, 0, TIER_2, "other") < 2:
        assert time.monotonic() < deadline, "proxy A never heard of B's enqueue"
        await asyncio.sleep(0.01)
    from_redis, from_memo = decisions("m", "shed", "redis"), decisions("m", "shed", "memo")
    with pytest.raises(GatewayError) as info:
        await a.admit("m", IDS, "a-next", 1)  # 2 ahead now (1 of them from B): over
    assert info.value.to_dict()["code"] == "expected_wait"
    assert decisions("m", "shed", "memo") == from_memo + 1
    assert decisions("m", "shed", "redis") == from_redis
    assert a.grants.enqueued_since(a.gate.enqueues_channel("m"), 0, TIER_2, "other") == 2
    assert a.grants.enqueued_since(a.gate.enqueues_channel("m"), 0, TIER_1, "other") == 0  # tier 0
    assert await a.gate.counts("m") == (2, 2)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await a.finish("full-1")
    await a.finish("full-2")
    await drained(a)


async def test_grants_are_numbered_in_their_messages_and_in_every_reply(
    client: Redis, redis_server: RedisServer
) -> None:
    s = settings(redis_server, stale_after_ms=60_000)
    gate = AdmissionGate(client, s)
    await publish(client, s, a={"max_active": 1}, b={"healthy": False})  # 1 slot + 1 allowance
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(gate.grants_channel("m"))
    try:
        for t in ("n1", "n2"):
            assert (await gate.enter("m", IDS, t, 1)).status == Status.ADMITTED
        waiting = await gate.enter("m", IDS, "n3", 1)
        assert (waiting.status, waiting.grants) == (Status.WAITING, 0)
        await gate.release("m", IDS, "n1")
        released = await gate.release("m", IDS, "n2")  # the batch slot frees: n3 is granted
        assert released.grants == 1
        message = None
        while message is None:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        assert message["data"] == b"n3 1"
        peek = await gate.peek("m", IDS, 1, None)
        assert (peek.status, peek.ahead, peek.grants) == (Status.WAITING, 0, 1)
        assert (await gate.poll("m", IDS, "n3", 1)).status == Status.ADMITTED
        await gate.release("m", IDS, "n3")
    finally:
        await pubsub.aclose()


async def test_a_full_queue_is_shed_from_the_memo_with_retry_afters_spread(
    client: Redis,
    redis_server: RedisServer,
    controllers: Callable[[Redis, AdmissionSettings], AdmissionController],
) -> None:
    """Queue full: Redis answers once; the next requests are shed by the memo (no Redis round
    trip, which the front door relies on); each Retry-After lies behind the ones given before
    it, at the fleet's full-load throughput (max_active 1 / 10 ms = 100/s here)."""
    s = settings(
        redis_server, max_queue=2, expected_wait_fraction=0.0, shed_memo_ms=5000,
        stale_after_ms=60_000, retry_after_min_s=0.001,
    )  # fmt: skip
    await publish(client, s, a={"max_active": 1}, b={"healthy": False})  # 1 slot + 1 allowance
    ctl = controllers(client, s)
    for t in ("f1", "f2"):
        await ctl.admit("m", IDS, t, 1)
    waiters = []
    for i in range(2):
        waiters.append(asyncio.create_task(ctl.admit("m", IDS, f"fw{i}", 1)))
        await asyncio.sleep(0.02)
    assert await ctl.gate.counts("m") == (2, 2)
    from_redis, from_memo = decisions("m", "shed", "redis"), decisions("m", "shed", "memo")
    ctl.memo.clear()
    waits = []
    for i in range(4):
        with pytest.raises(GatewayError) as info:
            await ctl.admit("m", IDS, f"full{i}", 1)
        assert info.value.to_dict()["code"] == "queue_full"
        waits.append(int((info.value.headers or {})["retry-after-ms"]))
    assert decisions("m", "shed", "redis") == from_redis + 1
    assert decisions("m", "shed", "memo") == from_memo + 3
    assert ctl.shed_early("m", IDS, 1) is not None  # the front door's check: no await
    assert ctl.shed_early("m", IDS, 0) is None  # no memo for that priority: let it in
    # work ahead 2 queued + itself = 3, then one more per client told before: 30, 40, 50, 60 ms
    assert waits[:4] == pytest.approx([30, 40, 50, 60], abs=3)
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    await ctl.finish("f1")
    await ctl.finish("f2")
    await drained(ctl)


async def test_the_fleet_throughput_stands_in_for_the_queue_rate_until_one_is_measured(
    client: Redis,
    redis_server: RedisServer,
    controllers: Callable[[Redis, AdmissionSettings], AdmissionController],
) -> None:
    """A burst after an idle spell: no waiter measured yet, yet the expected-wait limit is
    known from the first answer (max_active 2 / 100 ms = 20 req/s on the healthy replica)."""
    s = settings(redis_server, stale_after_ms=60_000)
    await publish(client, s, a={"request_ms": 100.0}, b={"healthy": False})
    ctl = controllers(client, s)
    assert ctl.ahead_limit("m", time.monotonic()) is None
    await ctl.admit("m", IDS, "t1", 1)
    limit = ctl.ahead_limit("m", time.monotonic())
    assert limit == pytest.approx(s.expected_wait_fraction * s.max_wait_ms / 1000 * 20.0 - 1)
    await ctl.finish("t1")
    await drained(ctl)


async def test_a_flood_from_one_key_does_not_starve_another_across_two_proxies(
    client: Redis,
    redis_server: RedisServer,
    controllers: Callable[[Redis, AdmissionSettings], AdmissionController],
) -> None:
    """Proxy A queues a flood of 6 from one key; proxy B then gets one request of another key:
    of the next two slots that free, one is B's (its start tag ties with the flood's first).
    With fair_share off (first come, first served in a tier, as before) B's request waits
    behind the whole flood."""
    for fair in (True, False):
        s = settings(redis_server, max_queue=10, fair_share=fair, stale_after_ms=60_000)
        await publish(client, s, a={"max_active": 2}, b={"healthy": False})  # 2 + 1 allowance
        a, b = controllers(client, s), controllers(client, s)
        flood = FlowCall("key:flood", 1.0, 100.0)
        for i in range(3):
            await a.admit("m", IDS, f"run-{i}", 1, flow=flood)
        waiting = [
            asyncio.create_task(a.admit("m", IDS, f"flood-{i}", 1, flow=flood)) for i in range(6)
        ]
        while (await a.gate.counts("m"))[1] < 6:
            await asyncio.sleep(0.01)
        steady = asyncio.create_task(
            b.admit("m", IDS, "steady", 1, flow=FlowCall("key:steady", 1.0, 100.0))
        )
        while (await a.gate.counts("m"))[1] < 7:
            await asyncio.sleep(0.01)
        for i in range(3):  # two batch slots free: who gets them?
            await a.finish(f"run-{i}")
        granted: list[str] = []
        pending = {steady, *waiting}
        while len(granted) < 2:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            assert all(task.exception() is None for task in done)  # granted, not timed out
            granted += ["steady" if task is steady else "flood" for task in done]

        assert ("steady" in granted) == fair, (fair, granted)
        for task in [steady, *waiting]:
            task.cancel()
        await asyncio.gather(steady, *waiting, return_exceptions=True)
        for ticket in ("steady", *(f"flood-{i}" for i in range(6))):
            await a.finish(ticket)
            await b.finish(ticket)
        await drained(a)


async def test_a_keys_own_queue_bound_is_a_429_and_the_settings_a_503(
    client: Redis,
    redis_server: RedisServer,
    controllers: Callable[[Redis, AdmissionSettings], AdmissionController],
) -> None:
    s = settings(redis_server, max_queue=10, flow_max_queue=3, stale_after_ms=60_000)
    await publish(client, s, a={"max_active": 1}, b={"healthy": False})
    ctl = controllers(client, s)
    flood = FlowCall("key:flood", 1.0, 100.0)
    await ctl.admit("m", IDS, "run-0", 1, flow=flood)
    await ctl.admit("m", IDS, "run-1", 1, flow=flood)
    own = [asyncio.create_task(ctl.admit("m", IDS, "own-0", 1, flow=flood, own_limit=2))]
    own.append(asyncio.create_task(ctl.admit("m", IDS, "own-1", 1, flow=flood, own_limit=2)))
    while (await ctl.gate.counts("m"))[1] < 2:
        await asyncio.sleep(0.01)
    with pytest.raises(GatewayError) as info:
        await ctl.admit("m", IDS, "own-2", 1, flow=flood, own_limit=2)
    assert info.value.status_code == 429
    body = info.value.to_dict()
    assert body["code"] == "flow_queue_full" and body["type"] == "rate_limit_error"
    assert int((info.value.headers or {})["Retry-After"]) >= 1
    own.append(asyncio.create_task(ctl.admit("m", IDS, "set-2", 1, flow=flood)))
    while (await ctl.gate.counts("m"))[1] < 3:
        await asyncio.sleep(0.01)
    with pytest.raises(GatewayError) as info:
        await ctl.admit("m", IDS, "set-3", 1, flow=flood)  # the setting's bound: 3
    assert info.value.status_code == 503
    assert info.value.to_dict()["code"] == "flow_queue_full"
    # another key's request still queues
    other = asyncio.create_task(ctl.admit("m", IDS, "other", 1, flow=FlowCall("key:other")))
    while (await ctl.gate.counts("m"))[1] < 4:
        await asyncio.sleep(0.01)
    for task in [*own, other]:
        task.cancel()
    await asyncio.gather(*own, other, return_exceptions=True)
    await ctl.finish("run-0")
    await ctl.finish("run-1")
    await drained(ctl)


async def test_a_deadline_sheds_at_arrival_and_no_grant_comes_after_it(
    client: Redis,
    redis_server: RedisServer,
    controllers: Callable[[Redis, AdmissionSettings], AdmissionController],
) -> None:
    """A time-to-first-token deadline: a request whose expected wait is past it is answered
    503 ttft_deadline at once; one that queued within it gives up at it, and the slot that
    frees after the deadline goes to a waiter without one, never to it."""
    s = settings(redis_server, max_queue=10, max_wait_ms=5000, stale_after_ms=60_000)
    await publish(client, s, a={"max_active": 1}, b={"healthy": False})  # 1 + 1 allowance
    ctl = controllers(client, s)
    ctl.queue_rate["m"] = QueueRate(rps=2.0, samples=3, at=time.monotonic())
    await ctl.admit("m", IDS, "run-0", 1)
    await ctl.admit("m", IDS, "run-1", 1)
    patient = asyncio.create_task(ctl.admit("m", IDS, "patient", 1))
    while (await ctl.gate.counts("m"))[1] < 1:
        await asyncio.sleep(0.01)
    # 1 ahead at 2 per second: an expected wait of 1 s, past a 0.5 s deadline
    started = time.monotonic()
    with pytest.raises(GatewayError) as info:
        await ctl.admit("m", IDS, "hurried", 1, deadline_s=0.5)
    assert time.monotonic() - started < 0.3  # at once
    assert info.value.to_dict()["code"] == "ttft_deadline"
    assert int((info.value.headers or {})["Retry-After"]) >= 1
    # within its deadline it queues (1.5 s), then gives up at it; its place is gone in Redis
    ctl.queue_rate["m"] = QueueRate(rps=2.0, samples=3, at=time.monotonic())
    started = time.monotonic()
    with pytest.raises(GatewayError) as info:
        await ctl.admit("m", IDS, "late", 1, deadline_s=1.5)
    waited = time.monotonic() - started
    assert 1.4 <= waited < 2.5, waited
    assert info.value.to_dict()["code"] == "ttft_deadline"
    keys = KeySchema(s.key_prefix)
    assert await client.zscore(keys.queue("m"), "late") is None
    await ctl.finish("run-0")  # the slot goes to the waiter without a deadline
    await ctl.finish("run-1")
    await asyncio.wait_for(patient, 2.0)
    assert await client.zscore(keys.admitted("m"), "late") is None
    await ctl.finish("patient")
    await drained(ctl)


async def test_the_gate_drops_a_place_at_its_deadline_whatever_its_waiter_does(
    client: Redis, redis_server: RedisServer
) -> None:
    """The deadline lives in Redis too: a place past it is gone before any grant (a waiter
    that is slow to give up, or dead, gets no slot after its deadline)."""
    s = settings(redis_server, stale_after_ms=60_000, queue_lease_ms=20_000, poll_ms=5000)
    gate = AdmissionGate(client, s)
    await publish(client, s, a={"max_active": 1}, b={"healthy": False})
    for t in ("r0", "r1"):
        assert (await gate.enter("m", IDS, t, 1)).status == Status.ADMITTED
    assert (await gate.enter("m", IDS, "d", 1, deadline_ms=100.0)).status == Status.WAITING
    assert (await gate.enter("m", IDS, "n", 1)).status == Status.WAITING
    await asyncio.sleep(0.2)
    await gate.release("m", IDS, "r0")
    await gate.release("m", IDS, "r1")
    keys = KeySchema(s.key_prefix)
    admitted = {t.decode() for t in await client.zrange(keys.admitted("m"), 0, -1)}
    assert admitted == {"n"}
    assert (await gate.poll("m", IDS, "d", 1)).status == Status.LOST
    await gate.release("m", IDS, "n")
    assert await gate.counts("m") == (0, 0)
