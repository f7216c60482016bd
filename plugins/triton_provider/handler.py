"""The ``triage_triton`` LiteLLM custom provider: chat completions on Triton's generate endpoints.

Register it in the proxy config::

    litellm_settings:
      custom_provider_map:
        - {provider: triage_triton, custom_handler: plugins.triton_provider.handler.triton_generate}

or in-process with ``register()``. A deployment is ``model: triage_triton/<triton model>`` with
``api_base`` = the replica's Triton HTTP URL; the handler posts to
``{api_base}/v2/models/<triton model>/generate_stream`` (SSE, one event per step), for
non-streaming calls too: their events are collected into one answer (setting
``non_stream_endpoint: generate`` posts them to ``/generate`` instead).

One ``httpx.AsyncClient`` per event loop (normally one: the proxy's) serves all requests, and the
upstream request is always closed when its caller goes away (a stream's ``aclose``, the task
cancelled, the proxy's client gone), which makes Triton cancel the request in the engine. Triton
2.51 notices a closed connection only once a response of that request has been sent (it reads
nothing from the connection before), so a disconnect cancels a ``/generate_stream`` request at
its next event, and never a ``/generate`` one: hence non-streaming calls go through
``/generate_stream`` by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import litellm
from litellm.llms.custom_llm import CustomLLM
from litellm.types.utils import GenericStreamingChunk, ModelResponse
from opentelemetry.trace import Span

from plugins import tracing
from plugins.triton_provider.chat_template import ChatTemplateError, chat_template
from plugins.triton_provider.dialects import Dialect, TextReader, dialect
from plugins.triton_provider.errors import (
    ErrorKind,
    classify_upstream_error,
    describe,
    to_litellm_exception,
)
from plugins.triton_provider.params import build_payload, stop_words
from plugins.triton_provider.settings import (
    PROVIDER,
    TritonProviderSettings,
    deployment_overrides,
    effective_settings,
)
from plugins.triton_provider.stop import StopTrimmer
from plugins.triton_provider.tokens import TokenUsage, UsageCounter

log = logging.getLogger(__name__)

MAX_ERROR_TEXT = 2000
T = TypeVar("T")


@dataclass(frozen=True)
class PreparedRequest:
    """Everything one call needs, computed before any I/O."""

    model: str
    api_base: str
    url: str
    payload: dict[str, Any]
    prompt: str
    max_tokens: int
    stops: list[str]
    headers: dict[str, str]
    timeout: httpx.Timeout
    settings: TritonProviderSettings
    call_id: str
    dialect: Dialect
    upstream_stream: bool = True
    """Posted to ``/generate_stream`` (streams, and non-streaming calls by default: their
    events make one answer); False: ``/generate``, one answer."""
    replica_id: str | None = None
    """The deployment's ``model_info.id`` (the replica its sidecar publishes)."""
    parent_span: Span | None = None
    """LiteLLM's span of the proxy request (``plugins/tracing.py``)."""

    def context(self) -> str:
        return f"call={self.call_id} model={self.model} api_base={self.api_base}"


def error_text(status_code: int, body: str) -> str:
    """The error message of a Triton error body: JSON ``{"error": ...}``, SSE, or raw text."""
    candidates = [body.strip()]
    candidates += [ln[5:].strip() for ln in body.splitlines() if ln.startswith("data:")]
    for candidate in candidates:
        try:
            parsed = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(parsed, dict) and "error" in parsed:
            return str(parsed["error"])
    return body.strip()[:MAX_ERROR_TEXT] or f"HTTP {status_code} with an empty body"


