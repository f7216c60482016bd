"""The Redis clients a proxy process makes: a sized, blocking connection pool, and fail fast.

**The pool.** Every proxy-side client (the admission gate, the routing store, the offline key
store, the model catalogue) runs on a ``SizedConnectionPool``: redis-py's
``BlockingConnectionPool`` with ``max_connections`` from ``RedisPoolSettings``
(``TRIAGE_REDIS_MAX_CONNECTIONS``). When every connection is busy a command *waits* for a free
one, up to ``pool_timeout_ms``, instead of failing at once (redis-py's default pool raises
"Too many connections", which the plugins took for a Redis outage: 192 concurrent requests
through one proxy exhausted its 100 connections). A wait that times out raises
``PoolExhausted``: a ``RedisError`` (callers that know nothing of it answer 503, as for any
Redis error), but never an outage: the plugins catch it first and answer the request with a
503 + ``Retry-After`` (back-pressure) or retry in the background, without falling back to
per-process counts. Redis itself is fine then; the process has more commands in flight than
connections.

**Fail fast.** A plugin that cannot reach Redis falls back at once (per-process counts) and
tries again after its retry window; redis-py's default retries and long timeouts would instead
hold every request. The one retry: a command that finds its pooled connection dead (Redis
restarted since it was last used) reconnects once. Without it every stale connection in the
pool would fail one request after Redis is back and send the plugin into its fallback again. A
refused connection fails at once either way; a timeout is never retried. (The retry policy must
be redis-py's asyncio ``Retry``: its sync one, given to an async client, never retries
anything.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client import Counter
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError

from core.redis_url import SentinelTarget, sentinel_target

log = logging.getLogger(__name__)

DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_POOL_TIMEOUT_MS = 5000

POOL_EXHAUSTED = Counter(
    "triage_redis_pool_exhausted",
    "Redis commands that found no free pooled connection within the pool timeout",
    ["what"],
)


class RedisPoolSettings(BaseSettings):
    """The connection pool of every Redis client a proxy process makes (env ``TRIAGE_REDIS_*``;
    one pool per client: admission, routing, keys, catalogue)."""

    model_config = SettingsConfigDict(env_prefix="TRIAGE_REDIS_", extra="ignore")

    max_connections: int = Field(
        default=DEFAULT_MAX_CONNECTIONS,
        ge=1,
        description="connections per client and process: the most commands it has in flight "
        "at once; more wait for a free one. Redis runs one command at a time, so more "
        "connections add no throughput, only sockets (Redis' maxclients is 10000)",
    )
    pool_timeout_ms: int = Field(
        default=DEFAULT_POOL_TIMEOUT_MS,
        ge=1,
        description="how long a command waits for a free connection before its request is "
        "answered 503 + Retry-After (back-pressure, never taken for a Redis outage); keep it "
        "below client timeouts and above the event loop's worst stalls",
    )


class PoolExhausted(MaxConnectionsError):
    """No pooled connection became free within the pool timeout: the process is busy, Redis
    is not down. Never a reason to fall back to per-process counts."""


class SizedConnectionPool(BlockingConnectionPool):
    """``BlockingConnectionPool`` whose wait timeout raises ``PoolExhausted`` (redis-py raises
    a plain ``ConnectionError``, which reads like a refused connection)."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return await super().get_connection(*args, **kwargs)
        except RedisConnectionError as exc:
            # only the wait for a free connection ends in asyncio's TimeoutError; a connect
            # that fails (Redis down) raises redis' own ConnectionError / TimeoutError
            if isinstance(exc, MaxConnectionsError) or not isinstance(exc.__cause__, TimeoutError):
                raise
            waited = time.monotonic() - started
            raise PoolExhausted(
                f"no free connection among {self.max_connections} after {waited:.2f} s "
                "(the process has more Redis commands in flight than its pool holds)"
            ) from exc


class SizedSentinelPool(SentinelConnectionPool, SizedConnectionPool):
    """The sized, blocking pool on the primary that the Sentinels name: a connection asks the
    Sentinels for the primary's address when it connects, so after a failover the next
    connection goes to the promoted one (a connection to the demoted primary fails with
    ``READONLY`` or a closed socket, and is dropped)."""


