"""LiteLLM's key management routes, served by the offline key store (no database).

LiteLLM's own ``/key/generate``, ``/key/info``, ``/key/update`` and ``/key/delete`` need its
PostgreSQL database; with the offline store (``plugins/auth/README.md``) these routes, put ahead
of LiteLLM's on the proxy's app, take the same requests (parsed with LiteLLM's own models:
``GenerateKeyRequest``, ``UpdateKeyRequest``, ``KeyRequest``) and answer in the same shapes
(``GenerateKeyResponse``; ``{"key", "info"}``; ``{"deleted_keys"}``), for the fields the store
keeps:

* ``key_alias``, ``models``, ``max_parallel_requests``, ``rpm_limit``, ``tpm_limit``,
  ``duration`` (expiry: ``"30s"``, ``"12h"``, ``"7d"``, ``"1mo"``, LiteLLM's parser), ``key``
  (a key chosen by the caller), and ``metadata`` (``metadata.priority`` is the admission tier,
  0-9; other entries are kept and passed on as LiteLLM passes a key's metadata);
* any other field set to something else than its default is refused with 400 naming it: the
  store would not keep it, and a limit that silently does not apply is worse than an error.

The master key only (403 otherwise). Only while the offline store is the proxy's
``custom_auth``: with LiteLLM's database keys its own routes answer (``OfflineKeyRoute``). The
limits are enforced where LiteLLM enforces them for its own keys: ``rpm_limit`` / ``tpm_limit``
/ ``max_parallel_requests`` by LiteLLM's rate limiter (429 with ``retry-after``), expiry by the
key check (401 ``expired_key``). A deleted or changed key takes effect at once in the proxy
process that served the call, within the key cache's TTL (``TRIAGE_KEYS_CACHE_TTL_S``) in the
others.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import Depends, FastAPI, status
from fastapi.routing import APIRoute
from litellm.litellm_core_utils.duration_parser import duration_in_seconds
from litellm.proxy._types import (
    GenerateKeyRequest,
    GenerateKeyResponse,
    KeyRequest,
    ProxyErrorTypes,
    ProxyException,
    UpdateKeyRequest,
    UserAPIKeyAuth,
)
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError
from starlette.routing import Match

from plugins.auth.custom_auth import get_authenticator
from plugins.auth.disclosure import is_admin
from plugins.auth.keystore import (
    AliasExistsError,
    KeyNotFoundError,
    KeyRecord,
    KeyStore,
    KeyStoreError,
    hash_key,
    new_alias,
)
from plugins.auth.settings import DEFAULT_PRIORITY

log = logging.getLogger("triage.auth.keys")

SUPPORTED = frozenset(
    {
        "key_alias",
        "models",
        "max_parallel_requests",
        "rpm_limit",
        "tpm_limit",
        "duration",
        "metadata",
        "key",
    }
)
OWN_METADATA = ("priority", "key_id", "key_source")
"""Metadata entries the store sets itself (``priority`` is kept as the record's tier)."""
KEY_ROUTES = ("/key/generate", "/key/info", "/key/update", "/key/delete")


def error(
    message: str, code: int, param: str | None = None, kind: str = "bad_request"
) -> Exception:
    return ProxyException(message=message, type=kind, param=param, code=code)


def unsupported(request: BaseModel, allowed: frozenset[str] = SUPPORTED) -> list[str]:
    """Fields the caller set, to something else than their default, that the store cannot keep."""
    out = []
    for name in sorted(request.model_fields_set - allowed - {"key_type"}):
        default = type(request).model_fields[name].get_default(call_default_factory=True)
        if getattr(request, name) not in (default, None):
            out.append(name)
    return out


def refuse_unsupported(request: BaseModel, allowed: frozenset[str] = SUPPORTED) -> None:
    fields = unsupported(request, allowed)
    if fields:
        raise error(
            f"the offline key store does not keep {', '.join(fields)}; supported: "
            f"{', '.join(sorted(allowed))} (plugins/auth/key_management.py)",
            status.HTTP_400_BAD_REQUEST,
            fields[0],
        )


def expiry(duration: str | None, now: datetime) -> datetime | None:
    if duration is None or duration in ("", "-1"):
        return None
    try:
        return now + timedelta(seconds=duration_in_seconds(duration))
    except ValueError as exc:
        raise error(f"duration {duration!r}: {exc}", 400, "duration") from exc


def split_metadata(metadata: dict[str, Any] | None) -> tuple[int | None, dict[str, Any]]:
    """(priority, the rest) of a request's metadata."""
    rest = dict(metadata or {})
    priority = rest.pop("priority", None)
    for own in OWN_METADATA:
        rest.pop(own, None)
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int)):
        raise error("metadata.priority must be an integer 0-9", 400, "metadata")
    return priority, rest


