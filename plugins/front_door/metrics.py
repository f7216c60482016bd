"""Prometheus metrics of the front door (on the proxy's ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REJECTED = Counter(
    "triage_front_door_rejected",
    "Requests the front door answered itself, before LiteLLM",
    ["reason"],  # request_too_large | shed | unauthorized | a validation code (invalid_json, ...)
)
CANCELLED = Counter(
    "triage_front_door_cancelled",
    "Requests cancelled because their client went away before the answer was complete",
)
DECISION = Histogram(
    "triage_front_door_shed_seconds",
    "From the request reaching the front door (before its body is read) to its early answer",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025),
)
