"""The triage_triton provider through litellm against real tritonserver stand-in replicas."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import litellm
import pytest
from litellm import Router

from gateway.triton_launcher import StandinSettings, TritonServer, start_standin_replica
from gateway.triton_metrics import parse_engine_sample
from plugins.triton_provider import (
    openai_frontend_deployment,
    register,
    triton_deployment,
    triton_generate,
)
from plugins.triton_provider.chat_template import chat_template
from plugins.triton_provider.stop import trim_at_stop
from plugins.triton_provider.tokens import count_tokens

pytestmark = pytest.mark.integration

MODEL = "triage_triton/standin"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about queues."},
]


@pytest.fixture(scope="module")
async def replica(workdir: Path) -> AsyncIterator[TritonServer]:
    server = start_standin_replica(
        "prov-a", StandinSettings(decode_ms_per_token=5.0), workdir, ready_timeout_s=90
    )
    try:
        register()
        yield server
    finally:
        # idle keep-alive connections would hold tritonserver's shutdown for its grace period
        await triton_generate.aclose()
        triton_generate.close()
        server.stop()


@pytest.fixture(scope="module")
async def tiny(workdir: Path) -> AsyncIterator[TritonServer]:
    """One slot and no engine queue: the second concurrent request overflows."""
    settings = StandinSettings(max_active=1, engine_queue_size=0, decode_ms_per_token=50)
    server = start_standin_replica("prov-tiny", settings, workdir, ready_timeout_s=90)
    try:
        register()
        yield server
    finally:
        await triton_generate.aclose()
        server.stop()


def active(server: TritonServer) -> int:
    text = httpx.get(server.metrics_url, timeout=5).text
    return parse_engine_sample(text, "standin", "standin", []).active


async def wait_active(server: TritonServer, target: int, timeout_s: float = 5.0) -> float:
    """Seconds until the engine's active count is ``target`` (fails after ``timeout_s``)."""
    start = time.monotonic()
    while (count := await asyncio.to_thread(active, server)) != target:
        assert time.monotonic() - start < timeout_s, f"active stayed {count}, wanted {target}"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_non_streaming_runs_to_length_with_usage(replica: TritonServer) -> None:
    response = await litellm.acompletion(
        model=MODEL, api_base=replica.http_url, messages=MESSAGES, max_tokens=6
    )
    choice = response.choices[0]
    assert choice.message.content
    assert choice.finish_reason == "length"
    prompt = chat_template(None).render(MESSAGES)
    assert response.usage.prompt_tokens == count_tokens(prompt) > 0
    assert response.usage.completion_tokens == 6 == count_tokens(choice.message.content)
    assert response.usage.total_tokens == response.usage.prompt_tokens + 6


async def test_max_completion_tokens_is_honoured(replica: TritonServer) -> None:
    response = await litellm.acompletion(
        model=MODEL, api_base=replica.http_url, messages=MESSAGES, max_completion_tokens=3
    )
    assert response.usage.completion_tokens == 3


async def test_streaming_chunks_and_final_usage(replica: TritonServer) -> None:
    stream = await litellm.acompletion(
        model=MODEL,
        api_base=replica.http_url,
        messages=MESSAGES,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: list[str] = []
    finish: list[str] = []
    usage: Any = None
    async for chunk in stream:
        if chunk.choices:
            texts.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].finish_reason:
                finish.append(chunk.choices[0].finish_reason)
        usage = getattr(chunk, "usage", None) or usage
    joined = "".join(texts)
    assert joined and count_tokens(joined) == 5
    assert finish == ["length"]
    assert usage is not None
    assert usage.completion_tokens == 5
    assert usage.prompt_tokens == count_tokens(chat_template(None).render(MESSAGES))


