"""A child process the stack owns: its own session, logged to a file, stopped for sure."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

log = logging.getLogger(__name__)


class StartError(RuntimeError):
    """A managed process did not become ready; the message carries the tail of its log."""


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

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.proc.pid

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
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
        """SIGTERM to the process group, then SIGKILL after ``grace_s``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s ignored SIGTERM for %.0f s: killing", self.name, grace_s)
                self.signal(signal.SIGKILL)
                self.proc.wait(timeout=10)
        # stragglers of the group (e.g. a python stub orphaned by the server)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # none left: fine
            os.killpg(self.proc.pid, signal.SIGKILL)


class Stoppable(Protocol):
    def stop(self) -> None: ...


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
