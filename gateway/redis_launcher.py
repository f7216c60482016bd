"""Start a real ``redis-server`` for the load store with ``redis/redis.conf`` on a free port."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import redis

from gateway.process import ManagedProcess
from triage.paths import REDIS_DIR, free_port, redis_server_binary

log = logging.getLogger(__name__)


@dataclass
class RedisServer:
    workdir: Path
    port: int = 0
    password: str | None = None
    ready_timeout_s: float = 20.0
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.port = self.port or free_port()
        data_dir = self.workdir / f"redis-{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(redis_server_binary()),
            str(REDIS_DIR / "redis.conf"),
            "--port",
            str(self.port),
            "--dir",
            str(data_dir),
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        self.process = ManagedProcess(
            f"redis-server[{self.port}]", argv, self.workdir / f"redis-{self.port}.log"
        )
        self.process.start()
        self.process.wait_until(self.ping, self.ready_timeout_s, "answering PING")
        log.info("redis ready at 127.0.0.1:%d", self.port)
        return self

    def ping(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
