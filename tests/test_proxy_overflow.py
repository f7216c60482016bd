"""Upstream overflow through the real proxy: each overflow answer of Triton / TensorRT-LLM on one
replica makes the request succeed on the other; with every replica full the client gets 503 +
Retry-After + the envelope (not 500, not 400, not ``llm_provider-retry-after`` alone).

Streams too: a stream that overflows before its first chunk is restarted on the other replica,
and with every replica full it is answered 503 + Retry-After + the envelope, as JSON.

Three model groups share one healthy replica; each has one replica that overflows its own way:
``engine-full``: the executor's queue ("Maximum queue size of N ...", 400 on /generate);
``triton-full``: Triton's queue ("Exceeds maximum queue size"; 400 through the ensemble on
/generate, the step's error prefixed "in ensemble 'standin', ");
``timeout``: Triton's queue timeout ("Request timeout expired", 400 on /generate).
No sidecars: every replica is "unknown" to the routers, so first attempts spread over both.

A fourth group, ``refused``, has one replica whose port refuses connections (a SIGKILLed
replica): each request first sent there is retried once, on the other, never on it again.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from devstack.proxy_launcher import LiteLLMProxy, start_proxy
from devstack.redis_launcher import RedisServer
from devstack.triton_launcher import StandinSettings, TritonServer, start_standin_replica
from plugins.auth.keystore import KeyStore
from plugins.proxy_config import (
    ProxyOptions,
    build_proxy_config,
    new_master_key,
    proxy_env,
    write_proxy_config,
)
from plugins.triton_provider.deployments import triton_deployment
from sidecar.triton_metrics import parse_engine_sample

from proxy_helpers import MESSAGES

pytestmark = pytest.mark.integration

PREFIX = "test-overflow:"
FAST = {"decode_ms_per_token": 10.0}
REPLICAS = {
    "engine": StandinSettings(max_active=1, engine_queue_size=0, **FAST),
    "triton": StandinSettings(
        max_active=1, engine_queue_size=0, engine_queue_full="block", triton_queue_size=1, **FAST
    ),
    "timeout": StandinSettings(
        max_active=1, engine_queue_size=0, engine_queue_full="block", queue_timeout_ms=100, **FAST
    ),
    "ok": StandinSettings(max_active=2, engine_queue_size=0, **FAST),
}
GROUPS = {"engine-full": "engine", "triton-full": "triton", "timeout": "timeout"}
REFUSED = "refused"


@pytest.fixture(scope="module")
def refusing_port() -> Iterator[int]:
    """A port bound but never listening: every connection to it is refused (and no other
    process can take it while the tests run)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TritonServer]]:
    workdir = tmp_path_factory.mktemp("overflow")
    started: dict[str, TritonServer] = {}
    try:
        for name, settings in REPLICAS.items():
            started[name] = start_standin_replica(name, settings, workdir, ready_timeout_s=90)
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def proxy(
    servers: dict[str, TritonServer],
    redis_server: RedisServer,
    refusing_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiteLLMProxy]:
    workdir = tmp_path_factory.mktemp("overflow-proxy")
    config = build_proxy_config("unused", "standin", [], ProxyOptions(num_retries=2))
    config["model_list"] = [
        triton_deployment(group, f"{group}-{role}", servers[name].http_url, "standin")
        for group, bad in GROUPS.items()
        for role, name in (("bad", bad), ("ok", "ok"))
    ] + [
        triton_deployment(
            REFUSED, f"{REFUSED}-bad", f"http://127.0.0.1:{refusing_port}", "standin"
        ),
        triton_deployment(REFUSED, f"{REFUSED}-ok", servers["ok"].http_url, "standin"),
    ]
    path = write_proxy_config(config, workdir / "proxy.yaml")
    proxy = start_proxy(
        "overflow", path, proxy_env(redis_server.url, PREFIX, new_master_key()), workdir
    )
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
async def api_key(redis_server: RedisServer) -> AsyncIterator[str]:
    store = KeyStore(Redis.from_url(redis_server.url), PREFIX, owns_client=True)
    try:
        key, _ = await store.create("overflow-tests")
        yield key
    finally:
        await store.aclose()


_tickets = itertools.count()


