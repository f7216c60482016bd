"""The offline virtual-key store: key records in Redis, keyed by the SHA-256 of the key.

Schema (owned by ``core/keyschema.py``, documented in ``redis/SCHEMA.md``):

* ``{prefix}apikey:{sha256}`` hash: one key's record, the fields of ``KeyRecord.to_redis``;
* ``{prefix}apikeys`` set: the SHA-256 hex of every live key.

The key itself is returned once by ``create`` and never stored or logged. Revoking a key deletes
its record (its alias can then be reused). Every write that can change an alias also writes
``apikeys`` (``create`` adds a member, ``update`` removes and re-adds its own), so watching that
one set makes "alias is unique" hold under concurrent writers in several processes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, computed_field, field_validator
from redis.asyncio import Redis
from redis.exceptions import WatchError

from core.keyschema import DEFAULT_PREFIX, KeySchema
from core.redis_client import sized_redis
from plugins.auth.settings import (
    DEFAULT_PRIORITY,
    PRIORITY_HIGHEST,
    PRIORITY_LOWEST,
    KeysSettings,
)

log = logging.getLogger("triage.auth.keystore")

KEY_TEXT_PREFIX = "sk-triage-"
"""Every key starts with this (LiteLLM treats ``sk-`` keys as secrets and hashes them in logs)."""
KEY_ID_LEN = 12
"""A key's public id: the first 12 hex digits of its SHA-256 (the same rule for DB keys)."""
ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@:\-]{0,63}$"
_HEX_ID = re.compile(r"^[0-9a-f]{12,64}$")
_CREATE_RETRIES = 16


def hash_key(plaintext: str) -> str:
    """SHA-256 hex of a key: its only form in Redis (and LiteLLM's ``token`` for DB keys)."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def key_id_from_hash(key_hash: str) -> str:
    return key_hash[:KEY_ID_LEN]


def new_key() -> str:
    """A fresh key: ``sk-triage-`` and 256 random bits, URL-safe base64."""
    return KEY_TEXT_PREFIX + secrets.token_urlsafe(32)


def new_alias() -> str:
    """An alias for a key created without one (LiteLLM's ``key_alias`` is optional)."""
    return f"key-{secrets.token_hex(4)}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class KeyStoreError(Exception):
    """A key-store operation that cannot be done (the message says why)."""


class AliasExistsError(KeyStoreError):
    pass


class KeyNotFoundError(KeyStoreError):
    pass


class AmbiguousKeyError(KeyStoreError):
    pass


class CorruptRecordError(KeyStoreError):
    """A record in Redis that does not validate: written by hand or by another version."""


class KeyRecord(BaseModel):
    """What the store knows about one key. Never holds the key itself."""

    model_config = ConfigDict(frozen=True)

    key_hash: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 hex of the key")
    alias: str = Field(pattern=ALIAS_PATTERN, description="unique human name")
    models: tuple[str, ...] = Field(
        default=(), description="model names the key may call; empty = every model"
    )
    priority: int = Field(
        default=DEFAULT_PRIORITY,
        ge=PRIORITY_HIGHEST,
        le=PRIORITY_LOWEST,
        description="admission tier: 0 is served first, 9 last",
    )
    max_parallel_requests: int | None = Field(
        default=None, ge=1, description="LiteLLM's per-key concurrency limit; None = unlimited"
    )
    rpm_limit: int | None = Field(
        default=None,
        ge=0,
        description="requests per minute (LiteLLM's limiter; 0 blocks the key); None = unlimited",
    )
    tpm_limit: int | None = Field(
        default=None,
        ge=0,
        description="tokens per minute (LiteLLM's limiter; 0 blocks the key); None = unlimited",
    )
    expires: datetime | None = Field(
        default=None, description="after this the key is refused (401 expired_key); None = never"
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="the key's LiteLLM metadata besides priority (ids and labels: no secrets)",
    )
    created_at: datetime

    @computed_field  # type: ignore[prop-decorator]
    @property
    def key_id(self) -> str:
        return key_id_from_hash(self.key_hash)

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: object) -> object:
        if isinstance(value, str):
            value = json.loads(value) if value.startswith("[") else value.split(",")
        if isinstance(value, Iterable) and not isinstance(value, Mapping):
            out: list[str] = []
            for item in value:
                if not isinstance(item, str):
                    raise ValueError(f"model names must be strings, got {item!r}")
                name = item.strip()
                if name and name not in out:
                    out.append(name)
            return tuple(out)
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: object) -> object:
        return json.loads(value) if isinstance(value, str) else ({} if value is None else value)

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires is not None and (now or datetime.now(UTC)) >= self.expires

    def to_redis(self) -> dict[str, str]:
        def optional(value: object) -> str:
            return "" if value is None else str(value)

        return {
            "key_id": self.key_id,
            "alias": self.alias,
            "models": json.dumps(list(self.models)),
            "priority": str(self.priority),
            "max_parallel_requests": optional(self.max_parallel_requests),
            "rpm_limit": optional(self.rpm_limit),
            "tpm_limit": optional(self.tpm_limit),
            "expires": "" if self.expires is None else self.expires.isoformat(),
            "metadata": json.dumps(self.metadata, sort_keys=True),
            "created_at": self.created_at.isoformat(),
        }

    @classmethod
    def from_redis(cls, key_hash: str, raw: Mapping[bytes | str, bytes | str]) -> KeyRecord:
        data = {_text(k): _text(v) for k, v in raw.items()}
        data.pop("key_id", None)  # derived from the hash in the key name
        fields: dict[str, object] = {k: (None if v == "" else v) for k, v in data.items()}
        fields["key_hash"] = key_hash
        return cls.model_validate(fields)


