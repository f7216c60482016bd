"""Prometheus metrics of the admission plugin (on the proxy's ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ADMITTED = Counter(
    "triage_admission_admitted", "Requests admitted", ["model", "path"]
)  # path: direct | queued | local
QUEUED = Counter("triage_admission_queued", "Requests that had to wait in the queue", ["model"])
SHED = Counter("triage_admission_shed", "Requests answered 503 by the gateway", ["model", "reason"])
QUEUE_WAIT = Histogram(
    "triage_admission_queue_wait_seconds",
    "Time spent in the gateway queue (admitted or not)",
    ["model", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DECISION = Histogram(
    "triage_admission_decision_seconds",
    "Time to the first admission decision, Redis included",
    ["model", "outcome", "source"],  # outcome: admitted | queued | shed;
    # source: redis (gate.lua) | memo (this process, from a recent answer) | fallback (no Redis)
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
RETRY_AFTER = Histogram(
    "triage_admission_retry_after_seconds",
    "Retry-After given with 503s",
    ["model"],
    buckets=(1, 2, 3, 5, 8, 13, 21, 30, 60),
)
OUTSTANDING = Gauge(
    "triage_admission_outstanding", "Admitted, unfinished requests (fleet-wide)", ["model"]
)
CAPACITY = Gauge("triage_admission_capacity", "Fleet capacity for the model", ["model"])
