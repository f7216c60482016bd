"""One check of a fleet's per-replica speed factors, for every settings class that takes them
(the embedded stack, ``triage bench``, ``decisions.py``)."""

from __future__ import annotations

import math


def check_speeds(speeds: list[float], replicas: int) -> list[float]:
    """``speeds`` for ``replicas`` replicas: empty means all 1.0; otherwise one finite value
    > 0 per replica (ValueError naming what is wrong)."""
    if not speeds:
        return [1.0] * replicas
    if len(speeds) != replicas:
        raise ValueError(f"{len(speeds)} speeds for {replicas} replicas")
    if any(not (math.isfinite(s) and s > 0) for s in speeds):
        raise ValueError("every speed must be finite and > 0")
    return speeds
