"""``manifest.json``: what was built, from what, with which versions and flags, and the hashes.

Engine files and the generated repository are hashed (SHA-256); the checkpoint's small files
(config, tokenizer, index) are hashed and its weight files recorded by name and size (hashing
hundreds of GB on every build would cost more than the build).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import platform
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from build_engines.commands import BuildStep
from build_engines.plan import Plan
from build_engines.runner import StepResult
from build_engines.settings import ENGINE_PATH_TRTLLM

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
VERSION_PROBE = (
    "import importlib.metadata as m\n"
    "try:\n    print(m.version('tensorrt-llm'))\n"
    "except m.PackageNotFoundError:\n    print('')\n"
)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(root: Path, hash_weights: bool = True) -> dict[str, dict[str, Any]]:
    """Every file under ``root`` (relative path → bytes, and sha256 unless a skipped weight)."""
    entries: dict[str, dict[str, Any]] = {}
    if not root.is_dir():
        return entries
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if "__pycache__" in path.parts:
            continue
        entry: dict[str, Any] = {"bytes": path.stat().st_size}
        if hash_weights or not path.name.endswith(WEIGHT_SUFFIXES):
            entry["sha256"] = sha256_file(path)
        entries[str(path.relative_to(root))] = entry
    return entries


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def trtllm_version(python: str, timeout_s: float = 60.0) -> str | None:
    """tensorrt-llm's version in the interpreter ``python`` (None: not installed, or no python)."""
    try:
        result = subprocess.run(
            [python, "-c", VERSION_PROBE],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except OSError:
        return None
    version = result.stdout.strip()
    return version or None


def engine_path_supported(version: str) -> bool:
    """True for tensorrt-llm 1.2.x, the last line with convert_checkpoint + trtllm-build."""
    match = re.match(r"^(\d+)\.(\d+)", version)
    return bool(match) and (int(match.group(1)), int(match.group(2))) == (1, 2)


def build_manifest(
    plan: Plan,
    steps: list[BuildStep],
    results: list[StepResult],
    trtllm: str | None,
    repository: Path,
) -> dict[str, Any]:
    s = plan.settings
    timings = {r.name: r for r in results}
    engine_config = s.engine_dir / "config.json"
    return {
        "schema": 1,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "serving": s.serving,
        "versions": {
            "triage": package_version("triage"),
            "tensorrt_llm": trtllm,
            "tensorrt_llm_required": ENGINE_PATH_TRTLLM if s.serving == "engine" else ">=1.2",
            "tritonclient": package_version("tritonclient"),
            "python": platform.python_version(),
        },
        "parallelism": {
            "tp_size": s.tp_size,
            "pp_size": s.pp_size,
            "world_size": s.world_size,
            "gpu_device_ids": s.device_ids,
        },
        "devices": dataclasses.asdict(plan.devices),
        "memory_estimate_mb": {
            **{k: round(v, 1) for k, v in dataclasses.asdict(plan.memory).items()},
            "total_mb": round(plan.memory.total_mb, 1),
        },
        "settings": s.model_dump(mode="json", exclude={"dry_run"}),
        "model": {
            "dir": str(s.model_path),
            "shape": dataclasses.asdict(plan.shape),
            "parameters": plan.shape.parameter_count(),
            "files": file_entries(s.model_path, hash_weights=False),
        },
        "commands": [
            {
                "name": step.name,
                "argv": step.argv,
                "shell": step.shell(),
                "seconds": timings[step.name].seconds if step.name in timings else None,
                "log": str(step.log_path),
            }
            for step in steps
        ],
        "engine": {
            "dir": str(s.engine_dir),
            "config": json.loads(engine_config.read_text()) if engine_config.is_file() else None,
            "files": file_entries(s.engine_dir),
        }
        if s.serving == "engine"
        else None,
        "repository": {"dir": str(repository), "files": file_entries(repository)},
    }


def write_manifest(manifest: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path
