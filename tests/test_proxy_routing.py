"""End to end: OpenAI SDK → real LiteLLM proxies (with the plugins) → real Triton replicas,
load published by real sidecars into a real Redis. An equal fleet of two replicas, two proxies."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from core.keyschema import KeySchema
from devstack.stack import Stack
from devstack.stack_settings import StackSettings

from proxy_helpers import (
    MESSAGES,
    chat_replica,
    occupy,
    sdk,
    shares,
    wait_for_state,
)

pytestmark = pytest.mark.integration

MODEL = "standin"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = StackSettings(
        catalogue=[],  # a stack of one model: no cold catalogue sidecars
        replicas=2,
        proxies=2,
        poll_interval_ms=100,
        decode_ms_per_token=10.0,
        max_active=4,
        engine_queue_size=24,  # the burst below fits without admission control
        workdir=tmp_path_factory.mktemp("proxy-stack"),
    )
    running = Stack(settings).start()
    try:
        yield running
    finally:
        running.stop()


async def test_chat_completion_text_and_usage(stack: Stack) -> None:
    client = sdk(stack)
    completion = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0.7, top_p=0.9, seed=3
    )
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.completion_tokens == 6


async def test_streaming_text_and_usage(stack: Stack) -> None:
    client = sdk(stack, 1)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    usage = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces).strip()
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens == 5


async def test_no_key_and_wrong_key_are_401(stack: Stack) -> None:
    import openai

    client = sdk(stack)
    for key in ("", "sk-triage-not-a-key"):
        with pytest.raises(openai.AuthenticationError) as info:
            await client.with_options(api_key=key or "missing").chat.completions.create(
                model=MODEL, messages=MESSAGES, max_tokens=2
            )
        assert info.value.status_code == 401


async def test_ties_are_spread_on_an_idle_fleet(stack: Stack) -> None:
    """Sequential requests find both replicas idle: a tie, broken at random each time. 24 picks
    with at least 4 on each replica fail by chance with p = 3e-4 (12 picks and 3 each: 4 %)."""
    client = sdk(stack)
    picks = [await chat_replica(client, MODEL) for _ in range(24)]
    counts = Counter(picks)
    assert set(counts) == {"replica-0", "replica-1"}, counts
    assert min(counts.values()) >= 4, counts


async def test_busy_replica_is_avoided_and_choice_follows_the_load(stack: Stack) -> None:
    client = sdk(stack)
    # replica-0: its 4 batch slots taken, 2 more queued, by long requests sent straight to Triton
    busy = occupy(stack, "replica-0", 6, max_tokens=250)
    await wait_for_state(stack, "replica-0", lambda s: s.active + s.waiting >= 6)
    picks = [await chat_replica(client, MODEL) for _ in range(5)]
    assert picks == ["replica-1"] * 5
    await busy.finish()
    # flip: now replica-1 is the busy one
    busy = occupy(stack, "replica-1", 6, max_tokens=250)
    await wait_for_state(stack, "replica-1", lambda s: s.active + s.waiting >= 6)
    await wait_for_state(stack, "replica-0", lambda s: s.active == 0)
    picks = [await chat_replica(client, MODEL) for _ in range(5)]
    assert picks == ["replica-0"] * 5
    await busy.finish()


async def test_two_proxies_burst_does_not_herd(stack: Stack) -> None:
    clients = [sdk(stack, 0), sdk(stack, 1)]
    await wait_for_state(stack, "replica-0", lambda s: s.active == 0)
    await wait_for_state(stack, "replica-1", lambda s: s.active == 0)
    picks = await asyncio.gather(
        *(chat_replica(clients[i % 2], MODEL, max_tokens=20) for i in range(40))
    )
    split = shares(picks)
    assert set(split) == {"replica-0", "replica-1"}
    assert all(0.4 <= share <= 0.6 for share in split.values()), split


async def picks_by_source(stack: Stack) -> dict[str, float]:
    """The first proxy's routing picks so far: made in Redis by the admission gate's call, by
    pick.lua, and by its per-process fallback."""
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(
            f"{stack.proxies[0].base_url}/metrics/",
            headers={"Authorization": f"Bearer {stack.master_key}"},
        )
    totals = {"gate": 0.0, "redis": 0.0, "local": 0.0}
    for family in text_string_to_metric_families(response.text):
        if family.name == "triage_routing_picks":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    totals[sample.labels["source"]] += sample.value
    return totals


async def test_redis_outage_keeps_serving_and_routing_recovers(stack: Stack) -> None:
    """Last in the module: it kills and restarts the stack's Redis."""
    assert stack.redis is not None
    client = sdk(stack)
    await chat_replica(client, MODEL)  # every proxy has looked the key up at least once
    await chat_replica(sdk(stack, 1), MODEL)
    stack.redis.kill()
    started = time.monotonic()
    outage_picks = []
    while time.monotonic() - started < 3.0:
        for index in (0, 1):
            outage_picks.append(await chat_replica(sdk(stack, index), MODEL))
    assert len(outage_picks) >= 6
    assert set(outage_picks) == {"replica-0", "replica-1"}  # per-process counts still spread
    stack.redis.start()  # same port, same data directory: the key store is back
    await wait_for_state(stack, "replica-0", lambda s: s.healthy)
    await wait_for_state(stack, "replica-1", lambda s: s.healthy)
    busy = occupy(stack, "replica-1", 6, max_tokens=250)
    await wait_for_state(stack, "replica-1", lambda s: s.active + s.waiting >= 6)
    # the plugin retries Redis at most 1 s after its last failure: once a pick is made from
    # Redis again, the picks are load-aware again (they avoid the busy replica)
    counts = await picks_by_source(stack)
    deadline = time.monotonic() + 8.0
    while (now := await picks_by_source(stack))["gate"] == counts["gate"]:
        assert time.monotonic() < deadline, "routing did not go back to Redis"
        await chat_replica(client, MODEL)
    picks = [await chat_replica(client, MODEL) for _ in range(4)]
    assert picks == ["replica-0"] * 4
    after = await picks_by_source(stack)
    # each request's replica was picked by the admission gate, in the call that admitted it
    assert {k: after[k] - now[k] for k in after} == {"gate": 4, "redis": 0, "local": 0}
    await busy.finish()


