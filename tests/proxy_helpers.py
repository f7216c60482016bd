"""Shared helpers of the proxy integration tests: start a stack, call it with the OpenAI SDK."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import httpx
from openai import AsyncOpenAI
from redis.asyncio import Redis

from core.keyschema import KeySchema, ReplicaState
from devstack.stack import Stack

MESSAGES = [{"role": "user", "content": "Tell me about the fleet."}]


def sdk(stack: Stack, proxy_index: int = 0) -> AsyncOpenAI:
    assert stack.api_key is not None
    return AsyncOpenAI(
        base_url=f"{stack.proxies[proxy_index].base_url}/v1",
        api_key=stack.api_key,
        max_retries=0,
        timeout=60.0,
    )


async def chat_replica(client: AsyncOpenAI, model: str, max_tokens: int = 4) -> str:
    """One chat completion through the proxy; the replica LiteLLM chose (its model id)."""
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=max_tokens
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    return raw.headers["x-litellm-model-id"]


async def replica_state(stack: Stack, replica_id: str) -> ReplicaState | None:
    assert stack.redis is not None
    client = Redis.from_url(stack.redis.url)
    try:
        raw = await client.hgetall(KeySchema(stack.settings.key_prefix).replica(replica_id))
    finally:
        await client.aclose()
    return ReplicaState.from_redis(raw) if raw else None


async def wait_for_state(
    stack: Stack, replica_id: str, check: object, timeout_s: float = 10.0
) -> ReplicaState:
    """Poll the replica's published state until ``check(state)`` holds."""
    deadline = time.monotonic() + timeout_s
    last: ReplicaState | None = None
    while time.monotonic() < deadline:
        last = await replica_state(stack, replica_id)
        if last is not None and check(last):  # type: ignore[operator]
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"{replica_id}: state never satisfied the check; last {last}")


async def engines_idle(stack: Stack, timeout_s: float = 30.0) -> None:
    """Wait until every replica publishes no active and no waiting request. Behind a stock
    ensemble a client's disconnect does not cancel the engine's work (it runs to max_tokens),
    so the gateway's counts reach zero long before the engines do."""
    for replica_id in stack.replicas:
        await wait_for_state(
            stack, replica_id, lambda s: s.active == 0 and s.waiting == 0, timeout_s
        )


@dataclass
class Occupation:
    """Long requests sent straight to one replica's Triton (the proxies do not see them)."""

    tasks: list[asyncio.Task[httpx.Response]]
    client: httpx.AsyncClient

    async def finish(self) -> None:
        try:
            for response in await asyncio.gather(*self.tasks):
                assert response.status_code == 200, response.text
        finally:
            await self.client.aclose()


def occupy(stack: Stack, replica_id: str, count: int, max_tokens: int) -> Occupation:
    server = stack.replicas[replica_id]
    client = httpx.AsyncClient(timeout=120.0)
    url = f"{server.http_url}/v2/models/{stack.settings.model}/generate"
    tasks = [
        asyncio.ensure_future(
            client.post(url, json={"text_input": "keep busy", "max_tokens": max_tokens})
        )
        for _ in range(count)
    ]
    return Occupation(tasks, client)


def shares(picks: Iterable[str]) -> dict[str, float]:
    counts = Counter(picks)
    total = sum(counts.values())
    return {replica: n / total for replica, n in sorted(counts.items())}
