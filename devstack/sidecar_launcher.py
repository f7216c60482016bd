"""Start a sidecar as its own process (how the stack and the tests run it)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from core.paths import free_port
from core.process import ManagedProcess
from devstack.triton_launcher import TritonServer


@dataclass
class SidecarProcess:
    replica_id: str
    port: int
    process: ManagedProcess
    ready_timeout_s: float = 30.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        return httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200

    def alive(self) -> bool:
        return self.process.alive()

    def exit_status(self) -> str:
        return self.process.exit_status()

    def kill(self) -> None:
        self.process.kill()

    def restart(self) -> None:
        """Start the same command again (same port, same Redis URL) and wait until it publishes."""
        self.process.restart(self.healthy, self.ready_timeout_s, "publishing to Redis")

    def stop(self) -> None:
        self.process.stop()


def start_sidecar(
    replica_id: str,
    server: TritonServer,
    model: str,
    redis_url: str,
    workdir: Path,
    poll_interval_ms: int = 250,
    key_prefix: str | None = None,
    extra: dict[str, str] | None = None,
    ready_timeout_s: float = 30.0,
    port: int = 0,
) -> SidecarProcess:
    """Start ``python -m sidecar.service`` for the replica on ``port`` (0: a free one); the
    Redis URL may carry a user and password (``redis://user:password@host:port/0``): it is
    passed in the environment, not on the command line, where any local user could read it."""
    port = port or free_port()
    args = {
        "replica-id": replica_id,
        "model": model,
        "triton-url": server.http_url,
        "metrics-url": server.metrics_url,
        "poll-interval-ms": str(poll_interval_ms),
        "port": str(port),
        **({"key-prefix": key_prefix} if key_prefix else {}),
        **(extra or {}),
    }
    argv = [sys.executable, "-m", "sidecar.service"]
    for name, value in args.items():
        argv += [f"--{name}", value]
    env = {**os.environ, "TRIAGE_SIDECAR_REDIS_URL": redis_url}
    process = ManagedProcess(
        f"sidecar[{replica_id}]", argv, workdir / f"sidecar-{replica_id}.log", env=env
    )
    process.start()
    sidecar = SidecarProcess(replica_id, port, process, ready_timeout_s)
    # healthy = polling and publishing (the replica itself may still be unhealthy)
    process.wait_until(sidecar.healthy, ready_timeout_s, "publishing to Redis")
    return sidecar
