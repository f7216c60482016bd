"""Read one replica's load out of Triton's Prometheus text (prometheus-client's parser).

Only what a real TensorRT-LLM replica exports is read (the facts, with the upstream files and
commits they come from, are in ``tests/fixtures/upstream/``):

* ``nv_trt_llm_request_metrics`` of the engine model (``tensorrt_llm``): ``active`` = the
  executor's active requests, ``max`` = its cap on active requests, ``scheduled`` = requests in
  this iteration's batch; ``waiting`` = active - scheduled is a *subset* of active, so it is not
  added to anything. Requests beyond ``max`` wait in the executor's queue, which no metric shows.
* ``nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction"}``,
  ``nv_trt_llm_general_metrics{general_type="iteration_counter"}``.
* Triton's per-model counters: the routed model's ``nv_inference_request_success`` +
  ``nv_inference_request_failure`` count *finished* requests when the routed model is an ensemble
  (Triton reports an ensemble's statistics when the whole ensemble request ends) or the C++
  TensorRT-LLM backend (it reports a request's statistics with its final response); the
  ``preprocessing`` step's ``nv_inference_request_success`` counts requests that reached the
  engine step (a non-decoupled model reports when ``execute`` returns). Their difference, less
  ``active``, is the executor's hidden queue (``sidecar/backlog.py``).
* ``nv_inference_pending_request_count``: Triton's own scheduler queue (about 0 for the decoupled
  ``tensorrt_llm`` model and the ensemble, but not for a model with a ``default_queue_policy``
  that holds requests, e.g. the stand-in in ``block`` mode or a plain Triton model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families

TRT_REQUESTS = "nv_trt_llm_request_metrics"
TRT_KV = "nv_trt_llm_kv_cache_block_metrics"
TRT_GENERAL = "nv_trt_llm_general_metrics"
PENDING = "nv_inference_pending_request_count"
SUCCESS = "nv_inference_request_success"
FAILURE = "nv_inference_request_failure"
DEFAULT_ARRIVALS_MODEL = "preprocessing"
"""The stock ensemble's first step: its successes are the requests handed to the engine."""

Samples = dict[str, list[tuple[dict[str, str], float]]]


@dataclass(frozen=True)
class EngineSample:
    source: Literal["trtllm", "triton"]
    active: int
    """The executor's active requests (``waiting`` ones included); 0 without engine gauges."""
    max_active: int | None
    """The executor's cap on active requests (``max``); None: the metrics do not say."""
    scheduled: int | None
    """Requests in the engine's last iteration batch (bounded by the batch size)."""
    pending: int
    """Triton's own queue in front of the routed model and the engine model."""
    kv_fraction: float
    kv_tokens: int | None = None
    """KV-cache capacity in tokens (``max`` blocks x ``tokens_per`` block), when exported."""
    iterations: float | None = None
    """TensorRT-LLM's executor ``iteration_counter`` (cumulative), when exported."""
    completions: float | None = None
    """Requests the routed model finished so far (success + failure), cumulative."""
    arrivals: float | None = None
    """Requests handed to the engine step so far (the arrivals model's successes), cumulative."""
    engine_model: str | None = None
    """The model label the engine gauges were read under (None: no engine gauges)."""


def parse_samples(text: str) -> Samples:
    """Samples by family name (the parser renames counter samples to ``<name>_total``)."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (family.name, f"{family.name}_total"):
                out.setdefault(family.name, []).append((sample.labels, sample.value))
    return out


def pick(values: Samples, name: str, model: str, **labels: str) -> float | None:
    """The value of family ``name`` for ``model`` with ``labels``; summed over versions."""
    found = [
        value
        for sample_labels, value in values.get(name, [])
        if sample_labels.get("model") == model
        and all(sample_labels.get(k) == v for k, v in labels.items())
    ]
    return sum(found) if found else None


def engine_models(values: Samples) -> list[str]:
    """The model labels that carry TensorRT-LLM request gauges, sorted."""
    return sorted({labels.get("model", "") for labels, _ in values.get(TRT_REQUESTS, [])} - {""})


def resolve_engine_model(values: Samples, model: str, engine_model: str | None) -> str | None:
    """The configured engine model; else the routed model if it has the gauges; else the only
    model that has them; else None (no gauges, or several engines and none configured)."""
    if engine_model is not None:
        return engine_model
    engines = engine_models(values)
    if model in engines:
        return model
    return engines[0] if len(engines) == 1 else None


def _int(value: float | None) -> int:
    return int(value) if value is not None and value > 0 else 0


def parse_engine_sample(
    text: str,
    model: str,
    engine_model: str | None = None,
    arrivals_model: str | None = DEFAULT_ARRIVALS_MODEL,
) -> EngineSample:
    """The load of ``model`` (routed name) whose engine gauges are labelled ``engine_model``
    (None: detect, see ``resolve_engine_model``)."""
    values = parse_samples(text)
    engine = resolve_engine_model(values, model, engine_model)
    pending = _int(pick(values, PENDING, model))
    if engine is not None and engine != model:
        pending += _int(pick(values, PENDING, engine))
    success = pick(values, SUCCESS, model)
    failure = pick(values, FAILURE, model)
    completions = None if success is None else success + (failure or 0.0)
    arrivals = pick(values, SUCCESS, arrivals_model) if arrivals_model else None
    active = pick(values, TRT_REQUESTS, engine, request_type="active") if engine else None
    if engine is None or active is None:
        return EngineSample(
            source="triton",
            active=0,
            max_active=None,
            scheduled=None,
            pending=pending,
            kv_fraction=0.0,
            completions=completions,
            arrivals=arrivals,
        )
    max_active = pick(values, TRT_REQUESTS, engine, request_type="max")
    scheduled = pick(values, TRT_REQUESTS, engine, request_type="scheduled")
    kv = pick(values, TRT_KV, engine, kv_cache_block_type="fraction")
    kv_max = pick(values, TRT_KV, engine, kv_cache_block_type="max")
    kv_tokens_per = pick(values, TRT_KV, engine, kv_cache_block_type="tokens_per")
    iterations = pick(values, TRT_GENERAL, engine, general_type="iteration_counter")
    return EngineSample(
        source="trtllm",
        active=_int(active),
        max_active=_int(max_active) or None,  # 0 = not reported yet
        scheduled=None if scheduled is None else _int(scheduled),
        pending=pending,
        kv_fraction=min(1.0, max(0.0, kv or 0.0)),
        kv_tokens=_int(kv_max) * _int(kv_tokens_per) or None,
        iterations=iterations,
        completions=completions,
        arrivals=arrivals,
        engine_model=engine,
    )
