"""pick.lua / release.lua against a real redis-server: the Lua pick agrees with policy.choose."""

from __future__ import annotations

import asyncio
import itertools
import math
import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from core.keyschema import KeySchema, ReplicaState
from devstack.redis_launcher import RedisServer
from plugins.routing.policy import NO_SHAPE, PolicyParams, RequestShape, choose, scores
from plugins.routing.store import RoutingStore

from replica_states import replica_state

_prefixes = itertools.count()


def fresh_keys() -> KeySchema:
    return KeySchema(prefix=f"test-pick:{next(_prefixes)}:")


async def redis_now_ms(client: Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def reservations(count: int, sizes: list[str] | None = None) -> dict[str, int]:
    """``count`` live reservations (leases far in the future) for ``ZADD inflight:{id}``, named
    with the size suffixes ``sizes`` in turn (none: no size, as an older proxy names them)."""
    marks = sizes or [""]
    return {f"held-{i}{marks[i % len(marks)]}": 2**50 for i in range(count)}


def state(replica_id: str, ts_ms: int, **fields: Any) -> ReplicaState:
    return replica_state(replica_id, ts_ms, **fields)


async def write_specs(
    client: Redis,
    keys: KeySchema,
    ids: list[str],
    specs: list[dict[str, Any]],
    extra: list[dict[str, Any]] | None = None,
) -> None:
    """Each replica of ``specs`` (``replica_specs``) as its sidecar and the proxies would have
    left it: its hash (``extra`` fields per replica), its reservations."""
    now = await redis_now_ms(client)
    async with client.pipeline(transaction=False) as pipe:
        for i, (replica_id, spec) in enumerate(zip(ids, specs, strict=True)):
            if spec["present"]:
                ts = now - 10_000 if spec["stale"] else now
                fields = {k: spec[k] for k in ("waiting", "active", "max_active", "kv_fraction")}
                st_ = state(
                    replica_id,
                    ts,
                    service_ms=spec["service_ms"],
                    healthy=spec["healthy"],
                    state="healthy" if spec["healthy"] else "unhealthy",
                    **(extra[i] if extra else {}),
                    **fields,
                )
                pipe.hset(keys.replica(replica_id), mapping=st_.to_redis())
            if spec["inflight"]:
                pipe.zadd(
                    keys.inflight(replica_id), reservations(spec["inflight"], spec.get("sizes"))
                )
        await pipe.execute()


# --- (a) Lua pick == Python choose ---------------------------------------------------------

# Small value sets make exact score ties (and so the tie rules) common; floats add variety.
small_ints = st.integers(0, 6)  # in-flight reservations: often above the engine counts
kv_fractions = st.one_of(
    st.sampled_from([0.0, 0.5, 0.8, 0.9, 1.0]),
    st.floats(0.0, 1.0, allow_nan=False),
)
service_times = st.one_of(
    st.none(),
    st.sampled_from([0.0, 50.0, 100.0, 200.0]),
    st.floats(0.001, 1e5, allow_nan=False, allow_infinity=False),
)


size_marks = st.sampled_from(
    ["", "#1", "#7", "#150", "#0", "#x", "#12a", "#99999999999", "#1000000001", "#b#40"]
)


@st.composite
def replica_specs(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "present": draw(st.sampled_from([True, True, False])),
        "stale": draw(st.sampled_from([False, False, True])),  # ts now or now - 10 s
        "waiting": draw(st.sampled_from([0, 0, 0, 1, 3])),
        "active": draw(st.sampled_from([0, 0, 1, 2, 4])),
        "max_active": draw(st.sampled_from([1, 2, 4, 8])),
        "kv_fraction": draw(kv_fractions),
        "service_ms": draw(service_times),
        "healthy": draw(st.sampled_from([True, True, True, False])),
        "inflight": draw(st.one_of(st.none(), small_ints)),  # None: no counter key
        # the reservations' sizes (policy.reservation_member), valid or not
        "sizes": draw(st.lists(size_marks, min_size=1, max_size=3)),
    }


param_sets = st.one_of(
    st.just(PolicyParams()),
    st.builds(
        PolicyParams,
        kv_threshold=st.sampled_from([0.0, 0.5, 0.8, 0.95]),
        kv_weight=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
        unknown_score=st.sampled_from([1e9, 50.0, -50.0]),
        default_service_ms=st.sampled_from([1.0, 75.0]),
        tie_tolerance=st.sampled_from([0.0, 0.1, 0.5]),
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    specs=st.lists(replica_specs(), min_size=1, max_size=6),
    uniform=st.booleans(),
    params=param_sets,
    tiebreak=st.integers(0, 2**32),
    names=st.permutations(["r0", "r1", "r2", "r3", "r4", "r5", "alpha", "B", "é"]),
)
async def test_lua_pick_matches_python_choose(
    client: Redis,
    specs: list[dict[str, Any]],
    params: PolicyParams,
    tiebreak: int,
    names: list[str],
    uniform: bool,
) -> None:
    if uniform:  # an equal fleet: exact score ties, and so the tie rules, become common
        same = ("present", "stale", "healthy", "max_active", "kv_fraction", "service_ms")
        shared = {k: specs[0][k] for k in same}
        specs = [{**spec, **shared} for spec in specs]
    keys = fresh_keys()
    store = RoutingStore(client, keys)
    ids = names[: len(specs)]
    await write_specs(client, keys, ids, specs)

    snap = await store.snapshot(ids)
    reserved = await store.reserved(ids, NO_SHAPE.output_tokens)
    now = await redis_now_ms(client)
    expected = choose(snap, params, now, tiebreak, reserved=reserved)
    got = await store.pick(ids, params, tiebreak)

    if expected is None:
        assert got is None
        after = await store.snapshot(ids)
        assert [c[2] for c in after] == [c[2] for c in snap]  # nothing reserved
    else:
        assert got is not None
        chosen, new_inflight, lua_score = got.replica_id, got.inflight, got.score
        assert chosen == expected
        index = ids.index(chosen)
        assert new_inflight == snap[index][2] + 1
        # bit-identical, not approx
        assert lua_score == scores(snap, params, now, reserved=reserved)[index]
        after = await store.snapshot(ids)
        assert [c[2] for c in after] == [c[2] + (1 if c[0] == chosen else 0) for c in snap]
    await client.delete(*keys_of(keys, ids))


def keys_of(keys: KeySchema, ids: list[str]) -> list[str]:
    return [keys.replica(r) for r in ids] + [keys.inflight(r) for r in ids]


async def test_equal_scores_prefer_fewer_inflight(client: Redis) -> None:
    keys = fresh_keys()
    store = RoutingStore(client, keys)
    now = await redis_now_ms(client)
    # a: n = max(2, 0) = 2 (reserved); b: n = max(0, 2) = 2 (engine) -> equal scores
    await client.hset(keys.replica("a"), mapping=state("a", now).to_redis())
    await client.hset(keys.replica("b"), mapping=state("b", now, active=2).to_redis())
    await client.zadd(keys.inflight("a"), reservations(2))
    snap = await store.snapshot(["a", "b"])
    assert len(set(scores(snap, PolicyParams(), now))) == 1
    for tiebreak in range(2):
        assert choose(snap, PolicyParams(), now, tiebreak) == "b"
    got = await store.pick(["a", "b"], PolicyParams(), 0)
    assert got is not None and (got.replica_id, got.inflight) == ("b", 1)


# Hashes the sidecar would never write: the script must treat them as unknown, like the mirror.
CORRUPT = [
    ("max_active 0", {"max_active": "0"}),
    ("negative waiting", {"waiting": "-1"}),
    ("fractional active", {"active": "1.5"}),
    ("kv above 1", {"kv_fraction": "1.5"}),
    ("garbage kv", {"kv_fraction": "lots"}),
    ("negative service", {"service_ms": "-3"}),
    ("empty ts", {"ts_ms": ""}),
    ("negative drain", {"drain_rps": "-1"}),  # the gate's fields: one validity rule for both
    ("garbage request_ms", {"request_ms": "soon"}),
    ("nan request_ms", {"request_ms": "nan"}),
]


@pytest.mark.parametrize("patch", [c[1] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
async def test_corrupt_hash_is_unknown_in_both(client: Redis, patch: dict[str, str]) -> None:
    keys = fresh_keys()
    store = RoutingStore(client, keys)
    now = await redis_now_ms(client)
    # "bad" would win by far if its hash were believed; "ok" is busy but known
    await client.hset(keys.replica("bad"), mapping={**state("bad", now).to_redis(), **patch})
    await client.hset(keys.replica("ok"), mapping=state("ok", now, active=30).to_redis())
    snap = await store.snapshot(["bad", "ok"])
    assert snap[0][1] is None
    assert choose(snap, PolicyParams(), now, 0) == "ok"
    got = await store.pick(["bad", "ok"], PolicyParams(), 0)
    assert got is not None and got.replica_id == "ok"


async def test_empty_healthy_reads_unhealthy_in_both(client: Redis) -> None:
    keys = fresh_keys()
    store = RoutingStore(client, keys)
    now = await redis_now_ms(client)
    await client.hset(keys.replica("a"), mapping={**state("a", now).to_redis(), "healthy": ""})
    snap = await store.snapshot(["a"])
    assert snap[0][1] is not None and not snap[0][1].healthy
    assert choose(snap, PolicyParams(), now, 0) is None
    assert await store.pick(["a"], PolicyParams(), 0) is None


# --- (b) concurrency: reservations make every pick visible ---------------------------------


@pytest.mark.parametrize("published", [True, False], ids=["idle-equal", "all-unknown"])
async def test_concurrent_picks_spread_exactly(
    client: Redis, redis_server: RedisServer, published: bool
) -> None:
    keys = fresh_keys()
    # one connection per pick: all 200 scripts really are in flight together
    wide = Redis.from_url(redis_server.url, max_connections=200)
    try:
        store = RoutingStore(wide, keys)
        ids = ["w", "x", "y", "z"]
        if published:
            now = await redis_now_ms(client)
            for replica_id in ids:
                await client.hset(
                    keys.replica(replica_id), mapping=state(replica_id, now).to_redis()
                )
        rng = random.Random(7)
        results = await asyncio.gather(
            *(store.pick(ids, PolicyParams(), rng.getrandbits(32)) for _ in range(200))
        )
        assert all(r is not None for r in results)
        picked = [r for r in results if r is not None]
        assert Counter(r.replica_id for r in picked) == dict.fromkeys(ids, 50)
        # every reservation saw its own count: 1..50 per replica
        for replica_id in ids:
            values = sorted(r.inflight for r in picked if r.replica_id == replica_id)
            assert values == list(range(1, 51))
        assert [c[2] for c in await store.snapshot(ids)] == [50] * 4
    finally:
        await wide.aclose()


# --- (c) release and leases ----------------------------------------------------------------


async def test_release_is_idempotent_and_never_negative(client: Redis) -> None:
    keys = fresh_keys()
    store = RoutingStore(client, keys)
    assert await store.release("never-picked", "nope") == 0
    first = await store.pick(["a"], PolicyParams(), 0, reservation_id="r1")
    second = await store.pick(["a"], PolicyParams(), 0, reservation_id="r2")
    assert first is not None and second is not None
    assert (first.reservation_id, first.inflight, second.inflight) == ("r1#1", 1, 2)
    assert await store.release("a", "r1#1") == 1
    assert await store.release("a", "r1#1") == 1  # success and failure callbacks both fired
    assert await store.release("a", "r2#1") == 0
    assert await store.inflight(["a"]) == [0]
    results = await asyncio.gather(*(store.release("a", "r2#1") for _ in range(50)))
    assert set(results) == {0}


async def test_leaked_reservation_heals_when_its_lease_ends(client: Redis) -> None:
    keys = fresh_keys()
    store = RoutingStore(client, keys)
    leaked = await store.pick(["a"], PolicyParams(), 0, lease_ms=150)
    kept = await store.pick(["a"], PolicyParams(), 0, lease_ms=60_000)
    assert leaked is not None and kept is not None and kept.inflight == 2
    assert await store.inflight(["a"]) == [2]
    await asyncio.sleep(0.3)
    assert await store.inflight(["a"]) == [1]  # the lost release no longer counts
    assert 0 < await client.pttl(keys.inflight("a")) <= 60_000  # the set dies with its last lease
    assert await store.release("a", kept.reservation_id) == 0


async def test_pick_argument_checks(client: Redis) -> None:
    store = RoutingStore(client, fresh_keys())
    assert await store.pick([], PolicyParams(), 0) is None
    with pytest.raises(ValueError):
        await store.pick(["a", "a"], PolicyParams(), 0)
    with pytest.raises(ValueError):
        await store.pick(["a"], PolicyParams(), -1)
    with pytest.raises(ValueError):
        await store.pick(["a"], PolicyParams(), 2**53)
    with pytest.raises(ValueError):
        await store.pick(["a"], PolicyParams(), 0, lease_ms=0)


# --- (b) with the request's shape and the prefix indexes: the same choice, score and index ----

HASHES = tuple(f"{i:016x}" for i in range(1, 9))


SESSION = "s0123456789abcdef"


@st.composite
def shapes(draw: st.DrawFn) -> RequestShape:
    blocks = draw(st.integers(0, len(HASHES)))
    return RequestShape(
        prompt_tokens=draw(st.sampled_from([0, 1, 40, 500, 3000])),
        output_tokens=draw(st.sampled_from([1, 16, 200])),
        tokens_per_block=draw(st.sampled_from([0.0, 16.0, 63.5, 64.0])),
        hashes=HASHES[:blocks],
        session=draw(st.sampled_from(["", SESSION])),
    )


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    specs=st.lists(replica_specs(), min_size=1, max_size=5),
    held=st.lists(st.lists(st.integers(0, 9), max_size=8), min_size=5, max_size=5),
    sources=st.lists(st.sampled_from(["trtllm", "triton"]), min_size=5, max_size=5),
    kv_tokens=st.lists(st.sampled_from([None, 0, 64, 200, 100_000]), min_size=5, max_size=5),
    in_session=st.lists(st.booleans(), min_size=5, max_size=5),
    shape=shapes(),
    params=st.builds(
        PolicyParams,
        prefill_ms_per_token=st.sampled_from([0.0, 0.2, 5.0]),
        tie_tolerance=st.sampled_from([0.0, 0.2]),
        prefix_index_blocks=st.sampled_from([1, 3, 4096]),
        block_tokens=st.sampled_from([16.0, 64.0]),
    ),
    tiebreak=st.integers(0, 2**32),
)
async def test_lua_pick_with_prefix_indexes_matches_python(
    client: Redis,
    specs: list[dict[str, Any]],
    held: list[list[int]],
    sources: list[str],
    kv_tokens: list[int | None],
    in_session: list[bool],
    shape: RequestShape,
    params: PolicyParams,
    tiebreak: int,
) -> None:
    """Indexes holding a prefix of the prompt's blocks, or blocks with gaps, or other blocks:
    Lua and Python credit each replica with the same cached blocks and choose alike; the chosen
    replica's index then holds every block of the prompt, bounded by its KV capacity."""
    keys = fresh_keys()
    store = RoutingStore(client, keys)
    ids = [f"r{i}" for i in range(len(specs))]
    await write_specs(
        client,
        keys,
        ids,
        specs,
        [{"source": s, "kv_tokens": k} for s, k in zip(sources, kv_tokens, strict=True)],
    )
    async with client.pipeline(transaction=False) as pipe:
        for i, replica_id in enumerate(ids):
            members = {HASHES[b] if b < len(HASHES) else f"other{b}": 1 for b in held[i]}
            if in_session[i]:  # it has served the session (whether this request has one)
                members[SESSION] = 1
            if members:
                pipe.zadd(keys.prefix_index(replica_id), members)
        await pipe.execute()

    snap = await store.snapshot(ids)
    cached = await store.cached_blocks(ids, shape)
    reserved = await store.reserved(ids, shape.output_tokens)
    holders = await store.session_holders(ids, shape)
    now = await redis_now_ms(client)
    expected = choose(snap, params, now, tiebreak, shape, cached, reserved, holders)
    got = await store.pick(ids, params, tiebreak, shape=shape)
    if expected is None:
        assert got is None
    else:
        assert got is not None and got.replica_id == expected
        index = ids.index(expected)
        assert got.score == scores(snap, params, now, shape, cached, reserved)[index]
        members = await client.zrange(keys.prefix_index(expected), 0, -1, withscores=True)
        state_ = snap[index][1]
        bound = params.prefix_index_blocks
        if state_ is not None and state_.kv_tokens:
            bound = max(1, math.floor(state_.kv_tokens / params.block_tokens))
        if shape.hashes:  # the index is written only for a prompt of known blocks
            assert len(members) <= bound
            kept = {m.decode() for m, _ in members}
            # the prompt's first blocks are the last forgotten: as many as the bound holds
            assert set(shape.hashes[: min(bound, len(shape.hashes))]) <= kept
            assert 0 < await client.pttl(keys.prefix_index(expected)) <= params.prefix_ttl_ms
        if shape.session and bound > len(shape.hashes):  # it has served the session now (the
            # session is forgotten before the prompt's blocks)
            assert await client.zscore(keys.prefix_index(expected), shape.session) is not None
    await client.delete(*store.candidate_keys(ids))


async def test_the_index_forgets_the_oldest_prompts_first_within_the_kv_capacity(
    client: Redis,
) -> None:
    """A replica whose KV cache holds 4 index blocks (256 tokens at 64 per block): after prompt
    A (3 blocks) and then prompt B (3 blocks), A's later blocks are forgotten, its first kept."""
    keys = fresh_keys()
    store = RoutingStore(client, keys)
    now = await redis_now_ms(client)
    await client.hset(keys.replica("r0"), mapping=state("r0", now, kv_tokens=256).to_redis())
    params = PolicyParams(block_tokens=64.0)
    a = RequestShape(prompt_tokens=200, tokens_per_block=64.0, hashes=("a1", "a2", "a3"))
    b = RequestShape(prompt_tokens=200, tokens_per_block=64.0, hashes=("b1", "b2", "b3"))
    await store.pick(["r0"], params, 0, shape=a)
    assert await store.cached_blocks(["r0"], a) == [3]
    await asyncio.sleep(0.002)  # a later pick
    await store.pick(["r0"], params, 0, shape=b)
    assert await client.zcard(keys.prefix_index("r0")) == 4
    assert await store.cached_blocks(["r0"], b) == [3]
    assert await store.cached_blocks(["r0"], a) == [1]
    await client.delete(*store.candidate_keys(["r0"]))
