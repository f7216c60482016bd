"""Start real ``tritonserver`` processes (the binary in the nvidia-pytriton wheel) on loopback.

Pitfalls handled (devstack/README.md, "Triton on a machine without a GPU"): the wheel's python
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
from google.protobuf import text_format
from pydantic import BaseModel, Field, model_validator
from tritonclient.grpc import model_config_pb2

from core.paths import STANDIN_REPOSITORY, cache_dir, free_ports, pytriton_root, venv_bin
from core.process import ManagedProcess, StartError

log = logging.getLogger(__name__)

STANDIN_MODEL = "standin"
ENGINE_MODEL = "tensorrt_llm"
"""The stock name of the engine model behind NVIDIA's ensemble (the stand-in's default too)."""
PREPROCESSING_MODEL = "preprocessing"
"""The stock ensemble's first step (text to token ids), the stand-in's too."""


PORT_ATTEMPTS = 3
PORT_TAKEN = "already in use"
"""Triton's log line when a port it was given is taken ("Socket '...' already in use")."""

MODEL_NAME = r"^[A-Za-z0-9_.\-]+$"


PROVIDER_DIALECT: dict[str, str] = {"ensemble": "inflight_batcher_llm", "llmapi": "llmapi"}
"""The Triton provider's dialect that speaks to each stand-in shape."""


class StandinSettings(BaseModel):
    """Per-replica knobs of the CPU stand-in LLM (written into its config.pbtxt files).

    ``dialect="ensemble"``: a Triton ensemble named ``model_name`` (the stock ensemble's inputs)
    over a decoupled python engine named ``engine_model`` that exports TensorRT-LLM's metrics.
    ``dialect="llmapi"``: one python model named ``model_name`` with the LLM-API model's inputs
    and no ``nv_trt_llm_*`` metric (as NVIDIA's ``all_models/llmapi``)."""

    model_name: str = Field(default=STANDIN_MODEL, pattern=MODEL_NAME)
    dialect: Literal["ensemble", "llmapi"] = "ensemble"
    engine_model: str = Field(
        default=ENGINE_MODEL, pattern=MODEL_NAME, description="the engine step's model name"
    )
    speed: float = Field(default=1.0, gt=0, description="2.0 = twice as fast as the baseline")
    max_active: int = Field(
        default=4, ge=1, description="the executor's cap on active requests (exported as max)"
    )
    max_batch_size: int | None = Field(
        default=None, ge=1, description="requests scheduled per iteration (default max_active)"
    )
    engine_queue_size: int = Field(
        default=8, ge=0, description="the executor queue behind max_active (0: none)"
    )
    engine_queue_full: Literal["reject", "block"] = "reject"
    triton_queue_size: int = Field(default=16, ge=1, description="Triton's max_queue_size")
    queue_timeout_ms: int = Field(default=60_000, ge=1)
    prefill_ms_per_token: float = Field(default=0.2, ge=0)
    decode_ms_per_token: float = Field(default=20.0, gt=0)
    batch_slowdown: float = Field(default=0.05, ge=0)
    kv_cache_blocks: int = Field(default=512, ge=1)
    kv_tokens_per_block: int = Field(default=64, ge=1)
    kv_cache_reuse: bool = Field(
        default=True,
        description="TensorRT-LLM's enable_kv_cache_reuse: a cached prompt prefix is not prefilled",
    )

    @model_validator(mode="after")
    def _distinct_names(self) -> StandinSettings:
        if self.dialect == "ensemble" and self.engine_model == self.model_name:
            raise ValueError(f"engine_model must differ from model_name ({self.model_name!r})")
        return self

    def served_models(self) -> list[str]:
        """The models to load (an ensemble's load also loads its step)."""
        return [self.model_name]


