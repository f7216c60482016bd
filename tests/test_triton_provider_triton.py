"""The triage_triton provider through litellm against real tritonserver stand-in replicas.

Every test of the request/response path runs in both dialects: the stand-in as a stock-shaped
``inflight_batcher_llm`` ensemble (``StandinSettings(dialect="ensemble")``) and as the LLM-API
model (``dialect="llmapi"``), each deployment naming its dialect in ``model_info.triage_triton``.
Cancellation: tests/test_provider_cancel.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import litellm
import pytest
from litellm import Router

from devstack.triton_launcher import (
    PROVIDER_DIALECT,
    StandinSettings,
    TritonServer,
    start_standin_replica,
)
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

TRITON_MODEL = "standin"
MODEL = f"triage_triton/{TRITON_MODEL}"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about queues."},
]
# the stand-in's dialect -> the provider's name for it
DIALECTS = PROVIDER_DIALECT


class Replica:
    """A stand-in replica and the provider dialect that speaks to it."""

    def __init__(self, server: TritonServer, standin_dialect: str) -> None:
        self.server = server
        self.standin_dialect = standin_dialect
        self.dialect = DIALECTS[standin_dialect]
        self.http_url = server.http_url

    def info(self, **settings: Any) -> dict[str, Any]:
        return {"triage_triton": {"dialect": self.dialect, **settings}}

    def call(self, **kw: Any) -> Any:
        """``litellm.acompletion`` on this replica (``model_info`` as the Router passes it)."""
        kw.setdefault("messages", MESSAGES)
        settings = kw.pop("settings", {})
        return litellm.acompletion(
            model=MODEL, api_base=self.http_url, model_info=self.info(**settings), **kw
        )

    def router(self, replica_id: str, **provider_settings: Any) -> Router:
        return Router(
            model_list=[
                triton_deployment(
                    "chat",
                    replica_id,
                    self.http_url,
                    TRITON_MODEL,
                    dialect=self.dialect,
                    provider_settings=provider_settings or None,
                )
            ],
            num_retries=0,
        )


def streamed_texts(replica: Replica) -> list[str]:
    """The ``text_output`` of each response of a 3-token stream straight from Triton."""
    if replica.standin_dialect == "llmapi":
        body = {"text_input": "probe", "sampling_param_max_tokens": 3, "streaming": True}
    else:
        body = {"text_input": "probe", "max_tokens": 3, "stream": True}
    url = f"{replica.http_url}/v2/models/{TRITON_MODEL}/generate_stream"
    return [
        json.loads(line[5:])["text_output"]
        for line in httpx.post(url, json=body, timeout=30).text.splitlines()
        if line.startswith("data:")
    ]


async def _start(
    workdir: Path, name: str, standin_dialect: str, **knobs: Any
) -> AsyncIterator[Replica]:
    settings = StandinSettings(dialect=standin_dialect, **knobs)
    server = start_standin_replica(name, settings, workdir, ready_timeout_s=90)
    try:
        register()
        yield Replica(server, standin_dialect)
    finally:
        # idle keep-alive connections would hold tritonserver's shutdown for its grace period
        await triton_generate.aclose()
        server.stop()


@pytest.fixture(scope="module", params=list(DIALECTS))
async def replica(workdir: Path, request: pytest.FixtureRequest) -> AsyncIterator[Replica]:
    async for rep in _start(
        workdir, f"prov-{request.param}", request.param, decode_ms_per_token=5.0
    ):
        yield rep


@pytest.fixture(scope="module", params=list(DIALECTS))
async def tiny(workdir: Path, request: pytest.FixtureRequest) -> AsyncIterator[Replica]:
    """One slot and no engine queue: the second concurrent request overflows."""
    async for rep in _start(
        workdir,
        f"prov-tiny-{request.param}",
        request.param,
        max_active=1,
        engine_queue_size=0,
        decode_ms_per_token=50,
    ):
        yield rep


async def started(call: Any, delay_s: float = 0.3) -> asyncio.Task[Any]:
    """``call`` running in a task, given ``delay_s`` to take the replica's only slot."""
    task = asyncio.create_task(call)
    await asyncio.sleep(delay_s)
    assert not task.done(), task
    return task


async def test_the_llmapi_standin_streams_the_whole_text_so_far(replica: Replica) -> None:
    """As NVIDIA's LLM-API model does (all_models/llmapi/tensorrt_llm/1/model.py
    _create_response sends CompletionOutput.text; NVIDIA/TensorRT-LLM b35ac1b6); the
    ensemble's engine streams each step's text."""
    texts = streamed_texts(replica)
    assert len(texts) == 3 and all(texts)
    if replica.standin_dialect == "llmapi":
        assert texts[1].startswith(texts[0]) and texts[2].startswith(texts[1])
        assert len(texts[0]) < len(texts[1]) < len(texts[2])
    else:
        assert all(" " not in t.strip() for t in texts)  # one word each


