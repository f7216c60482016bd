"""The machine's NVIDIA GPUs, from ``nvidia-smi`` (None when it is not installed)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

QUERY = "index,name,memory.total,driver_version"


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_mb: int
    driver: str


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """``nvidia-smi --query-gpu=index,name,memory.total,driver_version
    --format=csv,noheader,nounits`` output, one GPU a line."""
    gpus: list[GpuInfo] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        index, name, memory, driver = parts
        gpus.append(GpuInfo(int(index), name, int(float(memory)), driver))
    return gpus


def query_gpus(timeout_s: float = 20.0) -> list[GpuInfo] | None:
    """The GPUs nvidia-smi lists; None when nvidia-smi is not on PATH."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    result = subprocess.run(
        [binary, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"nvidia-smi failed ({result.returncode}): {result.stderr.strip()}")
    return parse_nvidia_smi(result.stdout)
