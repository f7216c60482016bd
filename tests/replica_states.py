"""One factory of replica states for the routing and admission tests (what a sidecar publishes)."""

from __future__ import annotations

import time
from typing import Any

from core.keyschema import ReplicaState


def replica_state(replica_id: str = "r", ts_ms: int | None = None, **fields: Any) -> ReplicaState:
    """A fresh, healthy, idle replica with 4 slots and 100 ms service time; ``fields`` override.
    ``ts_ms`` (and ``sample_ts_ms``) default to now."""
    now = int(time.time() * 1000) if ts_ms is None else ts_ms
    base: dict[str, Any] = {
        "replica_id": replica_id,
        "model": "m",
        "api_base": f"http://{replica_id}",
        "waiting": 0,
        "active": 0,
        "max_active": 4,
        "kv_fraction": 0.0,
        "service_ms": 100.0,
        "drain_rps": None,
        "healthy": True,
        "state": "healthy",
        "source": "trtllm",
        "ts_ms": now,
        "sample_ts_ms": now,
    }
    base.update(fields)
    return ReplicaState(**base)
