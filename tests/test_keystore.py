"""The offline key store against a real redis-server: records under hashes only, unique aliases."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from core.keyschema import KeySchema
from devstack.redis_launcher import RedisServer
from plugins.auth.keystore import (
    KEY_TEXT_PREFIX,
    AliasExistsError,
    AmbiguousKeyError,
    CorruptRecordError,
    KeyNotFoundError,
    KeyRecord,
    KeyStore,
    hash_key,
)


def fresh_prefix() -> str:
    return f"test-keys-{uuid.uuid4().hex[:8]}:"


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[KeyStore]:
    keystore = KeyStore(Redis.from_url(redis_server.url), fresh_prefix(), owns_client=True)
    try:
        yield keystore
    finally:
        await keystore.aclose()


async def test_create_then_lookup(store: KeyStore) -> None:
    plaintext, record = await store.create(
        "team-a", models=["m1", " m2 ", "m1"], priority=0, max_parallel_requests=4
    )
    assert plaintext.startswith(KEY_TEXT_PREFIX)
    assert len(plaintext) > len(KEY_TEXT_PREFIX) + 40  # 256 random bits
    assert record.key_hash == hash_key(plaintext)
    assert record.key_id == record.key_hash[:12]
    assert record.models == ("m1", "m2")
    assert (record.priority, record.max_parallel_requests) == (0, 4)

    found = await store.lookup(plaintext)
    assert found == record
    assert await store.get(record.key_hash) == record
    assert await store.lookup(plaintext + "x") is None
    assert await store.lookup(KEY_TEXT_PREFIX + "not-a-key") is None


async def test_defaults(store: KeyStore) -> None:
    _, record = await store.create("defaults")
    assert record.models == ()
    assert record.priority == 1
    assert record.max_parallel_requests is None
    assert await store.get(record.key_hash) == record


async def test_record_lives_under_the_schema_keys(store: KeyStore) -> None:
    _, record = await store.create("schema")
    keys = KeySchema(store.keys.prefix)
    raw = await store.client.hgetall(keys.api_key(record.key_hash))
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    assert fields["alias"] == "schema"
    assert fields["key_id"] == record.key_id
    assert json.loads(fields["models"]) == []
    members = {m.decode() for m in await store.client.smembers(keys.api_keys())}
    assert members == {record.key_hash}


async def test_plaintext_is_stored_nowhere(store: KeyStore) -> None:
    created = [await store.create(f"secret-{i}", models=["m"]) for i in range(3)]
    client = store.client
    haystack: list[bytes] = []
    async for name in client.scan_iter(match="*", count=1000):  # the whole database
        haystack.append(name)
        kind = (await client.type(name)).decode()
        if kind == "hash":
            for field, value in (await client.hgetall(name)).items():
                haystack += [field, value]
        elif kind == "set":
            haystack += list(await client.smembers(name))
        elif kind == "string":
            haystack.append(await client.get(name))
        elif kind == "zset":
            haystack += [m for m, _ in await client.zrange(name, 0, -1, withscores=True)]
    assert haystack, "nothing was scanned"
    blob = b"\n".join(haystack)
    for plaintext, record in created:
        secret = plaintext.removeprefix(KEY_TEXT_PREFIX)
        assert plaintext.encode() not in blob
        assert secret.encode() not in blob
        assert secret[:16].encode() not in blob
        assert record.key_hash.encode() in blob


async def test_alias_is_unique_until_revoked(store: KeyStore) -> None:
    _, first = await store.create("dup")
    with pytest.raises(AliasExistsError, match="dup"):
        await store.create("dup")
    await store.revoke("dup")
    _, second = await store.create("dup")
    assert second.key_hash != first.key_hash


async def test_alias_is_unique_under_concurrent_creates(redis_server: RedisServer) -> None:
    prefix = fresh_prefix()
    stores = [
        KeyStore(Redis.from_url(redis_server.url), prefix, owns_client=True) for _ in range(8)
    ]
    try:
        results = await asyncio.gather(*(s.create("race") for s in stores), return_exceptions=True)
        made = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, AliasExistsError)]
        assert len(made) == 1, results
        assert len(refused) == 7, results
        assert [r.alias for r in await stores[0].list()] == ["race"]
    finally:
        for s in stores:
            await s.aclose()


async def test_list_oldest_first(store: KeyStore) -> None:
    assert await store.list() == []
    records = [(await store.create(f"k{i}", priority=i % 3))[1] for i in range(4)]
    listed = await store.list()
    assert listed == records


async def test_revoke_by_id_alias_or_hash(store: KeyStore) -> None:
    a_key, a = await store.create("by-id")
    b_key, b = await store.create("by-alias")
    c_key, c = await store.create("by-hash")

    assert (await store.revoke(a.key_id)).alias == "by-id"
    revoked = await store.revoke("by-alias")
    assert (revoked.key_id, revoked.alias) == (b.key_id, "by-alias")
    assert (await store.revoke(c.key_hash.upper())).key_id == c.key_id

    for plaintext in (a_key, b_key, c_key):
        assert await store.lookup(plaintext) is None
    assert await store.list() == []
    assert await store.client.scard(store.keys.api_keys()) == 0
    with pytest.raises(KeyNotFoundError):
        await store.revoke("by-id")
    with pytest.raises(KeyNotFoundError):
        await store.revoke(a.key_id)


async def test_revoke_refuses_an_ambiguous_name(store: KeyStore) -> None:
    _, target = await store.create("first")
    # an alias that looks like another key's id: both readings match, nothing is revoked
    _, other = await store.create(target.key_id)
    with pytest.raises(AmbiguousKeyError):
        await store.revoke(target.key_id)
    assert len(await store.list()) == 2
    assert (await store.revoke(target.key_hash)).alias == "first"
    assert (await store.revoke(other.key_id)).alias == target.key_id


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"alias": "has space"}, "alias"),
        ({"alias": ""}, "alias"),
        ({"alias": "ok", "priority": 10}, "priority"),
        ({"alias": "ok", "priority": -1}, "priority"),
        ({"alias": "ok", "max_parallel_requests": 0}, "max_parallel_requests"),
    ],
)
async def test_invalid_fields_are_refused(
    store: KeyStore, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationError) as info:
        await store.create(**kwargs)  # type: ignore[arg-type]
    assert {str(e["loc"][0]) for e in info.value.errors()} == {field}
    assert await store.list() == []


async def test_corrupt_record_is_an_error_not_a_key(
    store: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    plaintext, record = await store.create("corrupt")
    _, healthy = await store.create("healthy")
    await store.client.hset(store.keys.api_key(record.key_hash), "priority", "high")
    with pytest.raises(CorruptRecordError, match=record.key_id):
        await store.lookup(plaintext)
    with caplog.at_level(logging.ERROR, logger="triage.auth.keystore"):
        assert await store.list() == [healthy]
    assert record.key_id in caplog.text
    assert (await store.revoke(record.key_id)).alias == "corrupt"


def test_record_round_trip() -> None:
    record = KeyRecord.model_validate(
        {
            "key_hash": hash_key("sk-triage-x"),
            "alias": "rt",
            "models": ["a", "b"],
            "priority": 2,
            "max_parallel_requests": 5,
            "created_at": "2026-11-01T12:00:00+00:00",
        }
    )
    assert KeyRecord.from_redis(record.key_hash, record.to_redis()) == record
    assert record.model_dump()["key_id"] == record.key_hash[:12]
