"""A child process the stack owns: its own session, logged to a file, stopped for sure.

Every child leads its own process group (``start_new_session``), so whatever it forks (Triton's
python-backend stubs) is in that group too: ``stop`` signals the whole group and waits until no
member is left, also when the leader itself is already dead (SIGKILLed from outside: its stubs
are then orphans that only the group still names).

``cancel_starts`` (called by ``triage up`` on SIGINT / SIGTERM / SIGHUP) makes every start or
readiness wait under way, in any thread, stop its process and raise ``StartCancelled`` within
0.1 s, so a signal during start-up or a supervised restart does not wait for a deadline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)


GROUP_EXIT_TIMEOUT_S = 5.0
"""How long ``stop`` waits for the members of a SIGKILLed process group to be gone."""


class StartError(RuntimeError):
    """A managed process did not become ready; the message carries the tail of its log."""


class StartCancelled(StartError):
    """A start or readiness wait was cut short by ``cancel_starts`` (the stack is stopping)."""


_starts_cancelled = threading.Event()


def cancel_starts() -> None:
    """From now on every ``ManagedProcess.start`` / ``wait_until`` raises ``StartCancelled``
    (after stopping its process). Safe to call from a signal handler."""
    _starts_cancelled.set()


def allow_starts() -> None:
    """Undo ``cancel_starts`` (for a process that goes on starting things, e.g. tests)."""
    _starts_cancelled.clear()


def starts_cancelled() -> bool:
    return _starts_cancelled.is_set()


def describe_returncode(code: int | None) -> str:
    """``exit code 1`` / ``killed by SIGKILL`` / ``running`` (Popen's negative = signal)."""
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``, from ``/proc`` (Linux)."""
    members: list[int] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # exited while we looked, or not ours to read: not a member we can stop
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) >= 3 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._group_gone = False
        """The process was reaped and its group found empty: its id may name another process
        group by now, so ``stop`` must not signal it again."""

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.proc.pid

    def exit_status(self) -> str:
        if self.proc is None:
            return "not started"
        return describe_returncode(self.proc.poll())

    def start(self) -> None:
        if starts_cancelled():
            raise StartCancelled(f"{self.name} not started: the stack is stopping")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._group_gone = False
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # its own process group: children (python stubs) die too
            )
        log.info("started %s pid=%d: %s", self.name, self.proc.pid, " ".join(self.argv))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Poll ``ready`` until it is true; raise StartError (and stop) on exit or deadline."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if starts_cancelled():
                self.stop()
                raise StartCancelled(f"{self.name}: start cancelled before {what} (stopping)")
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                self.stop()
                raise StartError(
                    f"{self.name} exited with code {code} before {what}; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            try:
                if ready():
                    return
            except Exception as exc:  # connection refused while it boots
                log.debug("%s not ready yet: %s", self.name, exc)
            time.sleep(0.1)
        self.stop()
        raise StartError(
            f"{self.name} not {what} after {timeout_s:.0f} s; log {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):  # exited since alive()
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL at once (for crash tests); ``stop`` still reaps it."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the process group, then SIGKILL after ``grace_s``; then SIGKILL to what is
        left of the group (a python stub orphaned by its dead server) and wait until it is gone."""
        if self.proc is None or self._group_gone:
            return
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %.0f s: killing", self.name, grace_s)
                self.signal(signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._kill_group_stragglers()

    def _kill_group_stragglers(self) -> None:
        assert self.proc is not None
        pgid = self.proc.pid
        left = group_members(pgid)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            self._group_gone = True  # the group is empty: the usual case after a clean exit
            return
        except PermissionError as exc:  # not ours: the id names someone else's group by now
            log.warning("%s: cannot signal process group %d: %s", self.name, pgid, exc)
            return
        if not left:
            self._group_gone = True  # only zombies were left (or there is no /proc)
            return
        log.info("%s: killed processes %s left in its process group", self.name, left)
        deadline = time.monotonic() + GROUP_EXIT_TIMEOUT_S
        while left := group_members(pgid):
            if time.monotonic() > deadline:
                log.error(
                    "%s: processes %s of its group outlived SIGKILL for %.0f s",
                    self.name,
                    left,
                    GROUP_EXIT_TIMEOUT_S,
                )
                return
            time.sleep(0.02)
        self._group_gone = True

    def restart(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        """Reap (and clear the group of) the old process, start the same argv again, wait."""
        self.stop()
        self.start()
        self.wait_until(ready, timeout_s, what)


class Stoppable(Protocol):
    def stop(self) -> None: ...


def stop_concurrently(parts: Iterable[Stoppable | None]) -> None:
    """``stop()`` every part side by side (each mostly waits for its process to exit); a part
    that fails to stop is logged and the others still stop."""
    todo = [part for part in parts if part is not None]
    if not todo:
        return

    def stop_one(part: Stoppable) -> None:
        try:
            part.stop()
        except Exception:
            log.exception("could not stop %r", part)

    if len(todo) == 1:
        stop_one(todo[0])
        return
    with ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="stop") as pool:
        list(pool.map(stop_one, todo))


S = TypeVar("S", bound=Stoppable)


def start_concurrently(starters: Mapping[str, Callable[[], S]]) -> dict[str, S]:
    """Run blocking ``start()`` calls side by side (each mostly waits for its process to be
    ready); the results in the order given. If any fails, the ones that started are stopped
    and the first failure is raised."""
    if len(starters) <= 1:
        return {name: start() for name, start in starters.items()}
    with ThreadPoolExecutor(max_workers=len(starters), thread_name_prefix="start") as pool:
        futures = {name: pool.submit(start) for name, start in starters.items()}
    started: dict[str, S] = {}
    failure: BaseException | None = None
    for name, future in futures.items():
        exc = future.exception()
        if exc is None:
            started[name] = future.result()
        elif failure is None:
            failure = exc
    if failure is not None:
        for part in started.values():
            try:
                part.stop()
            except Exception:
                log.exception("could not stop %r after a failed start", part)
        raise failure
    return started
