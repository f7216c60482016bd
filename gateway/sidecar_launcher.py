"""Start a sidecar as its own process (how the stack and the tests run it)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from gateway.process import ManagedProcess
from gateway.triton_launcher import TritonServer
from triage.paths import free_port


@dataclass
class SidecarProcess:
    replica_id: str
    port: int
    process: ManagedProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        return httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200

    def kill(self) -> None:
        self.process.kill()

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
) -> SidecarProcess:
    port = free_port()
    args = {
        "replica-id": replica_id,
        "model": model,
        "triton-url": server.http_url,
        "metrics-url": server.metrics_url,
        "redis-url": redis_url,
        "poll-interval-ms": str(poll_interval_ms),
        "port": str(port),
        **({"key-prefix": key_prefix} if key_prefix else {}),
        **(extra or {}),
    }
    argv = [sys.executable, "-m", "gateway.sidecar"]
    for name, value in args.items():
        argv += [f"--{name}", value]
    process = ManagedProcess(f"sidecar[{replica_id}]", argv, workdir / f"sidecar-{replica_id}.log")
    process.start()
    sidecar = SidecarProcess(replica_id, port, process)
    # healthy = polling and publishing (the replica itself may still be unhealthy)
    process.wait_until(sidecar.healthy, ready_timeout_s, "publishing to Redis")
    return sidecar
