"""Load scenarios as pure schedules: the offered load (a fraction of the fleet's capacity) at each
moment of a run. The Locust shape (``locustfile.ScenarioShape``) turns them into user counts.

| scenario | offered load over ``duration_s`` |
|---|---|
| ``steady`` | ``load`` throughout |
| ``skewed`` | the same as steady; meant for a fleet of unequal speeds (e.g. 1, 1, 0.5) |
| ``ramp`` | linear from ``ramp_from`` to ``ramp_to`` |
| ``burst`` | ``load``, but ``burst_load`` (overload) from ``burst_at_s`` for ``burst_s`` |
| ``kill`` | ``load`` throughout; one replica is killed (SIGKILL) at ``kill_at_s`` |

Every scenario then drains for ``drain_s``: no new requests, the ones in flight finish (a
request still running at the end is reported as cut by the run's end; the Locust shape ends the
drain early once every request is answered).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ScenarioKind = Literal["steady", "skewed", "ramp", "burst", "kill"]
SCENARIOS: tuple[ScenarioKind, ...] = ("steady", "skewed", "ramp", "burst", "kill")


@dataclass(frozen=True)
class Scenario:
    kind: ScenarioKind = "steady"
    duration_s: float = 60.0
    load: float = 0.85
    ramp_from: float = 0.1
    ramp_to: float = 1.2
    burst_load: float = 2.0
    burst_at_s: float = 20.0
    burst_s: float = 10.0
    kill_at_s: float = 20.0
    drain_s: float = 15.0

    def __post_init__(self) -> None:
        if self.kind not in SCENARIOS:
            raise ValueError(f"scenario must be one of {', '.join(SCENARIOS)}, not {self.kind!r}")
        for name in ("duration_s", "drain_s", "burst_s", "burst_at_s", "kill_at_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0")
        for name in ("load", "ramp_from", "ramp_to", "burst_load"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0 <= value <= 20):
                raise ValueError(f"{name} must be a fraction of capacity in [0, 20]")
        if self.duration_s <= 0:
            raise ValueError("duration_s must be > 0")
        if self.kind == "kill" and self.kill_at_s >= self.duration_s:
            raise ValueError("kill_at_s must fall inside the run (< duration_s)")

    @property
    def end_s(self) -> float:
        return self.duration_s + self.drain_s

    def load_at(self, t: float) -> float | None:
        """The offered fraction of capacity at ``t`` seconds; 0 while draining; None after."""
        if t >= self.end_s:
            return None
        if t >= self.duration_s:
            return 0.0
        match self.kind:
            case "ramp":
                return self.ramp_from + (self.ramp_to - self.ramp_from) * t / self.duration_s
            case "burst" if self.burst_at_s <= t < self.burst_at_s + self.burst_s:
                return self.burst_load
            case _:
                return self.load

    def users_at(self, t: float, capacity_rps: float, user_rps: float) -> int | None:
        """Users (each a Poisson source of ``user_rps``) that offer ``load_at(t)`` x capacity."""
        load = self.load_at(t)
        if load is None:
            return None
        return math.ceil(load * capacity_rps / user_rps - 1e-9) if load > 0 else 0

    def offered_requests(self, capacity_rps: float) -> float:
        """Requests the schedule offers in total (the integral of load x capacity)."""
        if self.kind == "ramp":
            mean = (self.ramp_from + self.ramp_to) / 2
            return mean * capacity_rps * self.duration_s
        if self.kind == "burst":
            inside = max(0.0, min(self.burst_s, self.duration_s - self.burst_at_s))
            return capacity_rps * (
                self.load * (self.duration_s - inside) + self.burst_load * inside
            )
        return self.load * capacity_rps * self.duration_s

    def events(self) -> list[tuple[float, str]]:
        """Marks for the plots: (seconds from the start, label)."""
        marks: list[tuple[float, str]] = []
        if self.kind == "burst":
            marks += [(self.burst_at_s, "burst"), (self.burst_at_s + self.burst_s, "burst end")]
        marks.append((self.duration_s, "drain"))
        return marks
