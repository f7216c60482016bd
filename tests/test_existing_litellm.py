"""The README's "Using triage in an existing LiteLLM deployment", as a user follows it: a stock
``litellm --config`` (LiteLLM's own CLI, not ``plugins.proxy_main``), started outside the
repository, with a config that is a plain LiteLLM one plus the README's snippet (its
``api_base`` values pointed at two real stand-in Tritons with their sidecars) and the two
environment variables. A request is admitted and routed through Redis (its admission ticket and
its replica reservation are there while it runs, gone after), and goes to the replica the
sidecars' load says (the busy one is avoided)."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from redis.asyncio import Redis

from core.keyschema import DEFAULT_PREFIX, KeySchema
from core.paths import REPO_ROOT, free_port
from core.process import ManagedProcess
from devstack.redis_launcher import RedisServer
from devstack.sidecar_launcher import SidecarProcess, start_sidecar
from devstack.triton_launcher import StandinSettings, TritonServer, start_standin_replica
from plugins.proxy_config import new_master_key

pytestmark = pytest.mark.integration

MARK = "<!-- existing-litellm-snippet"


def readme_snippet() -> dict[str, Any]:
    """The YAML block after the README's marker."""
    text = (REPO_ROOT / "README.md").read_text()
    after = text[text.index(MARK) :]
    block = re.search(r"```yaml\n(.*?)```", after, re.S)
    assert block is not None, "the README's snippet is gone"
    return yaml.safe_load(block.group(1))


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TritonServer]]:
    workdir = tmp_path_factory.mktemp("existing-litellm")
    standin = StandinSettings(model_name="ensemble", engine_model="ensemble_engine")
    started: dict[str, TritonServer] = {}
    try:
        for rid in ("replica-0", "replica-1"):
            started[rid] = start_standin_replica(rid, standin, workdir)
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def sidecars(
    replicas: dict[str, TritonServer], redis_server: RedisServer, tmp_path_factory: Any
) -> Iterator[dict[str, SidecarProcess]]:
    workdir = tmp_path_factory.mktemp("existing-litellm-sidecars")
    started = {
        rid: start_sidecar(rid, server, "ensemble", redis_server.url, workdir, 100)
        for rid, server in replicas.items()
    }
    try:
        yield started
    finally:
        for sidecar in started.values():
            sidecar.stop()


@pytest.fixture(scope="module")
def proxy(
    replicas: dict[str, TritonServer],
    sidecars: dict[str, SidecarProcess],
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str]]:
    workdir = tmp_path_factory.mktemp("existing-litellm-proxy")
    snippet = readme_snippet()
    for deployment in snippet["model_list"]:  # the README's hosts -> this machine's Tritons
        deployment["litellm_params"]["api_base"] = replicas[deployment["model_info"]["id"]].http_url
    config = {"general_settings": {"master_key": "os.environ/LITELLM_MASTER_KEY"}, **snippet}
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    litellm = shutil.which("litellm", path=str(Path(sys.executable).parent))
    assert litellm, "LiteLLM's CLI is not installed beside this Python"
    port, master_key = free_port(), new_master_key()
    env = {
        "LITELLM_MASTER_KEY": master_key,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "TRIAGE_ROUTING_REDIS_URL": redis_server.url,
        "TRIAGE_ADMISSION_REDIS_URL": redis_server.url,
        "PATH": str(Path(litellm).parent) + ":/usr/bin:/bin",
        "HOME": str(workdir),
    }
    argv = [litellm, "--config", "config.yaml", "--host", "127.0.0.1", "--port", str(port)]
    process = ManagedProcess("stock-litellm", argv, workdir / "litellm.log", env=env, cwd=workdir)
    process.start()
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        return httpx.get(f"{base}/health/readiness", timeout=2.0).status_code == 200

    try:
        process.wait_until(ready, 120.0, "LiteLLM ready")
        yield base, master_key
    finally:
        process.stop()


async def test_a_stock_litellm_with_the_readme_snippet_admits_and_routes_through_redis(
    proxy: tuple[str, str], redis_server: RedisServer
) -> None:
    base, key = proxy
    keys = KeySchema(DEFAULT_PREFIX)
    model = readme_snippet()["model_list"][0]["model_name"]
    redis = Redis.from_url(redis_server.url)
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 150}
    try:
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60.0) as client:
            long = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            deadline = time.monotonic() + 20.0
            while not await redis.zcard(keys.admitted(model)):
                assert not long.done(), (long.result().status_code, long.result().text)
                assert time.monotonic() < deadline, "the admission plugin took no ticket"
                await asyncio.sleep(0.05)
            held = {r: await redis.zcard(keys.inflight(r)) for r in ("replica-0", "replica-1")}
            assert sorted(held.values()) == [0, 1], held  # one reservation, on one replica
            busy = next(r for r, n in held.items() if n)
            # the sidecars see the running request; a short one goes to the other replica
            await asyncio.sleep(0.5)
            short = await client.post("/v1/chat/completions", json={**body, "max_tokens": 3})
            assert short.status_code == 200, short.text
            assert short.headers["x-litellm-model-id"] not in (busy, None)
            answer = await long
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-litellm-model-id"] == busy
        deadline = time.monotonic() + 5.0
        while await redis.zcard(keys.admitted(model)) or await redis.zcard(keys.inflight(busy)):
            assert time.monotonic() < deadline, "the ticket or the reservation was not released"
            await asyncio.sleep(0.05)
    finally:
        await redis.aclose()
