"""Benchmark of the admission gate's decisions (not a test): how fast is "yes" and "no"?

A real redis-server on a free port, two replicas published as a sidecar would publish them, and
the admission controller of one proxy process, in this process:

1. admit + release when there is room (two Redis round trips: ``gate.lua`` enter, release);
2. shed (503 ``queue_full``) when the fleet is at capacity and the queue is full: one round trip;
3. a burst of 3 x capacity concurrent requests with no queue: time to each answer.

Run: ``.venv/bin/triage bench admission [--decisions 3000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from redis.asyncio import Redis

from core.keyschema import KeySchema, ReplicaState
from devstack.redis_launcher import RedisServer
from plugins.admission.controller import AdmissionController
from plugins.admission.errors import GatewayError
from plugins.admission.gate import AdmissionGate
from plugins.admission.settings import AdmissionSettings

REPLICAS = ["replica-0", "replica-1"]
MODEL = "standin"


def quantiles_us(samples: list[float]) -> tuple[float, float, float]:
    cuts = statistics.quantiles(samples, n=100)
    return cuts[49] * 1e6, cuts[98] * 1e6, max(samples) * 1e6


async def publish(client: Redis, prefix: str) -> None:
    now = int(time.time() * 1000)
    for rid in REPLICAS:
        state = ReplicaState(
            replica_id=rid, model=MODEL, api_base="http://x", waiting=0, active=0, max_active=4,
            kv_fraction=0.0, service_ms=10.0, drain_rps=20.0, healthy=True, state="healthy",
            source="trtllm", ts_ms=now + 3_600_000, sample_ts_ms=now,
        )  # fmt: skip
        await client.hset(KeySchema(prefix).replica(rid), mapping=state.to_redis())


async def run(decisions: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp)).start()
        client = Redis.from_url(server.url)
        try:
            prefix = "bench-admission:"
            settings = AdmissionSettings(redis_url=server.url, key_prefix=prefix, max_queue=0)
            await publish(client, prefix)
            ctl = AdmissionController(AdmissionGate(client, settings), settings)
            capacity = 2 * (4 + settings.queue_allowance)

            admit: list[float] = []
            for i in range(decisions):
                started = time.perf_counter()
                await ctl.admit(MODEL, REPLICAS, f"a{i}", 1)
                admit.append(time.perf_counter() - started)
                await ctl.finish(f"a{i}")

            for i in range(capacity):
                await ctl.admit(MODEL, REPLICAS, f"hold{i}", 1)
            shed: list[float] = []
            for i in range(decisions):
                started = time.perf_counter()
                try:
                    await ctl.admit(MODEL, REPLICAS, f"s{i}", 1)
                except GatewayError as exc:
                    assert exc.status_code == 503
                else:
                    raise AssertionError("expected a shed")
                shed.append(time.perf_counter() - started)
            for i in range(capacity):
                await ctl.finish(f"hold{i}")

            burst_started = time.perf_counter()
            answered: list[float] = []
            outcomes: list[str] = []

            async def one(i: int) -> None:
                try:
                    await ctl.admit(MODEL, REPLICAS, f"b{i}", 1)
                    outcomes.append("admitted")
                except GatewayError:
                    outcomes.append("503")
                answered.append(time.perf_counter() - burst_started)

            await asyncio.gather(*(one(i) for i in range(3 * capacity)))
            for i in range(3 * capacity):
                await ctl.finish(f"b{i}")
            left = await ctl.gate.counts(MODEL)
        finally:
            await client.aclose()
            server.stop()

    print(
        f"admission decisions against a real redis-server ({decisions} each, capacity {capacity})"
    )
    print(f"  {'what':44} {'p50 µs':>8} {'p99 µs':>8} {'max µs':>9}")
    for name, samples in (
        ("admit (gate.lua enter), room available", admit),
        ("shed 503 queue_full", shed),
    ):
        p50, p99, top = quantiles_us(samples)
        print(f"  {name:44} {p50:8.0f} {p99:8.0f} {top:9.0f}")
    p50, p99, top = quantiles_us(answered)
    print(
        f"  burst of {3 * capacity} concurrent: {outcomes.count('admitted')} admitted, "
        f"{outcomes.count('503')} x 503; answer p50/p99/max {p50 / 1000:.1f}/{p99 / 1000:.1f}/"
        f"{top / 1000:.1f} ms after the burst started; left in Redis (outstanding, queued) {left}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="triage bench admission", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--decisions", type=int, default=3000)
    args = parser.parse_args(argv)
    if args.decisions < 100:
        parser.error("--decisions must be >= 100")
    asyncio.run(run(args.decisions))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
