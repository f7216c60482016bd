"""LiteLLM ``general_settings.custom_auth`` backed by the offline key store.

Proxy config::

    general_settings:
      custom_auth: plugins.auth.custom_auth.user_api_key_auth

LiteLLM calls ``user_api_key_auth(request, api_key)`` for every authenticated route, with the
``Bearer`` prefix already removed. Outcomes:

* ``LITELLM_MASTER_KEY`` → the proxy admin (no Redis round trip);
* a live key → ``UserAPIKeyAuth`` with ``token``/``api_key`` = the key's SHA-256, ``key_alias``,
  ``models``, ``max_parallel_requests`` and ``metadata`` ``{"priority", "key_id", "key_source"}``;
* no key, an unknown or a revoked key → ``ProxyException`` 401 (``type: auth_error``), which
  LiteLLM returns as is: ``{"error": {"message", "type", "param", "code": "401"}}``;
* a live key on a route outside the families an SDK user needs (``plugins/auth/routes.py``:
  chat/completions, completions, embeddings, responses, messages, models, model/info) → 403,
  unless ``restrict_routes`` is off: LiteLLM runs no route checks of its own after a
  ``custom_auth`` (``custom_auth_run_common_checks`` would, but its admin-route rejection
  needs the ``prisma`` package and answers 500 without it);
* the model a request names is checked here, before LiteLLM's route handler runs, so every
  route family answers in the same envelope (LiteLLM's ``/v1/messages`` handler would answer
  its own errors in Anthropic's shape, without ``param`` and ``code``): a key's model outside
  its ``models`` list → 403 ``key_model_access_denied``; a model no deployment serves → 404
  ``model_not_found`` (OpenAI's answer; LiteLLM's is a 400 "Invalid model name"), for the
  master key too; ``GET /v1/models/{id}`` of a model the key may not use → the same 404 as an
  unknown one, as OpenAI answers and as the listing hides it;
* Redis unreachable → 503 (``type: service_unavailable``, ``Retry-After``), logged with the store's
  address; a key is never accepted without a successful lookup within the cache TTL;
* settings invalid (e.g. ``TRIAGE_KEYS_REDIS_URL`` unset) → 500, logged.

Lookups are cached in-process by the key's hash for ``cache_ttl_s`` (found) or
``negative_cache_ttl_s`` (unknown), so a revocation takes effect within ``cache_ttl_s``.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from fastapi import Request, status
from litellm.constants import LITELLM_PROXY_ADMIN_NAME, LITELLM_PROXY_MASTER_KEY_ALIAS
from litellm.proxy._types import (
    LitellmUserRoles,
    ProxyErrorTypes,
    ProxyException,
    UserAPIKeyAuth,
)
from litellm.proxy.auth.auth_utils import get_request_route
from litellm.proxy.common_utils.http_parsing_utils import read_request_body
from pydantic import ValidationError
from redis.exceptions import RedisError

from core.redis_client import PoolExhausted
from plugins.auth.errors import model_not_found
from plugins.auth.identity import KEY_SOURCE, MASTER, flow_from, key_id_of
from plugins.auth.keystore import (
    CorruptRecordError,
    KeyRecord,
    KeyStore,
    hash_key,
    key_id_from_hash,
)
from plugins.auth.model_access import model_access_denied, model_allowed, model_served
from plugins.auth.routes import (
    KEY_ROUTES_TEXT,
    body_model,
    key_route_allowed,
    names_model_in_body,
    retrieved_model,
)
from plugins.auth.settings import DEFAULT_PRIORITY, KeysSettings

log = logging.getLogger("triage.auth")

ADMIN_KEY_ID = MASTER
MASTER_KEY_ENV = "LITELLM_MASTER_KEY"
RETRY_AFTER_S = 1


def _unauthorized(message: str) -> ProxyException:
    return ProxyException(
        message=message,
        type=ProxyErrorTypes.auth_error,
        param="api_key",
        code=status.HTTP_401_UNAUTHORIZED,
    )


def _bearer_stripped(api_key: str | None) -> str:
    if not api_key:
        return ""
    key = api_key.strip()
    scheme, _, rest = key.partition(" ")
    if scheme.lower() == "bearer":
        key = rest.strip()
    return key


class Authenticator:
    """Key lookups through a small in-process TTL cache keyed by the key's hash."""

    def __init__(
        self,
        store: KeyStore,
        settings: KeysSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.settings = settings
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()
        self._last_stale_log = -float("inf")

    @classmethod
    def from_settings(cls, settings: KeysSettings) -> Authenticator:
        return cls(KeyStore.from_settings(settings), settings)

    async def record_for(self, key_hash: str) -> KeyRecord | None:
        """The live record, from the cache if fresh; raises on Redis errors (never allows)."""
        now = self._clock()
        cached = self._cache.get(key_hash)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            record = await self.store.get(key_hash)
        except (RedisError, OSError) as exc:
            if (
                cached is not None
                and cached[1] is not None
                and now < cached[0] + self.settings.stale_if_error_s
            ):
                self._log_stale(cached[1], exc, now)
                return cached[1]
            raise
        ttl = (
            self.settings.cache_ttl_s if record is not None else self.settings.negative_cache_ttl_s
        )
        if ttl > 0:
            self._cache[key_hash] = (now + ttl, record)
            self._cache.move_to_end(key_hash)
            while len(self._cache) > self.settings.cache_max_entries:
                self._cache.popitem(last=False)
        else:
            self._cache.pop(key_hash, None)
        return record

    def _log_stale(self, record: KeyRecord, exc: BaseException, now: float) -> None:
        if now - self._last_stale_log >= 10.0:  # once per 10 s, not once per request
            self._last_stale_log = now
            log.warning(
                "key store unreachable on %s (%s: %s): accepting key %s from a lookup that "
                "expired less than %.0f s ago",
                self.store.describe(),
                type(exc).__name__,
                exc,
                record.key_id,
                self.settings.stale_if_error_s,
            )

    def cached(self, key_hash: str) -> tuple[bool, KeyRecord | None]:
        """(fresh, record) from the cache alone, no I/O: ``(True, None)`` is a key known to be
        unknown or revoked; ``(False, record)`` a key found by a lookup older than the TTL
        (still in the cache); ``(False, None)`` one not looked up lately."""
        cached = self._cache.get(key_hash)
        if cached is None:
            return False, None
        return cached[0] > self._clock(), cached[1]

    def forget(self, key_hash: str | None = None) -> None:
        """Drop one cached lookup (or all): for tests and for an in-process revoke."""
        if key_hash is None:
            self._cache.clear()
        else:
            self._cache.pop(key_hash, None)

    def admin(self) -> UserAPIKeyAuth:
        return UserAPIKeyAuth(
            api_key=LITELLM_PROXY_MASTER_KEY_ALIAS,
            user_id=LITELLM_PROXY_ADMIN_NAME,
            user_role=LitellmUserRoles.PROXY_ADMIN,
            key_alias=ADMIN_KEY_ID,
            metadata={
                "priority": self.settings.admin_priority,
                "key_id": ADMIN_KEY_ID,
                "key_source": KEY_SOURCE,
            },
        )

    @staticmethod
    def to_user_api_key_auth(record: KeyRecord) -> UserAPIKeyAuth:
        return UserAPIKeyAuth(
            api_key=record.key_hash,  # not ``sk-``: LiteLLM keeps it as is, token = the same
            key_alias=record.alias,
            key_name=record.key_id,
            user_role=LitellmUserRoles.INTERNAL_USER,
            models=list(record.models),
            max_parallel_requests=record.max_parallel_requests,
            rpm_limit=record.rpm_limit,  # enforced by LiteLLM's own limiter, as for its DB keys
            tpm_limit=record.tpm_limit,
            expires=record.expires,
            metadata={
                **record.metadata,
                "priority": record.priority,
                "key_id": record.key_id,
                "key_source": KEY_SOURCE,
            },
        )

    async def aclose(self) -> None:
        await self.store.aclose()


_authenticator: Authenticator | None = None


def get_authenticator() -> Authenticator:
    """The process's authenticator, made from ``KeysSettings()`` (env) on first use."""
    global _authenticator
    if _authenticator is None:
        settings = KeysSettings()  # type: ignore[call-arg]  # redis_url comes from the env
        _authenticator = Authenticator.from_settings(settings)
        log.info(
            "offline key store: %s, cache ttl %.1f s (unknown keys %.1f s)",
            _authenticator.store.describe(),
            settings.cache_ttl_s,
            settings.negative_cache_ttl_s,
        )
    return _authenticator


def set_authenticator(authenticator: Authenticator | None) -> Authenticator | None:
    """Replace the process's authenticator (None: make it again from the env on next use).

    Returns the previous one; closing it is the caller's business.
    """
    global _authenticator
    previous, _authenticator = _authenticator, authenticator
    return previous


@dataclass(frozen=True)
class CachedIdentity:
    """A key as this process's last lookup saw it (``cached_identity``)."""

    known: bool
    """False: no key, or a key the store said (within the negative cache's TTL) is unknown or
    revoked: answer 401."""
    priority: int = DEFAULT_PRIORITY
    models: tuple[str, ...] = ()
    flow: str = ""
    """The admission gate's flow of the key (``identity.flow_of``)."""


def cached_identity(authorization: str | None) -> CachedIdentity | None:
    """What this process already knows of the key in an ``Authorization`` header, without any
    I/O (the front door's shortcut, ``plugins/front_door``); None when it does not know (the
    offline key store is not in use in this process, or the key was not looked up lately):
    then ``user_api_key_auth`` decides as usual.

    A known key may come from a lookup older than the cache's TTL (while it is still in the
    cache): enough to shed its request with a 503 (a revoked key would get a 503 instead of a
    401: it learns nothing and reaches no replica), never to let it in, which
    ``user_api_key_auth`` still decides."""
    authenticator = _authenticator
    if authenticator is None:
        return None
    presented = _bearer_stripped(authorization)
    if not presented:
        return CachedIdentity(known=False)
    master = os.environ.get(MASTER_KEY_ENV)
    if master and hmac.compare_digest(presented.encode(), master.encode()):
        return CachedIdentity(
            known=True,
            priority=authenticator.settings.admin_priority,
            flow=flow_from(ADMIN_KEY_ID, {}).name,
        )
    fresh, record = authenticator.cached(hash_key(presented))
    if record is None:
        return CachedIdentity(known=False) if fresh else None
    return CachedIdentity(
        known=True,
        priority=record.priority,
        models=tuple(record.models),
        flow=flow_from(record.key_id, record.metadata).name,
    )


NO_KEY_MESSAGE = (
    "No API key provided: send 'Authorization: Bearer <key>' (create one with "
    "'triage keys create --alias NAME')."
)
UNKNOWN_KEY_MESSAGE = "Invalid API key: unknown or revoked."


async def user_api_key_auth(request: Request, api_key: str | None) -> UserAPIKeyAuth:
    """LiteLLM ``custom_auth`` entry point; see the module docstring for the outcomes."""
    route = get_request_route(request)
    presented = _bearer_stripped(api_key)
    if not presented:
        log.info("rejected request without an API key on %s", route)
        raise _unauthorized(NO_KEY_MESSAGE)
    try:
        authenticator = get_authenticator()
    except ValidationError as exc:
        fields = ", ".join(
            f"TRIAGE_KEYS_{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        log.error("offline key store is not configured, every key is refused: %s", fields)
        raise ProxyException(
            message="The gateway's key store is not configured; see the gateway's log.",
            type="internal_server_error",
            param=None,
            code=status.HTTP_500_INTERNAL_SERVER_ERROR,
        ) from exc

    # LiteLLM's span of this request (its otel callback on): a custom_auth's answer carries it
    # on, as LiteLLM's own auth does, so the request's later spans (and the plugins') join it
    proxy_span = getattr(request.state, "parent_otel_span", None)
    master = os.environ.get(MASTER_KEY_ENV)
    if master and hmac.compare_digest(presented.encode(), master.encode()):
        admin = authenticator.admin()
        admin.parent_otel_span = proxy_span
        await check_requested_model(request, route, admin)
        return admin

    key_hash = hash_key(presented)
    key_id = key_id_from_hash(key_hash)
    try:
        record = await authenticator.record_for(key_hash)
    except PoolExhausted as exc:  # Redis is fine: this process has too much in flight
        log.warning(
            "key store busy (%s), answering 503 to key %s on %s: %s",
            authenticator.store.describe(),
            key_id,
            route,
            exc,
        )
        raise ProxyException(
            message="The gateway is too busy to check API keys right now; retry shortly.",
            type="service_unavailable",
            param=None,
            code=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from exc
    except (RedisError, OSError) as exc:
        log.error(
            "key store unreachable (%s), refusing key %s on %s: %s: %s",
            authenticator.store.describe(),
            key_id,
            route,
            type(exc).__name__,
            exc,
        )
        raise ProxyException(
            message="The gateway cannot check API keys right now (key store unavailable); "
            "retry shortly.",
            type="service_unavailable",
            param=None,
            code=status.HTTP_503_SERVICE_UNAVAILABLE,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from exc
    except CorruptRecordError as exc:
        log.error("refusing key %s on %s: %s", key_id, route, exc)
        raise ProxyException(
            message=f"The record of API key {key_id} is invalid; ask the operator to reissue it.",
            type="internal_server_error",
            param=None,
            code=status.HTTP_500_INTERNAL_SERVER_ERROR,
        ) from exc
    if record is None:
        log.info("rejected unknown or revoked key %s on %s", key_id, route)
        raise _unauthorized(UNKNOWN_KEY_MESSAGE)
    if record.expired():
        log.info("rejected expired key %s (%s) on %s", key_id, record.alias, route)
        raise ProxyException(  # LiteLLM's answer to its own expired keys
            message=f"Authentication Error - Expired Key. Key Expiry time {record.expires} and "
            f"current time {datetime.now(UTC)}",
            type=ProxyErrorTypes.expired_key,
            param=key_id,
            code=status.HTTP_401_UNAUTHORIZED,
        )
    if authenticator.settings.restrict_routes and not key_route_allowed(route):
        log.info("refused key %s (%s) on route %s", key_id, record.alias, route)
        raise ProxyException(
            message=f"API key '{record.alias}' may call the model routes only "
            f"({KEY_ROUTES_TEXT}); {route} needs the master key.",
            type=ProxyErrorTypes.auth_error,
            param="route",
            code=status.HTTP_403_FORBIDDEN,
        )
    user = authenticator.to_user_api_key_auth(record)
    user.parent_otel_span = proxy_span
    await check_requested_model(request, route, user)
    return user


async def check_requested_model(request: Request, route: str, user: UserAPIKeyAuth) -> None:
    """403 / 404 for the model a request names, before LiteLLM's handler sees it (see the
    module docstring): ``user.models`` is the key's allow-list (``[]`` for the master key: every
    model); whether a model is served is asked of the proxy's router (not outside the proxy)."""
    allowed = list(user.models)  # [] = every model (and the master key's)
    who = key_id_of(user)
    retrieved = retrieved_model(route) if request.method == "GET" else None
    if retrieved is not None:
        if not model_allowed(retrieved, allowed) or model_served(retrieved) is False:
            log.info("model %r not found for key %s on %s", retrieved, who, route)
            raise model_not_found(retrieved, " or this API key may not use it" if allowed else "")
        return
    if not names_model_in_body(route, request.method):
        return
    model = body_model(await read_request_body(request))
    if model is None:
        return  # LiteLLM answers a missing or malformed model itself
    if not model_allowed(model, allowed):
        log.info("refused model %r for key %s (%s) on %s", model, who, user.key_alias, route)
        raise model_access_denied(model, user)
    if model_served(model) is False:
        log.info("model %r not found for key %s on %s", model, who, route)
        raise model_not_found(model)