async def test_stop_ends_the_text_before_the_stop_word(replica: TritonServer) -> None:
    common = {"model": MODEL, "api_base": replica.http_url, "messages": MESSAGES, "seed": 3}
    full = await litellm.acompletion(**common, max_tokens=20)
    text = full.choices[0].message.content
    stop_word = text.split()[3]  # deterministic for a prompt and seed
    expected, found = trim_at_stop(text, [stop_word])
    assert found

    stopped = await litellm.acompletion(**common, max_tokens=20, stop=[stop_word])
    assert stopped.choices[0].message.content == expected
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 20  # the engine stopped too

    stream = await litellm.acompletion(**common, max_tokens=20, stop=stop_word, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


async def test_wrong_triton_model_is_a_clear_404(replica: TritonServer) -> None:
    with pytest.raises(litellm.NotFoundError) as info:
        await litellm.acompletion(
            model="triage_triton/no_such_model",
            api_base=replica.http_url,
            messages=MESSAGES,
            max_tokens=2,
        )
    message = str(info.value)
    assert info.value.status_code == 404
    assert "no_such_model" in message and replica.http_url in message
    assert "model_not_found" in message


async def test_unsupported_param_is_a_400(replica: TritonServer) -> None:
    with pytest.raises(litellm.BadRequestError, match="logprobs"):
        await litellm.acompletion(
            model=MODEL, api_base=replica.http_url, messages=MESSAGES, max_tokens=2, logprobs=True
        )
    dropped = await litellm.acompletion(
        model=MODEL,
        api_base=replica.http_url,
        messages=MESSAGES,
        max_tokens=2,
        logprobs=True,
        drop_params=True,
    )
    assert dropped.usage.completion_tokens == 2


async def test_unreachable_replica_is_503() -> None:
    register()
    with pytest.raises(litellm.ServiceUnavailableError) as info:
        await litellm.acompletion(
            model=MODEL, api_base="http://127.0.0.1:9", messages=MESSAGES, max_tokens=2
        )
    assert info.value.status_code == 503
    assert "connection" in str(info.value)


async def test_cancelled_stream_consumer_cancels_the_triton_request(
    replica: TritonServer,
) -> None:
    received = asyncio.Event()

    async def consume() -> None:
        stream = await litellm.acompletion(
            model=MODEL, api_base=replica.http_url, messages=MESSAGES, max_tokens=400, stream=True
        )
        async for _ in stream:
            received.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(received.wait(), 10)
    assert await asyncio.to_thread(active, replica) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # 400 tokens at 5 ms would run 2 s more: the engine must drop it much sooner
    assert await wait_active(replica, 0, timeout_s=1.5) < 1.5


async def test_closed_stream_cancels_the_triton_request(replica: TritonServer) -> None:
    stream = await litellm.acompletion(
        model=MODEL, api_base=replica.http_url, messages=MESSAGES, max_tokens=400, stream=True
    )
    async for _ in stream:
        break
    assert await asyncio.to_thread(active, replica) == 1
    await stream.aclose()
    assert await wait_active(replica, 0, timeout_s=1.5) < 1.5


def test_sync_completion_and_streaming(replica: TritonServer) -> None:
    response = litellm.completion(
        model=MODEL, api_base=replica.http_url, messages=MESSAGES, max_tokens=3
    )
    assert response.usage.completion_tokens == 3
    chunks = list(
        litellm.completion(
            model=MODEL, api_base=replica.http_url, messages=MESSAGES, max_tokens=3, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert count_tokens(text) == 3


async def test_router_passes_per_deployment_settings(replica: TritonServer) -> None:
    """``model_info.triage_triton`` reaches the handler through the Router (here: max_tokens)."""
    router = Router(
        model_list=[
            triton_deployment(
                "chat",
                "prov-a",
                replica.http_url,
                "standin",
                provider_settings={"default_max_tokens": 4},
            )
        ]
    )
    response = await router.acompletion(model="chat", messages=MESSAGES)
    assert response.usage.completion_tokens == 4
    assert response.choices[0].finish_reason == "length"


async def test_engine_overflow_is_503(tiny: TritonServer) -> None:
    """TensorRT-LLM's executor overflow arrives from Triton as HTTP 400: it must become 503."""
    busy = asyncio.create_task(
        litellm.acompletion(model=MODEL, api_base=tiny.http_url, messages=MESSAGES, max_tokens=30)
    )
    await wait_active(tiny, 1)  # the only slot is taken, and the engine queue holds 0
    results = await asyncio.gather(
        *[
            litellm.acompletion(
                model=MODEL, api_base=tiny.http_url, messages=MESSAGES, max_tokens=5
            )
            for _ in range(2)
        ],
        return_exceptions=True,
    )
    for result in results:
        assert isinstance(result, litellm.ServiceUnavailableError), result
        assert result.status_code == 503
        assert "Maximum queue size of 0 has been reached" in str(result)
        assert "engine_queue_full" in str(result)

    stream = await litellm.acompletion(
        model=MODEL, api_base=tiny.http_url, messages=MESSAGES, max_tokens=5, stream=True
    )
    with pytest.raises(litellm.ServiceUnavailableError) as info:
        async for _ in stream:
            pass
    assert info.value.status_code == 503
    assert "Maximum queue size" in str(info.value)

    assert (await busy).usage.completion_tokens == 30


def generate_deployment(server: TritonServer, replica_id: str) -> Router:
    """A Router whose one deployment sends non-streaming calls to /generate (the opt-out)."""
    return Router(
        model_list=[
            triton_deployment(
                "plain",
                replica_id,
                server.http_url,
                "standin",
                provider_settings={"non_stream_endpoint": "generate"},
            )
        ],
        num_retries=0,
    )


async def test_non_streaming_answer_is_the_same_from_generate_stream_and_generate(
    replica: TritonServer,
) -> None:
    """Non-streaming calls are collected from /generate_stream (so that a cancel reaches Triton):
    text, usage and finish_reason are what /generate's single response gives."""
    router = generate_deployment(replica, "prov-a")
    common = {"messages": MESSAGES, "seed": 3}
    full = await litellm.acompletion(
        model=MODEL, api_base=replica.http_url, max_tokens=20, **common
    )
    stop_word = full.choices[0].message.content.split()[4]
    cases: list[dict[str, Any]] = [
        {"max_tokens": 20},
        {"max_tokens": 7, "temperature": 0.5},
        {"max_tokens": 20, "stop": [stop_word]},
        {"max_tokens": 20, "stop": stop_word[:2] + "\u00e9"},  # never found
    ]
    for params in cases:
        collected = await litellm.acompletion(
            model=MODEL, api_base=replica.http_url, **common, **params
        )
        plain = await router.acompletion(model="plain", **common, **params)
        assert collected.choices[0].message.content == plain.choices[0].message.content, params
        assert collected.choices[0].finish_reason == plain.choices[0].finish_reason, params
        assert collected.usage.prompt_tokens == plain.usage.prompt_tokens, params
        assert collected.usage.completion_tokens == plain.usage.completion_tokens, params
        assert collected.usage.total_tokens == plain.usage.total_tokens, params
    stopped = await litellm.acompletion(
        model=MODEL, api_base=replica.http_url, max_tokens=20, stop=[stop_word], **common
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stop_word not in stopped.choices[0].message.content


async def test_engine_overflow_is_503_on_generate_too(tiny: TritonServer) -> None:
    """The opt-out to /generate classifies the executor's overflow (HTTP 400 there) as 503 too."""
    busy = asyncio.create_task(
        litellm.acompletion(model=MODEL, api_base=tiny.http_url, messages=MESSAGES, max_tokens=30)
    )
    await wait_active(tiny, 1)
    with pytest.raises(litellm.ServiceUnavailableError) as info:
        await generate_deployment(tiny, "prov-tiny").acompletion(
            model="plain", messages=MESSAGES, max_tokens=5
        )
    assert info.value.status_code == 503
    assert "engine_queue_full" in str(info.value) and "HTTP 400" in str(info.value)
    assert (await busy).usage.completion_tokens == 30


# ---- the production alternative: LiteLLM's openai/ provider on Triton's OpenAI frontend ------


class _FakeOpenAIUpstream(BaseHTTPRequestHandler):
    """A FAKE OpenAI-compatible upstream that records requests and answers one canned reply.

    Allowed here because the test is about LiteLLM's own request shaping for ``openai/``, not
    about Triton (whose OpenAI frontend does not ship in the nvidia-pytriton wheel).
    """

    seen: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        reply = {
            "id": "cmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return


@pytest.fixture
def fake_openai_upstream() -> Iterator[str]:
    _FakeOpenAIUpstream.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAIUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def test_openai_frontend_deployment_shapes_the_request(fake_openai_upstream: str) -> None:
    router = Router(
        model_list=[openai_frontend_deployment("chat", "rep-o", fake_openai_upstream, "llama-3-8b")]
    )
    response = await router.acompletion(
        model="chat",
        messages=MESSAGES,
        temperature=0.3,
        top_p=0.8,
        stop=["END"],
        seed=7,
        max_tokens=12,
    )
    assert response.choices[0].message.content == "hi"
    [request] = _FakeOpenAIUpstream.seen
    assert request["path"] == "/v1/chat/completions"
    assert request["auth"] == "Bearer not-used"
    body = request["body"]
    assert body["model"] == "llama-3-8b"
    assert body["messages"] == MESSAGES
    assert (body["temperature"], body["top_p"], body["stop"], body["seed"]) == (
        0.3,
        0.8,
        ["END"],
        7,
    )
    assert body["max_tokens"] == 12
