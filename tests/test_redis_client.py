"""The plugins' fail-fast Redis client against a real redis-server that restarts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from core.redis_client import fail_fast_redis
from devstack.redis_launcher import RedisServer

pytestmark = pytest.mark.integration


async def test_a_pooled_connection_from_before_a_restart_reconnects_once(tmp_path: Path) -> None:
    """Redis restarted: the pooled connection is dead, and the command on it reconnects and
    succeeds instead of failing (which would send a plugin into its fallback for a while)."""
    server = RedisServer(tmp_path).start()
    client = fail_fast_redis(server.url, 500)
    try:
        script = client.register_script("return ARGV[1]")
        assert await client.ping()
        assert await script(args=["x"]) == b"x"
        server.kill()
        server.start()  # same port
        assert await script(args=["y"]) == b"y"  # on the pooled, dead connection
        assert await client.ping()
    finally:
        await client.aclose()
        server.stop()


async def test_a_refused_connection_fails_fast(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    client = fail_fast_redis(server.url, 500)
    try:
        assert await client.ping()
        server.kill()
        started = time.monotonic()
        with pytest.raises(RedisConnectionError):
            await client.ping()
        assert time.monotonic() - started < 1.0  # no backoff, no long timeout
    finally:
        await client.aclose()
        server.stop()
