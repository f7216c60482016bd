"""GPU check: build a tiny model, serve it with TP in Triton behind a sidecar and the gateway,
and print tokens/s sent straight to Triton vs through the gateway (LiteLLM proxy + plugins).

``python -m build_engines.gpu_check [--serving engine|llmapi|both] [--tp-size 2] ...``

Runs only where everything is there: an NVIDIA GPU (nvidia-smi), Triton with the ``tensorrtllm``
backend (the ``nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3`` container), tensorrt-llm
1.2.x, torch, transformers, mpirun. Otherwise it says what is missing and exits 77 ("skipped").
The model is made locally (``tiny_model``: byte-level BPE trained on this repository's Markdown,
random Llama weights); nothing is downloaded. Every request sends ``min_tokens = max_tokens``, so
the engine generates exactly ``max_tokens`` tokens and tokens/s = requests × max_tokens / wall time.

Exit codes: 0 every path served and measured, 1 a path failed, 2 invalid settings, 77 skipped.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

from build_engines.gpus import query_gpus
from build_engines.settings import BuildSettings
from core.keyschema import DEFAULT_PREFIX
from core.paths import free_port
from core.settings_errors import report_invalid
from devstack.proxy_launcher import LiteLLMProxy, start_proxy
from devstack.redis_launcher import RedisServer
from plugins.proxy_config import (
    ReplicaEndpoint,
    build_proxy_config,
    new_master_key,
    proxy_env,
    write_proxy_config,
)
from plugins.triton_provider.deployments import triton_deployment
from sidecar.tp_launcher import TpReplica, TpReplicaSettings, start_replica

SKIPPED = 77
PROMPT = "Explain in detail how tensor parallelism splits attention heads across GPUs."
MODEL_NAME = "tiny-llama"
REQUIRED_MODULES = ("tensorrt_llm", "torch", "transformers", "safetensors")


class GpuCheckSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_GPU_CHECK_",
        cli_prog_name="python -m build_engines.gpu_check",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        extra="forbid",
    )

    workdir: Path | None = Field(default=None, description="default: a temp dir")
    serving: Literal["engine", "llmapi", "both"] = "both"
    tp_size: int | None = Field(default=None, ge=1, description="default: 2 with >= 2 GPUs, else 1")
    requests: int = Field(default=64, ge=1)
    concurrency: int = Field(default=8, ge=1)
    max_tokens: int = Field(default=64, ge=1)
    warmup: int = Field(default=4, ge=0)
    tritonserver: str = "/opt/tritonserver/bin/tritonserver"
    keep: bool = Field(default=False, description="keep the workdir (model, engine, logs)")


def skip_reason(tritonserver: str = "/opt/tritonserver/bin/tritonserver") -> str | None:
    """Why the check cannot run here (None: it can)."""
    if shutil.which("nvidia-smi") is None:
        return "no NVIDIA GPU (nvidia-smi not found)"
    try:
        gpus = query_gpus()
    except (RuntimeError, OSError, ValueError) as exc:
        return f"no usable NVIDIA GPU (nvidia-smi failed: {exc})"
    if not gpus:
        return "no NVIDIA GPU (nvidia-smi lists none)"
    server = Path(tritonserver)
    if not server.exists():
        return (
            f"no tritonserver at {server} (run inside "
            "nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3)"
        )
    backend = server.parent.parent / "backends" / "tensorrtllm"
    if not backend.is_dir():
        return f"tritonserver has no tensorrtllm backend ({backend} missing)"
    for module in REQUIRED_MODULES:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not importable (pip install tensorrt-llm==1.2.1 transformers)"
    if shutil.which("mpirun") is None:
        return "mpirun not found (the engine path launches one rank per GPU with Open MPI)"
    return None


@dataclass(frozen=True)
class Throughput:
    path: str
    requests: int
    failures: int
    tokens: int
    seconds: float
    p50_ms: float
    p95_ms: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


async def measure(
    path: str, send: Callable[[], Awaitable[int]], requests: int, concurrency: int
) -> Throughput:
    """Run ``requests`` calls of ``send`` (returns tokens generated), ``concurrency`` at a time."""
    latencies: list[float] = []
    tokens = failures = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(requests):
        queue.put_nowait(n)

    async def worker() -> None:
        nonlocal tokens, failures
        while not queue.empty():
            queue.get_nowait()
            started = time.perf_counter()
            try:
                generated = await send()  # not `tokens += await ...`: that loses updates
                tokens += generated
                latencies.append((time.perf_counter() - started) * 1000)
            except Exception:
                failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
    seconds = time.perf_counter() - started
    ordered = sorted(latencies) or [0.0]
    return Throughput(
        path=path,
        requests=requests,
        failures=failures,
        tokens=tokens,
        seconds=round(seconds, 3),
        p50_ms=round(statistics.median(ordered), 1),
        p95_ms=round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1),
    )


def direct_sender(
    client: httpx.AsyncClient, triton_url: str, model: str, max_tokens: int
) -> Callable[[], Awaitable[int]]:
    url = f"{triton_url}/v2/models/{model}/generate"
    body = {"text_input": PROMPT, "max_tokens": max_tokens, "min_tokens": max_tokens}

    async def send() -> int:
        response = await client.post(url, json=body)
        response.raise_for_status()
        if not response.json().get("text_output"):
            raise RuntimeError(f"empty text_output: {response.text[:200]}")
        return max_tokens

    return send


def gateway_sender(
    client: httpx.AsyncClient, base_url: str, api_key: str, max_tokens: int
) -> Callable[[], Awaitable[int]]:
    url = f"{base_url}/v1/chat/completions"
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
    }
    headers = {"Authorization": f"Bearer {api_key}"}

    async def send() -> int:
        response = await client.post(url, json=body, headers=headers)
        response.raise_for_status()
        if not response.json()["choices"][0]["message"]["content"]:
            raise RuntimeError(f"empty completion: {response.text[:200]}")
        return max_tokens

    return send


def format_table(results: Sequence[Throughput]) -> list[str]:
    lines = [
        f"{'path':<18} {'requests':>8} {'failed':>6} {'tokens':>7} {'seconds':>8} "
        f"{'tokens/s':>9} {'p50 ms':>8} {'p95 ms':>8}"
    ]
    for r in results:
        lines.append(
            f"{r.path:<18} {r.requests:>8} {r.failures:>6} {r.tokens:>7} {r.seconds:>8.2f} "
            f"{r.tokens_per_s:>9.1f} {r.p50_ms:>8.1f} {r.p95_ms:>8.1f}"
        )
    return lines


async def _create_key(redis_url: str, key_prefix: str) -> str:
    from plugins.auth.keystore import KeyStore
    from plugins.auth.settings import KeysSettings

    store = KeyStore.from_settings(KeysSettings(redis_url=redis_url, key_prefix=key_prefix))
    try:
        key, _ = await store.create(alias=f"gpu-check-{os.getpid()}")
    finally:
        await store.aclose()
    return key


async def _measure_both(
    settings: GpuCheckSettings, label: str, triton_url: str, model: str, base_url: str, key: str
) -> list[Throughput]:
    async with httpx.AsyncClient(timeout=600.0) as client:
        direct = direct_sender(client, triton_url, model, settings.max_tokens)
        gateway = gateway_sender(client, base_url, key, settings.max_tokens)
        for _ in range(settings.warmup):
            await direct()
            await gateway()
        return [
            await measure(f"{label} direct", direct, settings.requests, settings.concurrency),
            await measure(f"{label} gateway", gateway, settings.requests, settings.concurrency),
        ]


def tiny_build_settings(
    serving: Literal["engine", "llmapi"], model_dir: Path, output_dir: Path, tp: int
) -> BuildSettings:
    """Small limits for the tiny model (the plan still checks heads, GPUs and memory)."""
    return BuildSettings(
        serving=serving,
        model_dir=model_dir,
        output_dir=output_dir,
        dtype="float16",
        tp_size=tp,
        max_batch_size=16,
        max_input_len=256,
        max_seq_len=512,
        max_num_tokens=2048,
        overwrite=True,
    )


def replica_settings(
    check: GpuCheckSettings, build: BuildSettings, repository: Path, redis_url: str
) -> TpReplicaSettings:
    serving = build.serving
    return TpReplicaSettings(
        replica_id=f"gpu-{serving}",
        repository=repository,
        serving=serving,
        world_size=build.world_size if serving == "engine" else 1,
        max_active=build.max_batch_size if serving == "llmapi" else None,
        tritonserver=check.tritonserver,
        http_port=free_port(),
        grpc_port=free_port(),
        metrics_port=free_port(),
        sidecar_port=free_port(),
        shm_prefix=f"triage_gpu_{serving}_{os.getpid()}_",
        redis_url=redis_url,
    )


def gateway_config(replica: TpReplicaSettings, max_tokens: int) -> dict[str, Any]:
    """The proxy config: one deployment on the replica, ``min_tokens`` fixed to max_tokens."""
    endpoint = ReplicaEndpoint(replica.replica_id, replica.triton_url)
    config = build_proxy_config(MODEL_NAME, replica.routed_model, [endpoint])
    config["model_list"] = [
        triton_deployment(
            MODEL_NAME,
            endpoint.replica_id,
            endpoint.api_base,
            replica.routed_model,
            provider_settings={"extra_inputs": {"min_tokens": max_tokens}},
        )
    ]
    return config


def run_path(
    check: GpuCheckSettings, serving: Literal["engine", "llmapi"], model_dir: Path, tp: int
) -> list[Throughput]:
    """Build (engine path) or package (LLM API), serve, put the gateway in front, measure."""
    from build_engines.main import run_build

    workdir = (check.workdir or Path(tempfile.gettempdir())) / serving
    workdir.mkdir(parents=True, exist_ok=True)
    build = tiny_build_settings(serving, model_dir, workdir / "build", tp)
    result = run_build(build, echo=lambda line: print(f"  {line}", flush=True))
    assert result.repository is not None
    redis = RedisServer(workdir).start()
    replica: TpReplica | None = None
    proxy: LiteLLMProxy | None = None
    try:
        served = replica_settings(check, build, result.repository, redis.url)
        replica = start_replica(served, workdir)
        key = asyncio.run(_create_key(redis.url, DEFAULT_PREFIX))
        proxy = start_proxy(
            f"gpu-{serving}",
            write_proxy_config(gateway_config(served, check.max_tokens), workdir / "proxy.yaml"),
            proxy_env(redis.url, DEFAULT_PREFIX, new_master_key()),
            workdir,
        )
        label = f"{serving} tp{tp}"
        return asyncio.run(
            _measure_both(check, label, served.triton_url, served.routed_model, proxy.base_url, key)
        )
    finally:
        for part in (proxy, replica, redis):
            if part is not None:
                part.stop()


def run_gpu_check(settings: GpuCheckSettings) -> tuple[list[Throughput], list[str]]:
    """(measurements, failures); needs a GPU machine (see ``skip_reason``)."""
    from build_engines.tiny_model import write_tiny_llama

    gpus = query_gpus() or []
    tp = settings.tp_size or (2 if len(gpus) >= 2 else 1)
    own_workdir = settings.workdir is None
    workdir = settings.workdir or Path(tempfile.mkdtemp(prefix="triage-gpu-check-"))
    settings = settings.model_copy(update={"workdir": workdir})
    print(f"GPUs: {', '.join(f'{g.index}: {g.name} {g.memory_mb} MiB' for g in gpus)}")
    model_dir = write_tiny_llama(workdir / "tiny-llama")
    print(f"tiny Llama (random weights, local tokenizer) at {model_dir}; tp_size={tp}")
    paths: list[Literal["engine", "llmapi"]] = (
        ["engine", "llmapi"] if settings.serving == "both" else [settings.serving]
    )
    results: list[Throughput] = []
    failures: list[str] = []
    for serving in paths:
        print(f"== {serving} path ==", flush=True)
        try:
            results += run_path(settings, serving, model_dir, tp)
        except Exception as exc:
            failures.append(f"{serving}: {type(exc).__name__}: {exc}")
            print(f"{serving} path failed: {exc}", file=sys.stderr)
    for line in format_table(results):
        print(line)
    (workdir / "gpu_check.json").write_text(
        json.dumps({"results": [asdict(r) for r in results], "failures": failures}, indent=2)
    )
    if own_workdir and not settings.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return results, failures


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = CliApp.run(
            GpuCheckSettings, cli_args=list(sys.argv[1:] if argv is None else argv)
        )
    except ValidationError as exc:
        return report_invalid("gpu_check", exc)
    reason = skip_reason(settings.tritonserver)
    if reason is not None:
        print(f"gpu check skipped: {reason}")
        return SKIPPED
    results, failures = run_gpu_check(settings)
    bad = [r.path for r in results if r.failures]
    return 1 if failures or bad or not results else 0


if __name__ == "__main__":
    raise SystemExit(main())
