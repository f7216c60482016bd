"""The embedded stack on free loopback ports: Redis, Triton stand-in replicas, a sidecar each."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.redis_launcher import RedisServer
from gateway.sidecar_launcher import SidecarProcess, start_sidecar
from gateway.stack_settings import StackSettings
from gateway.triton_launcher import StandinSettings, TritonServer, start_standin_replica

log = logging.getLogger(__name__)


@dataclass
class Stack:
    settings: StackSettings
    workdir: Path = field(init=False)
    redis: RedisServer | None = None
    replicas: dict[str, TritonServer] = field(default_factory=dict)
    sidecars: dict[str, SidecarProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = self.settings.workdir or Path(tempfile.mkdtemp(prefix="triage-stack-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> Stack:
        """Start everything; on any failure stop what was started and re-raise."""
        s = self.settings
        try:
            self.redis = RedisServer(self.workdir).start()
            for index, speed in enumerate(s.speeds):
                replica_id = f"replica-{index}"
                standin = StandinSettings(
                    model_name=s.model,
                    speed=speed,
                    max_active=s.max_active,
                    engine_queue_size=s.engine_queue_size,
                    decode_ms_per_token=s.decode_ms_per_token,
                )
                self.replicas[replica_id] = start_standin_replica(
                    replica_id, standin, self.workdir, ready_timeout_s=s.ready_timeout_s
                )
                self.sidecars[replica_id] = start_sidecar(
                    replica_id,
                    self.replicas[replica_id],
                    s.model,
                    self.redis.url,
                    self.workdir,
                    poll_interval_ms=s.poll_interval_ms,
                    key_prefix=s.key_prefix,
                )
        except BaseException:
            self.stop()
            raise
        (self.workdir / "stack.json").write_text(json.dumps(self.describe(), indent=2))
        return self

    def describe(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "redis_url": self.redis.url if self.redis else None,
            "key_prefix": self.settings.key_prefix,
            "model": self.settings.model,
            "replicas": {
                rid: {
                    "triton_url": server.http_url,
                    "metrics_url": server.metrics_url,
                    "speed": speed,
                    "sidecar_url": self.sidecars[rid].url if rid in self.sidecars else None,
                    "pid": server.process.pid if server.process else None,
                }
                for (rid, server), speed in zip(
                    self.replicas.items(), self.settings.speeds, strict=False
                )
            },
        }

    def stop(self) -> None:
        """Stop in reverse order of start; every part is attempted even if one fails."""
        parts: list[Any] = [*self.sidecars.values(), *self.replicas.values(), self.redis]
        for part in parts:
            if part is None:
                continue
            try:
                part.stop()
            except Exception:
                log.exception("could not stop %r", part)
