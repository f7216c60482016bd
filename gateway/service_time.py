"""Mean service time and drain rate from cumulative counters over a sliding window."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class ServiceTimeWindow:
    """Feed (time, cumulative duration µs, cumulative completions); read the window's means.

    ``service_ms`` = Δduration / Δcompleted over the last ``window_s`` seconds (kept from the
    previous window while nothing completes, so an idle replica keeps its measured speed);
    ``drain_rps`` = Δcompleted / Δt. A counter that goes down (server restart) resets the window.
    """

    window_s: float = 10.0
    samples: deque[tuple[float, float, float]] = field(default_factory=deque)
    last_service_ms: float | None = None

    def add(self, t: float, duration_us: float, completed: float) -> None:
        if self.samples and (duration_us < self.samples[-1][1] or completed < self.samples[-1][2]):
            self.samples.clear()
        self.samples.append((t, duration_us, completed))
        while len(self.samples) > 2 and self.samples[1][0] <= t - self.window_s:
            self.samples.popleft()
        first, last = self.samples[0], self.samples[-1]
        done = last[2] - first[2]
        if done > 0:
            self.last_service_ms = (last[1] - first[1]) / done / 1000.0

    @property
    def service_ms(self) -> float | None:
        return self.last_service_ms

    @property
    def drain_rps(self) -> float | None:
        if len(self.samples) < 2:
            return None
        first, last = self.samples[0], self.samples[-1]
        elapsed = last[0] - first[0]
        return (last[2] - first[2]) / elapsed if elapsed > 0 else None


@dataclass
class StepTimeWindow:
    """Engine time per iteration (ms), from TensorRT-LLM's cumulative ``iteration_counter``.

    One in-flight-batching iteration produces one token of every sequence in the batch, so the
    busy time per iteration is the replica's time per token: a speed measure independent of how
    long the requests are (a per-request mean mixes speed with request sizes, so a replica that
    last served long requests would look slow). Only intervals busy at both ends count (an idle
    engine does not iterate); the value is kept while the replica is idle, since speed is a
    property of the replica, not of its current load.
    """

    window_s: float = 10.0
    min_iterations: float = 50.0
    """Publish only from this many busy iterations in the window: a few short requests give
    estimates noisy enough to send a whole idle fleet's traffic to one replica."""
    intervals: deque[tuple[float, float, float]] = field(default_factory=deque)
    previous: tuple[float, float, bool] | None = None
    last_step_ms: float | None = None

    def add(self, t: float, iterations: float, busy: bool) -> None:
        previous, self.previous = self.previous, (t, iterations, busy)
        if previous is None:
            return
        t0, it0, busy0 = previous
        done = iterations - it0
        if done < 0:  # the counter went back: the server restarted
            self.intervals.clear()
            return
        if busy0 and busy and done > 0 and t > t0:
            self.intervals.append((t, t - t0, done))
        while self.intervals and self.intervals[0][0] <= t - self.window_s:
            self.intervals.popleft()
        steps = sum(interval[2] for interval in self.intervals)
        if self.intervals and steps >= self.min_iterations:
            elapsed = sum(interval[1] for interval in self.intervals)
            self.last_step_ms = elapsed / steps * 1000.0

    @property
    def step_ms(self) -> float | None:
        return self.last_step_ms