def sized_redis(
    url: str,
    *,
    pool: RedisPoolSettings | None = None,
    **connection_kwargs: Any,
) -> Redis:
    """A client on its own ``SizedConnectionPool`` (closed with the client). ``url`` is any
    form ``core.redis_url`` accepts; with ``redis+sentinel://`` the pool follows the primary."""
    settings = pool if pool is not None else RedisPoolSettings()
    sizing = {
        "max_connections": settings.max_connections,
        "timeout": settings.pool_timeout_ms / 1000.0,
    }
    target = sentinel_target(url)
    if target is None:
        return Redis.from_pool(SizedConnectionPool.from_url(url, **sizing, **connection_kwargs))
    return sentinel_master(target, SizedSentinelPool, **sizing, **connection_kwargs)


def redis_client(url: str, **connection_kwargs: Any) -> Redis:
    """A plain client (redis-py's own pool) for any URL ``core.redis_url`` accepts: the
    sidecars' and the tools'."""
    target = sentinel_target(url)
    if target is None:
        return Redis.from_url(url, **connection_kwargs)
    return sentinel_master(target, SentinelConnectionPool, **connection_kwargs)


def sentinel_master(
    target: SentinelTarget, pool_class: type[SentinelConnectionPool], **connection_kwargs: Any
) -> Redis:
    """A client of the primary the Sentinels name for ``target.service``."""
    # a connect asks the Sentinels in turn, and the fail-fast client retries a connect once:
    # each Sentinel gets a share of the timeout, so that all of them timing out costs about
    # one timeout, not 2 x their number (the request path must fail fast in an outage)
    share = 2 * len(target.sentinels)
    sentinel_kwargs: dict[str, Any] = {
        k: v / share
        for k, v in connection_kwargs.items()
        if k in ("socket_timeout", "socket_connect_timeout") and v is not None
    }
    if target.sentinel_password is not None:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_kwargs)
    data_node: dict[str, Any] = {"db": target.db, **connection_kwargs}
    if target.username is not None:
        data_node["username"] = target.username
    if target.password is not None:
        data_node["password"] = target.password
    if target.ssl:
        data_node["ssl"] = True
    return sentinel.master_for(target.service, connection_pool_class=pool_class, **data_node)


def fail_fast_redis(url: str, timeout_ms: int, pool: RedisPoolSettings | None = None) -> Redis:
    """The plugins' request-path client: short timeouts, one reconnect, a sized pool."""
    timeout = timeout_ms / 1000.0
    return sized_redis(
        url,
        pool=pool,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=0,
    )


class PoolWaits:
    """Rate-limited logging of ``PoolExhausted`` (one line per interval, with the count)."""

    def __init__(self, component: str, log_interval_s: float) -> None:
        self._component = component
        self._interval_s = log_interval_s
        self._last_log = -float("inf")
        self._since_log = 0

    def exhausted(self, exc: PoolExhausted, what: str, consequence: str) -> None:
        POOL_EXHAUSTED.labels(self._component).inc()
        self._since_log += 1
        now = time.monotonic()
        if now - self._last_log < self._interval_s:
            return
        log.warning(
            "%s: redis connection pool exhausted during %s (%s); %s; %d such waits since the "
            "last report (not an outage: no fallback to per-process counts; raise "
            "TRIAGE_REDIS_MAX_CONNECTIONS or TRIAGE_REDIS_POOL_TIMEOUT_MS if this persists)",
            self._component,
            what,
            exc,
            consequence,
            self._since_log,
        )
        self._last_log = now
        self._since_log = 0


def cancel_requested() -> bool:
    """Whether the running task has been asked to stop (``Task.cancel``), even if a library
    swallowed the ``CancelledError`` (redis-py's reads and connects can turn it into another
    error, or absorb it in a timed read). A background loop that retries on errors checks this,
    or a cancellation at shutdown could leave it retrying forever."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
