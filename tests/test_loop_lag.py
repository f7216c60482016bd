"""The event-loop lag monitor records how long the loop was held by other work."""

from __future__ import annotations

import asyncio
import time

from plugins.loop_lag import LOOP_LAG, LoopLagMonitor


def lag_count_above(seconds: float) -> float:
    total = above = 0.0
    for metric in LOOP_LAG.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                if bound == float("inf"):
                    total = sample.value
                elif bound == seconds:
                    above = sample.value
    return total - above


async def test_a_blocked_loop_is_recorded_as_lag() -> None:
    monitor = LoopLagMonitor(interval_s=0.01)
    before = lag_count_above(0.05)
    monitor.ensure_started()
    monitor.ensure_started()  # one task, not two
    await asyncio.sleep(0.03)
    time.sleep(0.12)  # some other work holds the loop
    await asyncio.sleep(0.03)
    monitor.stop()
    assert lag_count_above(0.05) - before == 1
