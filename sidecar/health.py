"""Debounced replica health: healthy → suspect → unhealthy (the one health policy)."""

from __future__ import annotations

from dataclasses import dataclass

from core.keyschema import HealthState


@dataclass
class HealthDebounce:
    """Unhealthy only after ``threshold`` consecutive failed polls; one success resets.

    A replica that never answered a poll is unhealthy: "not yet seen" is not "healthy".
    """

    threshold: int = 3
    ever_healthy: bool = False
    consecutive_failures: int = 0

    def observe(self, ok: bool) -> HealthState:
        if ok:
            self.ever_healthy = True
            self.consecutive_failures = 0
        else:
            self.consecutive_failures += 1
        return self.state

    @property
    def state(self) -> HealthState:
        if not self.ever_healthy or self.consecutive_failures >= self.threshold:
            return "unhealthy"
        return "suspect" if self.consecutive_failures else "healthy"

    @property
    def healthy(self) -> bool:
        return self.state != "unhealthy"
