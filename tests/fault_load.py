"""Steady load through the embedded stack's proxies while a fault is injected, and the counts
that must come back to zero after it: shared by the fault suite (``test_faults.py``) and the
Sentinel failover test (``test_redis_sentinel.py``)."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from redis.exceptions import RedisError

from core.keyschema import KeySchema
from core.redis_client import redis_client
from devstack.stack import Stack

from proxy_helpers import MESSAGES

MODEL = "standin"
HEAL_S = 10.0
"""Every count back to zero within this long after the load stops (the issue's "seconds, not
the 15 min lease")."""


@dataclass
class Outcome:
    kind: str
    """ok | error (an answer with the envelope) | broken (a stream that had sent content, then
    the envelope: its replica died under it) | cut (connection lost) | lost"""
    seconds: float
    proxy: int
    detail: str = ""


@dataclass
class Load:
    """``workers`` clients in a loop, alternating proxies; every third request a stream."""

    stack: Stack
    workers: int = 6
    max_tokens: int = 30
    outcomes: list[Outcome] = field(default_factory=list)
    skip_proxies: set[int] = field(default_factory=set)

    async def one(self, client: httpx.AsyncClient, proxy: int, stream: bool) -> Outcome:
        url = f"{self.stack.proxies[proxy].base_url}/v1/chat/completions"
        headers = {"Authorization": f"Bearer {self.stack.api_key}"}
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": self.max_tokens}
        started = time.monotonic()

        def done(kind: str, detail: str = "") -> Outcome:
            return Outcome(kind, time.monotonic() - started, proxy, detail)

        try:
            if not stream:
                response = await client.post(url, json=body, headers=headers)
                return done(*classify(response.status_code, response.content))
            async with client.stream(
                "POST", url, json={**body, "stream": True}, headers=headers
            ) as response:
                if response.status_code != 200:
                    return done(*classify(response.status_code, await response.aread()))
                finished = content = False
                async for line in response.aiter_lines():
                    if line.startswith("data: [DONE]"):
                        finished = True
                    elif line.startswith("data: ") and '"error"' in line[:40]:
                        # after content the stream cannot move to another replica unseen
                        return done("broken" if content else "error", line[:200])
                    elif line.startswith("data: ") and not content:
                        choices = json.loads(line[6:]).get("choices") or [{}]
                        content = bool((choices[0].get("delta") or {}).get("content"))
                return done("ok") if finished else done("lost", "stream ended without [DONE]")
        except httpx.TransportError as exc:
            return done("cut", type(exc).__name__)

    async def run(self, stop: asyncio.Event) -> None:
        async def worker(index: int) -> None:
            async with httpx.AsyncClient(timeout=120.0) as client:
                n = 0
                while not stop.is_set():
                    proxy = (index + n) % len(self.stack.proxies)
                    n += 1
                    if proxy in self.skip_proxies:
                        proxy = (proxy + 1) % len(self.stack.proxies)
                    self.outcomes.append(await self.one(client, proxy, n % 3 == 0))

        await asyncio.gather(*(worker(i) for i in range(self.workers)))


def classify(status: int, body: bytes) -> tuple[str, str]:
    if status == 200:
        return "ok", ""
    try:
        error = json.loads(body)["error"]
        assert {"message", "type", "code"} <= set(error)
    except (ValueError, KeyError, TypeError, AssertionError):
        return "lost", f"{status} without the envelope: {body[:200]!r}"
    return "error", f"{status} {error.get('code')}"


async def counts(stack: Stack) -> tuple[int, int, int]:
    """(admitted, queued, routing reservations) fleet-wide, live entries only."""
    assert stack.redis is not None
    keys = KeySchema(stack.settings.key_prefix)
    redis = redis_client(stack.redis_url(), socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        now_ms = int(time.time() * 1000)
        admitted = await redis.zcount(keys.admitted(MODEL), now_ms, "+inf")
        queued = await redis.zcard(keys.queue(MODEL))
        inflight = 0
        for replica_id in stack.replicas:
            inflight += await redis.zcount(keys.inflight(replica_id), now_ms, "+inf")
    finally:
        await redis.aclose()
    return admitted, queued, inflight


async def heal_seconds(stack: Stack, timeout_s: float = 2 * HEAL_S) -> float:
    started = time.monotonic()
    while True:
        try:
            if await counts(stack) == (0, 0, 0):
                return time.monotonic() - started
        except (OSError, RedisError):
            pass  # Redis restarting, or failing over
        if time.monotonic() - started > timeout_s:
            return float("inf")
        await asyncio.sleep(0.1)


def record(figures: dict[str, Any]) -> None:
    print(json.dumps(figures))
    if path := os.environ.get("TRIAGE_FIGURES"):
        with open(path, "a") as out:
            out.write(json.dumps({"fault_suite": figures}) + "\n")


async def under_load(
    stack: Stack,
    fault: str,
    inject: Callable[[Load], Awaitable[None]],
    before_s: float = 1.0,
    after_s: float = 2.0,
) -> tuple[Counter[str], float, Load]:
    """Load, ``before_s``, the fault (``inject`` returns when it is over), ``after_s`` more
    load, stop; then how long until every count is back to zero."""
    assert await heal_seconds(stack) < HEAL_S, "the previous fault left counts behind"
    load = Load(stack)
    stop = asyncio.Event()
    running = asyncio.create_task(load.run(stop))
    await asyncio.sleep(before_s)
    await inject(load)
    await asyncio.sleep(after_s)
    stop.set()
    await running
    healed = await heal_seconds(stack)
    kinds = Counter(o.kind for o in load.outcomes)
    latencies = [o.seconds for o in load.outcomes if o.kind == "ok"]
    record(
        {
            "fault": fault,
            "requests": len(load.outcomes),
            **{kind: kinds.get(kind, 0) for kind in ("ok", "error", "broken", "cut", "lost")},
            "errors": dict(
                Counter(o.detail for o in load.outcomes if o.kind in ("error", "broken"))
            ),
            "ok_p99_s": round(statistics.quantiles(latencies, n=100)[98], 2),
            "heal_s": round(healed, 2),
        }
    )
    for index, proxy in enumerate(stack.proxies):
        # a proxy that died by itself cuts every later connection to it: say why it died
        assert proxy.process.alive() or index in load.skip_proxies, (
            f"proxy {proxy.name} died ({proxy.process.exit_status()}):\n"
            + proxy.process.log_tail(80)
        )
    lost = [o for o in load.outcomes if o.kind == "lost"]
    assert not lost, lost[:5]
    return kinds, healed, load
