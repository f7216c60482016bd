"""``start_concurrently``: starts side by side, keeps the order, and stops the started parts
when one start fails."""

from __future__ import annotations

import threading
import time

import pytest

from gateway.process import StartError, start_concurrently


class Part:
    def __init__(self, name: str) -> None:
        self.name = name
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


def test_starts_side_by_side_in_the_given_order() -> None:
    barrier = threading.Barrier(3, timeout=5)  # all three must be running at once

    def start(name: str) -> Part:
        barrier.wait()
        return Part(name)

    began = time.monotonic()
    parts = start_concurrently({n: (lambda n=n: start(n)) for n in ("c", "a", "b")})
    assert list(parts) == ["c", "a", "b"]
    assert [p.name for p in parts.values()] == ["c", "a", "b"]
    assert time.monotonic() - began < 5


def test_a_failed_start_stops_the_others_and_raises_it() -> None:
    made: list[Part] = []

    def good(name: str) -> Part:
        made.append(Part(name))
        return made[-1]

    def bad() -> Part:
        raise StartError("replica-1 exited with code 1 before ready")

    with pytest.raises(StartError, match="replica-1 exited"):
        start_concurrently(
            {"replica-0": lambda: good("0"), "replica-1": bad, "replica-2": lambda: good("2")}
        )
    assert len(made) == 2 and all(p.stopped for p in made)
