"""Launch one tensor-parallel TensorRT-LLM replica in Triton, and its load sidecar.

Engine path (leader mode): ``mpirun --allow-run-as-root -n 1 tritonserver <rank 0> : -n 1
tritonserver <rank 1> : ...``, one rank per GPU. Rank 0 serves HTTP/gRPC/metrics on the replica's
ports; ranks > 0 load only the ``tensorrt_llm`` model (``--model-control-mode=explicit``) and get
ports of their own (base + rank × ``rank_port_stride``) so nothing collides on the host. Every rank
has its own python-backend shared-memory prefix. LLM-API path: one ``tritonserver`` process; the
LLM API starts its own MPI workers for ``tensor_parallel_size`` > 1.

The sidecar reads rank 0's metrics: on the engine path the gateway routes to ``ensemble`` and the
load comes from ``tensorrt_llm``'s ``nv_trt_llm_*`` gauges; the LLM-API model exports none, so its
slot count (``max_active``) must be given.

``python -m sidecar.tp_launcher --replica-id a --repository /engines/llama-tp2/triton_repo
--world-size 2 [--print]``; every flag is also ``TRIAGE_TP_<NAME>``.
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Literal

import httpx
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from core.keyschema import DEFAULT_PREFIX
from core.process import ManagedProcess
from core.redis_url import RedisUrl
from core.settings_errors import report_invalid
from sidecar.settings import SidecarSettings
from sidecar.triton_metrics import DEFAULT_ARRIVALS_MODEL

log = logging.getLogger(__name__)

ENGINE_MODEL = "tensorrt_llm"
DEFAULT_ROUTED = {"engine": "ensemble", "llmapi": "tensorrt_llm"}


class TpReplicaSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_TP_",
        cli_prog_name="python -m sidecar.tp_launcher",
        hide_input_in_errors=True,  # a Redis URL may hold a password
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="forbid",
    )

    replica_id: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$", description="id routers use")
    repository: Path = Field(description="the Triton repository triage build-engine wrote")
    serving: Literal["engine", "llmapi"] = "engine"
    world_size: int = Field(
        default=1, ge=1, le=64, description="engine path: tp_size × pp_size ranks, one per GPU"
    )
    model: str | None = Field(
        default=None, description="model the gateway calls; default ensemble / tensorrt_llm"
    )
    engine_model: str = Field(default=ENGINE_MODEL, description="model with nv_trt_llm_* gauges")
    max_active: int | None = Field(
        default=None, ge=1, description="slots; required on the LLM-API path (max_batch_size)"
    )
    tritonserver: str = "/opt/tritonserver/bin/tritonserver"
    mpirun: str = "mpirun"
    host: str = Field(default="127.0.0.1", description="address the gateway reaches Triton at")
    http_port: int = Field(default=8000, ge=1, le=65535)
    grpc_port: int = Field(default=8001, ge=1, le=65535)
    metrics_port: int = Field(default=8002, ge=1, le=65535)
    rank_port_stride: int = Field(default=10, ge=3, description="rank r: base port + r × stride")
    shm_prefix: str | None = Field(default=None, description="default: <replica_id>_")
    log_verbose: int = Field(default=0, ge=0)
    ready_timeout_s: float = Field(default=900.0, gt=0, description="engine load can take minutes")
    redis_url: RedisUrl = "redis://127.0.0.1:6379/0"
    key_prefix: str = DEFAULT_PREFIX
    poll_interval_ms: int = Field(default=250, ge=20)
    sidecar_port: int = Field(default=9400, ge=0, le=65535)
    workdir: Path | None = Field(default=None, description="logs; default a temp dir")
    print_only: bool = Field(default=False, description="print the commands and exit")

    @model_validator(mode="after")
    def _checks(self) -> TpReplicaSettings:
        if self.serving == "llmapi" and self.max_active is None:
            raise ValueError(
                "max_active is required on the LLM-API path (it exports no nv_trt_llm_* "
                "metrics); use the build's max_batch_size"
            )
        if self.serving == "llmapi" and self.world_size != 1:
            raise ValueError(
                f"world_size={self.world_size}: the LLM-API path runs one tritonserver; "
                "tensor_parallel_size lives in model.yaml"
            )
        top = max(self.http_port, self.grpc_port, self.metrics_port)
        if top + (self.world_size - 1) * self.rank_port_stride > 65535:
            raise ValueError(f"rank ports exceed 65535 (world_size={self.world_size})")
        return self

    @property
    def routed_model(self) -> str:
        return self.model or DEFAULT_ROUTED[self.serving]

    @property
    def prefix(self) -> str:
        return self.shm_prefix if self.shm_prefix is not None else f"{self.replica_id}_"

    @property
    def triton_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


@dataclass(frozen=True)
class RankPorts:
    http: int
    grpc: int
    metrics: int


def rank_ports(settings: TpReplicaSettings, rank: int) -> RankPorts:
    offset = rank * settings.rank_port_stride
    return RankPorts(
        settings.http_port + offset, settings.grpc_port + offset, settings.metrics_port + offset
    )


def rank_args(settings: TpReplicaSettings, rank: int) -> list[str]:
    """One rank's tritonserver argv."""
    ports = rank_ports(settings, rank)
    args = [
        settings.tritonserver,
        f"--model-repository={settings.repository}",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
    ]
    if rank > 0:
        args += ["--model-control-mode=explicit", f"--load-model={settings.engine_model}"]
    args += [
        "--disable-auto-complete-config",
        f"--backend-config=python,shm-region-prefix-name={settings.prefix}rank{rank}_",
        f"--log-verbose={settings.log_verbose}",
    ]
    return args