def read_model_config(path: Path) -> model_config_pb2.ModelConfig:
    """Parse a config.pbtxt with Triton's own protobuf (a typo raises ParseError)."""
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _write_engine(
    settings: StandinSettings, folder: str, target: Path, name: str, dialect: str
) -> None:
    """A stand-in engine (python, decoupled) at ``target`` from ``STANDIN_REPOSITORY/folder``."""
    source = STANDIN_REPOSITORY / folder
    config = read_model_config(source / "config.pbtxt")
    config.name = name
    policy = config.dynamic_batching.default_queue_policy
    policy.max_queue_size = settings.triton_queue_size
    policy.default_timeout_microseconds = settings.queue_timeout_ms * 1000
    if settings.engine_queue_full == "block":
        # one request per execute(): the instance holds at each request it cannot queue, so
        # the next ones wait in Triton's queue (a batch would wait inside execute() instead)
        config.dynamic_batching.preferred_batch_size[:] = [1]
    params = {
        "dialect": dialect,
        "speed": settings.speed,
        "max_active": settings.max_active,
        "max_batch_size": settings.max_batch_size or settings.max_active,
        "engine_queue_size": settings.engine_queue_size,
        "engine_queue_full": settings.engine_queue_full,
        "prefill_ms_per_token": settings.prefill_ms_per_token,
        "decode_ms_per_token": settings.decode_ms_per_token,
        "batch_slowdown": settings.batch_slowdown,
        "kv_cache_blocks": settings.kv_cache_blocks,
        "kv_tokens_per_block": settings.kv_tokens_per_block,
        "enable_kv_cache_reuse": str(settings.kv_cache_reuse).lower(),
    }
    for key, value in params.items():
        config.parameters[key].string_value = str(value)
    text = text_format.MessageToString(config)
    if target.exists():
        shutil.rmtree(target)
    (target / "1").mkdir(parents=True)
    for module in (STANDIN_REPOSITORY / "tensorrt_llm" / "1").glob("*.py"):  # model.py, kv_cache.py
        shutil.copy2(module, target / "1" / module.name)
    (target / "config.pbtxt").write_text(text)


def write_standin_repository(settings: StandinSettings, dest: Path) -> Path:
    """Write the stand-in's models into the model repository ``dest`` (created if needed):
    ``dialect="ensemble"``: ``model_name`` (the ensemble), ``preprocessing`` and
    ``engine_model`` (its steps);
    ``dialect="llmapi"``: ``model_name`` only."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / settings.model_name
    if settings.dialect == "llmapi":
        _write_engine(settings, "llmapi", target, settings.model_name, "llmapi")
        return dest
    for other in dest.glob("*/config.pbtxt"):
        existing = read_model_config(other)
        if existing.name != settings.model_name and any(
            step.model_name == settings.engine_model for step in existing.ensemble_scheduling.step
        ):
            raise ValueError(
                f"{dest}: ensemble {existing.name!r} already uses engine {settings.engine_model!r}"
                f"; give each stand-in ensemble its own engine_model"
            )
    _write_engine(
        settings, "tensorrt_llm", dest / settings.engine_model, settings.engine_model, "ensemble"
    )
    # the stock first step, stateless: ensembles in one repository share it
    preprocessing = dest / PREPROCESSING_MODEL
    if preprocessing.exists():
        shutil.rmtree(preprocessing)
    shutil.copytree(
        STANDIN_REPOSITORY / PREPROCESSING_MODEL,
        preprocessing,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    config = read_model_config(STANDIN_REPOSITORY / "ensemble" / "config.pbtxt")
    config.name = settings.model_name
    for step in config.ensemble_scheduling.step:
        if step.model_name == ENGINE_MODEL:
            step.model_name = settings.engine_model
    if target.exists():
        shutil.rmtree(target)
    (target / "1").mkdir(parents=True)  # an ensemble needs a version folder, even empty
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
            self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
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
        """Ready, its models ready, and its metrics served: tritonserver starts the metrics
        endpoint last, after HTTP answers, and exits when its port is taken (a ready HTTP
        alone once hid a metrics port another process held)."""
        with httpx.Client(timeout=1.0) as client:
            if client.get(f"{self.http_url}/v2/health/ready").status_code != 200:
                return False
            if not all(
                client.get(f"{self.http_url}/v2/models/{m}/ready").status_code == 200
                for m in self.models
            ):
                return False
            return client.get(self.metrics_url).status_code == 200

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
    replica_id: str,
    settings: StandinSettings,
    workdir: Path,
    ready_timeout_s: float = 60.0,
    unloaded: Sequence[StandinSettings] = (),
) -> TritonServer:
    """A Triton server serving the stand-in ``settings``; the ``unloaded`` stand-ins are in its
    repository too, for a load on request (explicit model control)."""
    repository = write_standin_repository(settings, workdir / f"models-{replica_id}")
    for other in unloaded:
        write_standin_repository(other, repository)
    server = TritonServer(
        name=replica_id,
        repository=repository,
        models=settings.served_models(),
        workdir=workdir,
        ready_timeout_s=ready_timeout_s,
    )
    return server.start()
