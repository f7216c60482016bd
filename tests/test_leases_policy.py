"""The lease policy (``plugins/routing/leases.py``) and its Lua mirror (``lease_lib.lua``) agree,
the renewal script keeps what is held and nothing else, and the admission gate does not count
the reservations of a replica reported down (their requests are retried elsewhere)."""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from core.keyschema import KeySchema
from core.lua import lua_source
from devstack.redis_launcher import RedisServer
from plugins.admission.gate import AdmissionGate, Status
from plugins.admission.settings import AdmissionSettings
from plugins.routing.leases import (
    DEFAULT_LEASE_MS,
    LeaseRenewer,
    counted_reservations,
    lease_expiry,
    lease_live,
    replica_down,
)
from plugins.routing.settings import RoutingSettings

from replica_states import replica_state

LEASE_LIB = Path(__file__).parents[1] / "plugins" / "routing" / "lease_lib.lua"
_prefixes = itertools.count()

PROBE = f"""--! include {LEASE_LIB}
-- ARGV[1] = now_ms, then one down flag per key: what lease_lib counts, and what is left
local now_ms = tonumber(ARGV[1])
local out = {{}}
for i = 1, #KEYS do
  out[#out + 1] = counted_reservations(KEYS[i], now_ms, ARGV[i + 1] == '1')
  out[#out + 1] = redis.call('ZCARD', KEYS[i])
end
return out
"""


def test_the_policy_in_words() -> None:
    now = 1_000_000
    assert lease_expiry(now, 10_000) == now + 10_000
    assert lease_live(now + 1, now) and not lease_live(now, now) and not lease_live(now - 1, now)
    assert counted_reservations([now + 5, now, now - 5, now + 9_999], now, down=False) == 2
    assert counted_reservations([now + 5, now + 9_999], now, down=True) == 0
    fresh_dead = replica_state("r", ts_ms=now, healthy=False, state="unhealthy")
    stale_dead = replica_state("r", ts_ms=now - 5_000, healthy=False, state="unhealthy")
    fresh_ok = replica_state("r", ts_ms=now)
    assert replica_down(fresh_dead, now, 1000)
    assert not replica_down(stale_dead, now, 1000)  # unknown, not down: keep counting
    assert not replica_down(fresh_ok, now, 1000) and not replica_down(None, now, 1000)


def test_defaults_heal_within_ten_seconds_and_survive_two_missed_renewals(
    redis_server: RedisServer,
) -> None:
    """A dead proxy's or a lost release's entries used to count for 15 minutes."""
    for settings in (
        RoutingSettings(redis_url=redis_server.url),
        AdmissionSettings(redis_url=redis_server.url),
    ):
        assert settings.lease_ms == DEFAULT_LEASE_MS <= 10_000
        assert settings.renew_ms * 3 <= settings.lease_ms
        assert settings.max_hold_ms >= 3_600_000  # a long stream keeps its entries
    with pytest.raises(ValueError, match="renew_ms"):
        RoutingSettings(redis_url=redis_server.url, lease_ms=2000, renew_ms=1000)
    with pytest.raises(ValueError, match="renew_ms"):
        AdmissionSettings(redis_url=redis_server.url, lease_ms=2000, renew_ms=1000)


async def test_lua_and_python_count_the_same_entries(client: Redis, tmp_path: Path) -> None:
    """Random sets of leases around ``now`` (the boundary included), replicas up or down."""
    (tmp_path / "probe.lua").write_text(PROBE)
    probe = client.register_script(lua_source(tmp_path / "probe.lua"))
    rng = random.Random(7)
    prefix = f"test-lease-policy:{next(_prefixes)}:"
    now = int(time.time() * 1000)
    for case in range(60):
        keys, flags, expected = [], [], []
        for k in range(rng.randint(1, 4)):
            key = f"{prefix}{case}:{k}"
            expiries = [now + rng.choice([-2, -1, 0, 1, 2]) * rng.randint(0, 3) for _ in range(6)]
            expiries = expiries[: rng.randint(0, 6)]
            if expiries:
                await client.zadd(key, {f"e{i}": e for i, e in enumerate(expiries)})
            down = rng.random() < 0.3
            keys.append(key)
            flags.append("1" if down else "0")
            live = sum(1 for e in expiries if lease_live(e, now))
            expected += [counted_reservations(expiries, now, down), live]
        assert await probe(keys=keys, args=[str(now), *flags]) == expected, case