def parse_sse_line(line: str) -> dict[str, Any] | None:
    """The JSON object of an SSE ``data:`` line; None for blank, comment and other fields."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if not data or data == "[DONE]":
        return None
    event = json.loads(data)
    if not isinstance(event, dict):
        raise ValueError(f"event is not a JSON object: {data[:200]!r}")
    return event


def finish_reason(usage: TokenUsage, max_tokens: int, stopped: bool) -> str:
    if stopped:
        return "stop"
    return "length" if usage.completion_tokens >= max_tokens else "stop"


class StreamState:
    """Turns generate_stream events into chunk texts, then the final chunk (pure, no I/O)."""

    def __init__(self, request: PreparedRequest) -> None:
        self.request = request
        self.reader = TextReader(request.dialect)
        settings = request.settings
        self.counter = UsageCounter(
            request.prompt,
            settings.use_upstream_token_counts,
            request.dialect.reused_blocks_output if settings.request_kv_cache_stats else None,
            settings.kv_tokens_per_block,
        )
        self.trimmer = StopTrimmer(request.stops if request.settings.trim_stop else [])
        self.events = 0
        self.emitted: list[str] = []

    def on_event(self, event: Mapping[str, Any]) -> str:
        self.events += 1
        text = self.reader.delta(event)
        self.counter.add(event, text)
        safe = self.trimmer.feed(text)
        self.emitted.append(safe)
        return safe

    @property
    def stopped(self) -> bool:
        return self.trimmer.stopped

    def final_chunk(self) -> GenericStreamingChunk:
        usage = self.counter.usage()
        return GenericStreamingChunk(
            text=self.trimmer.flush(),
            tool_use=None,
            is_finished=True,
            finish_reason=finish_reason(usage, self.request.max_tokens, self.stopped),
            usage=usage.as_dict(),  # type: ignore[typeddict-item]
            index=0,
        )


def text_chunk(text: str) -> GenericStreamingChunk:
    return GenericStreamingChunk(
        text=text, tool_use=None, is_finished=False, finish_reason="", usage=None, index=0
    )


class TritonGenerateHandler(CustomLLM):
    """LiteLLM ``CustomLLM`` for Triton's generate extension (both TensorRT-LLM dialects)."""

    def __init__(self, settings: TritonProviderSettings | None = None) -> None:
        super().__init__()
        self._settings = settings
        self._lock = threading.Lock()
        self._async_clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, httpx.AsyncClient
        ] = weakref.WeakKeyDictionary()

    # ---- configuration and clients ---------------------------------------------------------
    @property
    def settings(self) -> TritonProviderSettings:
        """Read from the environment on first use, so a proxy's env is in place by then."""
        with self._lock:
            if self._settings is None:
                self._settings = TritonProviderSettings()
            return self._settings

    def configure(self, settings: TritonProviderSettings) -> None:
        """Replace the process-wide settings (client limits apply to clients made after)."""
        with self._lock:
            self._settings = settings

    def _limits(self) -> tuple[httpx.Limits, httpx.Timeout]:
        s = self.settings
        limits = httpx.Limits(
            max_connections=s.max_connections,
            max_keepalive_connections=s.max_keepalive_connections,
        )
        return limits, httpx.Timeout(s.request_timeout_s, connect=s.connect_timeout_s)

    def async_client(self) -> httpx.AsyncClient:
        """The shared client of the running event loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._async_clients.get(loop)
        if client is None or client.is_closed:
            limits, timeout = self._limits()
            client = httpx.AsyncClient(limits=limits, timeout=timeout)
            with self._lock:
                self._async_clients[loop] = client
        return client

    async def aclose(self) -> None:
        """Close the running loop's client (idle keep-alive connections delay Triton's exit)."""
        await self.aclose_loop(asyncio.get_running_loop())

    async def aclose_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            client = self._async_clients.pop(loop, None)
        if client is not None:
            await client.aclose()

    # ---- request preparation (pure apart from reading a template file) ---------------------
    def prepare(
        self,
        *,
        model: str,
        messages: list[dict[str, Any]],
        api_base: str | None,
        api_key: str | None,
        optional_params: Mapping[str, Any],
        litellm_params: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        timeout: float | httpx.Timeout | None,
        stream: bool,
    ) -> PreparedRequest:
        litellm_params = litellm_params or {}
        if not api_base:
            raise litellm.BadRequestError(
                message=f"{PROVIDER}/{model}: api_base (the replica's Triton HTTP URL) is required",
                model=model,
                llm_provider=PROVIDER,
            )
        base = api_base.rstrip("/")
        try:
            settings = effective_settings(
                self.settings, deployment_overrides(litellm_params.get("model_info"))
            )
            template = chat_template(settings.chat_template, settings.bos_token, settings.eos_token)
        except (ValueError, ChatTemplateError) as exc:
            log.error("%s/%s at %s is misconfigured: %s", PROVIDER, model, base, exc)
            raise litellm.InternalServerError(
                message=f"{PROVIDER} deployment {model} at {base} is misconfigured: {exc}",
                llm_provider=PROVIDER,
                model=model,
            ) from exc
        try:
            prompt = template.render(messages)
        except ChatTemplateError as exc:
            raise litellm.BadRequestError(
                message=f"{PROVIDER}/{model}: {exc}", model=model, llm_provider=PROVIDER
            ) from exc
        drop = bool(litellm_params.get("drop_params")) or litellm.drop_params is True
        upstream_stream = stream or settings.non_stream_endpoint == "generate_stream"
        wire = dialect(settings.dialect)
        payload = build_payload(
            wire.name,
            model,
            prompt,
            optional_params,
            stream=upstream_stream,
            default_max_tokens=settings.default_max_tokens,
            drop_params=drop,
            exclude_input_in_output=settings.exclude_input_in_output,
            extra_inputs=settings.extra_inputs,
            token_counts=settings.request_token_counts,
        )
        if settings.request_kv_cache_stats:
            payload[wire.perf_metrics_input] = True
        endpoint = "generate_stream" if upstream_stream else "generate"
        request_headers = dict(headers or {})
        if api_key:
            request_headers.setdefault("Authorization", f"Bearer {api_key}")
        if isinstance(timeout, httpx.Timeout):
            http_timeout = timeout
        else:
            read = settings.request_timeout_s
            if timeout is not None:
                read = min(read, float(timeout))
            http_timeout = httpx.Timeout(read, connect=settings.connect_timeout_s)
        return PreparedRequest(
            model=model,
            api_base=base,
            url=f"{base}/v2/models/{quote(model, safe='')}/{endpoint}",
            payload=payload,
            prompt=prompt,
            max_tokens=payload[wire.max_tokens],
            stops=stop_words(model, optional_params.get("stop")),
            headers=request_headers,
            timeout=http_timeout,
            settings=settings,
            call_id=str(litellm_params.get("litellm_call_id") or "-"),
            dialect=wire,
            upstream_stream=upstream_stream,
            replica_id=(litellm_params.get("model_info") or {}).get("id"),
            parent_span=tracing.parent_span(litellm_params),
        )

    # ---- errors --------------------------------------------------------------------------------
    @staticmethod
    def upstream_error(
        request: PreparedRequest, status_code: int | None, message: str
    ) -> Exception:
        error = classify_upstream_error(status_code, message)
        # overload and client mistakes are routine; a replica in trouble is not
        if error.is_overload or error.kind is ErrorKind.BAD_REQUEST:
            level = logging.INFO
        else:
            level = logging.WARNING if error.retryable else logging.ERROR
        log.log(
            level, "%s: %s", request.context(), describe(error, request.api_base, request.model)
        )
        return to_litellm_exception(error, model=request.model, api_base=request.api_base)

    def transport_error(self, request: PreparedRequest, exc: httpx.TransportError) -> Exception:
        return self.upstream_error(request, None, f"{type(exc).__name__}: {exc}".rstrip(": "))

    def response_error(self, request: PreparedRequest, status_code: int, body: str) -> Exception:
        return self.upstream_error(request, status_code, error_text(status_code, body))

    def protocol_error(
        self, request: PreparedRequest, status_code: int, exc: Exception
    ) -> Exception:
        return self.upstream_error(request, status_code, f"malformed response from Triton: {exc}")

    # ---- the one core: a call's upstream events ----------------------------------------------
    def _pre_call(self, logging_obj: Any, request: PreparedRequest) -> None:
        if logging_obj is not None:
            logging_obj.pre_call(
                input=request.prompt,
                api_key="",
                additional_args={"complete_input_dict": request.payload, "api_base": request.url},
            )

    def _event(
        self, request: PreparedRequest, status_code: int, line: str
    ) -> dict[str, Any] | None:
        try:
            event = parse_sse_line(line)
        except ValueError as exc:
            raise self.protocol_error(request, status_code, exc) from exc
        if event is not None and "error" in event:
            raise self.upstream_error(request, status_code, str(event["error"]))
        return event

    def _body(self, request: PreparedRequest, status_code: int, text: str) -> dict[str, Any]:
        """``/generate``'s one answer: a JSON object, or an error."""
        try:
            body = json.loads(text)
        except ValueError as exc:
            raise self.protocol_error(request, status_code, exc) from exc
        if not isinstance(body, dict):
            raise self.protocol_error(request, status_code, ValueError(repr(body)[:200]))
        if "error" in body:
            raise self.upstream_error(request, status_code, str(body["error"]))
        return body

    async def _events(
        self, request: PreparedRequest, state: StreamState
    ) -> AsyncIterator[dict[str, Any]]:
        """The upstream's responses to ``request``, in order: each ``/generate_stream`` event,
        or ``/generate``'s one answer; errors (HTTP, in-band, transport, malformed) raised as
        LiteLLM exceptions. Closing the generator (a stop word in ``state``, or the consumer
        stopped or was cancelled) closes the upstream request, which makes Triton cancel it in
        the engine."""
        attempt = tracing.start_span(
            "triage.upstream",
            request.parent_span,
            replica=request.replica_id,
            model=request.model,
            upstream__endpoint=request.url.rsplit("/", 1)[-1],
            max_tokens=request.max_tokens,
        )
        try:
            async with self.async_client().stream(
                "POST",
                request.url,
                json=request.payload,
                headers=request.headers,
                timeout=request.timeout,
            ) as response:
                status = response.status_code
                attempt.set_attribute("http.response.status_code", status)
                if status != 200:
                    body = (await response.aread()).decode("utf-8", errors="replace")
                    raise self.response_error(request, status, body)
                if not request.upstream_stream:
                    text = (await response.aread()).decode("utf-8", errors="replace")
                    yield self._body(request, status, text)
                    return
                async for line in response.aiter_lines():
                    event = self._event(request, status, line)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            tracing.failed(attempt, exc)
            raise self.transport_error(request, exc) from exc
        except (GeneratorExit, asyncio.CancelledError):
            attempt.set_attribute("triage.upstream.closed_early", True)
            if not state.stopped:  # not our own stop at a stop word: the caller went away
                log.info(
                    "%s: the caller stopped after %d events; upstream request closed%s",
                    request.context(),
                    state.events,
                    "" if request.upstream_stream else " (Triton 2.51 keeps generating it)",
                )
            raise
        except Exception as exc:  # an error answer (HTTP or in-band) or a malformed one
            tracing.failed(attempt, exc)
            raise
        finally:
            attempt.set_attribute("triage.upstream.events", state.events)
            attempt.end()

    def collected_response(
        self, request: PreparedRequest, state: StreamState, model_response: ModelResponse
    ) -> ModelResponse:
        """The one answer of a non-streaming call: the text of all its responses (one from
        ``/generate``, the events of ``/generate_stream``), its usage and finish_reason."""
        if state.events == 0:
            raise self.protocol_error(
                request, 200, ValueError("the event stream ended without a response")
            )
        final = state.final_chunk()
        choice = model_response.choices[0]
        choice.message.content = "".join(state.emitted) + final["text"]  # type: ignore[union-attr]
        choice.finish_reason = final["finish_reason"]
        model_response.created = int(time.time())
        model_response.model = request.model
        model_response.usage = litellm.Usage(**(final["usage"] or {}))  # type: ignore[attr-defined]
        return model_response

    def deadline_error(self, request: PreparedRequest) -> Exception:
        """A non-streaming call that got no complete answer within its read timeout (408).

        On ``/generate`` that is httpx's read timeout (no byte before the answer); a collected
        ``/generate_stream`` call keeps that meaning with a deadline over the whole answer.
        """
        return self.upstream_error(
            request, None, f"ReadTimeout: no complete answer within {request.timeout.read:g} s"
        )

    async def _run(self, request: PreparedRequest, state: StreamState) -> AsyncIterator[str]:
        """``_events`` through ``state``: the texts to send on (stop words held back); stops
        reading (and closes the upstream request) at a stop word."""
        async with contextlib.aclosing(self._events(request, state)) as events:
            async for event in events:
                text = state.on_event(event)
                if text:
                    yield text
                if state.stopped:
                    break  # leaving the block closes the response: Triton cancels the rest

    def _request(self, call: Mapping[str, Any], stream: bool) -> PreparedRequest:
        """A LiteLLM ``CustomLLM`` call (LiteLLM passes every argument by name), prepared."""
        request = self.prepare(
            model=call["model"],
            messages=call["messages"],
            api_base=call.get("api_base"),
            api_key=call.get("api_key"),
            optional_params=call.get("optional_params") or {},
            litellm_params=call.get("litellm_params"),
            headers=call.get("headers"),
            timeout=call.get("timeout"),
            stream=stream,
        )
        self._pre_call(call.get("logging_obj"), request)
        return request

    # ---- LiteLLM's four entry points, all on the one core ------------------------------------
    async def acompletion(self, *args: Any, **call: Any) -> ModelResponse:  # type: ignore[override]
        """A non-streaming call: its responses collected into one answer."""
        _by_name(args)
        request = self._request(call, stream=False)
        state = StreamState(request)
        collecting = self._run(request, state)
        try:
            if request.upstream_stream:  # a deadline over the whole answer (see deadline_error)
                async with asyncio.timeout(request.timeout.read):
                    async for _ in collecting:
                        pass
            else:
                async for _ in collecting:
                    pass
        except TimeoutError as exc:  # only our own deadline: httpx's are TransportErrors
            raise self.deadline_error(request) from exc
        finally:
            await collecting.aclose()
        return self.collected_response(request, state, call["model_response"])

    async def astreaming(  # type: ignore[override]
        self, *args: Any, **call: Any
    ) -> AsyncIterator[GenericStreamingChunk]:
        """A stream: one chunk per text the upstream sends, then the final chunk (usage,
        finish_reason)."""
        _by_name(args)
        request = self._request(call, stream=True)
        state = StreamState(request)
        async with contextlib.aclosing(self._run(request, state)) as texts:
            async for text in texts:
                yield text_chunk(text)
        yield state.final_chunk()

    def completion(self, *args: Any, **call: Any) -> ModelResponse:  # type: ignore[override]
        """Sync callers (the SDK's ``litellm.completion``; never the proxy): ``acompletion`` on
        a private event loop."""
        return _run_sync(self, self.acompletion(*args, **call))

    def streaming(  # type: ignore[override]
        self, *args: Any, **call: Any
    ) -> Iterator[GenericStreamingChunk]:
        """Sync callers: ``astreaming``, stepped on a private event loop."""
        return _iterate_sync(self, self.astreaming(*args, **call))