def test_stack_state_file_is_private(stack: Stack) -> None:
    state = Path(stack.workdir) / "stack.json"
    assert state.stat().st_mode & 0o077 == 0


SYSTEM = " ".join(f"zanzibar{i} rule: answer briefly and cite the fleet." for i in range(40))
"""A long system prompt (~2,000 characters: 7 blocks of the prefix index) with a word that
appears nowhere else, to look for in Redis."""


CACHED: list[int | None] = []
"""``usage.prompt_tokens_details.cached_tokens`` of each ``chat_with_system`` answer."""


async def chat_with_system(client: object, system: str, question: str, max_tokens: int) -> str:
    raw = await client.chat.completions.with_raw_response.create(  # type: ignore[attr-defined]
        model=MODEL,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=max_tokens,
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    details = completion.usage.prompt_tokens_details
    CACHED.append(details.cached_tokens if details is not None else None)
    return raw.headers["x-litellm-model-id"]


async def every_stored_byte(stack: Stack) -> bytes:
    """Every key name and value in the stack's Redis, concatenated."""
    assert stack.redis is not None
    redis = Redis.from_url(stack.redis.url)
    out: list[bytes] = []
    try:
        async for key in redis.scan_iter(count=500):
            out.append(key)
            kind = (await redis.type(key)).decode()
            if kind == "string":
                out.append(await redis.get(key) or b"")
            elif kind == "hash":
                for field, value in (await redis.hgetall(key)).items():
                    out += [field, value]
            elif kind == "zset":
                out += [m for m, _ in await redis.zrange(key, 0, -1, withscores=True)]
            elif kind == "set":
                out += list(await redis.smembers(key))
            elif kind == "list":
                out += await redis.lrange(key, 0, -1)
    finally:
        await redis.aclose()
    return b"\n".join(out)


async def test_a_shared_prompt_prefix_follows_its_replica_until_it_is_busy(stack: Stack) -> None:
    """Requests with the same long system prompt go to the replica that served it first, from
    either proxy (the index is shared in Redis); when that replica is busy enough the load wins;
    the index holds hashes only: the prompt's text is nowhere in Redis."""
    clients = [sdk(stack, 0), sdk(stack, 1)]
    for replica_id in ("replica-0", "replica-1"):
        await wait_for_state(stack, replica_id, lambda s: s.active == 0)
    CACHED.clear()
    first = await chat_with_system(clients[0], SYSTEM, "question 0", 4)
    picks = [await chat_with_system(clients[i % 2], SYSTEM, f"q {i}", 4) for i in range(1, 7)]
    assert picks == [first] * 6
    # the engine reused the system prompt's blocks from the second request on, and said so
    assert CACHED[0] == 0 and all(cached >= 64 for cached in CACHED[1:]), CACHED
    other = "replica-1" if first == "replica-0" else "replica-0"
    assert stack.redis is not None
    redis = Redis.from_url(stack.redis.url)
    try:
        keys = KeySchema(stack.settings.key_prefix)
        assert await redis.zcard(keys.prefix_index(first)) >= 7
    finally:
        await redis.aclose()

    # busy enough: its 4 slots and 8 more queued (one slot's wait alone costs about what the
    # cached prompt saves, a tie the fewest in-flight decides)
    busy = occupy(stack, first, 12, max_tokens=120)
    await wait_for_state(stack, first, lambda s: s.active + s.waiting >= 12)
    assert await chat_with_system(clients[0], SYSTEM, "while it is busy", 30) == other
    await busy.finish()

    stored = await every_stored_byte(stack)
    assert b"zanzibar" not in stored and b"cite the fleet" not in stored


async def test_a_stream_reports_its_cached_prompt_tokens_in_the_final_usage(stack: Stack) -> None:
    """``stream_options.include_usage``: the last chunk's usage carries
    ``prompt_tokens_details.cached_tokens`` (the second time the system prompt is sent)."""
    client = sdk(stack)
    system = SYSTEM.replace("zanzibar", "kilimanjaro")
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "a"}]
    seen: list[int | None] = []
    for _ in range(2):
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        assert usage is not None and usage.prompt_tokens > 0
        details = usage.prompt_tokens_details
        seen.append(details.cached_tokens if details is not None else None)
    assert seen[0] == 0 and (seen[1] or 0) >= 64, seen


async def test_a_session_sticks_to_its_replica_when_its_prompts_share_no_block(
    stack: Stack,
) -> None:
    """Short prompts (under one prefix block) of one session, named by the OpenAI ``user`` or
    by LiteLLM's ``x-litellm-session-id`` header, go where the session went first, from either
    proxy; the session id is stored only as a salted hash."""
    clients = [sdk(stack, 0), sdk(stack, 1)]
    for replica_id in ("replica-0", "replica-1"):
        await wait_for_state(stack, replica_id, lambda s: s.active == 0)

    async def ask(i: int, **session: Any) -> str:
        # equal load (the sidecars' view of the last answer caught up): the session decides
        for replica_id in ("replica-0", "replica-1"):
            await wait_for_state(stack, replica_id, lambda s: s.active + s.waiting == 0)
        raw = await clients[i % 2].chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=2, **session
        )
        return raw.headers["x-litellm-model-id"]

    for session in (
        {"user": "user-zanzibar"},
        {"extra_headers": {"x-litellm-session-id": "session-zanzibar-1"}},
    ):
        picks = [await ask(i, **session) for i in range(6)]
        assert picks == [picks[0]] * 6, (session, picks)
    assert b"zanzibar" not in await every_stored_byte(stack)
