"""A cancelled call of the triage_triton provider stops the generation in a real Triton replica.

The provider closes its upstream connection when the awaiting task is cancelled (``Task.cancel``,
``wait_for``'s timeout, the proxy's client gone) or a stream is ``aclose()``d; Triton 2.51 turns
that into a cancel only for ``/generate_stream`` (see tests/test_standin_cancel.py), which is why
non-streaming calls are served from it too. Without that, a cancelled non-streaming call kept its
batch slot until max_tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import litellm
import pytest

from gateway.triton_launcher import StandinSettings, TritonServer, start_standin_replica
from gateway.triton_metrics import parse_engine_sample
from plugins.triton_provider import register, triton_generate

pytestmark = pytest.mark.integration

MODEL = "triage_triton/standin"
MESSAGES = [{"role": "user", "content": "Tell me a very long story."}]
HUGE = 100_000  # tokens: 1000 s at 10 ms a step


@pytest.fixture(scope="module")
async def replica(workdir: Path) -> AsyncIterator[TritonServer]:
    """One batch slot, so that a second call waits in the engine queue."""
    settings = StandinSettings(max_active=1, engine_queue_size=4, decode_ms_per_token=10)
    server = start_standin_replica("prov-cancel", settings, workdir, ready_timeout_s=90)
    try:
        register()
        yield server
    finally:
        await triton_generate.aclose()
        server.stop()


def load(server: TritonServer) -> tuple[int, int]:
    """(active, waiting) of the replica's engine."""
    text = httpx.get(server.metrics_url, timeout=5).text
    sample = parse_engine_sample(text, "standin", "standin", [])
    return sample.active, sample.waiting


async def wait_load(server: TritonServer, active: int, waiting: int, timeout_s: float) -> float:
    """Seconds until the engine has ``active`` running and ``waiting`` queued sequences."""
    start = time.monotonic()
    while (seen := await asyncio.to_thread(load, server)) != (active, waiting):
        assert time.monotonic() - start < timeout_s, f"load stayed {seen}"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def call(server: TritonServer, max_tokens: int = HUGE, **extra: Any) -> Any:
    return litellm.acompletion(
        model=MODEL, api_base=server.http_url, messages=MESSAGES, max_tokens=max_tokens, **extra
    )


async def assert_served_promptly(server: TritonServer) -> None:
    start = time.monotonic()
    response = await call(server, max_tokens=5)
    assert response.usage.completion_tokens == 5
    assert time.monotonic() - start < 1.0


async def test_cancelled_non_streaming_call_stops_the_generation(replica: TritonServer) -> None:
    """Fails when non-streaming calls go to /generate: Triton ran them to max_tokens."""
    task = asyncio.create_task(call(replica))
    await wait_load(replica, 1, 0, 10)
    await asyncio.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_load(replica, 0, 0, 1.0) < 1.0
    await assert_served_promptly(replica)


async def test_wait_for_timeout_stops_the_generation(replica: TritonServer) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(call(replica), 1.0)
    assert await wait_load(replica, 0, 0, 1.0) < 1.0
    await assert_served_promptly(replica)


async def test_litellm_timeout_is_a_408_and_stops_the_generation(replica: TritonServer) -> None:
    """The read timeout still bounds the whole non-streaming answer, as it did on /generate."""
    start = time.monotonic()
    with pytest.raises(litellm.Timeout) as info:
        await call(replica, timeout=1.0)
    assert 0.9 < time.monotonic() - start < 3.0
    assert info.value.status_code == 408
    assert "no complete answer within 1 s" in str(info.value)
    assert await wait_load(replica, 0, 0, 1.0) < 1.0


async def test_cancelled_stream_stops_the_generation(replica: TritonServer) -> None:
    received = asyncio.Event()

    async def consume() -> None:
        stream = await call(replica, stream=True)
        async for _ in stream:
            received.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(received.wait(), 10)
    await asyncio.sleep(1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_load(replica, 0, 0, 1.0) < 1.0

    stream = await call(replica, stream=True)
    async for _ in stream:
        break
    await stream.aclose()
    assert await wait_load(replica, 0, 0, 1.0) < 1.0
    await assert_served_promptly(replica)


async def test_cancelled_calls_running_and_queued_both_leave(replica: TritonServer) -> None:
    """A queued call is dropped once admitted: Triton notices its disconnect at its first event."""
    running = asyncio.create_task(call(replica))
    await wait_load(replica, 1, 0, 10)
    queued = asyncio.create_task(call(replica))
    await wait_load(replica, 1, 1, 10)
    for task in (queued, running):
        task.cancel()
    for task in (queued, running):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await wait_load(replica, 0, 0, 1.0) < 1.0
    await assert_served_promptly(replica)