async def test_non_streaming_runs_to_length_with_usage(replica: Replica) -> None:
    response = await replica.call(max_tokens=6)
    choice = response.choices[0]
    assert choice.message.content
    assert choice.finish_reason == "length"
    prompt = chat_template(None).render(MESSAGES)
    assert response.usage.prompt_tokens == count_tokens(prompt) > 0
    assert response.usage.completion_tokens == 6 == count_tokens(choice.message.content)
    assert response.usage.total_tokens == response.usage.prompt_tokens + 6


async def test_max_completion_tokens_is_honoured(replica: Replica) -> None:
    response = await replica.call(max_completion_tokens=3)
    assert response.usage.completion_tokens == 3


async def test_streaming_chunks_and_final_usage(replica: Replica) -> None:
    """The chunks add up to the same text as a non-streaming call: deltas in both dialects
    (the LLM-API model streams the whole text so far; the provider sends what is new)."""
    whole = await replica.call(max_tokens=5, seed=11)
    stream = await replica.call(
        max_tokens=5, seed=11, stream=True, stream_options={"include_usage": True}
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
    assert joined == whole.choices[0].message.content
    assert count_tokens(joined) == 5
    assert len([t for t in texts if t]) >= 2  # really streamed, not one blob
    assert finish == ["length"]
    assert usage is not None
    assert usage.completion_tokens == 5
    assert usage.prompt_tokens == count_tokens(chat_template(None).render(MESSAGES))


async def test_seed_makes_the_text_deterministic(replica: Replica) -> None:
    """``seed`` reaches the model under the dialect's name (``seed`` / ``sampling_param_seed``)."""
    texts = {}
    for seed in (1, 2, 1):
        response = await replica.call(max_tokens=12, seed=seed, temperature=1.0)
        texts.setdefault(seed, set()).add(response.choices[0].message.content)
    assert len(texts[1]) == 1, texts  # same seed, same text
    assert texts[1] != texts[2]  # another seed, another text


async def test_stop_ends_the_text_before_the_stop_word(replica: Replica) -> None:
    full = await replica.call(max_tokens=20, seed=3)
    text = full.choices[0].message.content
    stop_word = text.split()[3]  # deterministic for a prompt and seed
    expected, found = trim_at_stop(text, [stop_word])
    assert found

    stopped = await replica.call(max_tokens=20, seed=3, stop=[stop_word])
    assert stopped.choices[0].message.content == expected
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 20  # the engine stopped too

    stream = await replica.call(max_tokens=20, seed=3, stop=stop_word, stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


async def test_min_tokens_per_dialect(replica: Replica) -> None:
    """The ensemble takes ``min_tokens``; the LLM-API model has no such input: a clear 400
    before anything is sent (a stock model would reject an undeclared input)."""
    if replica.dialect == "llmapi":
        with pytest.raises(litellm.BadRequestError) as info:
            await replica.call(max_tokens=4, min_tokens=4)
        assert info.value.status_code == 400
        assert "min_tokens" in str(info.value) and "llmapi" in str(info.value)
        dropped = await replica.call(max_tokens=4, min_tokens=4, drop_params=True)
        assert dropped.usage.completion_tokens == 4
        return
    response = await replica.call(max_tokens=8, min_tokens=8)
    assert response.usage.completion_tokens == 8
    with pytest.raises(litellm.BadRequestError, match="min_tokens"):
        await replica.call(max_tokens=4, min_tokens=5)


async def test_upstream_token_counts_are_asked_for_on_the_ensemble(replica: Replica) -> None:
    """``request_token_counts`` sends ``return_num_input_tokens`` / ``return_num_output_tokens``,
    which a stock-shaped ensemble accepts; usage is right whether or not it returns counts."""
    if replica.dialect == "llmapi":
        with pytest.raises(litellm.InternalServerError, match="token-count"):
            await replica.call(max_tokens=3, settings={"request_token_counts": True})
        return
    for stream in (False, True):
        response = await replica.call(
            max_tokens=5,
            settings={"request_token_counts": True},
            stream=stream,
            stream_options={"include_usage": True} if stream else None,
        )
        if stream:
            chunks = [c async for c in response]
            usage = next(c.usage for c in reversed(chunks) if getattr(c, "usage", None))
        else:
            usage = response.usage
        assert usage.completion_tokens == 5
        assert usage.prompt_tokens == count_tokens(chat_template(None).render(MESSAGES))


async def test_wrong_triton_model_is_a_clear_404(replica: Replica) -> None:
    with pytest.raises(litellm.NotFoundError) as info:
        await litellm.acompletion(
            model="triage_triton/no_such_model",
            api_base=replica.http_url,
            messages=MESSAGES,
            max_tokens=2,
            model_info=replica.info(),
        )
    message = str(info.value)
    assert info.value.status_code == 404
    assert "no_such_model" in message and replica.http_url in message
    assert "model_not_found" in message


async def test_unsupported_param_is_a_400(replica: Replica) -> None:
    with pytest.raises(litellm.BadRequestError, match="logprobs"):
        await replica.call(max_tokens=2, logprobs=True)
    dropped = await replica.call(max_tokens=2, logprobs=True, drop_params=True)
    assert dropped.usage.completion_tokens == 2


async def test_unreachable_replica_is_503() -> None:
    register()
    with pytest.raises(litellm.ServiceUnavailableError) as info:
        await litellm.acompletion(
            model=MODEL, api_base="http://127.0.0.1:9", messages=MESSAGES, max_tokens=2
        )
    assert info.value.status_code == 503
    assert "connection" in str(info.value)


def test_sync_completion_and_streaming(replica: Replica) -> None:
    common: dict[str, Any] = {
        "model": MODEL,
        "api_base": replica.http_url,
        "messages": MESSAGES,
        "max_tokens": 3,
        "model_info": replica.info(),
    }
    response = litellm.completion(**common)
    assert response.usage.completion_tokens == 3
    chunks = list(litellm.completion(**common, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert count_tokens(text) == 3


async def test_router_passes_per_deployment_settings(replica: Replica) -> None:
    """``model_info.triage_triton`` (the dialect, here also max_tokens) reaches the handler
    through the Router."""
    response = await replica.router("prov-a", default_max_tokens=4).acompletion(
        model="chat", messages=MESSAGES
    )
    assert response.usage.completion_tokens == 4
    assert response.choices[0].finish_reason == "length"


async def test_wrong_dialect_is_not_always_refused(replica: Replica) -> None:
    """Triton's generate endpoints pass a name the model does not declare on as a request
    parameter instead of rejecting it: the ensemble refuses LLM-API names (its required
    ``max_tokens`` is missing), the LLM-API model ignores the ensemble's (``max_tokens``...)."""
    other = "llmapi" if replica.dialect == "inflight_batcher_llm" else "inflight_batcher_llm"
    if replica.dialect == "inflight_batcher_llm":
        with pytest.raises(litellm.BadRequestError) as info:
            await replica.call(max_tokens=2, settings={"dialect": other})
        assert "bad_request" in str(info.value) and "max_tokens" in str(info.value)
        return
    response = await replica.call(max_tokens=2, settings={"dialect": other})
    assert response.usage.completion_tokens != 2  # max_tokens went nowhere


async def test_overflow_is_503(tiny: Replica) -> None:
    """The engine's overflow (TensorRT-LLM's executor queue full) becomes a 503 that the Router
    counts against the replica, streaming or not."""
    busy = await started(tiny.call(max_tokens=30))
    results = await asyncio.gather(
        *[tiny.call(max_tokens=5) for _ in range(2)], return_exceptions=True
    )
    for result in results:
        assert isinstance(result, litellm.ServiceUnavailableError), result
        assert result.status_code == 503
        assert "Maximum queue size of 0 has been reached" in str(result)
        assert "engine_queue_full" in str(result)

    stream = await tiny.call(max_tokens=5, stream=True)
    with pytest.raises(litellm.ServiceUnavailableError) as info:
        async for _ in stream:
            pass
    assert info.value.status_code == 503
    assert "Maximum queue size" in str(info.value)

    assert (await busy).usage.completion_tokens == 30


async def test_non_streaming_answer_is_the_same_from_generate_stream_and_generate(
    replica: Replica,
) -> None:
    """Non-streaming calls are collected from /generate_stream (so that a cancel reaches Triton):
    text, usage and finish_reason are what /generate's single response gives."""
    router = replica.router("prov-a", non_stream_endpoint="generate")
    common = {"messages": MESSAGES, "seed": 3}
    full = await replica.call(max_tokens=20, seed=3)
    stop_word = full.choices[0].message.content.split()[4]
    cases: list[dict[str, Any]] = [
        {"max_tokens": 20},
        {"max_tokens": 7, "temperature": 0.5},
        {"max_tokens": 20, "stop": [stop_word]},
        {"max_tokens": 20, "stop": stop_word[:2] + "\u00e9"},  # never found
    ]
    for params in cases:
        collected = await replica.call(**common, **params)
        plain = await router.acompletion(model="chat", **common, **params)
        assert collected.choices[0].message.content == plain.choices[0].message.content, params
        assert collected.choices[0].finish_reason == plain.choices[0].finish_reason, params
        assert collected.usage.prompt_tokens == plain.usage.prompt_tokens, params
        assert collected.usage.completion_tokens == plain.usage.completion_tokens, params
        assert collected.usage.total_tokens == plain.usage.total_tokens, params
    stopped = await replica.call(max_tokens=20, stop=[stop_word], seed=3)
    assert stopped.choices[0].finish_reason == "stop"
    assert stop_word not in stopped.choices[0].message.content


async def test_overflow_is_503_on_generate_too(tiny: Replica) -> None:
    """The opt-out to /generate classifies the executor's overflow as 503 too, whatever HTTP
    status Triton gave it."""
    busy = await started(tiny.call(max_tokens=30))
    with pytest.raises(litellm.ServiceUnavailableError) as info:
        await tiny.router("prov-tiny", non_stream_endpoint="generate").acompletion(
            model="chat", messages=MESSAGES, max_tokens=5
        )
    assert info.value.status_code == 503
    assert "engine_queue_full" in str(info.value)
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
