"""Run build steps with progress on the console and the full output in a log file per step."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from build_engines.commands import BuildStep

Echo = Callable[[str], None]


class StepFailed(RuntimeError):
    """A step exited non-zero; the message names it and carries the tail of its log."""

    def __init__(self, step: BuildStep, returncode: int, tail: list[str]) -> None:
        self.step = step
        self.returncode = returncode
        lines = "\n".join(f"    {line}" for line in tail)
        super().__init__(
            f"{step.name} failed with exit code {returncode}; log {step.log_path}; last lines:\n"
            f"{lines}"
        )


@dataclass(frozen=True)
class StepResult:
    name: str
    seconds: float
    log_path: str


def run_step(
    step: BuildStep,
    echo: Echo = print,
    heartbeat_s: float = 15.0,
    tail_lines: int = 20,
) -> StepResult:
    """Run one step: its output goes to ``step.log_path``; every ``heartbeat_s`` the console
    gets the elapsed time and the last line. Raises ``StepFailed`` on a non-zero exit."""
    step.log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    for key, value in step.env.items():
        env[key] = f"{value}{os.pathsep}{env[key]}" if env.get(key) else value
    tail: deque[str] = deque(maxlen=tail_lines)
    started = time.monotonic()
    with open(step.log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {step.shell()}\n")
        log.flush()
        proc = subprocess.Popen(
            step.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
            errors="replace",
        )
        assert proc.stdout is not None

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                tail.append(line.rstrip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        while True:
            try:
                proc.wait(timeout=heartbeat_s)
                break
            except subprocess.TimeoutExpired:
                last = tail[-1] if tail else ""
                echo(f"    ... {step.name} {time.monotonic() - started:.0f} s: {last[:120]}")
        reader.join()
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise StepFailed(step, proc.returncode, list(tail))
    return StepResult(step.name, round(seconds, 3), str(step.log_path))


def run_steps(
    steps: list[BuildStep], echo: Echo = print, heartbeat_s: float = 15.0
) -> list[StepResult]:
    results: list[StepResult] = []
    for number, step in enumerate(steps, start=1):
        echo(f"[{number}/{len(steps)}] {step.name} (log {step.log_path})")
        echo(f"    $ {step.shell()}")
        result = run_step(step, echo, heartbeat_s)
        echo(f"    done in {result.seconds:.1f} s")
        results.append(result)
    return results
