"""gate.lua decides as plugins/admission/rules.py does: the same state in a real redis-server and
in the pure model, one call of each op, then the status, the counts, the rates (compared with
``==``), the grants, the queue and the admitted set after, and the replica picked with the
admission (``policy.choose``) must agree."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from redis.asyncio import Redis

from core.keyschema import KeySchema, ReplicaState
from devstack.redis_launcher import RedisServer
from plugins.admission import rules
from plugins.admission.gate import AdmissionGate
from plugins.admission.settings import AdmissionSettings
from plugins.routing.policy import PolicyParams, choose
from plugins.routing.store import PickPlan

from replica_states import replica_state

_prefixes = itertools.count()
STALE_AFTER_MS = 1000
LIVE, ENDED = 2**50, 1  # lease expiries: far ahead, long past


CORRUPT = [
    {"max_active": "0"},
    {"kv_fraction": "1.5"},
    {"drain_rps": "-1"},
    {"request_ms": "nan"},
    {"waiting": "x"},
]


@st.composite
def replica_specs(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "form": draw(st.sampled_from(["fresh", "fresh", "fresh", "stale", "missing", "corrupt"])),
        "corrupt": draw(st.sampled_from(CORRUPT)),
        "healthy": draw(st.sampled_from([True, True, True, False])),
        "max_active": draw(st.sampled_from([1, 2, 4])),
        "active": draw(st.sampled_from([0, 1, 3])),
        "drain_rps": draw(st.one_of(st.none(), st.sampled_from([0.0, 2.5]), st.floats(0.001, 1e4))),
        "request_ms": draw(
            st.one_of(st.none(), st.sampled_from([0.0, 100.0]), st.floats(0.01, 1e5))
        ),
        "reservations": draw(st.integers(0, 5)),
        "ended_reservations": draw(st.integers(0, 2)),
    }


FLOWS = ["a", "b", "c", ""]
TAGS = st.one_of(st.sampled_from([0.0, 1.0, 2.5, 7.0]), st.floats(0.0, 1e6))


@st.composite
def gate_cases(draw: st.DrawFn) -> dict[str, Any]:
    replicas = draw(st.lists(replica_specs(), max_size=4))
    admitted = draw(st.integers(0, 10))
    queue = draw(
        st.lists(
            # mostly one flow: a full queue held by one flow's flood (push-out) is common
            st.tuples(
                st.integers(0, 2),
                st.booleans(),
                st.sampled_from(["a", *FLOWS]),
                TAGS,
                st.sampled_from([None, None, "past", "future"]),  # its deadline
            ),
            max_size=8,
        )
    )
    op = draw(st.sampled_from(["enter", "enter", "poll", "peek", "leave", "release"]))
    max_queue = draw(st.integers(0, 10))
    return {
        "replicas": replicas,
        "admitted": admitted,
        "ended_admitted": draw(st.integers(0, 3)),
        "queue": queue,  # (priority, place still live, flow, start tag)
        "virtual": draw(st.dictionaries(st.integers(0, 2), TAGS, max_size=3)),
        "finish": draw(
            st.dictionaries(st.tuples(st.integers(0, 2), st.sampled_from(FLOWS)), TAGS, max_size=6)
        ),
        "flow": draw(st.sampled_from(FLOWS)),
        "weight": draw(st.one_of(st.sampled_from([1.0, 0.5, 3.0]), st.floats(0.01, 100.0))),
        "cost": draw(st.one_of(st.sampled_from([1.0, 300.0]), st.floats(1.0, 1e5))),
        "flow_limit": draw(st.one_of(st.none(), st.integers(0, 4))),
        "deadline_ms": draw(st.one_of(st.none(), st.sampled_from([1.0, 5000.0]))),
        "usage": draw(st.one_of(st.none(), st.sampled_from([0.0, 50.0]), st.floats(0.0, 1e5))),
        "op": op,
        "who": draw(st.sampled_from(["new", "admitted", "queued"])),
        "priority": draw(st.integers(0, 2)),
        "routed": draw(st.booleans()),
        "picking": draw(st.booleans()),
        "tiebreak": draw(st.integers(0, 2**32)),
        "settings": {
            "queue_allowance": draw(st.integers(0, 4)),
            "unknown_replica_slots": draw(st.integers(0, 4)),
            "max_queue": max_queue,
            "priority_max_queue": draw(st.dictionaries(st.integers(0, 2), st.integers(0, 10))),
        },
        "rate": draw(st.sampled_from([None, 0.1, 1.0, 20.0])),
    }


def read_state(raw: dict[bytes, bytes]) -> ReplicaState | None:
    if not raw:
        return None
    try:
        return ReplicaState.from_redis(raw)
    except ValidationError:
        return None


async def redis_now_ms(client: Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


@st.composite
def full_queue_cases(draw: st.DrawFn) -> dict[str, Any]:
    """A new request meets a full fleet and a full queue (of the model, or of its tier), most
    of it one flow's: where the fair order's push-out decides."""
    case = draw(gate_cases())
    busy = {"form": "fresh", "healthy": True, "max_active": 1, "reservations": 2}
    case["replicas"] = [{**spec, **busy} for spec in case["replicas"]] or [
        {**draw(replica_specs()), **busy}
    ]
    case["admitted"] = 10
    case["op"], case["who"] = "enter", "new"
    flood = st.sampled_from(["a", "a", "a", "a", "b"])
    case["queue"] = [(p, alive, draw(flood), tag, d) for p, alive, _, tag, d in case["queue"]]
    case["flow"] = draw(st.sampled_from(["b", "c", ""]))
    live = sum(1 for _, alive, _, _, d in case["queue"] if alive and d != "past")
    case["settings"]["max_queue"] = draw(st.integers(max(0, live - 1), live + 1))
    if draw(st.booleans()):  # or the caller's tier is full, the model's queue not
        tier = sum(
            1
            for p, alive, _, _, d in case["queue"]
            if alive and d != "past" and p == case["priority"]
        )
        case["settings"]["max_queue"] = live + 2
        case["settings"]["priority_max_queue"] = {case["priority"]: tier}
    case["rate"] = draw(st.sampled_from([None, 20.0]))
    return case


async def check_case(client: Redis, redis_server: RedisServer, case: dict[str, Any]) -> None:
    prefix = f"test-parity:{next(_prefixes)}:"
    s = AdmissionSettings(
        redis_url=redis_server.url,
        key_prefix=prefix,
        stale_after_ms=STALE_AFTER_MS,
        max_wait_ms=10_000,
        **case["settings"],
    )
    keys = KeySchema(prefix)
    gate = AdmissionGate(client, s)
    model = "m"
    ids = [f"r{i}" for i in range(len(case["replicas"]))]
    now = await redis_now_ms(client)

    # -- the state, in Redis ----------------------------------------------------------------
    admitted = [f"adm-{i}" for i in range(case["admitted"])]
    deadline = {None: None, "past": now - 10_000, "future": now + 10**9}
    queued = [
        (f"q-{i}", rules.queue_score(p, tag), live, flow, deadline[d])
        for i, (p, live, flow, tag, d) in enumerate(case["queue"])
    ]
    flow_counts: dict[str, int] = {}
    for _, _, _, flow, _ in queued:
        flow_counts[flow] = flow_counts.get(flow, 0) + 1
    fair = rules.Fair(dict(case["virtual"]), dict(case["finish"]))
    async with client.pipeline(transaction=False) as pipe:
        for replica_id, spec in zip(ids, case["replicas"], strict=True):
            if spec["form"] != "missing":
                fields = replica_state(
                    replica_id,
                    now - 10_000 if spec["form"] == "stale" else now,
                    max_active=spec["max_active"],
                    active=spec["active"],
                    drain_rps=spec["drain_rps"],
                    request_ms=spec["request_ms"],
                    healthy=spec["healthy"],
                    state="healthy" if spec["healthy"] else "unhealthy",
                ).to_redis()
                if spec["form"] == "corrupt":
                    fields.update(spec["corrupt"])
                pipe.hset(keys.replica(replica_id), mapping=fields)
            members = {f"res-{replica_id}-{j}": LIVE for j in range(spec["reservations"])}
            members |= {f"old-{replica_id}-{j}": ENDED for j in range(spec["ended_reservations"])}
            if members:
                pipe.zadd(keys.inflight(replica_id), members)
        tickets = {t: LIVE for t in admitted}
        tickets |= {f"ended-{i}": ENDED for i in range(case["ended_admitted"])}
        if tickets:
            pipe.zadd(keys.admitted(model), tickets)
        for ticket, score, live, flow, until in queued:
            pipe.zadd(keys.queue(model), {ticket: score})
            pipe.zadd(keys.queue_lease(model), {ticket: LIVE if live else ENDED})
            pipe.hset(keys.queue_flow(model), ticket, flow)
            if until is not None:
                pipe.zadd(keys.deadlines(model), {ticket: until})
        if flow_counts:
            pipe.hset(keys.flow_queued(model), mapping=flow_counts)
        fair_fields = {f"v:{p}": repr(v) for p, v in fair.virtual.items()}
        fair_fields |= {f"f:{p}:{fl}": repr(v) for (p, fl), v in fair.finish.items()}
        if fair_fields:
            pipe.hset(keys.fair(model), mapping=fair_fields)
        pipe.set(keys.grant_seq(model), 7)
        pipe.set(keys.enqueue_seq(model), 11)
        await pipe.execute()

    # -- the call -----------------------------------------------------------------------------
    op, priority = case["op"], case["priority"]
    live_queue = [
        rules.Queued(t, score, flow, until) for t, score, live, flow, until in queued if live
    ]
    if case["who"] == "admitted" and admitted:
        ticket = admitted[0]
    elif case["who"] == "queued" and queued:
        ticket = queued[0][0]
    else:
        ticket = "new"
    if op == "enter" and any(t == ticket for t, *_ in queued):
        ticket = "new"  # a proxy enters a ticket again only after its place was lost
    routed = None
    if op == "release" and case["routed"] and ids and case["replicas"][0]["reservations"]:
        routed = (ids[0], f"res-{ids[0]}-0")
    rate = case["rate"]
    limit = None if rate is None else s.expected_wait_fraction * 10.0 * rate - 1.0
    plan = None
    if case["picking"] and op in ("enter", "poll") and ids:
        plan = PickPlan(PolicyParams(stale_after_ms=STALE_AFTER_MS), case["tiebreak"], "picked")

    # -- the model, on the same state -------------------------------------------------------
    raw = [await client.hgetall(keys.replica(r)) for r in ids]
    states = [read_state(h) for h in raw]
    reservations = [spec["reservations"] for spec in case["replicas"]]
    if routed is not None:
        reservations[0] -= 1
    loads = [rules.ReplicaLoad(st_, n) for st_, n in zip(states, reservations, strict=True)]
    params = rules.GateParams(
        allowance=s.queue_allowance,
        unknown_slots=s.unknown_replica_slots,
        stale_after_ms=STALE_AFTER_MS,
        queue_limit=s.queue_limit(priority),
        max_queue=s.max_queue,
        ahead_limit=limit if op in ("enter", "peek") else None,
        flow_limit=case["flow_limit"] if op == "enter" else None,
    )
    flow = rules.FlowCall(case["flow"], case["weight"], case["cost"])
    view = rules.GateView(set(admitted), live_queue, fair)
    now = await redis_now_ms(client)
    usage = case["usage"] if op == "release" else None
    deadline_ms = case["deadline_ms"] if op == "enter" else None
    expected = rules.gate_call(
        view, op, ticket, priority, loads, params, now, flow, usage, deadline_ms
    )

    if op == "enter":
        reply = await gate.enter(
            model, ids, ticket, priority, limit, plan, flow, case["flow_limit"], deadline_ms
        )
    elif op == "poll":
        reply = await gate.poll(model, ids, ticket, priority, plan)
    elif op == "peek":
        reply = await gate.peek(model, ids, priority, limit, flow)
    elif op == "leave":
        reply = await gate.leave(model, ids, ticket)
    else:
        reply = await gate.release(model, ids, ticket, routed, priority, flow, usage)

    # -- alike --------------------------------------------------------------------------------
    context = {"case": case, "expected": expected, "reply": reply}
    assert reply.status == expected.status, context
    assert reply.capacity == expected.fleet.capacity, context
    assert reply.outstanding == expected.outstanding, context
    assert reply.queued == expected.queued, context
    assert reply.ahead == expected.ahead, context
    assert reply.drain_rps == expected.fleet.drain_rps, context  # bit-identical sums
    assert reply.throughput_rps == expected.fleet.throughput_rps, context
    assert reply.grants == 7 + len(expected.granted), context
    enqueued = 1 if op == "enter" and expected.status == rules.Status.WAITING else 0
    assert reply.enqueued == 11 + enqueued, context
    assert reply.next_score == expected.next_score, context
    queue_after = await client.zrange(keys.queue(model), 0, -1, withscores=True)
    assert [(t.decode(), sc) for t, sc in queue_after] == [
        (q.ticket, q.score) for q in view.queue
    ], context
    flows_after = await client.hgetall(keys.queue_flow(model))
    assert {t.decode(): f.decode() for t, f in flows_after.items()} == {
        q.ticket: q.flow for q in view.queue
    }, context
    with_deadline = {
        t.decode(): until
        for t, until in await client.zrange(keys.deadlines(model), 0, -1, withscores=True)
    }
    model_deadlines = {q.ticket: q.deadline_ms for q in view.queue if q.deadline_ms is not None}
    assert with_deadline.keys() == model_deadlines.keys(), context
    for t, until in model_deadlines.items():  # Redis's clock ran on a few ms from `now`
        assert until <= with_deadline[t] <= until + 1000, context
    counts_after = await client.hgetall(keys.flow_queued(model))
    assert {f.decode(): int(n) for f, n in counts_after.items()} == view.flow_counts(), context
    fair_after: dict[str, float] = {
        k.decode(): float(v) for k, v in (await client.hgetall(keys.fair(model))).items()
    }
    assert fair_after == {f"v:{p}": v for p, v in view.fair.virtual.items()} | {
        f"f:{p}:{fl}": v for (p, fl), v in view.fair.finish.items()
    }, context
    admitted_after = {t.decode() for t in await client.zrange(keys.admitted(model), 0, -1)}
    assert admitted_after == view.admitted, context

    # the call that admits picks too (not an enter of a ticket admitted already)
    picks = plan is not None and expected.status == rules.Status.ADMITTED
    if op == "enter" and ticket in admitted:
        picks = False
    if picks:
        assert plan is not None
        candidates = list(zip(ids, states, reservations, strict=True))
        chosen = choose(candidates, plan.params, now, case["tiebreak"])
        assert (reply.reservation and reply.reservation.replica_id) == chosen, context
    else:
        assert reply.reservation is None, context
    await client.delete(*[k async for k in client.scan_iter(f"{prefix}*")])


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=gate_cases())
async def test_gate_lua_decides_as_the_pure_rules(
    client: Redis, redis_server: RedisServer, case: dict[str, Any]
) -> None:
    await check_case(client, redis_server, case)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=full_queue_cases())
async def test_a_full_queue_is_decided_alike_push_out_included(
    client: Redis, redis_server: RedisServer, case: dict[str, Any]
) -> None:
    await check_case(client, redis_server, case)


async def test_a_down_replica_counts_no_reservations_and_no_slots_in_both(
    client: Redis, redis_server: RedisServer
) -> None:
    """The rule named in the docstring of rules.py, on one fixed case: 2 replicas, one down
    with 3 reservations; capacity is the healthy one's slots plus its allowance."""
    now = await redis_now_ms(client)
    healthy = replica_state("a", now, max_active=2)
    down = replica_state("b", now, max_active=4, healthy=False, state="unhealthy")
    loads = [rules.ReplicaLoad(healthy, 1), rules.ReplicaLoad(down, 3)]
    params = rules.GateParams(1, 4, STALE_AFTER_MS, 8, 8)
    f = rules.fleet(loads, params, now)
    assert (f.capacity, f.free, f.reserved, f.healthy) == (3, 1, 1, 1)
    assert rules.grant_count(f, outstanding=1, queued=5) == 1
    assert rules.grant_count(f, outstanding=2, queued=5) == 0  # the unrouted ticket takes it
