"""The Redis client the proxy plugins use on their request path: fail fast.

A plugin that cannot reach Redis falls back at once (per-process counts) and tries again after
its retry window; redis-py's default retries and long timeouts would instead hold every request.
The one retry: a command that finds its pooled connection dead (Redis restarted since it was
last used) reconnects once. Without it every stale connection in the pool would fail one
request after Redis is back and send the plugin into its fallback again. A refused connection
fails at once either way; a timeout is never retried. (The retry policy must be redis-py's
asyncio ``Retry``: its sync one, given to an async client, never retries anything.)
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError


def fail_fast_redis(url: str, timeout_ms: int) -> Redis:
    timeout = timeout_ms / 1000.0
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=0,
    )