async def test_renewal_keeps_what_is_held_and_never_resurrects_a_release(client: Redis) -> None:
    prefix = f"test-lease-renew:{next(_prefixes)}:"
    key, other = f"{prefix}admitted:m", f"{prefix}inflight:r"
    now = int(time.time() * 1000)
    await client.zadd(key, {"live": now + 200, "late": now - 50})  # "late": renewal came late
    await client.zadd(other, {"res": now + 200})
    held = {key: ["live", "late", "released"], other: ["res"]}
    still = {"live", "late", "res"}  # "released" was released while the renewal was on its way
    renewer = LeaseRenewer(
        "test", lambda: client, lambda: held, lambda k, m: m in still, 5000, 1000, 10.0
    )
    assert await renewer.renew(held)
    for member in ("live", "late"):
        score = await client.zscore(key, member)
        assert score is not None and score >= now + 4900
    assert await client.zscore(key, "released") is None  # stays released
    assert renewer.restored == 0
    assert 0 < await client.pttl(key) <= 5000  # the set lives as long as its longest lease
    # Redis lost the set (restarted without its data): what is still held is put back
    await client.delete(key, other)
    assert await renewer.renew(held)
    assert renewer.restored == 3
    assert {m.decode() for m in await client.zrange(key, 0, -1)} == {"live", "late"}
    assert await client.zscore(other, "res") is not None


def gate_settings(redis_server: RedisServer, **overrides: Any) -> AdmissionSettings:
    base: dict[str, Any] = {
        "redis_url": redis_server.url,
        "key_prefix": f"test-lease-gate:{next(_prefixes)}:",
        "queue_allowance": 1,
        "max_queue": 4,
    }
    return AdmissionSettings(**{**base, **overrides})


async def test_a_down_replicas_reservations_do_not_make_its_requests_look_routed(
    redis_server: RedisServer, client: Redis
) -> None:
    """A (2 slots) and B (2 slots) serve three admitted requests: t1 routed to A, t2 to B, t3
    not routed yet. B dies (its sidecar reports it unhealthy): t2 will fail there and be retried
    on A. With t3 released, A has one free slot, which t2's retry needs: a waiter must not get
    it. Counting B's reservation would make t2 look routed and grant A's slot twice."""
    s = gate_settings(redis_server)
    keys = KeySchema(s.key_prefix)
    gate = AdmissionGate(client, s)
    ids = ["A", "B"]
    for rid in ids:
        await client.hset(keys.replica(rid), mapping=replica_state(rid, max_active=2).to_redis())
    for ticket in ("t1", "t2", "t3"):
        assert (await gate.enter("m", ids, ticket, 0)).status == Status.ADMITTED
    later = int(time.time() * 1000) + 60_000
    await client.zadd(keys.inflight("A"), {"t1:r": later})
    await client.zadd(keys.inflight("B"), {"t2:r": later})
    # B dies: capacity 2 + 1 allowance (A only), three outstanding: a new request waits
    dead = replica_state("B", max_active=2, healthy=False, state="unhealthy")
    await client.hset(keys.replica("B"), mapping=dead.to_redis())
    assert (await gate.enter("m", ids, "w", 0)).status == Status.WAITING
    await gate.release("m", ids, "t3")
    assert (await gate.poll("m", ids, "w", 0)).status == Status.WAITING
    # t2's retry lands on A and its reservation on B is released: A is full, w still waits
    await client.zadd(keys.inflight("A"), {"t2:retry": later})
    await client.zrem(keys.inflight("B"), "t2:r")
    assert (await gate.poll("m", ids, "w", 0)).status == Status.WAITING
    # t1 ends: its slot on A goes to the waiter
    await client.zrem(keys.inflight("A"), "t1:r")
    await gate.release("m", ids, "t1")
    assert (await gate.poll("m", ids, "w", 0)).status == Status.ADMITTED
