"""The embedded stack on free loopback ports: Redis, Triton stand-in replicas, a sidecar each,
and the LiteLLM proxy (one or more processes) with the triage plugins and a fresh virtual key."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from gateway.process import start_concurrently
from gateway.proxy_config import (
    ProxyOptions,
    ReplicaEndpoint,
    build_proxy_config,
    new_master_key,
    proxy_env,
    write_proxy_config,
)
from gateway.proxy_launcher import LiteLLMProxy, start_proxy
from gateway.redis_launcher import RedisServer
from gateway.sidecar_launcher import SidecarProcess, start_sidecar
from gateway.stack_settings import StackSettings
from gateway.triton_launcher import StandinSettings, TritonServer, start_standin_replica

log = logging.getLogger(__name__)


@dataclass
class Stack:
    settings: StackSettings
    workdir: Path = field(init=False)
    redis: RedisServer | None = None
    replicas: dict[str, TritonServer] = field(default_factory=dict)
    sidecars: dict[str, SidecarProcess] = field(default_factory=dict)
    proxies: list[LiteLLMProxy] = field(default_factory=list)
    master_key: str = field(default_factory=new_master_key)
    api_key: str | None = None
    """A virtual key created at start (alias ``triage-up``, every model)."""

    def __post_init__(self) -> None:
        self.workdir = self.settings.workdir or Path(tempfile.mkdtemp(prefix="triage-stack-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> Stack:
        """Start everything; on any failure stop what was started and re-raise."""
        s = self.settings
        try:
            self.redis = RedisServer(self.workdir).start()
            standins = {
                f"replica-{index}": StandinSettings(
                    model_name=s.model,
                    speed=speed,
                    max_active=s.max_active,
                    engine_queue_size=s.engine_queue_size,
                    decode_ms_per_token=s.decode_ms_per_token,
                    batch_slowdown=s.batch_slowdown,
                    prefill_ms_per_token=s.prefill_ms_per_token,
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
                        self.redis.url,
                        self.workdir,
                        poll_interval_ms=s.poll_interval_ms,
                        key_prefix=s.key_prefix,
                    )
                    for rid, server in self.replicas.items()
                }
            )
            if s.proxies:
                self.api_key = asyncio.run(self._create_key())
                self._start_proxies()
        except BaseException:
            self.stop()
            raise
        # private (it holds the master key and a virtual key), and complete when it appears
        state = self.workdir / "stack.json"
        unfinished = state.with_suffix(".json.partial")
        fd = os.open(unfinished, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(self.describe(), out, indent=2)
        os.replace(unfinished, state)
        return self

    async def _create_key(self) -> str:
        from plugins.auth.keystore import KeyStore
        from plugins.auth.settings import KeysSettings

        assert self.redis is not None
        store = KeyStore.from_settings(
            KeysSettings(redis_url=self.redis.url, key_prefix=self.settings.key_prefix)
        )
        try:
            key, _ = await store.create(alias=f"triage-up-{os.getpid()}")
        finally:
            await store.aclose()
        return key

    def _start_proxies(self) -> None:
        s = self.settings
        assert self.redis is not None
        endpoints = [ReplicaEndpoint(rid, server.http_url) for rid, server in self.replicas.items()]
        options = ProxyOptions(routing=s.routing, num_retries=s.num_retries)
        config = build_proxy_config(s.model, s.model, endpoints, options)
        path = write_proxy_config(config, self.workdir / "proxy.yaml")
        env = proxy_env(self.redis.url, s.key_prefix, self.master_key)
        started = start_concurrently(
            {
                f"proxy-{index}": partial(
                    start_proxy,
                    f"proxy-{index}",
                    path,
                    env,
                    self.workdir,
                    ready_timeout_s=s.proxy_ready_timeout_s,
                )
                for index in range(s.proxies)
            }
        )
        self.proxies.extend(started.values())

    def describe(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "redis_url": self.redis.url if self.redis else None,
            "key_prefix": self.settings.key_prefix,
            "model": self.settings.model,
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
                    "pid": server.process.pid if server.process else None,
                }
                for (rid, server), speed in zip(
                    self.replicas.items(), self.settings.speeds, strict=False
                )
            },
        }

    def stop(self) -> None:
        """Stop in reverse order of start; every part is attempted even if one fails."""
        parts: list[Any] = [
            *self.proxies,
            *self.sidecars.values(),
            *self.replicas.values(),
            self.redis,
        ]
        for part in parts:
            if part is None:
                continue
            try:
                part.stop()
            except Exception:
                log.exception("could not stop %r", part)
