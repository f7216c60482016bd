"""Redis with Sentinel under load: the embedded stack with ``redis_sentinel`` (a primary, a
replica, three real ``redis-sentinel`` processes; every sidecar, proxy plugin and the key store
connecting through ``redis+sentinel://``) while the primary is SIGKILLed. Requests keep being
answered (the plugins fail open while no primary answers, then follow the promoted replica),
none is lost, every count is back to zero afterwards on the new primary, and the old primary
rejoins as a replica. The figures are printed (``tests/README.md`` keeps them)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest

from core.redis_url import sentinel_target
from devstack.stack import Stack
from devstack.stack_settings import StackSettings

from fault_load import HEAL_S, Load, record, under_load

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = StackSettings(
        catalogue=[],  # a stack of one model: no cold catalogue sidecars
        replicas=2,
        proxies=1,
        poll_interval_ms=100,
        decode_ms_per_token=5.0,
        max_active=2,
        engine_queue_size=4,
        redis_sentinel=True,
        workdir=tmp_path_factory.mktemp("sentinel-stack"),
    )
    running = Stack(settings).start()
    try:
        yield running
    finally:
        running.stop()


def test_every_part_connects_through_the_sentinels(stack: Stack) -> None:
    state = stack.describe()
    for url in [state["redis_url"], *state["redis_users"].values()]:
        target = sentinel_target(url)
        assert target is not None and len(target.sentinels) == 3, url
    assert stack.redis_ha is not None and stack.redis_ha.current_primary() is stack.redis


async def test_primary_killed_under_load_fails_over_and_loses_nothing(stack: Stack) -> None:
    ha = stack.redis_ha
    assert ha is not None and ha.replica is not None
    old, new = stack.redis, ha.replica
    assert old is not None and old.process is not None
    figures: dict[str, float] = {}

    async def kill_primary(load: Load) -> None:
        killed = time.monotonic()
        os.kill(old.process.pid, signal.SIGKILL)  # type: ignore[union-attr]
        while ha.current_primary() is not new:
            assert time.monotonic() - killed < 30.0, "no failover within 30 s"
            await asyncio.sleep(0.05)
        figures["failover_s"] = round(time.monotonic() - killed, 2)
        figures["answered_during_failover"] = len(load.outcomes)

    kinds, healed, load = await under_load(
        stack, "Redis primary SIGKILL, Sentinel failover", kill_primary, after_s=2.0
    )
    ok_after = [
        o for o in load.outcomes[int(figures["answered_during_failover"]) :] if o.kind == "ok"
    ]
    record({"fault": "sentinel failover", **figures, "ok_after_promotion": len(ok_after)})
    assert kinds["cut"] == kinds["broken"] == 0, kinds
    assert kinds["error"] <= 0.02 * len(load.outcomes), kinds  # at most a brief 503 or two
    assert ok_after, "no request succeeded after the promotion"
    assert healed < HEAL_S  # counted on the promoted primary
    assert new.role() == "master"

    # the old primary comes back (same port, same data folder) and Sentinel makes it a replica
    await asyncio.to_thread(old.start)
    started = time.monotonic()
    while not (old.role() == "slave" and old.in_sync()):
        assert time.monotonic() - started < 30.0, "the old primary did not rejoin as a replica"
        await asyncio.sleep(0.2)
    assert ha.current_primary() is new