async def wait_idle(server: TritonServer, timeout_s: float = 20.0) -> None:
    """Until the replica runs and queues nothing (an earlier test's held requests go on
    generating after their clients left)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            text = (await client.get(server.metrics_url)).text
            sample = parse_engine_sample(text, "standin")
            if sample.active == 0 and sample.pending == 0:
                return
            assert asyncio.get_running_loop().time() < deadline, f"{server.name} stays busy"
            await asyncio.sleep(0.1)


async def fill(
    client: httpx.AsyncClient, server: TritonServer, count: int
) -> list[asyncio.Task[httpx.Response]]:
    """Long requests straight to one replica's Triton, one after another (so that Triton's
    batcher cannot take them into one blocked batch), enough to make it overflow."""
    await wait_idle(server)
    url = f"{server.http_url}/v2/models/standin/generate"
    tasks = []
    for _ in range(count):
        body = {"text_input": f"hold {next(_tickets)}", "max_tokens": 600}
        tasks.append(asyncio.ensure_future(client.post(url, json=body)))
        await asyncio.sleep(0.2)
    return tasks


async def overflows(server: TritonServer) -> str:
    """What a new request to the full replica gets, straight from Triton."""
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"{server.http_url}/v2/models/standin/generate",
            json={"text_input": "probe", "max_tokens": 2},
        )
    assert response.status_code != 200, "the replica was expected to be full"
    return f"{response.status_code} {response.text}"


MIN_ASKS, MAX_ASKS = 8, 40

EXPECTED = {
    "engine-full": "Maximum queue size",
    "triton-full": "Exceeds maximum queue size",
    "timeout": "Request timeout expired",
}


async def stream_restarts(proxy: LiteLLMProxy, model: str) -> float:
    admin = {"Authorization": f"Bearer {proxy.master_key}"}
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{proxy.base_url}/metrics/", headers=admin)).text
    for family in text_string_to_metric_families(text):
        if family.name == "triage_routing_stream_restarts":
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("model") == model:
                    return sample.value
    return 0.0


@pytest.mark.parametrize("group", list(GROUPS))
async def test_overflowing_replica_is_retried_on_the_other(
    group: str, servers: dict[str, TritonServer], proxy: LiteLLMProxy, api_key: str
) -> None:
    bad = servers[GROUPS[group]]
    async with httpx.AsyncClient(timeout=60) as holder:
        held = await fill(holder, bad, {"triton-full": 3, "timeout": 2}.get(group, 1))
        await asyncio.sleep(0.4)
        assert EXPECTED[group] in await overflows(bad)
        sdk = AsyncOpenAI(base_url=f"{proxy.base_url}/v1", api_key=api_key, max_retries=0)
        served = Counter()
        retried = 0
        # first attempts are random between the two (both unknown): ask until one was first
        # sent to the full replica (8 asks at least; 40 at most: 2**-40 to miss by chance)
        while sum(served.values()) < MIN_ASKS or (retried == 0 and sum(served.values()) < MAX_ASKS):
            raw = await sdk.chat.completions.with_raw_response.create(
                model=group, messages=MESSAGES, max_tokens=3
            )
            assert raw.parse().choices[0].message.content
            served[raw.headers["x-litellm-model-id"]] += 1
            retried += int(raw.headers.get("x-litellm-attempted-retries", "0") or 0)
        assert set(served) == {f"{group}-ok"}
        assert retried > 0, "no request was first sent to the full replica: nothing was proven"
        for task in held:
            task.cancel()


@pytest.mark.parametrize("group", list(GROUPS))
async def test_stream_overflowing_before_its_first_chunk_is_restarted_on_the_other(
    group: str, servers: dict[str, TritonServer], proxy: LiteLLMProxy, api_key: str
) -> None:
    bad = servers[GROUPS[group]]
    async with httpx.AsyncClient(timeout=60) as holder:
        held = await fill(holder, bad, {"triton-full": 3, "timeout": 2}.get(group, 1))
        await asyncio.sleep(0.4)
        assert EXPECTED[group] in await overflows(bad)
        before = await stream_restarts(proxy, group)
        sdk = AsyncOpenAI(base_url=f"{proxy.base_url}/v1", api_key=api_key, max_retries=0)
        served = Counter()
        restarted = 0.0
        # as above: ask until one stream was first sent to the full replica
        while sum(served.values()) < MIN_ASKS or (
            not restarted and sum(served.values()) < MAX_ASKS
        ):
            raw = await sdk.chat.completions.with_raw_response.create(
                model=group, messages=MESSAGES, max_tokens=3, stream=True
            )
            text = "".join(
                [
                    chunk.choices[0].delta.content or ""
                    async for chunk in raw.parse()
                    if chunk.choices
                ]
            )
            assert text
            served[raw.headers["x-litellm-model-id"]] += 1
            restarted = await stream_restarts(proxy, group) - before
        for task in held:
            task.cancel()
    assert set(served) == {f"{group}-ok"}
    assert restarted > 0, "no stream was first sent to the full replica: nothing was proven"


async def ask_with_both_full(
    servers: dict[str, TritonServer], proxy: LiteLLMProxy, api_key: str, **extra: Any
) -> httpx.Response:
    """``engine-full``'s two replicas both full, one request through the proxy."""
    async with httpx.AsyncClient(timeout=60) as holder:
        held = await fill(holder, servers["engine"], 1) + await fill(holder, servers["ok"], 2)
        await asyncio.sleep(0.4)
        await overflows(servers["engine"])
        await overflows(servers["ok"])
        async with httpx.AsyncClient(timeout=60) as client:
            response = await client.post(
                f"{proxy.base_url}/v1/chat/completions",
                json={"model": "engine-full", "messages": MESSAGES, "max_tokens": 3, **extra},
                headers={"Authorization": f"Bearer {api_key}"},
            )
        for task in held:
            task.cancel()
    return response


