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
import os
import signal
import threading
from collections.abc import Iterator

import httpx
import pytest

from devstack.stack import Stack
from devstack.stack_settings import StackSettings
from devstack.supervisor import Supervisor

from fault_load import HEAL_S, MODEL, Load, under_load
from proxy_helpers import MESSAGES, wait_for_state

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = StackSettings(
        catalogue=[],  # a stack of one model: no cold catalogue sidecars
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
                # 600 tokens: 3 s of engine work each, long after their clients leave (0.5 s)
                body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 600, "stream": stream}
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
