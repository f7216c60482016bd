"""Session fixtures that start real processes on free loopback ports and always stop them."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from devstack.redis_launcher import RedisServer
from devstack.stack import Stack
from devstack.stack_settings import StackSettings

# litellm fetches its model cost map from the internet at import unless told not to
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[RedisServer]:
    server = RedisServer(workdir).start()
    try:
        yield server
    finally:
        server.stop()


SMALL_STACK = "small_stack"
_small: dict[str, Stack] = {}


@pytest.fixture(scope="session")
def small_stack(tmp_path_factory: pytest.TempPathFactory) -> Stack:
    """One embedded stack (one stand-in replica, one proxy with every plugin) shared by the
    modules that only talk to a proxy and leave nothing running behind (keys, routes, traces):
    one start instead of one each. Its users run one after another
    (``pytest_collection_modifyitems``) and it stops after the last of them
    (``pytest_runtest_teardown``): idle processes left running would take CPU from the
    timing-sensitive tests after them. A module whose tests load the fleet, or change its
    shape, starts its own."""
    settings = StackSettings(
        catalogue=[],  # a stack of one model: no cold catalogue sidecars
        replicas=1,
        decode_ms_per_token=2.0,
        num_retries=0,  # LiteLLM retries a malformed body's APIConnectionError (5 s a request)
        workdir=tmp_path_factory.mktemp("small-stack"),
    )
    _small[SMALL_STACK] = Stack(settings).start()
    return _small[SMALL_STACK]


def group_small_stack_users(items: list[pytest.Item]) -> None:
    """The small stack's users one after another, where the first of them was."""
    users = [item for item in items if SMALL_STACK in getattr(item, "fixturenames", ())]
    if not users:
        return
    first = items.index(users[0])
    rest = [item for item in items if item not in users]
    items[:] = rest[:first] + users + rest[first:]


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if SMALL_STACK in _small and (
        nextitem is None or SMALL_STACK not in getattr(nextitem, "fixturenames", ())
    ):
        _small.pop(SMALL_STACK).stop()


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A client of the session's redis-server (a test file may name its own ``client``)."""
    redis = Redis.from_url(redis_server.url)
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest.fixture(scope="session", autouse=True)
async def no_task_outlives_the_session() -> AsyncIterator[None]:
    """Every test shares one event loop (``asyncio_default_test_loop_scope = "session"``): a
    background task a test left behind (a grant listener, a lease renewer) is cancelled here,
    and one that will not end within 5 s is named in the log (the loop's own shutdown would
    wait for it forever)."""
    yield
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for task in left:
        task.cancel()
    if not left:
        return
    _, pending = await asyncio.wait(left, timeout=5.0)
    for task in pending:
        logging.getLogger("tests").error("a task ignores its cancellation: %r", task)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Integration tests (real processes) run after the fast unit tests; the small stack's
    users one after another."""
    items.sort(key=lambda item: item.get_closest_marker("integration") is not None)
    group_small_stack_users(items)