def _by_name(args: tuple[Any, ...]) -> None:
    if args:
        raise TypeError(f"{PROVIDER}: LiteLLM passes a custom provider's arguments by name")


def _run_sync(handler: TritonGenerateHandler, work: Coroutine[Any, Any, T]) -> T:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(work)
    finally:
        loop.run_until_complete(handler.aclose_loop(loop))
        loop.close()


def _iterate_sync(handler: TritonGenerateHandler, chunks: AsyncIterator[T]) -> Iterator[T]:
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(anext(chunks))
            except StopAsyncIteration:
                return
    finally:
        closing = getattr(chunks, "aclose", None)
        if closing is not None:
            loop.run_until_complete(closing())
        loop.run_until_complete(handler.aclose_loop(loop))
        loop.close()


triton_generate = TritonGenerateHandler()


def register(settings: TritonProviderSettings | None = None) -> TritonGenerateHandler:
    """Register ``triton_generate`` as LiteLLM's ``triage_triton`` provider in this process."""
    from litellm.utils import custom_llm_setup

    if settings is not None:
        triton_generate.configure(settings)
    others = [item for item in litellm.custom_provider_map if item["provider"] != PROVIDER]
    litellm.custom_provider_map = [
        *others,
        {"provider": PROVIDER, "custom_handler": triton_generate},
    ]
    custom_llm_setup()
    return triton_generate
