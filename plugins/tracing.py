"""OpenTelemetry spans of a request's way through the plugins, joined to LiteLLM's own trace.

With LiteLLM's ``otel`` callback on (``litellm_settings.callbacks: ["otel"]``, the
``opentelemetry-sdk`` installed: ``pip install "triage[otel]"``), LiteLLM opens a server span
per proxy request (``Received Proxy Server Request``, continuing an incoming ``traceparent``)
and sets the global tracer provider; the plugins' spans become its children:

* ``triage.admit``: the admission gate's decision (``triage.admission.outcome`` admitted,
  queued then admitted, or shed; the wait), with the replica the gate reserved in the same call;
* ``triage.pick``: one routing decision per attempt (``triage.replica``, its ``triage.score``,
  ``triage.pick.source`` redis / gate / local, ``triage.retry`` for a retry after a failure);
* ``triage.upstream``: one per upstream attempt to a replica's Triton (``triage.replica``,
  the status, the events received); a retry or a stream restarted elsewhere is a new one.

Attributes are ids, counts and outcomes only: never prompt or completion text. Without the
callback (or without the SDK) the API's tracer does nothing and costs a function call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, StatusCode

TRACER = trace.get_tracer("triage")
_API_TRACER = TRACER  # a test may put its own tracer in TRACER: then it is used as is
PARENT_KEY = "litellm_parent_otel_span"
"""Where LiteLLM's proxy puts its request span (``litellm_pre_call_utils``): the request's
``metadata`` (or ``litellm_metadata``)."""

Attribute = str | bool | int | float


def parent_span(data: Mapping[str, Any] | None) -> Span | None:
    """LiteLLM's span of this request, from a request's data or a call's ``litellm_params``."""
    if not data:
        return None
    for where in ("metadata", "litellm_metadata"):
        metadata = data.get(where)
        if isinstance(metadata, Mapping) and isinstance(metadata.get(PARENT_KEY), Span):
            return metadata[PARENT_KEY]
    return None


def _attributes(values: Mapping[str, Attribute | None]) -> dict[str, Attribute]:
    return {key: value for key, value in values.items() if value is not None}


def enabled() -> bool:
    """Whether an SDK tracer provider is set (LiteLLM's otel callback sets one): without it
    the plugins make no span and touch no context (nothing on the request path)."""
    return not isinstance(
        trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider
    )


@contextmanager
def span(name: str, parent: Span | None, **attributes: Attribute | None) -> Iterator[Span]:
    """A span named ``name`` under ``parent`` (the current one without), current inside the
    block; an exception leaving the block is recorded on it, and marks it an error."""
    if not enabled() and TRACER is _API_TRACER:
        yield trace.INVALID_SPAN
        return
    context = trace.set_span_in_context(parent) if parent is not None else None
    with TRACER.start_as_current_span(
        name,
        context=context,
        attributes=_attributes(_dotted(attributes)),
        record_exception=False,  # a message may quote upstream text: the type only, below
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except BaseException as exc:
            failed(current, exc)
            raise


def failed(current: Span, exc: BaseException) -> None:
    """Mark ``current`` failed by ``exc``: its type, never its message (which may quote an
    upstream answer's text)."""
    current.set_attribute("triage.error", type(exc).__name__)
    current.set_status(StatusCode.ERROR, type(exc).__name__)


def start_span(name: str, parent: Span | None, **attributes: Attribute | None) -> Span:
    """A span that is not made current (one that outlives a generator's steps): the caller
    ends it."""
    if not enabled() and TRACER is _API_TRACER:
        return trace.INVALID_SPAN
    context = trace.set_span_in_context(parent) if parent is not None else None
    return TRACER.start_span(name, context=context, attributes=_attributes(_dotted(attributes)))


def annotate(**attributes: Attribute | None) -> None:
    """Set attributes on the current span (e.g. the pick's score, inside ``triage.pick``)."""
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes(_attributes(_dotted(attributes)))


def _dotted(attributes: Mapping[str, Attribute | None]) -> dict[str, Attribute | None]:
    """``replica=...`` -> ``triage.replica``; ``pick__source=...`` -> ``triage.pick.source``."""
    return {f"triage.{key.replace('__', '.')}": value for key, value in attributes.items()}
