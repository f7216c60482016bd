"""Entrypoint of the stand-in replica image (``triton-standin.Dockerfile``): one real
``tritonserver`` (the nvidia-pytriton wheel's) serving the CPU stand-in of a TensorRT-LLM replica.

It writes the stand-in's model repository from ``triton_models/cpu_standin/`` with
``devstack.triton_launcher.write_standin_repository`` (the same code ``triage up`` uses), builds
the server's command line with ``TritonServer.argv`` (same flags, same python-backend folder),
moves its listeners from 127.0.0.1 to every interface (the proxies reach it from other pods),
and execs it, so that the server gets the pod's SIGTERM directly.

Settings: ``TRIAGE_STANDIN_*``, the stand-in's knobs (``StandinSettings``: ``MODEL_NAME``,
``DIALECT``, ``MAX_ACTIVE``, ``DECODE_MS_PER_TOKEN``, ...) plus the ports and the repository
folder below. A bad value exits 2 naming the field.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.settings_errors import report_invalid
from devstack.triton_launcher import (
    StandinSettings,
    TritonServer,
    triton_env,
    write_standin_repository,
)

LOOPBACK_FLAGS = ("--http-address", "--grpc-address", "--metrics-address")


class StandinReplicaSettings(BaseSettings, StandinSettings):
    """The stand-in's knobs (``StandinSettings``) and where this server listens."""

    model_config = SettingsConfigDict(env_prefix="TRIAGE_STANDIN_", extra="forbid")

    repository: Path = Field(
        default=Path("/opt/triage-models"),
        description="writable folder the stand-in's model repository is written to",
    )
    http_port: int = Field(default=8000, ge=1, le=65535)
    grpc_port: int = Field(default=8001, ge=1, le=65535)
    metrics_port: int = Field(default=8002, ge=1, le=65535)
    listen_address: str = Field(default="0.0.0.0", description="every interface of the pod")
    shm_prefix: str = Field(default="triage_standin_", description="python backend shm prefix")


def server_argv(settings: StandinReplicaSettings) -> list[str]:
    """``TritonServer.argv`` for ``settings``, listening on ``listen_address``."""
    standin = StandinSettings.model_validate(
        settings.model_dump(include=set(StandinSettings.model_fields))
    )
    server = TritonServer(
        name="standin",
        repository=settings.repository,
        models=standin.served_models(),
        workdir=settings.repository,
        http_port=settings.http_port,
        grpc_port=settings.grpc_port,
        metrics_port=settings.metrics_port,
        shm_prefix=settings.shm_prefix,
    )
    argv = server.argv()
    for flag in LOOPBACK_FLAGS:
        loopback = f"{flag}=127.0.0.1"
        if loopback not in argv:
            raise RuntimeError(f"TritonServer.argv has no {loopback}: update {__file__}")
        argv[argv.index(loopback)] = f"{flag}={settings.listen_address}"
    return argv


def main() -> int:
    try:
        settings = StandinReplicaSettings()
    except ValidationError as exc:
        return report_invalid("triton_standin", exc)
    standin = StandinSettings.model_validate(
        settings.model_dump(include=set(StandinSettings.model_fields))
    )
    write_standin_repository(standin, settings.repository)
    argv = server_argv(settings)
    print(f"tritonserver: {shlex.join(argv)}", flush=True)
    os.execve(argv[0], argv, triton_env())
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
