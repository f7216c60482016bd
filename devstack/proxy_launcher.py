"""Start the real LiteLLM proxy (LiteLLM's own CLI through ``plugins.proxy_main``, which puts
the front door in front of its app) as a process on a free loopback port."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import httpx

from core.paths import REPO_ROOT, free_port, venv_bin
from core.process import ManagedProcess


@dataclass
class LiteLLMProxy:
    name: str
    port: int
    master_key: str
    process: ManagedProcess

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ready(self) -> bool:
        response = httpx.get(f"{self.base_url}/health/readiness", timeout=2.0)
        return response.status_code == 200

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        self.process.stop()


def start_proxy(
    name: str,
    config_path: Path,
    env: dict[str, str],
    workdir: Path,
    num_workers: int = 1,
    ready_timeout_s: float = 120.0,
    extra_env: dict[str, str] | None = None,
) -> LiteLLMProxy:
    """Start ``litellm --config config_path`` (behind the front door) and wait until it answers
    its readiness probe."""
    port = free_port()
    argv = [
        str(venv_bin() / "python"),
        "-m",
        "plugins.proxy_main",  # LiteLLM's CLI, its app behind the front door
        "--config",
        str(config_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        str(num_workers),
    ]
    full_env = {**os.environ, **env, **(extra_env or {})}
    full_env["PATH"] = f"{venv_bin()}{os.pathsep}{full_env.get('PATH', '')}"
    process = ManagedProcess(
        f"litellm[{name}]", argv, workdir / f"proxy-{name}.log", env=full_env, cwd=REPO_ROOT
    )
    process.start()
    proxy = LiteLLMProxy(name, port, env["LITELLM_MASTER_KEY"], process)
    process.wait_until(proxy.ready, ready_timeout_s, "LiteLLM proxy ready")
    return proxy
