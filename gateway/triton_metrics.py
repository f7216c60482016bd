"""Read one replica's load out of Triton's Prometheus text (prometheus-client's parser)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families

CounterPair = tuple[str, str]  # (cumulative duration in µs, completed requests)


@dataclass(frozen=True)
class EngineSample:
    source: Literal["trtllm", "triton"]
    waiting: int
    active: int
    max_active: int | None  # None: the metrics do not say (LLM-API path, plain Triton models)
    kv_fraction: float
    duration_us: float | None  # the first counter pair present, cumulative
    completed: float | None
    iterations: float | None = None
    """TensorRT-LLM's executor ``iteration_counter`` (cumulative), when exported."""


def _values(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by family name (the parser renames counter samples to ``<name>_total``)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (family.name, f"{family.name}_total"):
                out.setdefault(family.name, []).append((sample.labels, sample.value))
    return out


def _pick(
    values: dict[str, list[tuple[dict[str, str], float]]], name: str, model: str, **labels: str
) -> float | None:
    for sample_labels, value in values.get(name, []):
        if sample_labels.get("model") != model:
            continue
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    return None


def parse_engine_sample(
    text: str, model: str, engine_model: str, counter_pairs: list[CounterPair]
) -> EngineSample:
    """The load of ``model`` (routed name) whose engine metrics are labelled ``engine_model``.

    TensorRT-LLM gauges (``nv_trt_llm_*``) are the primary signal: the in-flight batcher takes
    requests off Triton's queue at once, so Triton's pending count alone under-reports. Triton's
    own queue (``nv_inference_pending_request_count``) is added to ``waiting`` in both cases.
    ``counter_pairs`` are tried in order; the first whose both counters exist gives the
    service-time counters.
    """
    values = _values(text)
    pending = _pick(values, "nv_inference_pending_request_count", model) or 0.0
    trt = "nv_trt_llm_request_metrics"
    active = _pick(values, trt, engine_model, request_type="active")
    duration_us = completed = None
    for duration_name, completed_name in counter_pairs:
        d = _pick(values, duration_name, model)
        if d is None:
            d = _pick(values, duration_name, engine_model)
        c = _pick(values, completed_name, model)
        if c is None:
            c = _pick(values, completed_name, engine_model)
        if d is not None and c is not None:
            duration_us, completed = d, c
            break
    if active is None:
        return EngineSample(
            source="triton",
            waiting=int(pending),
            active=0,
            max_active=None,
            kv_fraction=0.0,
            duration_us=duration_us,
            completed=completed,
        )
    waiting = _pick(values, trt, engine_model, request_type="waiting") or 0.0
    max_active = _pick(values, trt, engine_model, request_type="max")
    kv = _pick(
        values, "nv_trt_llm_kv_cache_block_metrics", engine_model, kv_cache_block_type="fraction"
    )
    iterations = _pick(
        values, "nv_trt_llm_general_metrics", engine_model, general_type="iteration_counter"
    )
    return EngineSample(
        source="trtllm",
        waiting=int(waiting + pending),
        active=int(active),
        max_active=int(max_active) if max_active else None,
        kv_fraction=min(1.0, max(0.0, kv or 0.0)),
        duration_us=duration_us,
        completed=completed,
        iterations=iterations,
    )
