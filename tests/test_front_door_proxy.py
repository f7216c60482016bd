"""The front door in front of the real proxy (real Triton stand-in replicas, sidecars, Redis,
the LiteLLM proxy started by ``plugins.proxy_main``): every bad input a user has sent gets its
answer, a client that goes away frees everything and stops the replica, abandoned huge requests
cannot take the fleet down, a flood is answered, and the layer runs in every worker.

The replicas have the shape of NVIDIA's LLM-API model (``dialect="llmapi"``), where Triton's
cancel reaches the model. Behind a stock ensemble it does not: Triton checks for cancellation
only between an ensemble's steps, so a running ``tensorrt_llm`` step generates on to
``max_tokens`` (Triton's "Request Cancellation" guide; measured on tritonserver 2.51 in
``tests/test_provider_cancel.py``); there, only the model's ``max_output_tokens`` bounds what an
abandoned request costs (``plugins/front_door/README.md``)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from core.keyschema import KeySchema
from devstack.proxy_launcher import start_proxy
from devstack.stack import PROXY_USER, Stack
from devstack.stack_settings import StackSettings
from plugins.proxy_config import proxy_env

from proxy_helpers import MESSAGES

pytestmark = pytest.mark.integration

MODEL = "standin"
MAX_OUTPUT_TOKENS = 4096  # plugins/proxy_config.py's default model_info.max_output_tokens
FRONT_DOOR_ENV = {"TRIAGE_FRONT_DOOR_MAX_BODY_MB": "1"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = StackSettings(
        catalogue=[],  # a stack of one model: no cold catalogue sidecars
        replicas=2,
        poll_interval_ms=100,
        decode_ms_per_token=10.0,
        max_active=2,
        engine_queue_size=4,
        dialect="llmapi",
        workdir=tmp_path_factory.mktemp("front-door-stack"),
    )
    with pytest.MonkeyPatch.context() as env:
        for name, value in FRONT_DOOR_ENV.items():
            env.setenv(name, value)  # read by the proxy processes at start
        running = Stack(settings).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=60.0) as http:
        yield http


def url(stack: Stack, path: str = "/v1/chat/completions") -> str:
    return f"{stack.proxies[0].base_url}{path}"


def auth(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.api_key}", "content-type": "application/json"}


def chat(max_tokens: int = 4, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, **extra}


async def counts(stack: Stack) -> tuple[int, int, int]:
    """(admitted, queued, routing reservations) fleet-wide."""
    assert stack.redis is not None
    keys = KeySchema(stack.settings.key_prefix)
    redis = Redis.from_url(stack.redis.url)
    try:
        now_ms = int(time.time() * 1000)
        admitted = await redis.zcount(keys.admitted(MODEL), now_ms, "+inf")
        queued = await redis.zcard(keys.queue(MODEL))
        inflight = sum(
            [await redis.zcount(keys.inflight(r), now_ms, "+inf") for r in stack.replicas]
        )
    finally:
        await redis.aclose()
    return admitted, queued, inflight


async def until_settled(stack: Stack, timeout_s: float) -> float:
    """Seconds until nothing is admitted, queued or reserved (fails after ``timeout_s``)."""
    started = time.monotonic()
    while (now := await counts(stack)) != (0, 0, 0):
        assert time.monotonic() - started < timeout_s, f"counts stayed {now}"
        await asyncio.sleep(0.05)
    return time.monotonic() - started


CANCELLED = "triage_request_cancelled"


async def cancelled(stack: Stack) -> float:
    """Requests the replicas' engines dropped because Triton cancelled them (the stand-in's
    test-only counter: the LLM-API model exports no gauges, and its sidecar no ``active``)."""
    total = 0.0
    async with httpx.AsyncClient(timeout=5.0) as http:
        for server in stack.replicas.values():
            text = (await http.get(server.metrics_url)).text
            for family in text_string_to_metric_families(text):
                if family.name == CANCELLED:
                    total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


async def until_cancelled(stack: Stack, count: float, timeout_s: float) -> None:
    started = time.monotonic()
    while (now := await cancelled(stack)) < count:
        assert time.monotonic() - started < timeout_s, f"{now} of {count} dropped"
        await asyncio.sleep(0.05)


def assert_envelope(response: httpx.Response, status: int, code: str, param: str | None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert (error["code"], error["param"]) == (code, param), error
    assert "Traceback" not in error["message"] and "/" not in error["message"].split(":")[0]


BAD_INPUTS = [
    ("json array", b"[1, 2]", None, "invalid_type"),
    ("empty body", b"", "model", "missing_required_parameter"),
    ("no model", json.dumps({"messages": MESSAGES}).encode(), "model", "missing_required_parameter"),
    ("model null", json.dumps({"model": None, "messages": MESSAGES}).encode(), "model", "missing_required_parameter"),
    ("invalid utf-8", b'{"model": "standin", "messages": [{"role": "user", "content": "\xff"}]}', None, "invalid_encoding"),
    ("no role", json.dumps(chat(messages=[{"content": "hi"}])).encode(), "messages[0].role", "missing_required_parameter"),
    ("role wizard", json.dumps(chat(messages=[{"role": "wizard", "content": "hi"}])).encode(), "messages[0].role", "invalid_value"),
    ("messages string", json.dumps(chat(messages="hi")).encode(), "messages", "invalid_type"),
    ("max_tokens 1e9", json.dumps(chat(max_tokens=1_000_000_000)).encode(), "max_tokens", "max_tokens_too_large"),
    ("api_base in the body", json.dumps(chat(api_base="http://evil.example")).encode(), None, "param_not_allowed"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "body", "param", "code"), BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS]
)
async def test_bad_input_gets_400_naming_the_field(
    stack: Stack, client: httpx.AsyncClient, name: str, body: bytes, param: str | None, code: str
) -> None:
    response = await client.post(url(stack), content=body, headers=auth(stack))
    assert_envelope(response, 400, code, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL, "messages": "hi", "max_tokens": 5}, "messages"),
        ({"model": MODEL, "messages": [5], "max_tokens": 5}, "messages[0]"),
        ({"model": MODEL, "messages": MESSAGES}, "max_tokens"),
    ],
)
async def test_anthropic_messages_get_the_same_400s(
    stack: Stack, client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    response = await client.post(url(stack, "/v1/messages"), json=body, headers=auth(stack))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


async def test_max_tokens_up_to_the_models_limit_is_served(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    too_many = await client.post(url(stack), json=chat(MAX_OUTPUT_TOKENS + 1), headers=auth(stack))
    assert_envelope(too_many, 400, "max_tokens_too_large", "max_tokens")
    assert f"at most {MAX_OUTPUT_TOKENS} " in too_many.json()["error"]["message"]
    ok = await client.post(url(stack), json=chat(3), headers=auth(stack))
    assert ok.status_code == 200, ok.text
    assert "x-litellm-model-api-base" not in ok.headers  # a replica's address stays inside


async def test_keys_and_models_keep_their_answers(stack: Stack, client: httpx.AsyncClient) -> None:
    no_key = await client.post(
        url(stack), json=chat(), headers={"content-type": "application/json"}
    )
    assert_envelope(no_key, 401, "401", "api_key")
    for _ in range(2):  # the second answer comes from the front door's cache of the first
        bad_key = await client.post(
            url(stack), json=chat(), headers={"Authorization": "Bearer sk-x"}
        )
        assert_envelope(bad_key, 401, "401", "api_key")
    unknown = await client.post(url(stack), json=chat(model="no-such"), headers=auth(stack))
    assert_envelope(unknown, 404, "model_not_found", "model")


def proxy_rss_mb(stack: Stack) -> float:
    status = Path(f"/proc/{stack.proxies[0].process.pid}/status").read_text()
    return (
        next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        / 1024
    )


async def test_a_huge_body_gets_413_and_memory_stays_flat(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    before = proxy_rss_mb(stack)
    # a client that declares 200 MB: answered before it sends them (a raw socket, since HTTP
    # clients refuse to send less than they declare)
    port = stack.proxies[0].port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {stack.api_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {200 * 1024 * 1024}\r\n\r\n"
    )
    writer.write(head.encode() + b"{" + b" " * 1024)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), 10.0)
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 413 " in status_line, answer
    body = json.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "request_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # 20 MB with no Content-Length
        for _ in range(80):
            yield b"x" * (256 * 1024)

    for path in ("/v1/chat/completions", "/v1/embeddings"):
        try:
            streamed = await client.post(url(stack, path), content=chunks(), headers=auth(stack))
        except httpx.TransportError:
            continue  # the proxy answered and closed while the client was still sending
        assert_envelope(streamed, 413, "request_too_large", None)
    assert proxy_rss_mb(stack) - before < 30


async def test_a_client_that_goes_away_stops_the_replica_and_frees_everything(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    """Non-stream and stream: 30 s of generation each, abandoned after 1 s."""
    await until_settled(stack, 10)
    before = await cancelled(stack)

    async def abandon(body: dict[str, Any]) -> None:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(url(stack), json=body, headers=auth(stack), timeout=1.0)

    async def abandon_stream(body: dict[str, Any]) -> None:
        async with client.stream("POST", url(stack), json=body, headers=auth(stack)) as response:
            assert response.status_code == 200
            async for _ in response.aiter_lines():
                break  # the first event, then the client is gone

    await asyncio.gather(
        abandon(chat(3000)), abandon(chat(3000)), abandon_stream(chat(3000, stream=True))
    )
    started = time.monotonic()
    freed_s = await until_settled(stack, 5)
    await until_cancelled(stack, before + 3, 5)
    stopped_s = time.monotonic() - started
    figures = {
        "disconnect_counts_freed_s": round(freed_s, 2),
        "disconnect_engines_dropped_s": round(stopped_s, 2),
    }
    print(json.dumps(figures))
    if path := os.environ.get("TRIAGE_FIGURES"):
        with open(path, "a") as out:
            out.write(json.dumps(figures) + "\n")
    assert freed_s < 1.5 and stopped_s < 2.0, (freed_s, stopped_s)  # within ~1 s


async def test_abandoned_huge_requests_cannot_take_the_fleet_down(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    """More requests at the model's limit than the fleet has slots, whose clients give up
    after 1 s: the next ordinary requests are served at once."""
    await until_settled(stack, 10)

    async def give_up() -> None:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                url(stack), json=chat(MAX_OUTPUT_TOKENS), headers=auth(stack), timeout=1.0
            )

    await asyncio.gather(*(give_up() for _ in range(8)))
    started = time.monotonic()
    served = await asyncio.gather(
        *(client.post(url(stack), json=chat(5), headers=auth(stack)) for _ in range(3))
    )
    assert [r.status_code for r in served] == [200, 200, 200]
    assert time.monotonic() - started < 5.0  # not after the abandoned ones' 40 s
    await until_settled(stack, 5)


async def test_a_flood_is_answered_and_the_counts_return_to_zero(
    stack: Stack, client: httpx.AsyncClient
) -> None:
    """240 requests at once (the fleet holds 2 x (2 + 4) plus a queue of 64): each ends with a
    200 or a 503 with Retry-After and the envelope; nothing is lost or left counted."""
    await until_settled(stack, 10)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as flood:
        answers = await asyncio.gather(
            *(flood.post(url(stack), json=chat(20), headers=auth(stack)) for _ in range(240))
        )
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 12
    for response in answers:
        if response.status_code == 503:
            assert int(response.headers["retry-after-ms"]) > 0 and response.headers["retry-after"]
            assert response.json()["error"]["code"] in {
                "queue_full",
                "expected_wait",
                "queue_timeout",
            }
    await until_settled(stack, 10)


async def test_the_front_door_runs_in_every_worker(stack: Stack, tmp_path: Path) -> None:
    """A proxy with two worker processes: each answers a bad body itself (uvicorn imports the
    front door's app by name in every worker)."""
    env = proxy_env(stack.redis_url(PROXY_USER), stack.settings.key_prefix, stack.master_key)
    proxy = start_proxy("two-workers", stack.workdir / "proxy.yaml", env, tmp_path, num_workers=2)
    try:
        async with httpx.AsyncClient(timeout=30.0) as http:
            for _ in range(8):  # new connections: the kernel spreads them over the workers
                response = await http.post(
                    f"{proxy.base_url}/v1/chat/completions",
                    content=b"[]",
                    headers={**auth(stack), "connection": "close"},
                )
                assert_envelope(response, 400, "invalid_type", None)
    finally:
        proxy.stop()