def launch_argv(settings: TpReplicaSettings) -> list[str]:
    """The whole replica: mpirun leader mode (engine path) or one tritonserver (LLM API)."""
    if settings.serving == "llmapi":
        return rank_args(settings, 0)
    argv = [settings.mpirun, "--allow-run-as-root"]
    for rank in range(settings.world_size):
        if rank:
            argv.append(":")
        argv += ["-n", "1", *rank_args(settings, rank)]
    return argv


def sidecar_settings(settings: TpReplicaSettings) -> SidecarSettings:
    return SidecarSettings(
        replica_id=settings.replica_id,
        model=settings.routed_model,
        engine_model=settings.engine_model if settings.serving == "engine" else None,
        # the LLM-API model has no preprocessing step and exports no engine gauges
        arrivals_model=DEFAULT_ARRIVALS_MODEL if settings.serving == "engine" else "",
        triton_url=settings.triton_url,
        metrics_url=settings.metrics_url,
        redis_url=settings.redis_url,
        key_prefix=settings.key_prefix,
        poll_interval_ms=settings.poll_interval_ms,
        max_active=settings.max_active,
        port=settings.sidecar_port,
    )


def sidecar_argv(settings: TpReplicaSettings, python: str = sys.executable) -> list[str]:
    sidecar = sidecar_settings(settings)
    argv = [python, "-m", "sidecar.service"]
    fields = (
        "replica_id",
        "model",
        "engine_model",
        "arrivals_model",
        "triton_url",
        "metrics_url",
        "redis_url",
        "key_prefix",
        "poll_interval_ms",
        "max_active",
        "port",
    )
    for name in fields:
        value = getattr(sidecar, name)
        if name == "arrivals_model" and value is None:
            value = ""  # explicitly none (the setting's default is the preprocessing step)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def triton_ready(settings: TpReplicaSettings) -> bool:
    with httpx.Client(timeout=2.0) as client:
        if client.get(f"{settings.triton_url}/v2/health/ready").status_code != 200:
            return False
        model = client.get(f"{settings.triton_url}/v2/models/{settings.routed_model}/ready")
        return model.status_code == 200


@dataclass
class TpReplica:
    """A started replica (tritonserver ranks + sidecar); ``stop`` stops both."""

    settings: TpReplicaSettings
    triton: ManagedProcess
    sidecar: ManagedProcess | None = None

    def stop(self) -> None:
        for part in (self.sidecar, self.triton):
            if part is not None:
                part.stop(grace_s=30.0)
        for region in Path("/dev/shm").glob(f"{self.settings.prefix}rank*"):
            region.unlink(missing_ok=True)


def start_replica(
    settings: TpReplicaSettings, workdir: Path, with_sidecar: bool = True
) -> TpReplica:
    """Start the ranks, wait until rank 0 serves the routed model, then start the sidecar."""
    triton = ManagedProcess(
        f"tritonserver[{settings.replica_id}]",
        launch_argv(settings),
        workdir / f"triton-{settings.replica_id}.log",
    )
    triton.start()
    replica = TpReplica(settings, triton)
    try:
        triton.wait_until(lambda: triton_ready(settings), settings.ready_timeout_s, "ready")
        if with_sidecar:
            replica.sidecar = ManagedProcess(
                f"sidecar[{settings.replica_id}]",
                sidecar_argv(settings),
                workdir / f"sidecar-{settings.replica_id}.log",
            )
            replica.sidecar.start()
            url = f"http://127.0.0.1:{settings.sidecar_port}/healthz"
            replica.sidecar.wait_until(
                lambda: httpx.get(url, timeout=1.0).status_code == 200, 60.0, "publishing"
            )
    except BaseException:
        replica.stop()
        raise
    return replica


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = CliApp.run(
            TpReplicaSettings, cli_args=list(sys.argv[1:] if argv is None else argv)
        )
    except ValidationError as exc:
        return report_invalid("tp_launcher", exc)
    print(f"triton:  {shlex.join(launch_argv(settings))}")
    print(f"sidecar: {shlex.join(sidecar_argv(settings))}", flush=True)
    if settings.print_only:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    workdir = settings.workdir or Path(tempfile.mkdtemp(prefix="triage-tp-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    replica = start_replica(settings, workdir)
    print(f"replica {settings.replica_id} ready at {settings.triton_url} (logs {workdir})")
    try:
        while not stop.wait(1.0):
            if not replica.triton.alive():
                print(f"tritonserver exited; log {replica.triton.log_path}", file=sys.stderr)
                return 1
    finally:
        replica.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
