"""Restart crashed parts of the embedded stack, with exponential backoff.

A pure policy (``BackoffPolicy``: how long to wait before the next restart) and a loop
(``Supervisor``: notices a part that exited, waits, restarts it, repeats). The parts restart
themselves on the same ports (``Supervised.restart``), so nothing that names their URLs (the
proxies' config, the sidecars, ``stack.json``) has to change.

The loop runs in the caller's thread (``triage up``'s main thread), so a restart never races the
final ``Stack.stop``; a signal cancels a restart under way (``core.process.cancel_starts``).
Restarts are sequential: while one part waits for readiness, the others are not looked at.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from core.process import StartCancelled

log = logging.getLogger(__name__)


class Supervised(Protocol):
    def alive(self) -> bool: ...

    def exit_status(self) -> str:
        """How it ended, e.g. ``killed by SIGKILL`` (for the log)."""
        ...

    def restart(self) -> None:
        """Clean up what the dead process left, start it again, wait until it is ready;
        raise (``StartError``) when it does not become ready."""
        ...


@dataclass(frozen=True)
class BackoffPolicy:
    """Delay before restart number n of a run of crashes: ``initial_s * factor**(n-1)``, at
    most ``max_s``. A part that stayed up ``reset_after_s`` before it crashed starts a new run."""

    initial_s: float = 1.0
    factor: float = 2.0
    max_s: float = 30.0
    reset_after_s: float = 60.0

    def delay_s(self, failures: int) -> float:
        """Wait before the restart that follows the ``failures``-th failure in a row (>= 1)."""
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        return min(self.max_s, self.initial_s * self.factor ** (failures - 1))

    def failures_after_crash(self, failures: int, uptime_s: float) -> int:
        """The run length after a crash that came ``uptime_s`` after the part was (re)started."""
        return 1 if uptime_s >= self.reset_after_s else failures + 1


@dataclass
class _Watch:
    part: Supervised
    up_since: float
    failures: int = 0
    restart_at: float | None = None
    """When a restart is due; None while the part runs."""


class Supervisor:
    """Watches ``parts`` (name -> part, checked in this order); ``check`` is one tick."""

    def __init__(
        self,
        parts: Mapping[str, Supervised],
        policy: BackoffPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.policy = policy or BackoffPolicy()
        self.clock = clock
        self.on_restart = on_restart
        now = clock()
        self.watches = {name: _Watch(part, up_since=now) for name, part in parts.items()}
        self.restarts: dict[str, int] = dict.fromkeys(parts, 0)
        """Successful restarts per part so far."""

    def check(self) -> None:
        """Schedule a restart for each part found dead; run the restarts that are due.
        ``StartCancelled`` (the stack is stopping) propagates; other failures are retried."""
        for name, watch in self.watches.items():
            now = self.clock()
            if watch.restart_at is None:
                if watch.part.alive():
                    continue
                uptime = now - watch.up_since
                watch.failures = self.policy.failures_after_crash(watch.failures, uptime)
                delay = self.policy.delay_s(watch.failures)
                watch.restart_at = now + delay
                log.warning(
                    "%s crashed (%s) after %.1f s up; restart in %.1f s (failure %d in a row)",
                    name,
                    watch.part.exit_status(),
                    uptime,
                    delay,
                    watch.failures,
                )
            elif now >= watch.restart_at:
                self._restart(name, watch)

    def _restart(self, name: str, watch: _Watch) -> None:
        began = self.clock()
        log.info("restarting %s (failure %d in a row)", name, watch.failures)
        try:
            watch.part.restart()
        except StartCancelled:
            raise
        except Exception as exc:
            watch.failures += 1
            delay = self.policy.delay_s(watch.failures)
            watch.restart_at = self.clock() + delay
            log.error(
                "restart of %s failed after %.1f s: %s; next try in %.1f s (failure %d in a row)",
                name,
                self.clock() - began,
                exc,
                delay,
                watch.failures,
                exc_info=not isinstance(exc, RuntimeError),
            )
            return
        watch.restart_at = None
        watch.up_since = self.clock()
        self.restarts[name] += 1
        log.warning(
            "%s restarted: ready %.1f s after the restart began (restart %d)",
            name,
            watch.up_since - began,
            self.restarts[name],
        )
        if self.on_restart is not None:
            self.on_restart(name)

    def run(self, stop: threading.Event, interval_s: float = 0.25) -> None:
        """Check every ``interval_s`` until ``stop`` is set."""
        while not stop.wait(interval_s):
            self.check()
