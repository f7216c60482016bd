"""The fault suite: the embedded stack (3 stand-in replicas, 2 proxies, real Redis and sidecars,
replicas and sidecars supervised as ``triage up`` does) under a steady load of streamed and
non-streamed requests while one fault is injected at a time. For each fault: no request is
lost (each ends with a success or an error answer with the OpenAI envelope; only the killed
proxy's own connections may be cut), and every admission ticket, queue place and routing
reservation is gone within seconds after the load stops. The figures are printed, appended
to ``$TRIAGE_FIGURES`` when set, and kept in ``tests/README.md``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from core.keyschema import KeySchema
from devstack.stack import Stack
from devstack.stack_settings import StackSettings
from devstack.supervisor import Supervisor

from proxy_helpers import MESSAGES, wait_for_state

pytestmark = pytest.mark.integration

MODEL = "standin"
HEAL_S = 10.0
"""Every count back to zero within this long after the load stops (the issue's "seconds, not
the 15 min lease")."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = StackSettings(
        replicas=3,
        proxies=2,
        poll_interval_ms=100,
        decode_ms_per_token=5.0,
        max_active=2,
        engine_queue_size=4,
        workdir=tmp_path_factory.mktemp("faults-stack"),
    )
    running = Stack(settings).start()
    # replicas and sidecars come back by themselves, as under `triage up`; Redis and the
    # proxies are the tests' to kill and restart
    parts = {n: p for n, p in running.supervised_parts().items() if "[replica-" in n}
    stop = threading.Event()
    loop = threading.Thread(target=Supervisor(parts).run, args=(stop, 0.1), daemon=True)
    loop.start()
    try:
        yield running
    finally:
        stop.set()
        loop.join(5)
        running.stop()


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
    redis = Redis.from_url(stack.redis.url)
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
        except OSError:
            pass  # Redis restarting
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
    before_s: float = 2.0,
    after_s: float = 3.0,
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
    lost = [o for o in load.outcomes if o.kind == "lost"]
    assert not lost, lost[:5]
    return kinds, healed, load


def pid_of(stack: Stack, replica_id: str) -> int:
    return stack.replicas[replica_id].process.pid


async def test_replica_sigkill(stack: Stack) -> None:
    async def kill(load: Load) -> None:
        os.kill(pid_of(stack, "replica-0"), signal.SIGKILL)
        # the supervisor restarts it on the same port; its sidecar reports it healthy again
        await asyncio.sleep(1.0)
        await wait_for_state(stack, "replica-0", lambda s: s.healthy, 30.0)

    kinds, healed, _ = await under_load(stack, "replica SIGKILL", kill)
    # every request the dead replica had not started answering is retried or restarted
    # elsewhere; a stream it was answering ends with the envelope (at most the streams running
    # there: 2 of the 6 clients stream at a time)
    assert kinds["cut"] == kinds["error"] == 0 and kinds["broken"] <= 2, kinds
    assert healed < HEAL_S


async def test_replica_sigstop_for_20_s(stack: Stack) -> None:
    async def freeze(load: Load) -> None:
        os.kill(pid_of(stack, "replica-1"), signal.SIGSTOP)
        try:
            await asyncio.sleep(20.0)
        finally:
            os.kill(pid_of(stack, "replica-1"), signal.SIGCONT)

    kinds, healed, _ = await under_load(stack, "replica SIGSTOP 20 s", freeze)
    assert kinds["cut"] == kinds["error"] == kinds["broken"] == 0, kinds
    assert healed < HEAL_S


async def test_sidecar_stalled(stack: Stack) -> None:
    async def stall(load: Load) -> None:
        sidecar = stack.sidecars["replica-2"].process.pid
        os.kill(sidecar, signal.SIGSTOP)
        try:
            await asyncio.sleep(5.0)  # its replica's state goes stale: "unknown", not gone
        finally:
            os.kill(sidecar, signal.SIGCONT)

    kinds, healed, _ = await under_load(stack, "sidecar stalled 5 s", stall)
    assert kinds["cut"] == kinds["error"] == kinds["broken"] == 0, kinds
    assert healed < HEAL_S


async def test_redis_killed_and_restarted_on_the_same_data(stack: Stack) -> None:
    assert stack.redis is not None
    redis = stack.redis

    async def outage(load: Load) -> None:
        redis.kill()
        await asyncio.sleep(5.0)  # the proxies serve on per-process counts meanwhile
        await asyncio.to_thread(redis.start)  # same port, same append-only file

    kinds, healed, _ = await under_load(stack, "Redis SIGKILL 5 s, restarted", outage)
    assert kinds["cut"] == kinds["error"] == kinds["broken"] == 0, kinds
    assert healed < HEAL_S


async def test_a_proxy_killed_mid_request(stack: Stack) -> None:
    async def kill(load: Load) -> None:
        stack.proxies[1].kill()
        load.skip_proxies.add(1)  # its clients go to the other proxy (a load balancer would)

    try:
        kinds, healed, load = await under_load(stack, "proxy SIGKILL mid-request", kill)
    finally:
        proxy = stack.proxies[1]
        await asyncio.to_thread(proxy.process.restart, proxy.ready, 120.0, "LiteLLM proxy ready")
    cut_elsewhere = [o for o in load.outcomes if o.kind == "cut" and o.proxy != 1]
    assert not cut_elsewhere, cut_elsewhere[:3]
    assert kinds["error"] == kinds["broken"] == 0, kinds
    assert healed < HEAL_S


async def test_client_disconnects_under_load(stack: Stack) -> None:
    async def disconnects(load: Load) -> None:
        async with httpx.AsyncClient(timeout=0.5) as impatient:
            headers = {"Authorization": f"Bearer {stack.api_key}"}

            async def leave(proxy: int, stream: bool) -> None:
                body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2000, "stream": stream}
                url = f"{stack.proxies[proxy].base_url}/v1/chat/completions"
                if stream:  # the first event (or 0.5 s without one), then the client is gone
                    with contextlib.suppress(httpx.TimeoutException):
                        async with impatient.stream("POST", url, json=body, headers=headers) as r:
                            async for _ in r.aiter_lines():
                                break
                    return
                with pytest.raises(httpx.TimeoutException):  # gives up after 0.5 s
                    await impatient.post(url, json=body, headers=headers)

            await asyncio.gather(*(leave(i % 2, i % 2 == 0) for i in range(10)))

    kinds, healed, _ = await under_load(stack, "10 client disconnects under load", disconnects)
    assert kinds["cut"] == kinds["error"] == kinds["broken"] == 0, kinds
    assert healed < HEAL_S
