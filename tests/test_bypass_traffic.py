"""Traffic that bypasses the gateway: a replica kept full by direct calls to Triton.

A real TensorRT-LLM replica shows such load only as ``active == max``: the executor's queue
behind it is no metric. The sidecar estimates that queue from Triton's request counters
(``sidecar/backlog.py``) and publishes it in ``waiting``, so the routing score counts it, and a
request goes to the replica with room (``plugins/routing/README.md``, "traffic that bypasses the
gateway"). Real tritonserver stand-ins, real sidecars, real Redis; no proxy (the choice is the
pure policy that ``pick.lua`` mirrors, tested alike in ``tests/test_pick_script.py``).
"""

from __future__ import annotations

import concurrent.futures as cf
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from core.keyschema import KeySchema, ReplicaState
from devstack.redis_launcher import RedisServer
from devstack.sidecar_launcher import SidecarProcess, start_sidecar
from devstack.triton_launcher import StandinSettings, TritonServer, start_standin_replica
from plugins.routing.policy import PolicyParams, choose, scores
from sidecar.triton_metrics import TRT_REQUESTS, parse_samples

pytestmark = pytest.mark.integration

POLL_MS = 100
MODEL = "standin"
MAX_ACTIVE = 2
DIRECT = 10  # 2 active + 8 in the executor's queue


@pytest.fixture(scope="module")
def pair(
    workdir: Path, redis_server: RedisServer
) -> Iterator[tuple[KeySchema, redis.Redis, dict[str, TritonServer]]]:
    keys = KeySchema(prefix=f"bypass-{uuid.uuid4().hex[:6]}:")
    servers: dict[str, TritonServer] = {}
    sidecars: list[SidecarProcess] = []
    try:
        for replica_id in ("busy", "free"):
            settings = StandinSettings(
                decode_ms_per_token=10, max_active=MAX_ACTIVE, engine_queue_size=64
            )
            servers[replica_id] = start_standin_replica(f"bypass-{replica_id}", settings, workdir)
            sidecars.append(
                start_sidecar(
                    replica_id,
                    servers[replica_id],
                    MODEL,
                    redis_server.url,
                    workdir,
                    poll_interval_ms=POLL_MS,
                    key_prefix=keys.prefix,
                )
            )
        client = redis.Redis.from_url(redis_server.url)
        yield keys, client, servers
        client.close()
    finally:
        for sidecar in sidecars:
            sidecar.stop()
        for server in servers.values():
            server.stop()


def state(keys: KeySchema, client: redis.Redis, replica_id: str) -> ReplicaState | None:
    raw = client.hgetall(keys.replica(replica_id))
    return ReplicaState.from_redis(raw) if raw else None


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout_s} s")


def direct_call(server: TritonServer, max_tokens: int) -> int:
    response = httpx.post(
        f"{server.http_url}/v2/models/{MODEL}/generate",
        json={"text_input": "direct", "max_tokens": max_tokens},
        timeout=120,
    )
    return response.status_code


def engine_gauges(server: TritonServer) -> dict[str, float]:
    values = parse_samples(httpx.get(server.metrics_url).text)
    return {
        labels["request_type"]: value
        for labels, value in values.get(TRT_REQUESTS, [])
        if "request_type" in labels
    }


def test_a_replica_full_of_direct_calls_publishes_its_hidden_queue_and_is_avoided(
    pair: tuple[KeySchema, redis.Redis, dict[str, TritonServer]],
) -> None:
    keys, client, servers = pair
    wait_for(lambda: all(state(keys, client, r) is not None for r in servers), 5)
    # the free replica has one request running: room for more, but not idle
    with cf.ThreadPoolExecutor(DIRECT + 1) as pool:
        # long enough to still run once the busy one's queue shows (CI, loaded: over 4 s)
        free_one = pool.submit(direct_call, servers["free"], 800)
        busy = [pool.submit(direct_call, servers["busy"], 100) for _ in range(DIRECT)]
        wait_for(
            lambda: (
                (s := state(keys, client, "busy")) is not None
                and s.active == MAX_ACTIVE
                and s.waiting >= DIRECT - MAX_ACTIVE - 1
                and (f := state(keys, client, "free")) is not None
                and f.active == 1
            ),
            10,
        )
        gauges = engine_gauges(servers["busy"])
        # what the replica itself shows: full, and no number for the queue behind it
        assert gauges["active"] == gauges["max"] == MAX_ACTIVE
        assert gauges["waiting"] <= gauges["active"]
        busy_state = state(keys, client, "busy")
        free_state = state(keys, client, "free")
        assert busy_state is not None and free_state is not None
        assert busy_state.waiting == pytest.approx(DIRECT - MAX_ACTIVE, abs=1)
        assert free_state.active == 1 and free_state.waiting == 0
        # no proxy reserved anything on either: the score sees the direct load and its queue
        now_ms = int(time.time() * 1000)
        candidates = [("busy", busy_state, 0), ("free", free_state, 0)]
        params = PolicyParams(stale_after_ms=60_000)
        busy_score, free_score = scores(candidates, params, now_ms)
        assert busy_score > 3 * free_score, (busy_score, free_score)
        assert {choose(candidates, params, now_ms, t) for t in range(8)} == {"free"}
        assert free_one.result() == 200
        assert all(f.result() == 200 for f in busy)
    # drained: the estimate falls back to 0 with the queue
    wait_for(lambda: (s := state(keys, client, "busy")) is not None and s.waiting == 0, 5)
