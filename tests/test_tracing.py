"""OpenTelemetry spans of the plugins (``plugins/tracing.py``), joined to LiteLLM's trace.

In process, with the SDK's in-memory exporter: the helpers name, nest and annotate spans and
find LiteLLM's request span where LiteLLM puts it. End to end: the real proxy with LiteLLM's
``otel`` callback (its console exporter, the default, writes every finished span to the
proxy's output as JSON; a separate process is beyond an in-memory exporter's reach): one request
through the embedded stack is one trace, LiteLLM's server span at its root, with
``triage.admit``, ``triage.pick`` and ``triage.upstream`` in it, and no prompt text in any span.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from devstack.proxy_launcher import LiteLLMProxy, start_proxy
from devstack.stack import Stack
from plugins import tracing
from plugins.proxy_config import (
    ProxyOptions,
    ReplicaEndpoint,
    build_proxy_config,
    proxy_env,
    write_proxy_config,
)

SECRET_PROMPT = "the launch code is 0451"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("triage")
    original = tracing.TRACER
    tracing.TRACER = tracer  # type: ignore[assignment]
    try:
        yield memory
    finally:
        tracing.TRACER = original


def test_spans_nest_under_litellms_request_span_and_carry_ids_only(
    exporter: InMemorySpanExporter,
) -> None:
    proxy_span = tracing.TRACER.start_span("Received Proxy Server Request")
    data = {"metadata": {tracing.PARENT_KEY: proxy_span}}
    assert tracing.parent_span(data) is proxy_span
    assert tracing.parent_span({"litellm_metadata": {tracing.PARENT_KEY: proxy_span}})
    assert tracing.parent_span({"metadata": {}}) is None and tracing.parent_span(None) is None
    with tracing.span("triage.pick", tracing.parent_span(data), model="m"):
        tracing.annotate(replica="replica-1", pick__source="redis", score=512.0, absent=None)
    upstream = tracing.start_span("triage.upstream", proxy_span, replica="replica-1")
    upstream.end()
    with pytest.raises(RuntimeError), tracing.span("triage.admit", proxy_span):
        raise RuntimeError("shed")
    proxy_span.end()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root = spans["Received Proxy Server Request"]
    for name in ("triage.pick", "triage.upstream", "triage.admit"):
        assert spans[name].parent is not None and spans[name].parent.span_id == root.context.span_id
        assert spans[name].context.trace_id == root.context.trace_id
    assert dict(spans["triage.pick"].attributes or {}) == {
        "triage.model": "m",
        "triage.replica": "replica-1",
        "triage.pick.source": "redis",
        "triage.score": 512.0,
    }
    assert spans["triage.admit"].status.status_code == trace.StatusCode.ERROR


def finished_spans(log: Path) -> list[dict[str, Any]]:
    """The JSON spans the console exporter wrote among the proxy's other output."""
    text, decoder, spans, at = log.read_text(errors="replace"), json.JSONDecoder(), [], 0
    while (at := text.find("{", at)) >= 0:
        try:
            value, end = decoder.raw_decode(text, at)
        except ValueError:
            at += 1
            continue
        if isinstance(value, dict) and "context" in value and "name" in value:
            spans.append(value)
        at = end
    return spans


@pytest.fixture(scope="module")
def stack(small_stack: Stack) -> Stack:
    return small_stack


@pytest.fixture(scope="module")
def traced_proxy(stack: Stack) -> Iterator[LiteLLMProxy]:
    endpoints = [ReplicaEndpoint(rid, s.http_url) for rid, s in stack.replicas.items()]
    options = ProxyOptions(otel=True, num_retries=stack.settings.num_retries)
    config = build_proxy_config("standin", "standin", endpoints, options)
    path = write_proxy_config(config, stack.workdir / "proxy-otel.yaml")
    env = proxy_env(stack.redis_url(), stack.settings.key_prefix, stack.master_key)
    env["OTEL_EXPORTER"] = "console"
    proxy = start_proxy("otel", path, env, stack.workdir)
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.mark.integration
def test_one_request_is_one_trace_with_admit_pick_and_upstream(
    stack: Stack, traced_proxy: LiteLLMProxy
) -> None:
    response = httpx.post(
        f"{traced_proxy.base_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {stack.master_key}"},
        json={
            "model": "standin",
            "messages": [{"role": "user", "content": SECRET_PROMPT}],
            "max_tokens": 4,
        },
        timeout=60,
    )
    assert response.status_code == 200, response.text
    replica = response.headers["x-litellm-model-id"]
    log = traced_proxy.process.log_path
    spans: list[dict[str, Any]] = []
    for _ in range(50):  # the exporter writes as spans end; the server span ends last
        spans = finished_spans(log)
        if any(s["name"] == "Received Proxy Server Request" for s in spans):
            break
        time.sleep(0.1)
    by_name = {s["name"]: s for s in spans}
    root = by_name["Received Proxy Server Request"]
    trace_id = root["context"]["trace_id"]
    ours = {name: by_name[name] for name in ("triage.admit", "triage.pick", "triage.upstream")}
    for name, found in ours.items():
        assert found["context"]["trace_id"] == trace_id, name
    assert ours["triage.admit"]["parent_id"] == root["context"]["span_id"]
    assert ours["triage.admit"]["attributes"]["triage.admission.outcome"] == "admitted"
    assert ours["triage.pick"]["attributes"]["triage.replica"] == replica
    assert ours["triage.upstream"]["attributes"]["triage.replica"] == replica
    assert ours["triage.upstream"]["attributes"]["http.response.status_code"] == 200
    for name, found in ours.items():
        assert SECRET_PROMPT not in json.dumps(found), f"prompt text in {name}"
