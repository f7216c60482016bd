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
import json
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import litellm
from litellm.llms.custom_llm import CustomLLM
from litellm.types.utils import GenericStreamingChunk, ModelResponse

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
    collect: bool = False
    """A non-streaming call served from ``/generate_stream``: its events make one answer."""

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
        self.counter = UsageCounter(request.prompt, request.settings.use_upstream_token_counts)
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
            usage={
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
            },
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
        self._sync_client: httpx.Client | None = None

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

    def sync_client(self) -> httpx.Client:
        limits, timeout = self._limits()
        with self._lock:
            if self._sync_client is None or self._sync_client.is_closed:
                self._sync_client = httpx.Client(limits=limits, timeout=timeout)
            return self._sync_client

    async def aclose(self) -> None:
        """Close the running loop's client (idle keep-alive connections delay Triton's exit)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._async_clients.pop(loop, None)
        if client is not None:
            await client.aclose()

    def close(self) -> None:
        with self._lock:
            client, self._sync_client = self._sync_client, None
        if client is not None:
            client.close()

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
        collect = not stream and settings.non_stream_endpoint == "generate_stream"
        upstream_stream = stream or collect
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
            collect=collect,
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

    # ---- non-streaming -------------------------------------------------------------------------
    def _pre_call(self, logging_obj: Any, request: PreparedRequest) -> None:
        if logging_obj is not None:
            logging_obj.pre_call(
                input=request.prompt,
                api_key="",
                additional_args={"complete_input_dict": request.payload, "api_base": request.url},
            )

    def _body(self, request: PreparedRequest, response: httpx.Response) -> dict[str, Any]:
        if response.status_code != 200:
            raise self.response_error(request, response.status_code, response.text)
        try:
            body = response.json()
        except ValueError as exc:
            raise self.protocol_error(request, response.status_code, exc) from exc
        if not isinstance(body, dict):
            raise self.protocol_error(request, response.status_code, ValueError(repr(body)[:200]))
        if "error" in body:
            raise self.upstream_error(request, response.status_code, str(body["error"]))
        return body

    @staticmethod
    def build_response(
        request: PreparedRequest, body: Mapping[str, Any], model_response: ModelResponse
    ) -> ModelResponse:
        counter = UsageCounter(request.prompt, request.settings.use_upstream_token_counts)
        counter.add(body, TextReader(request.dialect).delta(body))
        usage = counter.usage()
        trimmer = StopTrimmer(request.stops if request.settings.trim_stop else [])
        text = trimmer.feed(counter.text) + trimmer.flush()
        choice = model_response.choices[0]
        choice.message.content = text  # type: ignore[union-attr]
        choice.finish_reason = finish_reason(usage, request.max_tokens, trimmer.stopped)
        model_response.created = int(time.time())
        model_response.model = request.model
        model_response.usage = litellm.Usage(**usage.as_dict())  # type: ignore[attr-defined]
        return model_response

    def collected_response(
        self, request: PreparedRequest, state: StreamState, model_response: ModelResponse
    ) -> ModelResponse:
        """The one answer of a non-streaming call served from ``/generate_stream``.

        The same text, usage and finish_reason as ``build_response`` makes of ``/generate``'s
        single response (the events are the deltas of that text).
        """
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

        On ``/generate`` that was httpx's read timeout (no byte before the answer); a collected
        ``/generate_stream`` call keeps that meaning with a deadline over the whole answer.
        """
        return self.upstream_error(
            request, None, f"ReadTimeout: no complete answer within {request.timeout.read:g} s"
        )

    async def _acollect(self, request: PreparedRequest, state: StreamState) -> None:
        """Read a ``/generate_stream`` answer to its end (or to the stop) into ``state``."""
        try:
            async with self.async_client().stream(
                "POST",
                request.url,
                json=request.payload,
                headers=request.headers,
                timeout=request.timeout,
            ) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode("utf-8", errors="replace")
                    raise self.response_error(request, response.status_code, body)
                async for line in response.aiter_lines():
                    event = self._event(request, response.status_code, line)
                    if event is None:
                        continue
                    state.on_event(event)
                    if state.stopped:
                        break  # leaving the block closes the response: Triton cancels the rest
        except httpx.TransportError as exc:
            raise self.transport_error(request, exc) from exc

    def _collect(self, request: PreparedRequest) -> StreamState:
        """``_acollect`` for the sync client; the deadline is checked between events."""
        state = StreamState(request)
        deadline = None if request.timeout.read is None else time.monotonic() + request.timeout.read
        try:
            with self.sync_client().stream(
                "POST",
                request.url,
                json=request.payload,
                headers=request.headers,
                timeout=request.timeout,
            ) as response:
                if response.status_code != 200:
                    body = response.read().decode("utf-8", errors="replace")
                    raise self.response_error(request, response.status_code, body)
                for line in response.iter_lines():
                    if deadline is not None and time.monotonic() > deadline:
                        raise self.deadline_error(request)
                    event = self._event(request, response.status_code, line)
                    if event is None:
                        continue
                    state.on_event(event)
                    if state.stopped:
                        break
        except httpx.TransportError as exc:
            raise self.transport_error(request, exc) from exc
        return state

    async def acompletion(  # type: ignore[override]
        self,
        model: str,
        messages: list[dict[str, Any]],
        api_base: str | None,
        custom_prompt_dict: dict[str, Any],
        model_response: ModelResponse,
        print_verbose: Callable[..., Any],
        encoding: Any,
        api_key: str | None,
        logging_obj: Any,
        optional_params: dict[str, Any],
        acompletion: bool | None = None,
        litellm_params: dict[str, Any] | None = None,
        logger_fn: Callable[..., Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | httpx.Timeout | None = None,
        client: Any = None,
    ) -> ModelResponse:
        request = self.prepare(
            model=model,
            messages=messages,
            api_base=api_base,
            api_key=api_key,
            optional_params=optional_params,
            litellm_params=litellm_params,
            headers=headers,
            timeout=timeout,
            stream=False,
        )
        self._pre_call(logging_obj, request)
        if request.collect:
            state = StreamState(request)
            try:
                async with asyncio.timeout(request.timeout.read):
                    await self._acollect(request, state)
            except TimeoutError as exc:  # only our own deadline: httpx's are TransportErrors
                raise self.deadline_error(request) from exc
            except asyncio.CancelledError:
                log.info(
                    "%s: caller cancelled the call after %d events; upstream request closed",
                    request.context(),
                    state.events,
                )
                raise
            return self.collected_response(request, state, model_response)
        try:
            response = await self.async_client().post(
                request.url, json=request.payload, headers=request.headers, timeout=request.timeout
            )
        except httpx.TransportError as exc:
            raise self.transport_error(request, exc) from exc
        except asyncio.CancelledError:
            log.info(
                "%s: caller cancelled the call; upstream /generate closed (Triton 2.51 "
                "keeps generating it)",
                request.context(),
            )
            raise
        return self.build_response(request, self._body(request, response), model_response)

    def completion(  # type: ignore[override]
        self,
        model: str,
        messages: list[dict[str, Any]],
        api_base: str | None,
        custom_prompt_dict: dict[str, Any],
        model_response: ModelResponse,
        print_verbose: Callable[..., Any],
        encoding: Any,
        api_key: str | None,
        logging_obj: Any,
        optional_params: dict[str, Any],
        acompletion: bool | None = None,
        litellm_params: dict[str, Any] | None = None,
        logger_fn: Callable[..., Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | httpx.Timeout | None = None,
        client: Any = None,
    ) -> ModelResponse:
        request = self.prepare(
            model=model,
            messages=messages,
            api_base=api_base,
            api_key=api_key,
            optional_params=optional_params,
            litellm_params=litellm_params,
            headers=headers,
            timeout=timeout,
            stream=False,
        )
        self._pre_call(logging_obj, request)
        if request.collect:
            return self.collected_response(request, self._collect(request), model_response)
        try:
            response = self.sync_client().post(
                request.url, json=request.payload, headers=request.headers, timeout=request.timeout
            )
        except httpx.TransportError as exc:
            raise self.transport_error(request, exc) from exc
        return self.build_response(request, self._body(request, response), model_response)

    # ---- streaming -----------------------------------------------------------------------------
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

    async def astreaming(  # type: ignore[override]
        self,
        model: str,
        messages: list[dict[str, Any]],
        api_base: str | None,
        custom_prompt_dict: dict[str, Any],
        model_response: ModelResponse,
        print_verbose: Callable[..., Any],
        encoding: Any,
        api_key: str | None,
        logging_obj: Any,
        optional_params: dict[str, Any],
        acompletion: bool | None = None,
        litellm_params: dict[str, Any] | None = None,
        logger_fn: Callable[..., Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | httpx.Timeout | None = None,
        client: Any = None,
    ) -> AsyncIterator[GenericStreamingChunk]:
        request = self.prepare(
            model=model,
            messages=messages,
            api_base=api_base,
            api_key=api_key,
            optional_params=optional_params,
            litellm_params=litellm_params,
            headers=headers,
            timeout=timeout,
            stream=True,
        )
        self._pre_call(logging_obj, request)
        state = StreamState(request)
        http = self.async_client()
        try:
            async with http.stream(
                "POST",
                request.url,
                json=request.payload,
                headers=request.headers,
                timeout=request.timeout,
            ) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode("utf-8", errors="replace")
                    raise self.response_error(request, response.status_code, body)
                async for line in response.aiter_lines():
                    event = self._event(request, response.status_code, line)
                    if event is None:
                        continue
                    text = state.on_event(event)
                    if text:
                        yield text_chunk(text)
                    if state.stopped:
                        break  # leaving the block closes the response: Triton cancels the rest
        except httpx.TransportError as exc:
            raise self.transport_error(request, exc) from exc
        except (GeneratorExit, asyncio.CancelledError):
            log.info(
                "%s: consumer stopped the stream early; upstream request closed", request.context()
            )
            raise
        yield state.final_chunk()

    def streaming(  # type: ignore[override]
        self,
        model: str,
        messages: list[dict[str, Any]],
        api_base: str | None,
        custom_prompt_dict: dict[str, Any],
        model_response: ModelResponse,
        print_verbose: Callable[..., Any],
        encoding: Any,
        api_key: str | None,
        logging_obj: Any,
        optional_params: dict[str, Any],
        acompletion: bool | None = None,
        litellm_params: dict[str, Any] | None = None,
        logger_fn: Callable[..., Any] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float | httpx.Timeout | None = None,
        client: Any = None,
    ) -> Iterator[GenericStreamingChunk]:
        request = self.prepare(
            model=model,
            messages=messages,
            api_base=api_base,
            api_key=api_key,
            optional_params=optional_params,
            litellm_params=litellm_params,
            headers=headers,
            timeout=timeout,
            stream=True,
        )
        self._pre_call(logging_obj, request)
        state = StreamState(request)
        try:
            with self.sync_client().stream(
                "POST",
                request.url,
                json=request.payload,
                headers=request.headers,
                timeout=request.timeout,
            ) as response:
                if response.status_code != 200:
                    body = response.read().decode("utf-8", errors="replace")
                    raise self.response_error(request, response.status_code, body)
                for line in response.iter_lines():
                    event = self._event(request, response.status_code, line)
                    if event is None:
                        continue
                    text = state.on_event(event)
                    if text:
                        yield text_chunk(text)
                    if state.stopped:
                        break
        except httpx.TransportError as exc:
            raise self.transport_error(request, exc) from exc
        except GeneratorExit:
            log.info(
                "%s: consumer stopped the stream early; upstream request closed", request.context()
            )
            raise
        yield state.final_chunk()


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
