"""Admission end to end: real proxies (two, sharing Redis), real Triton replicas and sidecars;
raw HTTP and OpenAI SDK clients."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from core.keyschema import KeySchema
from devstack.stack import Stack
from devstack.stack_settings import StackSettings
from plugins.auth.keystore import KeyStore

from proxy_helpers import MESSAGES, engines_idle, wait_for_state

pytestmark = pytest.mark.integration

MODEL = "standin"
CAPACITY = 2 * (2 + 1)  # two replicas x (max_active 2 + queue allowance 1)
MAX_WAIT_S = 15.0
ADMISSION_ENV = {
    "TRIAGE_ADMISSION_QUEUE_ALLOWANCE": "1",
    "TRIAGE_ADMISSION_MAX_QUEUE": "6",
    "TRIAGE_ADMISSION_MAX_WAIT_MS": str(int(MAX_WAIT_S * 1000)),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = StackSettings(
        catalogue=[],  # a stack of one model: no cold catalogue sidecars
        replicas=2,
        proxies=2,
        poll_interval_ms=100,
        decode_ms_per_token=10.0,
        max_active=2,
        engine_queue_size=4,
        workdir=tmp_path_factory.mktemp("admission-stack"),
    )
    with pytest.MonkeyPatch.context() as env:
        for name, value in ADMISSION_ENV.items():
            env.setenv(name, value)  # read by the proxy processes at start
        running = Stack(settings).start()
    try:
        yield running
    finally:
        running.stop()


async def outstanding(stack: Stack) -> tuple[int, int, int]:
    """(admitted, queued, routing reservations) fleet-wide, after expired entries."""
    assert stack.redis is not None
    keys = KeySchema(stack.settings.key_prefix)
    client = Redis.from_url(stack.redis.url)
    try:
        admitted = await client.zcard(keys.admitted(MODEL))
        queued = await client.zcard(keys.queue(MODEL))
        inflight = sum([await client.zcard(keys.inflight(r)) for r in stack.replicas])
    finally:
        await client.aclose()
    return admitted, queued, inflight


async def settle(stack: Stack, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (counts := await outstanding(stack)) != (0, 0, 0):
        assert time.monotonic() < deadline, f"counts did not return to zero: {counts}"
        await asyncio.sleep(0.05)


def body(max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, **extra}


async def test_burst_of_three_times_capacity(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    results: list[tuple[int, float, httpx.Response]] = []

    async def one(client: httpx.AsyncClient, url: str) -> None:
        started = time.perf_counter()
        response = await client.post(f"{url}/v1/chat/completions", json=body(40), headers=headers)
        results.append((response.status_code, time.perf_counter() - started, response))

    async with httpx.AsyncClient(timeout=60) as client:
        urls = [p.base_url for p in stack.proxies]
        for url in urls:  # warm: a proxy's first request pays for lazy imports
            warm = await client.post(f"{url}/v1/chat/completions", json=body(2), headers=headers)
            assert warm.status_code == 200
        await asyncio.gather(*(one(client, urls[i % 2]) for i in range(3 * CAPACITY + 6)))
    codes = [code for code, _, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= CAPACITY
    shed = [(latency, r) for code, latency, r in results if code == 503]
    assert shed, "a burst of 3x capacity + queue must shed"
    for _, response in shed:
        assert int(response.headers["Retry-After"]) >= 1
        assert int(response.headers["retry-after-ms"]) >= 1
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"}
        assert error["code"] in {"queue_full", "queue_timeout", "expected_wait"}
    at_arrival = {"queue_full", "expected_wait"}
    full = sorted(latency for latency, r in shed if r.json()["error"]["code"] in at_arrival)
    decision_ms = []
    async with httpx.AsyncClient(timeout=10) as client:
        for proxy in stack.proxies:
            admin = {"Authorization": f"Bearer {stack.master_key}"}
            text = (await client.get(f"{proxy.base_url}/metrics/", headers=admin)).text
            total = count = 0.0
            for family in text_string_to_metric_families(text):
                if family.name == "triage_admission_decision_seconds":
                    for sample in family.samples:
                        if sample.name.endswith("_sum"):
                            total += sample.value
                        elif sample.name.endswith("_count"):
                            count += sample.value
            assert count > 0, "the admission metrics are on the proxy's /metrics"
            decision_ms.append(total / count * 1000)
    print(
        f"\nmean admission decision (Redis round trip included): "
        f"{', '.join(f'{ms:.2f} ms' for ms in decision_ms)} per proxy"
    )
    print(
        f"burst {len(results)} requests: {codes.count(200)} x 200, {len(shed)} x 503; "
        f"queue_full / expected_wait answered in p50 {statistics.median(full) * 1000:.0f} ms, "
        f"max {max(full) * 1000:.0f} ms"
    )
    # at once, not after a timeout: far below max_wait (15 s). How fast is the benchmarks'
    # business (`triage bench`: shed decisions at the proxy), not a timed test's: here the time
    # is the proxies' CPU under the burst, on 2 cores shared with everything (0.4-1.3 s seen)
    assert full and max(full) < MAX_WAIT_S / 3
    await settle(stack)


async def test_sdk_with_retries_completes_everything_through_a_burst(stack: Stack) -> None:
    clients = [
        AsyncOpenAI(base_url=f"{p.base_url}/v1", api_key=stack.api_key, max_retries=10)
        for p in stack.proxies
    ]
    completions = await asyncio.gather(
        *(
            clients[i % 2].chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=20)
            for i in range(3 * CAPACITY)
        )
    )
    assert all(c.choices[0].message.content for c in completions)
    await settle(stack)


async def test_two_proxies_never_admit_more_than_capacity(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, (await outstanding(stack))[0])
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    async with httpx.AsyncClient(timeout=60) as client:
        urls = [p.base_url for p in stack.proxies]
        responses = await asyncio.gather(
            *(
                client.post(f"{urls[i % 2]}/v1/chat/completions", json=body(30), headers=headers)
                for i in range(4 * CAPACITY)
            )
        )
    done.set()
    await watcher
    assert CAPACITY - 1 <= peak <= CAPACITY
    # no replica ever overflowed: the gate kept the engines within their queues
    for response in responses:
        if response.status_code == 503:
            assert response.json()["error"]["code"] in {
                "queue_full",
                "queue_timeout",
                "expected_wait",
            }
        else:
            assert response.status_code == 200
    await settle(stack)


async def test_higher_priority_keys_are_admitted_first(stack: Stack) -> None:
    assert stack.redis is not None
    store = KeyStore(Redis.from_url(stack.redis.url), stack.settings.key_prefix, owns_client=True)
    try:
        high_key, _ = await store.create(f"high-{time.time_ns()}", priority=0)
        low_key, _ = await store.create(f"low-{time.time_ns()}", priority=3)
        # another tenant in the high tier: its own flow in the fair share
        other_key, _ = await store.create(
            f"other-{time.time_ns()}", priority=0, metadata={"tenant": "acme"}
        )
    finally:
        await store.aclose()
    url = stack.proxies[0].base_url
    admitted_at: dict[str, float] = {}
    tag = str(time.time_ns())
    keys = KeySchema(stack.settings.key_prefix)

    async def watch_admissions(done: asyncio.Event) -> None:
        """Admission order as the gate records it: tickets (= call ids) entering admitted."""
        assert stack.redis is not None
        client = Redis.from_url(stack.redis.url)
        try:
            while not done.is_set():
                for ticket in await client.zrange(keys.admitted(MODEL), 0, -1):
                    admitted_at.setdefault(ticket.decode(), time.monotonic())
                await asyncio.sleep(0.005)
        finally:
            await client.aclose()

    async def stream(client: httpx.AsyncClient, key: str, name: str, tokens: int) -> None:
        headers = {"Authorization": f"Bearer {key}", "x-litellm-call-id": f"{tag}-{name}"}
        async with client.stream(
            "POST", f"{url}/v1/chat/completions", json=body(tokens, stream=True), headers=headers
        ) as response:
            assert response.status_code == 200, (name, await response.aread())
            async for _ in response.aiter_lines():
                pass

    done = asyncio.Event()
    watcher = asyncio.create_task(watch_admissions(done))
    async with httpx.AsyncClient(timeout=60) as client:
        # fill the fleet; the holders end one after another (staggered lengths)
        holders = [
            asyncio.create_task(stream(client, high_key, f"hold-{i}", 300 + 40 * i))
            for i in range(CAPACITY)
        ]
        await wait_for_state(stack, "replica-0", lambda s: s.active >= 2)
        await wait_for_state(stack, "replica-1", lambda s: s.active >= 2)
        await asyncio.sleep(0.3)
        waiters = []
        for i in range(2):  # the low-priority ones arrive first (2: the queue holds 6)
            waiters.append(asyncio.create_task(stream(client, low_key, f"low-{i}", 5)))
            await asyncio.sleep(0.05)
        for i in range(3):
            waiters.append(asyncio.create_task(stream(client, high_key, f"high-{i}", 5)))
            await asyncio.sleep(0.05)
        waiters.append(asyncio.create_task(stream(client, other_key, "other", 5)))
        # all six must be waiting before the first slot frees (a slow proxy can lag arrivals)
        assert stack.redis is not None
        queue_client = Redis.from_url(stack.redis.url)
        try:
            while await queue_client.zcard(keys.queue(MODEL)) < 6:
                assert not any(h.done() for h in holders), "a slot freed before all queued"
                await asyncio.sleep(0.01)
            await asyncio.gather(*holders, *waiters)
        finally:
            await queue_client.aclose()
            for task in (*holders, *waiters):  # a failure must not leave the fleet occupied
                task.cancel()
    done.set()
    await watcher
    # tickets are the clients' call ids with the front door's random suffix
    admitted_at = {k.removeprefix(f"{tag}-").rsplit(".", 1)[0]: v for k, v in admitted_at.items()}
    high = [admitted_at[f"high-{i}"] for i in range(3)]
    low = [admitted_at[f"low-{i}"] for i in range(2)]
    assert max(high) <= min(low), (high, low)  # two can show up in one 5 ms sample
    # fair share within the tier: the other tenant's one request, though it came last, is
    # served before the high key's second and third (its start tag is the tier's virtual time)
    assert admitted_at["other"] <= high[1] <= high[2], (admitted_at["other"], high)
    await settle(stack)


async def test_a_bad_deadline_header_is_a_400_naming_it(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.api_key}", "x-triage-ttft-deadline-ms": "soon"}
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"{stack.proxies[0].base_url}/v1/chat/completions", json=body(2), headers=headers
        )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "x-triage-ttft-deadline-ms" and "soon" in error["message"]


async def test_client_disconnects_give_everything_back(stack: Stack) -> None:
    """Streams whose clients go away mid-stream, and clients that give up while queued: the
    proxies' streaming iterator hooks and failure paths return every slot and reservation."""
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    urls = [f"{p.base_url}/v1/chat/completions" for p in stack.proxies]

    async def leave_mid_stream(i: int) -> None:
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream(
                "POST", urls[i % 2], json=body(200, stream=True), headers=headers
            ) as response,
        ):
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    break  # one token, then hang up while the replica still generates

    async def give_up_waiting(i: int) -> None:
        async with httpx.AsyncClient(timeout=0.5) as client:
            with pytest.raises(httpx.TimeoutException):
                await client.post(urls[i % 2], json=body(200), headers=headers)

    await asyncio.gather(*(leave_mid_stream(i) for i in range(CAPACITY)))
    await asyncio.gather(*(give_up_waiting(i) for i in range(4)))
    await settle(stack, timeout_s=20)
    # the gateway's counts are back; the engines still generate what the clients left (a
    # stock ensemble does not pass a cancel on): the next test must not meet that work
    await engines_idle(stack)


