"""The embedded stack on free loopback ports: Redis, Triton stand-in replicas, a sidecar each,
and the LiteLLM proxy (one or more processes) with the triage plugins and a fresh virtual key.

Redis gets a random password (``settings.redis_auth``) and, where it has ACLs, a user for the
sidecars (replica state only) and one for the proxies (no writes to the key store); the key is
created as the default user. ``supervisor()`` builds the loop that ``triage up`` runs to restart
crashed parts on their ports. ``stack.json`` (mode 0600: it holds the master key, a virtual key
and the Redis passwords) is removed on stop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from core.process import ManagedProcess, start_concurrently, stop_concurrently
from devstack.proxy_launcher import LiteLLMProxy, start_proxy
from devstack.redis_launcher import (
    PROXY_USER,
    SIDECAR_USER,
    RedisServer,
    new_password,
    redis_server_version,
    stack_users,
)
from devstack.sentinel_launcher import RedisHA
from devstack.sidecar_launcher import SidecarProcess, start_sidecar
from devstack.stack_settings import StackSettings
from devstack.supervisor import Supervised, Supervisor
from devstack.triton_launcher import (
    PROVIDER_DIALECT,
    StandinSettings,
    TritonServer,
    start_standin_replica,
)
from plugins.catalogue.settings import replica_id as catalogue_replica_id
from plugins.proxy_config import (
    ProxyOptions,
    ReplicaEndpoint,
    build_proxy_config,
    new_master_key,
    proxy_env,
    write_proxy_config,
)

log = logging.getLogger(__name__)

STATE_FILE = "stack.json"


@dataclass
class SupervisedProxy:
    """A proxy process as the supervisor sees it: restarted with the same command (same port,
    config and environment)."""

    proxy: LiteLLMProxy
    ready_timeout_s: float

    @property
    def process(self) -> ManagedProcess:
        return self.proxy.process

    def alive(self) -> bool:
        return self.process.alive()

    def exit_status(self) -> str:
        return self.process.exit_status()

    def restart(self) -> None:
        self.process.restart(self.proxy.ready, self.ready_timeout_s, "LiteLLM proxy ready")


@dataclass
class Stack:
    settings: StackSettings
    workdir: Path = field(init=False)
    redis: RedisServer | None = None
    """The Redis server (with ``redis_sentinel``: the first primary)."""
    redis_ha: RedisHA | None = None
    """With ``redis_sentinel``: the primary, its replica and the Sentinels."""
    replicas: dict[str, TritonServer] = field(default_factory=dict)
    sidecars: dict[str, SidecarProcess] = field(default_factory=dict)
    proxies: list[LiteLLMProxy] = field(default_factory=list)
    master_key: str = field(default_factory=new_master_key)
    api_key: str | None = None
    """A virtual key created at start (alias ``triage-up``, every model)."""
    _launch_proxy: Callable[..., LiteLLMProxy] | None = field(default=None, init=False, repr=False)
    """``start_proxy`` with the stack's proxy config and environment (once they are written)."""

    def __post_init__(self) -> None:
        self.workdir = self.settings.workdir or Path(tempfile.mkdtemp(prefix="triage-stack-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> Stack:
        """Start everything; on any failure stop what was started and re-raise."""
        s = self.settings
        try:
            self.redis = self._redis_server().start()
            if s.redis_sentinel:
                self.redis_ha = RedisHA(self.redis).start()
            standins = {
                f"replica-{index}": StandinSettings(
                    model_name=s.model,
                    dialect=s.dialect,
                    speed=speed,
                    max_active=s.max_active,
                    engine_queue_size=s.engine_queue_size,
                    decode_ms_per_token=s.decode_ms_per_token,
                    batch_slowdown=s.batch_slowdown,
                    prefill_ms_per_token=s.prefill_ms_per_token,
                    kv_cache_blocks=s.kv_cache_blocks,
                )
                for index, speed in enumerate(s.speeds)
            }
            self.replicas = start_concurrently(
                {
                    rid: partial(
                        start_standin_replica,
                        rid,
                        standin,
                        self.workdir,
                        ready_timeout_s=s.ready_timeout_s,
                        unloaded=[
                            standin.model_copy(
                                update={"model_name": name, "engine_model": f"{name}_engine"}
                            )
                            for name in s.catalogue
                        ],
                    )
                    for rid, standin in standins.items()
                }
            )
            self.sidecars = start_concurrently(
                {
                    rid: partial(
                        start_sidecar,
                        rid,
                        server,
                        s.model,
                        self.redis_url(SIDECAR_USER),
                        self.workdir,
                        poll_interval_ms=s.poll_interval_ms,
                        key_prefix=s.key_prefix,
                        extra=self._sidecar_extra(),
                    )
                    for rid, server in self.replicas.items()
                }
                | {
                    # one sidecar per (server, catalogued model), as the catalogue wants
                    catalogue_replica_id(rid, name): partial(
                        start_sidecar,
                        catalogue_replica_id(rid, name),
                        server,
                        name,
                        self.redis_url(SIDECAR_USER),
                        self.workdir,
                        poll_interval_ms=s.poll_interval_ms,
                        key_prefix=s.key_prefix,
                        extra={**self._sidecar_extra(), "server-id": rid},
                    )
                    for rid, server in self.replicas.items()
                    for name in s.catalogue
                }
            )
            if s.proxies:
                self.api_key = asyncio.run(self.create_key(f"triage-up-{os.getpid()}"))
                self._start_proxies()
        except BaseException:
            self.stop()
            raise
        self.write_state()
        return self

    def _redis_server(self) -> RedisServer:
        if not self.settings.redis_auth:
            return RedisServer(self.workdir)
        users = stack_users(self.settings.key_prefix, redis_server_version())
        return RedisServer(self.workdir, password=new_password(), users=users)

    def redis_url(self, user: str | None = None) -> str:
        """The URL of ACL user ``user`` where the server has it, else the default user's
        (through the Sentinels with ``redis_sentinel``)."""
        assert self.redis is not None
        found = next((u for u in self.redis.users if u.name == user), None)
        if self.redis_ha is not None:
            if found is not None:
                return self.redis_ha.url_for(found.name, found.password)
            return self.redis_ha.url_for()
        return self.redis.url_for(found.name) if found is not None else self.redis.url

    @property
    def state_path(self) -> Path:
        return self.workdir / STATE_FILE

    def write_state(self) -> Path:
        """``stack.json``: private (it holds the master key, a virtual key and the Redis
        passwords), and complete when it appears (written aside, then renamed)."""
        state = self.state_path
        unfinished = state.with_suffix(".json.partial")
        fd = os.open(unfinished, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(self.describe(), out, indent=2)
        os.replace(unfinished, state)
        return state

    def supervised_parts(self) -> dict[str, Supervised]:
        """What the supervisor watches, in the order it restarts them: Redis first (the others
        need it), a replica before its sidecar."""
        parts: dict[str, Supervised] = {}
        if self.redis_ha is not None:
            for part in self.redis_ha.parts():
                parts[
                    f"{'redis-sentinel' if part in self.redis_ha.sentinels else 'redis-server'}"
                    f"[{part.port}]"
                ] = part
        elif self.redis is not None:
            parts["redis-server"] = self.redis
        for rid, server in self.replicas.items():
            parts[f"tritonserver[{rid}]"] = server
        for rid, sidecar in self.sidecars.items():
            parts[f"sidecar[{rid}]"] = sidecar
        for proxy in self.proxies:
            parts[f"litellm[{proxy.name}]"] = SupervisedProxy(
                proxy, self.settings.proxy_ready_timeout_s
            )
        return parts

    def supervisor(self) -> Supervisor:
        """The restart loop over every part; ``stack.json`` is rewritten after each restart
        (a replica's pid changes)."""
        return Supervisor(self.supervised_parts(), on_restart=lambda name: self.write_state())

    async def create_key(self, alias: str) -> str:
        """A new virtual key in this stack's key store (also for load generators)."""
        from plugins.auth.keystore import KeyStore
        from plugins.auth.settings import KeysSettings

        assert self.redis is not None
        store = KeyStore.from_settings(  # as the default user, as `triage keys` would
            KeysSettings(redis_url=self.redis_url(), key_prefix=self.settings.key_prefix)
        )
        try:
            key, _ = await store.create(alias=alias)
        finally:
            await store.aclose()
        return key

    def _sidecar_extra(self) -> dict[str, str]:
        """The LLM-API model exports no engine gauges and has no preprocessing step: its
        sidecar takes the slots from the settings and estimates no hidden queue."""
        if self.settings.dialect == "llmapi":
            return {"max-active": str(self.settings.max_active), "arrivals-model": ""}
        return {}

    def _start_proxies(self) -> None:
        s = self.settings
        assert self.redis is not None
        endpoints = [ReplicaEndpoint(rid, server.http_url) for rid, server in self.replicas.items()]
        catalogue = self._write_catalogue()
        options = ProxyOptions(
            routing=s.routing, num_retries=s.num_retries, catalogue_file=catalogue
        )
        # the stand-in answers its requests' reused KV-cache blocks (return_perf_metrics), as
        # TensorRT-LLM does: usage.prompt_tokens_details.cached_tokens
        config = build_proxy_config(
            s.model,
            s.model,
            endpoints,
            options,
            dialect=PROVIDER_DIALECT[s.dialect],
            provider_settings={
                "request_kv_cache_stats": True,
                # the stack's stand-ins keep StandinSettings' block size
                "kv_tokens_per_block": StandinSettings().kv_tokens_per_block,
            },
        )
        path = write_proxy_config(config, self.workdir / "proxy.yaml")
        env = proxy_env(self.redis_url(PROXY_USER), s.key_prefix, self.master_key, catalogue)
        self._launch_proxy = partial(
            start_proxy,
            config_path=path,
            env=env,
            workdir=self.workdir,
            ready_timeout_s=s.proxy_ready_timeout_s,
        )
        launch = self._launch_proxy
        started = start_concurrently(
            {f"proxy-{i}": partial(launch, f"proxy-{i}") for i in range(s.proxies)}
        )
        self.proxies.extend(started.values())

    def start_proxy(self, name: str, extra_env: dict[str, str] | None = None) -> LiteLLMProxy:
        """One more proxy of the stack's own config (plugins, replicas, key store), with
        ``extra_env`` over its environment (another plugin setting); stopped with the stack."""
        if self._launch_proxy is None:
            raise RuntimeError("the stack starts no proxy (proxies=0): there is no config to share")
        proxy = self._launch_proxy(name, extra_env=extra_env)
        self.proxies.append(proxy)
        return proxy

    def _write_catalogue(self) -> Path | None:
        """The catalogue file (``plugins/catalogue/README.md``): every replica's server, each
        catalogued model on any of them (CPU stand-ins: the host's topology)."""
        if not self.settings.catalogue:
            return None
        doc = {
            "servers": {
                rid: {"api_base": server.http_url} for rid, server in self.replicas.items()
            },
            "models": {
                name: {
                    "triton_model": name,
                    "dialect": PROVIDER_DIALECT[self.settings.dialect],
                }
                for name in self.settings.catalogue
            },
        }
        path = self.workdir / "catalogue.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def describe(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "redis_url": self.redis_url() if self.redis else None,
            # the ACL users' URLs (sidecars, proxies); empty without a password or ACLs
            "redis_users": (
                {u.name: self.redis_url(u.name) for u in self.redis.users} if self.redis else {}
            ),
            "key_prefix": self.settings.key_prefix,
            "model": self.settings.model,
            "catalogue": list(self.settings.catalogue),
            "base_url": self.proxies[0].base_url if self.proxies else None,
            "proxy_urls": [p.base_url for p in self.proxies],
            "api_key": self.api_key,
            "master_key": self.master_key if self.proxies else None,
            "routing": self.settings.routing,
            # the stand-in's timing, for load generators that size their load by capacity
            "standin": self.settings.model_dump(
                mode="json",
                include={
                    "max_active",
                    "engine_queue_size",
                    "decode_ms_per_token",
                    "batch_slowdown",
                    "prefill_ms_per_token",
                },
            ),
            "replicas": {
                rid: {
                    "triton_url": server.http_url,
                    "metrics_url": server.metrics_url,
                    "speed": speed,
                    "sidecar_url": self.sidecars[rid].url if rid in self.sidecars else None,
                    "catalogue_sidecar_urls": [
                        self.sidecars[c].url
                        for name in self.settings.catalogue
                        if (c := catalogue_replica_id(rid, name)) in self.sidecars
                    ],
                    "pid": server.process.pid if server.process else None,
                    "sidecar_pid": (
                        self.sidecars[rid].process.pid if rid in self.sidecars else None
                    ),
                    "shm_prefix": server.shm_prefix,
                }
                for (rid, server), speed in zip(
                    self.replicas.items(), self.settings.speeds, strict=False
                )
            },
        }

    def stop(self) -> None:
        """Stop in two tiers, each tier's parts side by side (every part is attempted even if
        one fails), then remove ``stack.json``: first what uses the others (the proxies, and
        the sidecars, which withdraw their replica's state from Redis as they stop), then what
        is used (the replicas and Redis)."""
        stop_concurrently([*self.proxies, *self.sidecars.values()])
        used: list[Any] = [*self.replicas.values()]
        used += self.redis_ha.parts() if self.redis_ha is not None else [self.redis]
        stop_concurrently(used)
        for path in (self.state_path, self.state_path.with_suffix(".json.partial")):
            path.unlink(missing_ok=True)
