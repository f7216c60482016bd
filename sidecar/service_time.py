"""Drain rate, mean request time and time per engine iteration, over sliding windows."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class CompletionWindow:
    """Feed (time, cumulative finished requests, active requests); read the window's rates.

    ``drain_rps`` = Δfinished / Δt over the last ``window_s`` seconds; ``request_ms`` = the mean
    time a request spends active in the engine, by Little's law: the time-average of ``active``
    over the window divided by the completion rate (= ∫active dt / Δfinished). It needs only
    the signals a real TensorRT-LLM replica exports (the ``active`` gauge and Triton's
    completion-timed counters), and it excludes the time a request waited in the executor's
    queue: with ``max_active`` it is the replica's throughput at full load. It is kept from the
    previous window while nothing finishes, so an idle replica keeps its measured value. A
    counter that goes down (server restart) resets the window.
    """

    window_s: float = 10.0
    samples: deque[tuple[float, float, float]] = field(default_factory=deque)
    """(t, finished, active-seconds integrated up to t)."""
    last_active: float = 0.0
    last_request_ms: float | None = None

    def add(self, t: float, finished: float, active: float) -> None:
        if self.samples and finished < self.samples[-1][1]:
            self.samples.clear()
        if self.samples:
            t0, _, area0 = self.samples[-1]
            # trapezoid between two polls: the gauge moved somewhere in between
            area = area0 + (t - t0) * (self.last_active + active) / 2.0
        else:
            area = 0.0
        self.last_active = active
        self.samples.append((t, finished, area))
        while len(self.samples) > 2 and self.samples[1][0] <= t - self.window_s:
            self.samples.popleft()
        first, last = self.samples[0], self.samples[-1]
        done = last[1] - first[1]
        if done > 0:
            self.last_request_ms = (last[2] - first[2]) / done * 1000.0

    @property
    def request_ms(self) -> float | None:
        return self.last_request_ms

    @property
    def drain_rps(self) -> float | None:
        if len(self.samples) < 2:
            return None
        first, last = self.samples[0], self.samples[-1]
        elapsed = last[0] - first[0]
        return (last[1] - first[1]) / elapsed if elapsed > 0 else None


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
