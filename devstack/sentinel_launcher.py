"""Redis with Sentinel for the embedded stack (``triage up --redis-sentinel``) and the failover
test: a primary, one replica, and three ``redis-sentinel`` processes (``redis-server
--sentinel``) watching them with a quorum of two. Every part then connects through the Sentinels
(``redis+sentinel://``, ``core/redis_url.py``), so a failover moves them to the promoted replica.

Sentinel rewrites its own config file (the replicas and Sentinels it learns, a new primary), so
each Sentinel gets a private, writable one (mode 0600: it holds ``auth-pass``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import redis

from core.paths import free_port, redis_server_binary
from core.process import ManagedProcess
from devstack.redis_launcher import RedisProcess, RedisServer

log = logging.getLogger(__name__)

SERVICE = "triage"
"""The name the Sentinels monitor the primary under (the URL's path)."""
DOWN_AFTER_MS = 1000
"""How long a primary may not answer before a Sentinel calls it down (Redis' default is 30 s;
the stack's load store is on the request path, so a short one)."""
FAILOVER_TIMEOUT_MS = 10_000


@dataclass
class RedisSentinel(RedisProcess):
    workdir: Path
    primary_port: int
    password: str | None
    port: int = 0
    quorum: int = 2
    ready_timeout_s: float = 20.0
    process: ManagedProcess | None = None

    @property
    def config_path(self) -> Path:
        return self.workdir / f"sentinel-{self.port}.conf"

    def write_config(self) -> Path:
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f'dir "{self.workdir}"',
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} {self.quorum}",
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {SERVICE} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {SERVICE} {self.password}")
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(lines) + "\n")
        return self.config_path

    def start(self) -> RedisSentinel:
        self.port = self.port or free_port()
        argv = [str(redis_server_binary()), str(self.write_config()), "--sentinel"]
        name = f"redis-sentinel[{self.port}]"
        self.process = ManagedProcess(name, argv, self.workdir / f"sentinel-{self.port}.log")
        self.process.start()
        self.process.wait_until(self.ping, self.ready_timeout_s, "answering PING")
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5)

    def ping(self) -> bool:
        client = self.client()
        try:
            return bool(client.ping())
        finally:
            client.close()

    def primary(self) -> tuple[str, int] | None:
        """The primary's address as this Sentinel knows it now."""
        client = self.client()
        try:
            found = client.sentinel_get_master_addr_by_name(SERVICE)
        finally:
            client.close()
        return (str(found[0]), int(found[1])) if found else None

    def knows(self, replicas: int, sentinels: int) -> bool:
        """It has found the replicas and the other Sentinels (a failover needs both)."""
        client = self.client()
        try:
            return (
                len(client.sentinel_slaves(SERVICE)) >= replicas
                and len(client.sentinel_sentinels(SERVICE)) >= sentinels
            )
        finally:
            client.close()


@dataclass
class RedisHA:
    """A primary, its replica and three Sentinels; ``url`` is the Sentinel URL."""

    primary: RedisServer
    replica: RedisServer | None = None
    sentinels: list[RedisSentinel] = field(default_factory=list)
    count: int = 3

    def start(self) -> RedisHA:
        """Start the primary, the replica (until it is in sync), then the Sentinels (until each
        knows the replica and the others)."""
        p = self.primary
        if p.process is None:
            p.start()
        self.replica = RedisServer(
            p.workdir, password=p.password, users=list(p.users), primary_port=p.port
        ).start()
        self.replica.process.wait_until(  # type: ignore[union-attr]
            self.replica.in_sync, 30.0, "in sync with its primary"
        )
        self.sentinels = [
            RedisSentinel(p.workdir, p.port, p.password).start() for _ in range(self.count)
        ]
        for sentinel in self.sentinels:
            sentinel.process.wait_until(  # type: ignore[union-attr]
                lambda s=sentinel: s.knows(1, self.count - 1), 30.0, "aware of the others"
            )
        log.info(
            "redis with sentinel: primary :%d, replica :%d, sentinels %s",
            p.port,
            self.replica.port,
            [s.port for s in self.sentinels],
        )
        return self

    def url_for(self, user: str | None = None, password: str | None = None) -> str:
        """``redis+sentinel://`` with ``user``'s credentials (the default user's without)."""
        secret = password if password is not None else self.primary.password
        auth = f"{user or ''}:{secret}@" if secret else ""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{auth}{hosts}/{SERVICE}/0"

    def current_primary(self) -> RedisServer:
        """The data node the Sentinels name now."""
        for sentinel in self.sentinels:
            if sentinel.alive() and (address := sentinel.primary()) is not None:
                for node in (self.primary, self.replica):
                    if node is not None and node.port == address[1]:
                        return node
        raise RuntimeError("no Sentinel names a primary")

    def parts(self) -> list[RedisServer | RedisSentinel]:
        return [s for s in [self.primary, self.replica, *self.sentinels] if s is not None]

    def stop(self) -> None:
        for part in [*self.sentinels, self.replica, self.primary]:
            if part is not None:
                part.stop()
