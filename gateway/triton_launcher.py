"""Start real ``tritonserver`` processes (the binary in the nvidia-pytriton wheel) on loopback.

Pitfalls handled (gateway/README.md, "Triton on a machine without a GPU"): the wheel's python
backend lacks its stub, so a backend folder
of our own is assembled once per interpreter version; the stub needs the interpreter's LIBDIR and
``nvidia_pytriton.libs`` on ``LD_LIBRARY_PATH`` and the venv's ``python3`` first on ``PATH``, or
it hangs in "loading" forever, hence the readiness deadline; each server gets its own shared
memory prefix, removed after it stops.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
from google.protobuf import text_format
from pydantic import BaseModel, Field
from tritonclient.grpc import model_config_pb2

from gateway.process import ManagedProcess, StartError
from triage.paths import STANDIN_REPOSITORY, cache_dir, free_port, pytriton_root, venv_bin

log = logging.getLogger(__name__)

STANDIN_MODEL = "standin"


PORT_ATTEMPTS = 3
PORT_TAKEN = "already in use"
"""Triton's log line when a port it was given is taken ("Socket '...' already in use")."""


class StandinSettings(BaseModel):
    """Per-replica knobs of the CPU stand-in LLM (written into its config.pbtxt)."""

    model_name: str = Field(default=STANDIN_MODEL, pattern=r"^[A-Za-z0-9_.\-]+$")
    speed: float = Field(default=1.0, gt=0, description="2.0 = twice as fast as the baseline")
    max_active: int = Field(default=4, ge=1, description="in-flight batch slots")
    engine_queue_size: int = Field(default=8, ge=0, description="the executor's waiting queue")
    engine_queue_full: Literal["reject", "block"] = "reject"
    triton_queue_size: int = Field(default=16, ge=1, description="Triton's max_queue_size")
    queue_timeout_ms: int = Field(default=60_000, ge=1)
    prefill_ms_per_token: float = Field(default=0.2, ge=0)
    decode_ms_per_token: float = Field(default=20.0, gt=0)
    batch_slowdown: float = Field(default=0.05, ge=0)
    kv_cache_blocks: int = Field(default=512, ge=1)
    kv_tokens_per_block: int = Field(default=64, ge=1)


def read_model_config(path: Path) -> model_config_pb2.ModelConfig:
    """Parse a config.pbtxt with Triton's own protobuf (a typo raises ParseError)."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def write_standin_repository(settings: StandinSettings, dest: Path) -> Path:
    """A model repository at ``dest`` holding one stand-in model configured by ``settings``."""
    source = STANDIN_REPOSITORY / STANDIN_MODEL
    target = dest / settings.model_name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    config = read_model_config(source / "config.pbtxt")
    config.name = settings.model_name
    policy = config.dynamic_batching.default_queue_policy
    policy.max_queue_size = settings.triton_queue_size
    policy.default_timeout_microseconds = settings.queue_timeout_ms * 1000
    params = {
        "speed": settings.speed,
        "max_active": settings.max_active,
        "engine_queue_size": settings.engine_queue_size,
        "engine_queue_full": settings.engine_queue_full,
        "prefill_ms_per_token": settings.prefill_ms_per_token,
        "decode_ms_per_token": settings.decode_ms_per_token,
        "batch_slowdown": settings.batch_slowdown,
        "kv_cache_blocks": settings.kv_cache_blocks,
        "kv_tokens_per_block": settings.kv_tokens_per_block,
    }
    for key, value in params.items():
        config.parameters[key].string_value = str(value)
    (target / "config.pbtxt").write_text(text_format.MessageToString(config))
    return dest


def python_backend_dir() -> Path:
    """A Triton backend folder with the python backend *and* the stub for this interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    root = pytriton_root() / "tritonserver"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise RuntimeError(f"nvidia-pytriton ships no python backend stub for Python {version}")
    target = cache_dir() / f"triton-backends-py{version}-{stub.stat().st_size}"
    if (target / "python" / "triton_python_backend_stub").exists():
        return target
    staging = Path(tempfile.mkdtemp(prefix="backends-", dir=cache_dir()))
    (staging / "python").mkdir()
    for item in (root / "backends" / "python").iterdir():
        if item.is_file():
            shutil.copy2(item, staging / "python" / item.name)
    shutil.copy2(stub, staging / "python" / stub.name)
    try:
        staging.rename(target)  # atomic: parallel starters never see a half-built folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process won the race
    return target


