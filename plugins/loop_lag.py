"""How late the proxy's event loop runs a timer: the time it was busy with other work.

Every coroutine in a LiteLLM proxy process shares one event loop, so a plugin's await (a Redis
reply, a grant) resumes only when the loop gets to it. An admission decision that takes one
0.3 ms Redis round trip can still take tens of ms at the proxy when LiteLLM's own request
handling holds the loop. ``triage_proxy_event_loop_lag_seconds`` shows that share directly:
a timer due every ``interval_s`` records how late it ran.
"""

from __future__ import annotations

import asyncio

from prometheus_client import Histogram

LOOP_LAG = Histogram(
    "triage_proxy_event_loop_lag_seconds",
    "How late the proxy's event loop ran a timer (it was busy with other work meanwhile)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)

INTERVAL_S = 0.05


class LoopLagMonitor:
    """One per proxy process; ``ensure_started`` from inside the running loop."""

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            LOOP_LAG.observe(max(0.0, loop.time() - due))

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None


MONITOR = LoopLagMonitor()
