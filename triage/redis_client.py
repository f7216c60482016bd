"""The Redis client the proxy plugins use on their request path: fail fast, never retry.

A plugin that cannot reach Redis falls back at once (per-process counts) and tries again after
its retry window; redis-py's default retries and long timeouts would instead hold every request.
"""

from __future__ import annotations

from redis.asyncio import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def fail_fast_redis(url: str, timeout_ms: int) -> Redis:
    timeout = timeout_ms / 1000.0
    return Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
