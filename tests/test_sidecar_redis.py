"""Two real stand-in replicas, a sidecar process each, a real redis-server: the load contract."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from core.keyschema import KeySchema, ReplicaState
from devstack.redis_launcher import RedisServer
from devstack.sidecar_launcher import SidecarProcess, start_sidecar
from devstack.triton_launcher import StandinSettings, TritonServer, start_standin_replica
from sidecar.triton_metrics import parse_engine_sample

pytestmark = pytest.mark.integration

POLL_MS = 100
MODEL = "standin"


@dataclass
class Fleet:
    keys: KeySchema
    redis: redis.Redis
    servers: dict[str, TritonServer]
    sidecars: dict[str, SidecarProcess]

    def state(self, replica_id: str) -> ReplicaState | None:
        raw = self.redis.hgetall(self.keys.replica(replica_id))
        return ReplicaState.from_redis(raw) if raw else None


@pytest.fixture(scope="module")
def fleet(workdir: Path, redis_server: RedisServer) -> Iterator[Fleet]:
    keys = KeySchema(prefix=f"test-{uuid.uuid4().hex[:6]}:")
    servers: dict[str, TritonServer] = {}
    sidecars: dict[str, SidecarProcess] = {}
    try:
        for replica_id, speed in (("fast", 1.0), ("slow", 0.5)):
            settings = StandinSettings(speed=speed, decode_ms_per_token=10, max_active=4)
            servers[replica_id] = start_standin_replica(replica_id, settings, workdir)
            sidecars[replica_id] = start_sidecar(
                replica_id,
                servers[replica_id],
                MODEL,
                redis_server.url,
                workdir,
                poll_interval_ms=POLL_MS,
                key_prefix=keys.prefix,
            )
        client = redis.Redis.from_url(redis_server.url)
        yield Fleet(keys, client, servers, sidecars)
        client.close()
    finally:
        for sidecar in sidecars.values():
            sidecar.stop()
        for server in servers.values():
            server.stop()


def wait_for(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.005) -> float:
    """Seconds until ``predicate`` held; fails the test at the deadline."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        if predicate():
            return time.perf_counter() - start
        time.sleep(step_s)
    raise AssertionError(f"condition not met within {timeout_s} s")


def generate(server: TritonServer, max_tokens: int) -> int:
    response = httpx.post(
        f"{server.http_url}/v2/models/{MODEL}/generate",
        json={"text_input": "load", "max_tokens": max_tokens},
        timeout=60,
    )
    return response.status_code


def record(name: str, value: object) -> None:
    """Figures for the closing note and benchmarks: appended to $TRIAGE_FIGURES if set."""
    path = os.environ.get("TRIAGE_FIGURES")
    print(f"FIGURE {name} = {value}")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({name: value}) + "\n")


def test_hash_and_membership_published(fleet: Fleet) -> None:
    wait_for(lambda: (s := fleet.state("fast")) is not None and s.healthy, 5)
    members = {m.decode() for m in fleet.redis.smembers(fleet.keys.model_replicas(MODEL))}
    assert members == {"fast", "slow"}
    state = fleet.state("fast")
    assert state is not None
    assert (state.max_active, state.source, state.api_base) == (
        4,
        "trtllm",
        fleet.servers["fast"].http_url,
    )
    ttl = fleet.redis.pttl(fleet.keys.replica("fast"))
    assert 0 < ttl <= 4 * POLL_MS
    assert "load" not in json.dumps(state.model_dump())  # no prompt text in Redis


def test_service_time_reflects_replica_speed(fleet: Fleet) -> None:
    for replica_id in ("fast", "slow"):
        for _ in range(3):
            assert generate(fleet.servers[replica_id], 30) == 200
    time.sleep(3 * POLL_MS / 1000)
    fast, slow = fleet.state("fast"), fleet.state("slow")
    assert fast is not None and slow is not None
    assert fast.service_ms is not None and slow.service_ms is not None
    ratio = slow.service_ms / fast.service_ms
    record("service_ms_fast", round(fast.service_ms, 1))
    record("service_ms_slow", round(slow.service_ms, 1))
    assert 1.5 < ratio < 2.6, (fast.service_ms, slow.service_ms)
    # the mean request time (30 tokens each), whose ratio is the speeds' as well
    assert fast.request_ms is not None and slow.request_ms is not None
    assert fast.request_ms > 10 * fast.service_ms
    assert 1.5 < slow.request_ms / fast.request_ms < 2.6, (fast.request_ms, slow.request_ms)


def engine_load(server: TritonServer) -> tuple[int, int]:
    """(active, queued) as Triton's /metrics show them: the executor's queue is no gauge, it is
    the requests handed to the engine less those ended and those active (Triton's counters)."""
    sample = parse_engine_sample(httpx.get(server.metrics_url).text, MODEL)
    assert sample.arrivals is not None and sample.completions is not None
    hidden = max(0, round(sample.arrivals - sample.completions - sample.active))
    return sample.active, sample.pending + hidden