def key_name(plaintext: str) -> str:
    """LiteLLM's ``key_name``: the key's first 3 characters and its last 4."""
    return f"{plaintext[:3]}...{plaintext[-4:]}"


def info_of(record: KeyRecord) -> dict[str, Any]:
    """A record as LiteLLM's ``/key/info`` ``info`` (the fields the store keeps)."""
    return {
        "token": record.key_hash,
        "key_alias": record.alias,
        "models": list(record.models),
        "max_parallel_requests": record.max_parallel_requests,
        "rpm_limit": record.rpm_limit,
        "tpm_limit": record.tpm_limit,
        "expires": record.expires.isoformat() if record.expires else None,
        "metadata": {**record.metadata, "priority": record.priority},
        "created_at": record.created_at.isoformat(),
        "spend": 0.0,
    }


def token_of(key: str) -> str:
    """A key's record id from the key itself or from its token (the SHA-256 hex)."""
    lowered = key.strip().lower()
    if len(lowered) == 64 and all(c in "0123456789abcdef" for c in lowered):
        return lowered
    return hash_key(key.strip())


def admin_only(user: UserAPIKeyAuth) -> None:
    if not is_admin(user):
        raise error(
            "key management needs the master key", 403, None, ProxyErrorTypes.auth_error.value
        )


async def record_or_404(store: KeyStore, key: str | None) -> KeyRecord:
    if not key:
        raise error("name the key: its value or its token", 400, "key")
    record = await store.get(token_of(key))
    if record is None:
        raise error("Key not found in the key store", 404, "key", "not_found_error")
    return record


