"""The model catalogue end to end: real Triton servers in explicit model-control mode with no
model loaded, their sidecars (the real ``Sidecar``, polling in this process), real Redis, the
real proxy with the catalogue plugin.

Servers: ``server-1`` and ``server-2`` (one device each, 24 GiB), and ``server-big`` (two
devices) whose Triton is down: its sidecar has published its topology, never its health.
A second proxy, with unloading on, has a catalogue of two 15 GiB models on ``server-1``: only
one fits at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from core.paths import free_port
from devstack.proxy_launcher import LiteLLMProxy, start_proxy
from devstack.redis_launcher import RedisServer
from devstack.triton_launcher import StandinSettings, TritonServer, write_standin_repository
from plugins.auth.keystore import KeyStore
from plugins.catalogue.settings import replica_id
from plugins.proxy_config import (
    ProxyOptions,
    build_proxy_config,
    new_master_key,
    proxy_env,
    write_proxy_config,
)
from sidecar.service import Sidecar, SidecarMetrics
from sidecar.settings import SidecarSettings

from proxy_helpers import MESSAGES

pytestmark = pytest.mark.integration

PREFIX = "test-catalogue:"
SERVERS = ("server-1", "server-2")
TRITON_MODELS = ("alpha", "beta", "broken", "gamma", "delta")
BROKEN_REASON = "weights are missing for this test"
MEMORY_MB = 24_000


def catalogue_doc(urls: dict[str, str]) -> dict[str, Any]:
    one_device = ["server-1", "server-2"]
    return {
        "servers": {name: {"api_base": url} for name, url in urls.items()},
        "models": {
            "alpha": {"triton_model": "alpha", "servers": one_device, "pinned_on": ["server-2"]},
            "beta": {"triton_model": "beta", "servers": one_device},
            "broken": {"triton_model": "broken", "servers": one_device},
            "wide": {"triton_model": "alpha", "servers": one_device, "min_devices": 2},
            "wide-anywhere": {"triton_model": "alpha", "min_devices": 2},
        },
    }


def small_catalogue_doc(urls: dict[str, str]) -> dict[str, Any]:
    big = {"servers": ["server-1"], "min_device_memory_mb": 15_000}
    return {
        "servers": {"server-1": {"api_base": urls["server-1"]}},
        "models": {name: {"triton_model": name, **big} for name in ("gamma", "delta")},
    }


def write_repository(dest: Path) -> Path:
    for name in TRITON_MODELS:
        # Each ensemble gets its own engine; "broken" is one python model (the LLM-API shape)
        # so that its model.py is the one Triton fails to load.
        shape: dict[str, Any] = (
            {"dialect": "llmapi"} if name == "broken" else {"engine_model": f"{name}_engine"}
        )
        write_standin_repository(
            StandinSettings(model_name=name, decode_ms_per_token=5.0, max_active=4, **shape),
            dest,
        )
    (dest / "broken" / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        f"        raise RuntimeError({BROKEN_REASON!r})\n"
    )
    return dest


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TritonServer]]:
    workdir = tmp_path_factory.mktemp("catalogue")
    started: dict[str, TritonServer] = {}
    try:
        for name in SERVERS:
            repository = write_repository(workdir / f"models-{name}")
            server = TritonServer(name=name, repository=repository, models=[], workdir=workdir)
            started[name] = server.start()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def urls(servers: dict[str, TritonServer]) -> dict[str, str]:
    return {
        **{name: server.http_url for name, server in servers.items()},
        "server-big": f"http://127.0.0.1:{free_port()}",  # nothing listens: the server is down
    }


@pytest.fixture(scope="module")
async def sidecars(
    servers: dict[str, TritonServer], urls: dict[str, str], redis_server: RedisServer
) -> AsyncIterator[None]:
    """One sidecar per (server, model), as ``triage up --catalogue`` runs them."""
    client = Redis.from_url(redis_server.url, socket_timeout=2, socket_connect_timeout=2)
    http = httpx.AsyncClient(timeout=0.5)
    tasks = []
    metrics = SidecarMetrics(CollectorRegistry())
    plan = [(s, m, 1) for s in SERVERS for m in TRITON_MODELS] + [("server-big", "alpha", 2)]
    for server, model, devices in plan:
        metrics_url = (
            servers[server].metrics_url if server in servers else f"{urls[server]}/metrics"
        )
        settings = SidecarSettings(
            replica_id=replica_id(server, model),
            server_id=server,
            model=model,
            triton_url=urls[server],
            metrics_url=metrics_url,
            redis_url=redis_server.url,
            key_prefix=PREFIX,
            poll_interval_ms=100,
            device_count=devices,
            device_memory_mb=MEMORY_MB,
        )
        sidecar = Sidecar(settings, client, http, metrics)
        tasks.append(asyncio.create_task(sidecar.run()))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=5)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(http.aclose(), 5)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.aclose(), 5)


def start_catalogue_proxy(
    name: str, doc: dict[str, Any], redis_url: str, workdir: Path, **env_extra: str
) -> LiteLLMProxy:
    catalogue = workdir / "catalogue.yaml"
    catalogue.write_text(yaml.safe_dump(doc))
    config = build_proxy_config("unused", "standin", [], ProxyOptions(catalogue_file=catalogue))
    path = write_proxy_config(config, workdir / "proxy.yaml")
    env = proxy_env(redis_url, PREFIX, new_master_key(), catalogue) | env_extra
    return start_proxy(name, path, env, workdir)


@pytest.fixture(scope="module")
def proxy(
    urls: dict[str, str],
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiteLLMProxy]:
    proxy = start_catalogue_proxy(
        "catalogue",
        catalogue_doc(urls),
        redis_server.url,
        tmp_path_factory.mktemp("catalogue-proxy"),
        TRIAGE_CATALOGUE_COOLDOWN_S="60",
    )
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def unloading_proxy(
    urls: dict[str, str],
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LiteLLMProxy]:
    proxy = start_catalogue_proxy(
        "catalogue-unloading",
        small_catalogue_doc(urls),
        redis_server.url,
        tmp_path_factory.mktemp("catalogue-unloading-proxy"),
        TRIAGE_CATALOGUE_UNLOAD_LRU="true",
    )
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
async def api_key(redis_server: RedisServer) -> AsyncIterator[str]:
    store = KeyStore(Redis.from_url(redis_server.url), PREFIX, owns_client=True)
    try:
        key, _ = await store.create("catalogue-tests")
        yield key
    finally:
        await store.aclose()


@pytest.fixture(scope="module")
async def ready(
    sidecars: None, proxy: LiteLLMProxy, api_key: str, redis_server: RedisServer
) -> dict[str, str]:
    """Every server's topology is in Redis (server-big's too, while it is down)."""
    client = Redis.from_url(redis_server.url)
    deadline = time.monotonic() + 10
    try:
        while True:
            found = [await client.exists(f"{PREFIX}server:{s}") for s in (*SERVERS, "server-big")]
            if all(found):
                break
            assert time.monotonic() < deadline, f"server topology not published: {found}"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    return {"Authorization": f"Bearer {api_key}"}


async def repository_index(server: TritonServer) -> dict[str, str]:
    async with httpx.AsyncClient(timeout=5) as client:  # never block the sidecars' loop
        index = (await client.post(f"{server.http_url}/v2/repository/index")).json()
    return {entry["name"]: entry.get("state", "") for entry in index}


async def listed(proxy: LiteLLMProxy, headers: dict[str, str]) -> dict[str, str]:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(f"{proxy.base_url}/v1/models", headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    return {entry["id"]: entry["state"] for entry in body["data"]}


async def chat(proxy: LiteLLMProxy, headers: dict[str, str], model: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.post(
            f"{proxy.base_url}/v1/chat/completions",
            json={"model": model, "messages": MESSAGES, "max_tokens": 3},
            headers=headers,
        )


async def loads(proxy: LiteLLMProxy, model: str, outcome: str, action: str = "load") -> float:
    admin = {"Authorization": f"Bearer {proxy.master_key}"}
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{proxy.base_url}/metrics/", headers=admin)).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == "triage_catalogue_loads":
            for sample in family.samples:
                labels = sample.labels
                if (
                    sample.name.endswith("_total")
                    and labels.get("model") == model
                    and labels.get("action") == action
                    and labels.get("outcome") == outcome
                ):
                    total += sample.value
    return total


async def test_models_lists_the_catalogue_with_state(
    proxy: LiteLLMProxy, ready: dict[str, str], servers: dict[str, TritonServer]
) -> None:
    states = await listed(proxy, ready)
    assert states == {
        "alpha": "available",
        "beta": "available",
        "broken": "available",
        "wide-anywhere": "available",  # server-big could host it (when it is back)
    }  # "wide" needs 2 devices and may run only on 1-device servers: never listed
    for server in servers.values():
        assert "READY" not in (await repository_index(server)).values()


async def test_first_request_loads_the_model_on_its_pinned_server(
    proxy: LiteLLMProxy, ready: dict[str, str], servers: dict[str, TritonServer]
) -> None:
    response = await chat(proxy, ready, "alpha")
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    assert response.headers["x-litellm-model-id"] == "server-2.alpha"
    assert (await repository_index(servers["server-2"])).get("alpha") == "READY"
    assert (await repository_index(servers["server-1"])).get("alpha") != "READY"
    assert (await listed(proxy, ready))["alpha"] == "loaded"


async def test_concurrent_first_requests_cause_one_load(
    proxy: LiteLLMProxy, ready: dict[str, str], servers: dict[str, TritonServer]
) -> None:
    burst = [asyncio.create_task(chat(proxy, ready, "beta")) for _ in range(10)]
    seen: set[str] = set()
    while not all(task.done() for task in burst):
        seen.add((await listed(proxy, ready))["beta"])
        await asyncio.sleep(0.05)
    responses = await asyncio.gather(*burst)
    assert [r.status_code for r in responses] == [200] * 10, [
        r.text for r in responses if r.status_code != 200
    ]
    assert "loading" in seen, seen
    ready_on = [
        name for name, s in servers.items() if (await repository_index(s)).get("beta") == "READY"
    ]
    assert len(ready_on) == 1, ready_on
    assert await loads(proxy, "beta", "ok") == 1
    assert {r.headers["x-litellm-model-id"] for r in responses} == {f"{ready_on[0]}.beta"}


async def test_a_model_no_server_can_host_is_404_and_an_unhealthy_one_is_503(
    proxy: LiteLLMProxy, ready: dict[str, str]
) -> None:
    never = await chat(proxy, ready, "wide")
    assert never.status_code == 404, never.text
    error = never.json()["error"]
    assert error["code"] == "model_unplaceable"
    assert "needs 2 devices, has 1" in error["message"]
    later = await chat(proxy, ready, "wide-anywhere")
    assert later.status_code == 503, later.text
    assert int(later.headers["Retry-After"]) >= 1
    assert int(later.headers["retry-after-ms"]) >= 1
    assert "server-big" in later.json()["error"]["message"]
    unknown = await chat(proxy, ready, "no-such-model")
    assert unknown.status_code == 404, unknown.text


async def test_a_failing_load_is_503_with_the_reason_and_does_not_loop(
    proxy: LiteLLMProxy, ready: dict[str, str]
) -> None:
    first = await chat(proxy, ready, "broken")
    assert first.status_code == 503, first.text
    error = first.json()["error"]
    assert error["code"] == "load_failed"
    assert BROKEN_REASON in error["message"]
    assert int(first.headers["Retry-After"]) >= 1
    tried = await loads(proxy, "broken", "failed")
    assert tried == 2  # each server once, then the cooldown answers
    started = time.monotonic()
    again = await chat(proxy, ready, "broken")
    assert again.status_code == 503 and again.json()["error"]["code"] == "load_failed"
    assert time.monotonic() - started < 2.0
    assert await loads(proxy, "broken", "failed") == tried


async def test_unloading_makes_room_with_the_least_recently_used_idle_model(
    unloading_proxy: LiteLLMProxy, ready: dict[str, str], servers: dict[str, TritonServer]
) -> None:
    first = await chat(unloading_proxy, ready, "gamma")
    assert first.status_code == 200, first.text
    assert (await repository_index(servers["server-1"])).get("gamma") == "READY"
    second = await chat(unloading_proxy, ready, "delta")  # 15 + 15 GiB > 24 GiB: gamma goes
    assert second.status_code == 200, second.text
    index = await repository_index(servers["server-1"])
    assert index.get("delta") == "READY"
    assert index.get("gamma") != "READY"
    assert await loads(unloading_proxy, "gamma", "ok", action="unload") == 1
    assert (await listed(unloading_proxy, ready)) == {"gamma": "available", "delta": "loaded"}