def lag_behind_engine(fleet: Fleet, replica_id: str, load: tuple[int, int]) -> float:
    """Seconds from Triton's /metrics showing ``load`` to the Redis hash showing it."""
    server = fleet.servers[replica_id]
    wait_for(lambda: engine_load(server) == load, 3, step_s=0.002)
    engine_seen = time.perf_counter()
    wait_for(
        lambda: (s := fleet.state(replica_id)) is not None and (s.active, s.waiting) == load,
        3,
        step_s=0.002,
    )
    return time.perf_counter() - engine_seen


def test_load_tracks_real_engine_within_a_poll(fleet: Fleet) -> None:
    fast = fleet.servers["fast"]
    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(generate, fast, 60) for _ in range(6)]
        rise = lag_behind_engine(fleet, "fast", (4, 2))
        slow = fleet.state("slow")
        assert slow is not None and (slow.active, slow.waiting) == (0, 0)
        assert all(f.result() == 200 for f in futures)
    fall = lag_behind_engine(fleet, "fast", (0, 0))
    record("redis_lag_behind_engine_rise_ms", round(rise * 1000))
    record("redis_lag_behind_engine_fall_ms", round(fall * 1000))
    # one poll interval, plus the poll's own time on a busy 2-core machine
    assert rise < POLL_MS / 1000 + 0.05, rise
    assert fall < POLL_MS / 1000 + 0.05, fall


def test_health_is_debounced_and_recovers(fleet: Fleet) -> None:
    server = fleet.servers["fast"]
    wait_for(lambda: (s := fleet.state("fast")) is not None and s.state == "healthy", 2)
    server.kill()
    killed = time.perf_counter()
    transitions: list[tuple[float, str]] = []

    def unhealthy() -> bool:
        s = fleet.state("fast")
        if s is not None and (not transitions or transitions[-1][1] != s.state):
            transitions.append((time.perf_counter() - killed, s.state))
        return s is not None and s.state == "unhealthy"

    wait_for(unhealthy, 3, step_s=0.002)
    states = [state for _, state in transitions]
    assert states[-2:] == ["suspect", "unhealthy"], transitions
    first_suspect = next(t for t, state in transitions if state == "suspect")
    # third failed poll: at least two poll intervals after the first failed one
    assert transitions[-1][0] - first_suspect >= 2 * POLL_MS / 1000 * 0.8, transitions

    server.start()  # same ports
    recovered = wait_for(lambda: (s := fleet.state("fast")) is not None and s.healthy, 2)
    record("recovered_after_ready_ms", round(recovered * 1000))
    assert recovered < POLL_MS / 1000 + 0.15


def test_sidecar_endpoints(fleet: Fleet) -> None:
    url = fleet.sidecars["slow"].url
    health = httpx.get(f"{url}/healthz").json()
    assert health["publishing"] is True and health["replica_state"] == "healthy"
    metrics = httpx.get(f"{url}/metrics").text
    for name in (
        "triage_sidecar_poll_seconds_bucket",
        "triage_sidecar_poll_failures_total",
        "triage_sidecar_last_publish_timestamp_seconds",
        'triage_sidecar_published{field="max_active"} 4.0',
    ):
        assert name in metrics


def test_a_fresher_fact_is_not_overwritten_by_an_older_poll(fleet: Fleet) -> None:
    """Another writer (the catalogue's cold loader) stored a sample taken after the sidecar's
    polls began: those polls keep out of the replica hash; the first poll begun after it writes."""
    key = fleet.keys.replica("fast")
    fresher_until_ms = int(time.time() * 1000) + 1000
    fleet.redis.hset(key, mapping={"state": "marker", "sample_ts_ms": fresher_until_ms})
    fleet.redis.pexpire(key, 5000)  # as the loader does: its fact outlives the sidecar's TTL
    time.sleep(5 * POLL_MS / 1000)
    assert fleet.redis.hget(key, "state") == b"marker"
    wait_for(lambda: fleet.redis.hget(key, "state") == b"healthy", 2)
    assert int(fleet.redis.hget(key, "sample_ts_ms") or 0) > fresher_until_ms
    assert fleet.redis.pttl(key) > 0


def test_killed_sidecar_hash_expires_and_stopped_one_withdraws(fleet: Fleet) -> None:
    fleet.sidecars["slow"].kill()
    assert fleet.state("slow") is not None
    gone = wait_for(lambda: fleet.state("slow") is None, 2)
    assert gone <= 4 * POLL_MS / 1000 + 0.1
    assert b"slow" in fleet.redis.smembers(fleet.keys.model_replicas(MODEL))

    assert fleet.state("fast") is not None
    fleet.sidecars["fast"].stop()  # SIGTERM: clean shutdown deletes the hash at once
    assert fleet.state("fast") is None
