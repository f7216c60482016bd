"""``start_concurrently``: starts side by side, keeps the order, and stops the started parts
when one start fails; ``stop_concurrently``; ``ManagedProcess.stop`` clears the process group of
a leader killed from outside; ``cancel_starts`` cuts a readiness wait short."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.process import (
    ManagedProcess,
    StartCancelled,
    StartError,
    allow_starts,
    cancel_starts,
    describe_returncode,
    group_members,
    start_concurrently,
    stop_concurrently,
)


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


def test_stop_concurrently_stops_side_by_side_and_survives_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    barrier = threading.Barrier(2, timeout=5)  # both stops must run at once

    class Slow(Part):
        def stop(self) -> None:
            barrier.wait()
            super().stop()

    class Broken(Part):
        def stop(self) -> None:
            raise OSError("no such process group")

    slow = [Slow("a"), Slow("b")]
    stop_concurrently([slow[0], None, Broken("x"), slow[1]])
    assert all(p.stopped for p in slow)
    assert "could not stop" in caplog.text and "no such process group" in caplog.text


def test_describe_returncode() -> None:
    assert describe_returncode(None) == "running"
    assert describe_returncode(0) == "exit code 0"
    assert describe_returncode(-signal.SIGKILL) == "killed by SIGKILL"


def test_stop_kills_what_is_left_of_the_group_of_a_dead_leader(tmp_path: Path) -> None:
    """The leader SIGKILLed from outside (a crashed tritonserver): its child (a python stub)
    lives on in the group; ``stop`` kills it and returns once it is gone."""
    process = ManagedProcess("leader", ["sh", "-c", "sleep 60 & wait"], tmp_path / "leader.log")
    process.start()
    deadline = time.monotonic() + 5
    while len(group_members(process.pid)) < 2:
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.02)
    (orphan,) = (pid for pid in group_members(process.pid) if pid != process.pid)
    os.kill(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while process.alive():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert process.exit_status() == "killed by SIGKILL"
    assert group_members(process.pid) == [orphan]
    process.stop()
    assert group_members(process.pid) == []


@pytest.fixture
def starts_allowed_after() -> Iterator[None]:
    try:
        yield
    finally:
        allow_starts()


@pytest.mark.usefixtures("starts_allowed_after")
def test_cancel_starts_cuts_a_readiness_wait_short(tmp_path: Path) -> None:
    process = ManagedProcess("never-ready", ["sleep", "60"], tmp_path / "never.log")
    process.start()
    threading.Timer(0.3, cancel_starts).start()
    began = time.monotonic()
    with pytest.raises(StartCancelled, match="never-ready: start cancelled before ready"):
        process.wait_until(lambda: False, timeout_s=30, what="ready")
    assert time.monotonic() - began < 2
    assert not process.alive() and process.exit_status() == "killed by SIGTERM"
    with pytest.raises(StartCancelled, match="not started"):
        process.start()
    allow_starts()
    process.start()
    assert process.alive()
    process.stop()


def test_free_ports_lie_below_the_ephemeral_range() -> None:
    """An outgoing connection can take an ephemeral port between ``free_port`` and the server's
    bind; below the kernel's ephemeral range only another listener can."""
    import socket

    from core.paths import LISTEN_PORTS_FROM, ephemeral_ports, free_port

    low, high = ephemeral_ports()
    assert 0 < low <= high
    ports = {free_port() for _ in range(20)}
    if low - LISTEN_PORTS_FROM >= 1000:
        assert all(LISTEN_PORTS_FROM <= p < low for p in ports), sorted(ports)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_server_listening_on_several_ports_gets_distinct_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Triton's HTTP, gRPC and metrics ports: ``free_ports`` never repeats one, even when the
    random picks do (a CI run's Triton exited: "cannot listen to HTTP requests and GRPC requests
    at the same address and port")."""
    import core.paths as paths

    picks = iter([20001, 20001, 20002, 20001, 20003])
    monkeypatch.setattr(paths, "free_port", lambda host="127.0.0.1": next(picks))
    assert paths.free_ports(3) == [20001, 20002, 20003]