async def test_replica_crash_mid_burst_loses_nothing(stack: Stack) -> None:
    """Last in the module: kills replica-1's Triton while requests are in flight."""
    await engines_idle(stack)  # the burst meets idle engines, whatever ran before
    clients = [
        AsyncOpenAI(base_url=f"{p.base_url}/v1", api_key=stack.api_key, max_retries=0, timeout=60)
        for p in stack.proxies
    ]

    failures: list[str] = []

    async def one(i: int) -> int:
        try:
            await clients[i % 2].chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=60
            )
        except Exception as exc:  # every failure must be an explicit HTTP error with a body
            status = getattr(exc, "status_code", None)
            assert status in {500, 503}, repr(exc)
            assert getattr(exc, "body", None), repr(exc)
            failures.append(f"{status} {getattr(exc, 'body', None)}"[:300])
            return int(status)
        return 200

    burst = [asyncio.create_task(one(i)) for i in range(2 * CAPACITY)]
    await asyncio.sleep(0.3)
    stack.replicas["replica-1"].kill()
    codes = await asyncio.wait_for(asyncio.gather(*burst), timeout=60)  # none hangs
    assert codes.count(200) >= CAPACITY // 2, (codes, failures)
    await wait_for_state(stack, "replica-1", lambda s: not s.healthy, timeout_s=10)
    after = [await one(i) for i in range(4)]
    assert after == [200] * 4  # the survivor serves everything once the crash is known
    await settle(stack)
