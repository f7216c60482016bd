"""Start a real ``redis-server`` for the load store with ``redis/redis.conf`` on a free port.

Without a password (the default here: tests and ``loadtests/`` start it so) any local client may
do anything. With ``password`` the default user needs it, and ``users`` adds ACL users (Redis
>= 6). Secrets go into a generated config file (mode 0600, removed on stop) that includes
``redis/redis.conf``, never onto the command line, which every local user can read in ``ps``.
``stack_users`` builds the two users of the embedded stack (``redis/SCHEMA.md``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from core.keyschema import KeySchema
from core.paths import REDIS_DIR, free_port, redis_server_binary
from core.process import ManagedProcess

log = logging.getLogger(__name__)

SIDECAR_USER = "triage-sidecar"
PROXY_USER = "triage-proxy"

SIDECAR_KEYS = ("replica", "model_replicas", "server")
"""``KeySchema`` methods naming the keys a sidecar writes (``sidecar/publish.lua``'s KEYS, and
``DEL replica:{id}`` when it withdraws on a clean stop)."""
SIDECAR_COMMANDS = (
    "ping",
    "select",
    "evalsha",
    "eval",
    "script|load",  # redis-py's Script: EVALSHA, on NOSCRIPT SCRIPT LOAD and EVALSHA again
    "hget",
    "hset",
    "pexpire",
    "sadd",
    "del",
)
"""What ``publish.lua`` calls (Redis checks the commands a script runs against the calling
user's ACL, and their keys, declared or not) plus the sidecar's own calls."""
PROXY_COMMANDS = ("+@all", "-@admin", "-@dangerous")


@functools.cache
def redis_server_version(binary: Path | None = None) -> tuple[int, int, int]:
    """``redis-server --version`` as (major, minor, patch)."""
    exe = binary or redis_server_binary()
    out = subprocess.run(
        [str(exe), "--version"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    found = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if found is None:
        raise RuntimeError(f"cannot read the version of {exe} from {out!r}")
    major, minor, patch = (int(part) for part in found.groups())
    return major, minor, patch


def new_password() -> str:
    return secrets.token_urlsafe(24)  # [A-Za-z0-9_-]: safe in a URL and in an ACL rule


@dataclass(frozen=True)
class RedisUser:
    """An ACL user: ``user <name> on ><password> <rules...>`` in the generated config."""

    name: str
    password: str
    rules: tuple[str, ...]

    def config_line(self) -> str:
        return " ".join(["user", self.name, "on", f">{self.password}", *self.rules])


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis glob (ACL key and channel patterns)."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def key_kinds() -> list[str]:
    """The public methods of ``KeySchema``: one per kind of key (or channel)."""
    return [name for name, _ in inspect.getmembers(KeySchema, inspect.isfunction) if name[0] != "_"]


def key_patterns(prefix: str, kinds: tuple[str, ...] | list[str]) -> list[str]:
    """The glob of every key of each kind, e.g. ``triage:replica:*`` for ``replica``."""
    schema = KeySchema(glob_escape(prefix))
    patterns = []
    for kind in kinds:
        method = getattr(schema, kind)
        patterns.append(method(*["*"] * len(inspect.signature(method).parameters)))
    return patterns


def sidecar_rules(prefix: str, version: tuple[int, int, int]) -> tuple[str, ...]:
    """Write the replica state (its hash, the model's replica set, the server hash), no more."""
    keys = [f"~{pattern}" for pattern in key_patterns(prefix, SIDECAR_KEYS)]
    channels = ["resetchannels"] if version >= (6, 2) else []  # 6.0/6.1: channels unchecked
    return ("resetkeys", *keys, *channels, "-@all", *(f"+{c}" for c in SIDECAR_COMMANDS))


def proxy_rules(prefix: str, version: tuple[int, int, int]) -> tuple[str, ...]:
    """Every key and channel under the prefix, readable; writable: the schema's key kinds (Redis
    >= 7: ``%R~`` for the rest; before, every key under the prefix), the key store included
    (the proxies serve LiteLLM's key routes to the master key they hold:
    ``plugins/auth/key_management.py``); no admin or dangerous commands (CONFIG, FLUSHALL, KEYS,
    ACL, ...)."""
    everything = f"{glob_escape(prefix)}*"
    if version >= (7, 0):
        keys = [f"%R~{everything}", *(f"~{p}" for p in key_patterns(prefix, key_kinds()))]
    else:
        keys = [f"~{everything}"]
    channels = ["resetchannels", f"&{everything}"] if version >= (6, 2) else []
    return ("resetkeys", *keys, *channels, *PROXY_COMMANDS)


def stack_users(prefix: str, version: tuple[int, int, int]) -> list[RedisUser]:
    """The sidecar and proxy users of the embedded stack, fresh passwords; none before 6.0."""
    if version < (6, 0):
        log.warning("redis-server %s has no ACLs: every client uses the default user", version)
        return []
    return [
        RedisUser(SIDECAR_USER, new_password(), sidecar_rules(prefix, version)),
        RedisUser(PROXY_USER, new_password(), proxy_rules(prefix, version)),
    ]


def _quoted(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedisProcess:
    """The life of a ``redis-server`` process (a data node or a Sentinel) started from a
    private config file on its own port: what the supervisor and the stack call."""

    process: ManagedProcess | None
    port: int

    @property
    def config_path(self) -> Path:
        raise NotImplementedError

    def start(self) -> Any:
        raise NotImplementedError

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def exit_status(self) -> str:
        return self.process.exit_status() if self.process is not None else "not started"

    def restart(self) -> None:
        """Same port, same data folder (a data node's append-only file brings its keys back)."""
        self.stop()
        self.start()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
        if self.port:
            self.config_path.unlink(missing_ok=True)  # it may hold passwords


@dataclass
class RedisServer(RedisProcess):
    workdir: Path
    port: int = 0
    password: str | None = None
    """The default user's password (``requirepass``); None: no authentication."""
    users: list[RedisUser] = field(default_factory=list)
    """ACL users besides the default one (Redis >= 6)."""
    ready_timeout_s: float = 20.0
    primary_port: int | None = None
    """A replica of the primary on this port (``replicaof``; authenticated with ``password``)."""
    process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        """The default user's URL (with the password, if any)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def url_for(self, user: str) -> str:
        """The URL of ACL user ``user`` (``redis://user:password@host:port/0``)."""
        for candidate in self.users:
            if candidate.name == user:
                return f"redis://{user}:{candidate.password}@127.0.0.1:{self.port}/0"
        raise KeyError(f"redis-server has no user {user!r}")

    @property
    def config_path(self) -> Path:
        return self.workdir / f"redis-{self.port}.conf"

    def write_config(self, data_dir: Path) -> Path:
        """``redis/redis.conf`` plus the port, data folder, password and users (mode 0600)."""
        lines = [
            f"include {_quoted(REDIS_DIR / 'redis.conf')}",
            f"port {self.port}",
            f"dir {_quoted(data_dir)}",
        ]
        if self.password:
            # masterauth on a primary too: after a failover Sentinel makes it a replica
            lines += [f"requirepass {self.password}", f"masterauth {self.password}"]
        if self.primary_port is not None:
            lines.append(f"replicaof 127.0.0.1 {self.primary_port}")
        lines += [user.config_line() for user in self.users]
        path = self.config_path
        unfinished = path.with_suffix(".conf.partial")
        fd = os.open(unfinished, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("\n".join(lines) + "\n")
        os.replace(unfinished, path)
        return path

    def start(self) -> RedisServer:
        self.port = self.port or free_port()
        data_dir = self.workdir / f"redis-{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        if self.users and redis_server_version() < (6, 0):
            raise RuntimeError(f"ACL users need redis-server >= 6, not {redis_server_version()}")
        argv = [str(redis_server_binary()), str(self.write_config(data_dir))]
        self.process = ManagedProcess(
            f"redis-server[{self.port}]", argv, self.workdir / f"redis-{self.port}.log"
        )
        self.process.start()
        self.process.wait_until(self.ping, self.ready_timeout_s, "answering PING")
        users = ", ".join(["default", *(u.name for u in self.users)])
        auth = f"password, users {users}" if self.password else "no password"
        log.info("redis ready at 127.0.0.1:%d (%s)", self.port, auth)
        return self

    def ping(self) -> bool:
        client = redis.Redis.from_url(self.url, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()

    def role(self) -> str:
        """``master`` or ``slave`` (Redis' words), as the server says now."""
        client = redis.Redis.from_url(self.url, socket_timeout=0.5)
        try:
            return str(client.info("replication")["role"])
        finally:
            client.close()

    def in_sync(self) -> bool:
        """A replica whose link to its primary is up (a primary: always)."""
        client = redis.Redis.from_url(self.url, socket_timeout=0.5)
        try:
            info = client.info("replication")
        finally:
            client.close()
        return info["role"] == "master" or info.get("master_link_status") == "up"