def triton_env() -> dict[str, str]:
    env = dict(os.environ)
    libdirs = [
        sysconfig.get_config_var("LIBDIR") or "",
        str(pytriton_root().parent / "nvidia_pytriton.libs"),
        env.get("LD_LIBRARY_PATH", ""),
    ]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in libdirs if p)
    env["PATH"] = f"{venv_bin()}:{env.get('PATH', '')}"
    return env


@dataclass
class TritonServer:
    """One ``tritonserver`` on free loopback ports serving ``models`` from ``repository``."""

    name: str
    repository: Path
    models: list[str]
    workdir: Path
    ready_timeout_s: float = 60.0
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    extra_args: list[str] = field(default_factory=list)
    process: ManagedProcess | None = None
    shm_prefix: str = ""

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def argv(self) -> list[str]:
        binary = pytriton_root() / "tritonserver" / "bin" / "tritonserver"
        args = [
            str(binary),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            *[f"--load-model={m}" for m in self.models],
            "--http-address=127.0.0.1",
            f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=false",
            "--metrics-interval-ms=100",
            "--strict-readiness=true",
            "--exit-on-error=true",
            # on SIGTERM Triton waits for in-flight requests up to this long (default 30 s,
            # beyond ManagedProcess.stop's grace): a stand-in fleet stops within seconds
            "--exit-timeout-secs=5",
            f"--backend-directory={python_backend_dir()}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--log-verbose=0",
        ]
        return args + self.extra_args

    def start(self) -> TritonServer:
        """Start on the given ports, or on free ones; a free port taken by another process
        before Triton bound it ("already in use": free ports are ephemeral ones, which any
        outgoing connection may take meanwhile) is replaced, up to ``PORT_ATTEMPTS`` times."""
        if self.http_port and self.grpc_port and self.metrics_port:
            return self._start()
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.http_port, self.grpc_port, self.metrics_port = (free_port() for _ in range(3))
            try:
                return self._start()
            except StartError as exc:
                if PORT_TAKEN not in str(exc) or attempt == PORT_ATTEMPTS:
                    raise
                log.warning("triton %s: a port was taken before it bound it; new ports", self.name)
        raise AssertionError("unreachable")

    def _start(self) -> TritonServer:
        self.shm_prefix = self.shm_prefix or f"triage_{self.name}_{uuid.uuid4().hex[:8]}_"
        self.process = ManagedProcess(
            f"tritonserver[{self.name}]",
            self.argv(),
            self.workdir / f"triton-{self.name}.log",
            env=triton_env(),
        )
        self.process.start()
        try:
            self.process.wait_until(self.is_ready, self.ready_timeout_s, "ready")
        except BaseException:
            self._clean_shm()  # wait_until stopped the server; its stub may have made some
            raise
        log.info("triton %s ready at %s (metrics %s)", self.name, self.http_url, self.metrics_url)
        return self

    def is_ready(self) -> bool:
        with httpx.Client(timeout=1.0) as client:
            if client.get(f"{self.http_url}/v2/health/ready").status_code != 200:
                return False
            return all(
                client.get(f"{self.http_url}/v2/models/{m}/ready").status_code == 200
                for m in self.models
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def exit_status(self) -> str:
        return self.process.exit_status() if self.process is not None else "not started"

    def kill(self) -> None:
        """Crash it (SIGKILL); ``start`` again on the same ports restores it."""
        if self.process is not None:
            self.process.kill()
        self._clean_shm()

    def restart(self) -> None:
        """After a crash: kill what is left of the old server (its python stubs), remove its
        shared memory, and start it again on the same ports with the same shm prefix."""
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        self._clean_shm()

    def _clean_shm(self) -> None:
        if not self.shm_prefix:
            return
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)
            log.info("triton %s: removed shared memory %s", self.name, region.name)


def start_standin_replica(
    replica_id: str, settings: StandinSettings, workdir: Path, ready_timeout_s: float = 60.0
) -> TritonServer:
    repository = write_standin_repository(settings, workdir / f"models-{replica_id}")
    server = TritonServer(
        name=replica_id,
        repository=repository,
        models=[settings.model_name],
        workdir=workdir,
        ready_timeout_s=ready_timeout_s,
    )
    return server.start()
