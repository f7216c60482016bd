"""A Triton server's device topology, as its sidecar publishes it (``server:{id}``)."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


def gpu_topology() -> tuple[int, int] | None:
    """(GPU count, smallest GPU memory in MiB) from ``nvidia-smi``; None without GPUs."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    try:
        out = subprocess.run(
            [binary, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed, treating the server as CPU-only: %s", exc)
        return None
    sizes = [int(float(line)) for line in out.splitlines() if line.strip()]
    return (len(sizes), min(sizes)) if sizes else None


def host_memory_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise ValueError(f"no MemTotal in {meminfo}")


def server_topology(device_count: int | None, device_memory_mb: int | None) -> tuple[int, int]:
    """Configured values win; else the GPUs; else one "device": the host (CPU stand-ins)."""
    detected = gpu_topology() if device_count is None or device_memory_mb is None else None
    if detected is None and (device_count is None or device_memory_mb is None):
        detected = (1, host_memory_mb())
    count = device_count if device_count is not None else detected[0]  # type: ignore[index]
    memory = device_memory_mb if device_memory_mb is not None else detected[1]  # type: ignore[index]
    return count, memory