async def test_all_replicas_full_is_503_with_retry_after(
    servers: dict[str, TritonServer], proxy: LiteLLMProxy, api_key: str
) -> None:
    response = await ask_with_both_full(servers, proxy, api_key)
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    assert int(response.headers["retry-after-ms"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "upstream_overloaded"
    assert set(error) >= {"message", "type", "param", "code"}


async def test_stream_with_all_replicas_full_is_503_with_retry_after(
    servers: dict[str, TritonServer], proxy: LiteLLMProxy, api_key: str
) -> None:
    response = await ask_with_both_full(servers, proxy, api_key, stream=True)
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert int(response.headers["Retry-After"]) >= 1
    assert int(response.headers["retry-after-ms"]) >= 1
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["reason"] == "upstream_overloaded"
    assert error["type"] == "service_unavailable"


async def test_unknown_model_is_404_and_bad_request_is_400(
    proxy: LiteLLMProxy, api_key: str
) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(timeout=30) as client:
        unknown = await client.post(
            f"{proxy.base_url}/v1/chat/completions",
            json={"model": "no-such-model", "messages": MESSAGES},
            headers=headers,
        )
        bad = await client.post(
            f"{proxy.base_url}/v1/chat/completions",
            json={"model": "engine-full", "messages": MESSAGES, "max_tokens": -5},
            headers=headers,
        )
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert bad.status_code == 400, bad.text
    assert set(bad.json()["error"]) >= {"message", "type", "param", "code"}


async def test_a_retry_never_goes_back_to_a_replica_that_refuses_connections(
    servers: dict[str, TritonServer], proxy: LiteLLMProxy, api_key: str
) -> None:
    """LiteLLM logs each failed attempt in a task of its own; that event used to make the
    routing plugin forget where the request had failed, so retries went back to the dead
    replica (5 of 7 with a SIGKILLed one). Now a request first sent there is retried once."""
    await wait_idle(servers["ok"])
    sdk = AsyncOpenAI(base_url=f"{proxy.base_url}/v1", api_key=api_key, max_retries=0)
    served = Counter()
    retries: list[int] = []
    # first attempts are random between the two (both unknown) until LiteLLM cools the dead
    # one down: ask until one was first sent there
    while len(retries) < MIN_ASKS or (not any(retries) and len(retries) < MAX_ASKS):
        raw = await sdk.chat.completions.with_raw_response.create(
            model=REFUSED, messages=MESSAGES, max_tokens=3
        )
        assert raw.parse().choices[0].message.content
        served[raw.headers["x-litellm-model-id"]] += 1
        retries.append(int(raw.headers.get("x-litellm-attempted-retries", "0") or 0))
    assert set(served) == {f"{REFUSED}-ok"}
    assert any(retries), "no request was first sent to the dead replica: nothing was proven"
    assert max(retries) == 1, retries  # never back to the replica that refused it
