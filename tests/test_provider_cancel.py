"""A cancelled call of the triage_triton provider stops the generation in a real Triton replica.

The provider closes its upstream connection when the awaiting task is cancelled (``Task.cancel``,
``wait_for``'s timeout, the proxy's client gone) or a stream is ``aclose()``d; Triton 2.51 turns
that into a cancel only for ``/generate_stream`` (see tests/test_standin_cancel.py), which is why
non-streaming calls are served from it too. Without that, a cancelled non-streaming call kept its
batch slot until max_tokens.

Where the cancel reaches the engine depends on the model: the LLM-API model is one python model,
which sees the cancel itself (these tests run on the stand-in in that dialect, with one batch
slot, so a generation that was not stopped holds up the next call); a stock ``ensemble`` does not
pass a cancel on to its running ``tensorrt_llm`` step in Triton 2.51 (measured below).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import litellm
import pytest

from devstack.triton_launcher import StandinSettings, TritonServer, start_standin_replica
from plugins.triton_provider import register, triton_generate
from sidecar.triton_metrics import parse_engine_sample

pytestmark = pytest.mark.integration

MODEL = "triage_triton/standin"
MESSAGES = [{"role": "user", "content": "Tell me a very long story."}]
HUGE = 100_000  # tokens: 1000 s at 10 ms a step
LLMAPI = {"triage_triton": {"dialect": "llmapi"}}
CANCELLED = re.compile(r"^triage_request_cancelled(?:_total)?(?:\{[^}]*\})? ([0-9.e+]+)$", re.M)


async def _start(workdir: Path, name: str, **knobs: Any) -> AsyncIterator[TritonServer]:
    server = start_standin_replica(name, StandinSettings(**knobs), workdir, ready_timeout_s=90)
    try:
        register()
        yield server
    finally:
        await triton_generate.aclose()
        server.stop()


@pytest.fixture(scope="module")
async def replica(workdir: Path) -> AsyncIterator[TritonServer]:
    """The LLM-API model, one batch slot: a second call waits in the engine queue."""
    async for server in _start(
        workdir,
        "prov-cancel",
        dialect="llmapi",
        max_active=1,
        engine_queue_size=4,
        decode_ms_per_token=10,
    ):
        yield server


@pytest.fixture(scope="module")
async def ensemble(workdir: Path) -> AsyncIterator[TritonServer]:
    async for server in _start(
        workdir, "prov-cancel-ens", dialect="ensemble", max_active=1, decode_ms_per_token=10
    ):
        yield server


def cancelled(server: TritonServer) -> float:
    """Requests the stand-in engine dropped because Triton cancelled them (stand-in counter)."""
    text = httpx.get(server.metrics_url, timeout=5).text
    return sum(float(v) for v in CANCELLED.findall(text))


async def wait_cancelled(server: TritonServer, target: float, timeout_s: float) -> float:
    start = time.monotonic()
    while (seen := await asyncio.to_thread(cancelled, server)) < target:
        assert time.monotonic() - start < timeout_s, f"cancelled stayed {seen}, wanted {target}"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def call(server: TritonServer, max_tokens: int = HUGE, **extra: Any) -> Any:
    return litellm.acompletion(
        model=MODEL,
        api_base=server.http_url,
        messages=MESSAGES,
        max_tokens=max_tokens,
        model_info=LLMAPI,
        **extra,
    )


async def assert_served_promptly(server: TritonServer) -> None:
    """The only batch slot is free: a short call is answered at once (not after HUGE tokens)."""
    start = time.monotonic()
    response = await asyncio.wait_for(call(server, max_tokens=5), 5.0)
    assert response.choices[0].message.content
    assert time.monotonic() - start < 1.0


async def running(task_call: Any, delay_s: float = 0.5) -> asyncio.Task[Any]:
    task = asyncio.create_task(task_call)
    await asyncio.sleep(delay_s)
    assert not task.done()
    return task


async def test_cancelled_non_streaming_call_stops_the_generation(replica: TritonServer) -> None:
    """Fails when non-streaming calls go to /generate: Triton ran them to max_tokens."""
    before = await asyncio.to_thread(cancelled, replica)
    task = await running(call(replica), 1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_cancelled(replica, before + 1, 1.0) < 1.0
    await assert_served_promptly(replica)


async def test_wait_for_timeout_stops_the_generation(replica: TritonServer) -> None:
    before = await asyncio.to_thread(cancelled, replica)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(call(replica), 1.0)
    assert await wait_cancelled(replica, before + 1, 1.0) < 1.0
    await assert_served_promptly(replica)


async def test_litellm_timeout_is_a_408_and_stops_the_generation(replica: TritonServer) -> None:
    """The read timeout still bounds the whole non-streaming answer, as it did on /generate."""
    before = await asyncio.to_thread(cancelled, replica)
    start = time.monotonic()
    with pytest.raises(litellm.Timeout) as info:
        await call(replica, timeout=1.0)
    assert 0.9 < time.monotonic() - start < 3.0
    assert info.value.status_code == 408
    assert "no complete answer within 1 s" in str(info.value)
    assert await wait_cancelled(replica, before + 1, 1.0) < 1.0
    await assert_served_promptly(replica)


async def test_cancelled_stream_stops_the_generation(replica: TritonServer) -> None:
    before = await asyncio.to_thread(cancelled, replica)
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
    assert await wait_cancelled(replica, before + 1, 1.0) < 1.0

    stream = await call(replica, stream=True)
    async for _ in stream:
        break
    await stream.aclose()
    assert await wait_cancelled(replica, before + 2, 1.0) < 1.0
    await assert_served_promptly(replica)


async def test_cancelled_calls_running_and_queued_both_leave(replica: TritonServer) -> None:
    """A queued call is dropped once admitted: Triton notices its disconnect at its first event."""
    before = await asyncio.to_thread(cancelled, replica)
    running_call = await running(call(replica))
    queued = await running(call(replica))
    for task in (queued, running_call):
        task.cancel()
    for task in (queued, running_call):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await wait_cancelled(replica, before + 2, 1.5) < 1.5
    await assert_served_promptly(replica)


async def test_a_cancel_does_not_reach_the_engine_behind_an_ensemble(
    ensemble: TritonServer,
) -> None:
    """Measured on tritonserver 2.51 with a stock-shaped ensemble: the provider closes the
    stream, but the ensemble scheduler does not pass the cancel on to its running engine step,
    so the generation keeps its batch slot until it ends (here 150 tokens at 10 ms)."""

    def active() -> int:
        text = httpx.get(ensemble.metrics_url, timeout=5).text
        return parse_engine_sample(text, "standin", None, []).active

    stream = await litellm.acompletion(
        model=MODEL, api_base=ensemble.http_url, messages=MESSAGES, max_tokens=150, stream=True
    )
    async for _ in stream:
        break
    await stream.aclose()
    await asyncio.sleep(0.5)
    assert await asyncio.to_thread(active) == 1  # still generating the cancelled request
    deadline = time.monotonic() + 10
    while await asyncio.to_thread(active) != 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