def parsed(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise error(f"invalid request: {where}: {first['msg']}", 400, where) from exc


async def generate(body: dict[str, Any], user: UserAPIKeyAuth) -> dict[str, Any]:
    admin_only(user)
    request = parsed(GenerateKeyRequest, body)
    refuse_unsupported(request)
    if request.key is not None and not (request.key.startswith("sk-") and len(request.key) >= 16):
        raise error("a chosen key must start with 'sk-' and be 16 characters or more", 400, "key")
    now = datetime.now(UTC)
    priority, metadata = split_metadata(request.metadata)
    store = get_authenticator().store
    try:
        plaintext, record = await store.create(
            request.key_alias or new_alias(),
            request.models or (),
            DEFAULT_PRIORITY if priority is None else priority,
            request.max_parallel_requests,
            rpm_limit=request.rpm_limit,
            tpm_limit=request.tpm_limit,
            expires=expiry(request.duration, now),
            metadata=metadata,
            plaintext=request.key,
        )
    except AliasExistsError as exc:
        raise error(str(exc), 400, "key_alias") from exc
    except KeyStoreError as exc:  # e.g. a chosen key that already exists
        raise error(str(exc), 400, "key") from exc
    except ValidationError as exc:
        raise error(f"invalid key: {exc.errors()[0]['msg']}", 400) from exc
    response = GenerateKeyResponse(
        key=plaintext,
        key_name=key_name(plaintext),
        key_alias=record.alias,
        token=None,
        token_id=record.key_hash,
        expires=record.expires,
        models=list(record.models),
        metadata={**record.metadata, "priority": record.priority},
        max_parallel_requests=record.max_parallel_requests,
        rpm_limit=record.rpm_limit,
        tpm_limit=record.tpm_limit,
        created_at=record.created_at,
    )
    return response.model_dump(mode="json")


async def info(key: str | None, user: UserAPIKeyAuth) -> dict[str, Any]:
    admin_only(user)
    record = await record_or_404(get_authenticator().store, key)
    return {"key": key, "info": info_of(record)}


async def update(body: dict[str, Any], user: UserAPIKeyAuth) -> dict[str, Any]:
    admin_only(user)
    request = parsed(UpdateKeyRequest, body)
    refuse_unsupported(request)
    authenticator = get_authenticator()
    record = await record_or_404(authenticator.store, request.key)
    changes: dict[str, Any] = {}
    if "models" in request.model_fields_set:
        changes["models"] = request.models or ()
    for name in ("max_parallel_requests", "rpm_limit", "tpm_limit"):
        if name in request.model_fields_set:  # 0 is a limit (LiteLLM's "blocked"), not none
            changes[name] = getattr(request, name)
    if request.key_alias is not None:
        changes["alias"] = request.key_alias
    if request.duration is not None:
        changes["expires"] = expiry(request.duration, datetime.now(UTC))
    if request.metadata is not None:
        priority, metadata = split_metadata(request.metadata)
        changes["metadata"] = metadata
        if priority is not None:
            changes["priority"] = priority
    try:
        updated = await authenticator.store.update(record.key_hash, **changes)
    except AliasExistsError as exc:
        raise error(str(exc), 400, "key_alias") from exc
    except KeyNotFoundError as exc:
        raise error(str(exc), 404, "key", "not_found_error") from exc
    except ValidationError as exc:
        raise error(f"invalid update: {exc.errors()[0]['msg']}", 400) from exc
    authenticator.forget(record.key_hash)
    return {"key": request.key, **info_of(updated)}


async def delete(body: dict[str, Any], user: UserAPIKeyAuth) -> dict[str, Any]:
    admin_only(user)
    request = parsed(KeyRequest, body)
    authenticator = get_authenticator()
    store = authenticator.store
    names = list(request.keys or []) + list(request.key_aliases or [])
    if not names:
        raise error("name the keys to delete: keys or key_aliases", 400, "keys")
    hashes: list[str] = []
    for key in request.keys or []:
        hashes.append((await record_or_404(store, key)).key_hash)
    aliases = (
        {alias: h for h, alias in (await store.aliases()).items()} if request.key_aliases else {}
    )
    for alias in request.key_aliases or []:
        if alias not in aliases:  # aliases only: never a key id that looks like one
            raise error(f"no key with alias {alias!r}", 404, "key_aliases", "not_found_error")
        hashes.append(aliases[alias])
    for key_hash in hashes:
        await store.revoke(key_hash)
        authenticator.forget(key_hash)
    return {"deleted_keys": names}


def offline_store_in_use() -> bool:
    """Whether the proxy's ``custom_auth`` is the offline key store's (mode 1): with LiteLLM's
    database keys (mode 2), LiteLLM's own key routes answer."""
    from litellm.proxy import proxy_server

    from plugins.auth.custom_auth import user_api_key_auth

    # by name: LiteLLM may load custom_auth from a file path, a second copy of the function
    configured = getattr(proxy_server, "user_custom_auth", None)
    return (getattr(configured, "__module__", None), getattr(configured, "__qualname__", None)) in (
        (user_api_key_auth.__module__, user_api_key_auth.__qualname__),
        ("custom_auth", user_api_key_auth.__qualname__),
    )


class OfflineKeyRoute(APIRoute):
    """A route that matches only while the offline key store is the proxy's auth, so that the
    routes put ahead of LiteLLM's never hide its database-backed ones."""

    def matches(self, scope: Any) -> tuple[Match, dict[str, Any]]:
        match, child = super().matches(scope)  # the path first: every request passes here
        if match is not Match.NONE and not offline_store_in_use():
            return Match.NONE, {}
        return match, child


async def store_call(call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """The route's answer; the key store unreachable is a 503 with Retry-After, not a 500."""
    try:
        return await call
    except RedisError as exc:
        log.error("key management: key store unreachable: %s: %s", type(exc).__name__, exc)
        raise ProxyException(
            message="The key store is unavailable right now; retry shortly.",
            type="service_unavailable",
            param=None,
            code=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": "1"},
        ) from exc


def install_key_routes(app: FastAPI) -> None:
    """Serve the four routes ahead of LiteLLM's, behind LiteLLM's key check (mode 1 only)."""
    from litellm.proxy.auth.user_api_key_auth import user_api_key_auth

    auth = Depends(user_api_key_auth)

    async def generate_route(body: dict[str, Any], user: UserAPIKeyAuth = auth) -> Any:
        return await store_call(generate(body, user))

    async def info_route(key: str | None = None, user: UserAPIKeyAuth = auth) -> Any:
        return await store_call(info(key, user))

    async def update_route(body: dict[str, Any], user: UserAPIKeyAuth = auth) -> Any:
        return await store_call(update(body, user))

    async def delete_route(body: dict[str, Any], user: UserAPIKeyAuth = auth) -> Any:
        return await store_call(delete(body, user))

    for path, handler, method in (
        ("/key/generate", generate_route, "POST"),
        ("/key/info", info_route, "GET"),
        ("/key/update", update_route, "POST"),
        ("/key/delete", delete_route, "POST"),
    ):
        route = OfflineKeyRoute(path, handler, methods=[method], tags=["key management"])
        app.router.routes.insert(0, route)
    log.info(
        "key management: %s served by the offline key store whenever it is the proxy's "
        "custom_auth (else LiteLLM's own routes answer)",
        ", ".join(KEY_ROUTES),
    )