@dataclass(frozen=True)
class RevokedKey:
    key_id: str
    alias: str | None


class KeyStore:
    """Create, look up, list and revoke keys on Redis (redis-py asyncio)."""

    def __init__(self, client: Redis, prefix: str = DEFAULT_PREFIX, *, owns_client: bool = False):
        self._client = client
        self._keys = KeySchema(prefix)
        self._owns_client = owns_client

    @classmethod
    def from_settings(cls, settings: KeysSettings) -> KeyStore:
        # the proxy looks keys up on its request path: a sized pool that waits for a free
        # connection (``core.redis_client``), not redis-py's pool that fails when exhausted
        client = sized_redis(
            settings.redis_url,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
        )
        return cls(client, settings.key_prefix, owns_client=True)

    @property
    def keys(self) -> KeySchema:
        return self._keys

    @property
    def client(self) -> Redis:
        return self._client

    def describe(self) -> str:
        """Where the store is, for logs and messages (no password)."""
        pool = self._client.connection_pool
        kwargs = pool.connection_kwargs
        service = getattr(pool, "service_name", None)  # a Sentinel pool: the monitored name
        where = (
            f"sentinel service {service!r}"
            if service
            else kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        )
        return f"redis {where} db {kwargs.get('db', 0)} prefix {self._keys.prefix!r}"

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def create(
        self,
        alias: str,
        models: Sequence[str] = (),
        priority: int = DEFAULT_PRIORITY,
        max_parallel_requests: int | None = None,
        *,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        expires: datetime | None = None,
        metadata: Mapping[str, Any] | None = None,
        plaintext: str | None = None,
    ) -> tuple[str, KeyRecord]:
        """A new key and its record. The key is in the return value only: show it once.
        ``plaintext``: the key itself, chosen by the caller (LiteLLM's ``/key/generate`` takes
        one); default a new random one.

        Raises ``AliasExistsError`` if a live key has this alias, ``pydantic.ValidationError``
        for bad fields.
        """
        plaintext = plaintext or new_key()
        record = KeyRecord(
            key_hash=hash_key(plaintext),
            alias=alias,
            models=tuple(models),
            priority=priority,
            max_parallel_requests=max_parallel_requests,
            rpm_limit=rpm_limit,
            tpm_limit=tpm_limit,
            expires=expires,
            metadata=dict(metadata or {}),
            created_at=datetime.now(UTC),
        )
        set_key = self._keys.api_keys()
        record_key = self._keys.api_key(record.key_hash)
        async with self._client.pipeline(transaction=True) as pipe:
            for attempt in range(_CREATE_RETRIES):
                try:
                    await pipe.watch(set_key, record_key)
                    if await pipe.exists(record_key):  # 2**-256: a broken random source
                        raise KeyStoreError("a record for the new key already exists")
                    hashes = [_text(h) for h in await pipe.smembers(set_key)]
                    aliases = await self._aliases(hashes)
                    if alias in aliases.values():
                        raise AliasExistsError(f"a key with alias {alias!r} already exists")
                    pipe.multi()
                    pipe.hset(record_key, mapping=record.to_redis())
                    pipe.sadd(set_key, record.key_hash)
                    await pipe.execute()
                    break
                except WatchError:
                    log.debug(
                        "create %r: key set changed during the check, retry %d", alias, attempt
                    )
                    await pipe.reset()
            else:
                raise KeyStoreError(
                    f"could not create {alias!r}: the key set kept changing "
                    f"({_CREATE_RETRIES} tries)"
                )
        log.info("created key %s alias %r on %s", record.key_id, alias, self.describe())
        return plaintext, record

    async def update(self, key_hash: str, **changes: Any) -> KeyRecord:
        """Change a live key's record (``KeyRecord`` fields). Raises ``KeyNotFoundError``,
        ``AliasExistsError`` (a new alias another live key has), ``ValidationError``."""
        set_key = self._keys.api_keys()
        record_key = self._keys.api_key(key_hash)
        async with self._client.pipeline(transaction=True) as pipe:
            for attempt in range(_CREATE_RETRIES):
                try:
                    await pipe.watch(set_key, record_key)
                    raw = await pipe.hgetall(record_key)
                    if not raw:
                        raise KeyNotFoundError(f"no key {key_id_from_hash(key_hash)}")
                    current = KeyRecord.from_redis(key_hash, raw)
                    record = KeyRecord.model_validate({**current.model_dump(), **changes})
                    if record.alias != current.alias:
                        hashes = [_text(h) for h in await pipe.smembers(set_key)]
                        others = await self._aliases([h for h in hashes if h != key_hash])
                        if record.alias in others.values():
                            raise AliasExistsError(
                                f"a key with alias {record.alias!r} already exists"
                            )
                    pipe.multi()
                    pipe.delete(record_key)
                    pipe.hset(record_key, mapping=record.to_redis())
                    pipe.srem(set_key, key_hash)  # a write to the set: concurrent alias checks
                    pipe.sadd(set_key, key_hash)  # (create's, update's) see the change and retry
                    await pipe.execute()
                    break
                except WatchError:
                    log.debug("update %s: changed meanwhile, retry %d", key_hash[:12], attempt)
                    await pipe.reset()
            else:
                raise KeyStoreError(f"could not update key {key_id_from_hash(key_hash)}")
        log.info("updated key %s (%s) on %s", record.key_id, sorted(changes), self.describe())
        return record

    async def lookup(self, plaintext: str) -> KeyRecord | None:
        """The live record of a key, or None if the key is unknown or revoked."""
        return await self.get(hash_key(plaintext))

    async def get(self, key_hash: str) -> KeyRecord | None:
        """The live record by the key's SHA-256 hex; raises ``CorruptRecordError``."""
        raw = await self._client.hgetall(self._keys.api_key(key_hash))
        if not raw:
            return None
        try:
            return KeyRecord.from_redis(key_hash, raw)
        except (ValidationError, ValueError) as exc:
            raise CorruptRecordError(
                f"record of key {key_id_from_hash(key_hash)} on {self.describe()} is invalid: {exc}"
            ) from exc

    async def find(self, id_or_alias: str) -> str:
        """The SHA-256 of the one live key whose id (or full hash) or alias is ``id_or_alias``."""
        hashes = [_text(h) for h in await self._client.smembers(self._keys.api_keys())]
        wanted = id_or_alias.strip()
        matches: set[str] = set()
        if _HEX_ID.match(wanted.lower()):
            matches.update(h for h in hashes if h.startswith(wanted.lower()))
        aliases = await self._aliases(hashes)
        matches.update(h for h, alias in aliases.items() if alias == wanted)
        if not matches:
            raise KeyNotFoundError(f"no key with id or alias {wanted!r}")
        if len(matches) > 1:
            ids = ", ".join(sorted(key_id_from_hash(h) for h in matches))
            raise AmbiguousKeyError(f"{wanted!r} names several keys ({ids}): use a longer id")
        return matches.pop()

    async def revoke(self, id_or_alias: str) -> RevokedKey:
        """Delete a key's record. Proxies stop accepting it within their cache TTL."""
        key_hash = await self.find(id_or_alias)
        record_key = self._keys.api_key(key_hash)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hget(record_key, "alias")
            pipe.delete(record_key)
            pipe.srem(self._keys.api_keys(), key_hash)
            alias, _, _ = await pipe.execute()
        revoked = RevokedKey(key_id_from_hash(key_hash), None if alias is None else _text(alias))
        log.info("revoked key %s alias %r on %s", revoked.key_id, revoked.alias, self.describe())
        return revoked

    async def list(self) -> list[KeyRecord]:
        """Every live key's record, oldest first. Invalid records are logged and left out."""
        hashes = sorted(_text(h) for h in await self._client.smembers(self._keys.api_keys()))
        async with self._client.pipeline(transaction=False) as pipe:
            for key_hash in hashes:
                pipe.hgetall(self._keys.api_key(key_hash))
            raws = await pipe.execute()
        records: list[KeyRecord] = []
        for key_hash, raw in zip(hashes, raws, strict=True):
            if not raw:
                log.warning(
                    "key %s is in %s but has no record on %s",
                    key_id_from_hash(key_hash),
                    self._keys.api_keys(),
                    self.describe(),
                )
                continue
            try:
                records.append(KeyRecord.from_redis(key_hash, raw))
            except ValidationError as exc:
                log.error(
                    "record of key %s on %s is invalid, left out of the list (revoke it by id): %s",
                    key_id_from_hash(key_hash),
                    self.describe(),
                    exc,
                )
        records.sort(key=lambda r: (r.created_at, r.key_hash))
        return records

    async def aliases(self) -> dict[str, str]:
        """Every live key's alias, by its SHA-256."""
        hashes = [_text(h) for h in await self._client.smembers(self._keys.api_keys())]
        return await self._aliases(hashes)

    async def _aliases(self, hashes: Sequence[str]) -> dict[str, str]:
        if not hashes:
            return {}
        async with self._client.pipeline(transaction=False) as pipe:
            for key_hash in hashes:
                pipe.hget(self._keys.api_key(key_hash), "alias")
            values = await pipe.execute()
        return {h: _text(v) for h, v in zip(hashes, values, strict=True) if v is not None}
