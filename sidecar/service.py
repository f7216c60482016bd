"""The load sidecar: one per Triton replica; polls its metrics and publishes load to Redis.

Run: ``triage sidecar --replica-id r1 --model standin --triton-url http://127.0.0.1:8000 ...``
(every flag also reads ``TRIAGE_SIDECAR_<NAME>``). Serves ``/healthz`` and ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import ValidationError
from pydantic_settings import CliApp
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from core.keyschema import KeySchema, ReplicaState, ServerState
from core.lua import ScriptProtocol, fields, lua_source
from core.redis_client import cancel_requested, redis_client
from core.redis_url import redacted
from core.settings_errors import report_invalid
from sidecar.backlog import HiddenQueue
from sidecar.health import HealthDebounce
from sidecar.service_time import CompletionWindow, StepTimeWindow
from sidecar.settings import SidecarSettings
from sidecar.topology import server_topology
from sidecar.triton_metrics import EngineSample, parse_engine_sample

log = logging.getLogger("triage.sidecar")


class ModelNotLoaded(RuntimeError):
    """The server answers, the model is not loaded on it (explicit model control)."""


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.poll_seconds = Histogram(
            "triage_sidecar_poll_seconds",
            "Time to poll Triton (metrics and readiness)",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.poll_failures = Counter(
            "triage_sidecar_poll_failures", "Polls that failed", registry=registry
        )
        self.publish_failures = Counter(
            "triage_sidecar_publish_failures", "Redis publishes that failed", registry=registry
        )
        self.last_publish = Gauge(
            "triage_sidecar_last_publish_timestamp_seconds",
            "Unix time of the last successful publish to Redis",
            registry=registry,
        )
        self.published = Gauge(
            "triage_sidecar_published",
            "Last values published to Redis",
            ["field"],
            registry=registry,
        )
        self.info = Gauge(
            "triage_sidecar_info",
            "1, labelled with the replica and model this sidecar publishes for (for joins)",
            ["replica", "model", "server"],
            registry=registry,
        )


PUBLISH_LUA = Path(__file__).with_name("publish.lua")
PUBLISH = ScriptProtocol(
    "publish",
    keys=("replica", "replicas", "server"),
    args=fields(
        ("poll_started_ms", "int"), ("ttl_ms", "int"), "replica_id", ("replica_fields", "int")
    ),
)
"""``publish.lua``: after the fixed arguments, the replica hash's field/value pairs, then the
server hash's; replies 1 when the replica hash was written, 0 when a fresher one was kept."""


def flat(mapping: dict[str, str]) -> list[str]:
    """``{"a": "1", "b": "2"}`` → ``["a", "1", "b", "2"]`` (HSET's argument order)."""
    return [part for pair in mapping.items() for part in pair]


class Sidecar:
    def __init__(
        self,
        settings: SidecarSettings,
        redis_client: aioredis.Redis,
        http: httpx.AsyncClient,
        metrics: SidecarMetrics,
    ) -> None:
        self.settings = settings
        self.redis = redis_client
        self.http = http
        self.metrics = metrics
        self.keys = KeySchema(settings.key_prefix)
        self.health = HealthDebounce(threshold=settings.unhealthy_after)
        self.window = CompletionWindow(window_s=settings.service_window_s)
        self.steps = StepTimeWindow(window_s=settings.service_window_s)
        self.hidden = HiddenQueue(window_s=settings.backlog_window_s)
        self.hidden_queue = 0
        """The executor's queue behind ``max`` as last estimated (0: none, or no counters)."""
        self.last_sample: EngineSample | None = None
        self.last_sample_ms = 0
        self.last_publish_monotonic: float | None = None
        self.last_state: ReplicaState | None = None
        self._redis_error_logged_at = 0.0
        self._publish_script = redis_client.register_script(lua_source(PUBLISH_LUA, PUBLISH))
        self.poll_started_ms = 0
        """When the current poll began: a replica fact stored after it is fresher than ours."""
        self.loaded = True
        """False while the server is up and the model is not loaded on it."""
        self.server_up = False
        self.device_count, self.device_memory_mb = server_topology(
            settings.device_count, settings.device_memory_mb
        )

    async def sample(self) -> EngineSample:
        s = self.settings
        assert s.metrics_url is not None
        server, ready, text = await asyncio.gather(
            # liveness, not readiness: with --strict-readiness one model that failed to load
            # makes the whole server "not ready", though it serves its other models
            self.http.get(f"{s.triton_url}/v2/health/live"),
            self.http.get(f"{s.triton_url}/v2/models/{s.model}/ready"),
            self.http.get(s.metrics_url),
        )
        self.server_up = server.status_code == 200
        if ready.status_code != 200:
            if self.server_up:
                raise ModelNotLoaded(f"model {s.model} is not loaded (HTTP {ready.status_code})")
            raise RuntimeError(f"model {s.model} not ready (HTTP {ready.status_code})")
        text.raise_for_status()
        return parse_engine_sample(text.text, s.model, s.engine_model, s.arrivals_model)

    async def poll_once(self) -> ReplicaState:
        s = self.settings
        before = self.health.state
        started = time.perf_counter()
        self.poll_started_ms = int(time.time() * 1000)
        try:
            sample = await self.sample()
        except ModelNotLoaded as exc:
            if self.loaded:
                log.info("replica %s: %s", s.replica_id, exc)
            self.loaded = False
            self.health = HealthDebounce(threshold=s.unhealthy_after)  # a fact, not a flake
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            if isinstance(exc, httpx.HTTPError):
                self.server_up = False
            self.metrics.poll_failures.inc()
            state = self.health.observe(False)
            level = logging.WARNING if state != before else logging.DEBUG
            log.log(
                level,
                "replica %s poll failed (%s, %d in a row): %s",
                s.replica_id,
                state,
                self.health.consecutive_failures,
                exc,
            )
        else:
            self.loaded = True
            self.health.observe(True)
            self.last_sample = sample
            self.last_sample_ms = int(time.time() * 1000)
            now = time.monotonic()
            if sample.completions is not None:
                self.window.add(now, sample.completions, sample.active)
            if sample.iterations is not None:
                self.steps.add(now, sample.iterations, sample.active > 0)
            self.hidden_queue = self.hidden_queue_estimate(now, sample)
            if before != "healthy":
                log.info("replica %s healthy (was %s)", s.replica_id, before)
        finally:
            self.metrics.poll_seconds.observe(time.perf_counter() - started)
        state = self.current_state()
        await self.publish(state)
        return state

    def hidden_queue_estimate(self, now: float, sample: EngineSample) -> int:
        """The executor's queue behind ``max`` (``sidecar/backlog.py``); 0 without the gauges
        or the counters it needs."""
        if (
            sample.max_active is None
            or sample.arrivals is None
            or sample.completions is None
            or self.settings.max_active is not None  # configured: the gauge's cap is not used
        ):
            return 0
        return self.hidden.estimate(
            now, sample.arrivals, sample.completions, sample.active, sample.max_active
        )

    def service_ms(self) -> float | None:
        """The replica's time unit for the routing score (the same basis across a fleet):
        ms per engine iteration when the engine exports its iteration counter (TensorRT-LLM and
        the stand-in), else the mean time a request is active (Little's law)."""
        if self.last_sample is not None and self.last_sample.iterations is not None:
            return self.steps.step_ms
        return self.request_ms()

    def request_ms(self) -> float | None:
        """Mean time a request is active in the engine (None without the ``active`` gauge)."""
        if self.last_sample is None or self.last_sample.source != "trtllm":
            return None
        return self.window.request_ms

    def current_state(self) -> ReplicaState:
        s = self.settings
        sample = self.last_sample
        max_active = s.max_active or (sample.max_active if sample else None) or 1
        return ReplicaState(
            replica_id=s.replica_id,
            model=s.model,
            api_base=s.api_base or s.triton_url,
            # Triton's own queue + the executor's, estimated (the engine's `waiting` gauge is a
            # subset of `active`: counting it again would count those requests twice)
            waiting=(sample.pending + self.hidden_queue) if sample else 0,
            active=sample.active if sample else 0,
            max_active=max_active,
            kv_fraction=sample.kv_fraction if sample else 0.0,
            kv_tokens=sample.kv_tokens if sample else None,
            service_ms=self.service_ms(),
            drain_rps=self.window.drain_rps,
            request_ms=self.request_ms(),
            healthy=self.health.healthy and self.loaded,
            state=self.health.state if self.loaded else "unloaded",
            source=sample.source if sample else "triton",
            ts_ms=int(time.time() * 1000),
            sample_ts_ms=self.last_sample_ms,
        )

    def server_state(self) -> ServerState:
        s = self.settings
        assert s.server_id is not None
        return ServerState(
            server_id=s.server_id,
            api_base=s.api_base or s.triton_url,
            device_count=self.device_count,
            device_memory_mb=self.device_memory_mb,
            healthy=self.server_up,
            ts_ms=int(time.time() * 1000),
        )

    async def publish(self, state: ReplicaState) -> None:
        s = self.settings
        assert s.server_id is not None
        try:
            replica_fields = flat(state.to_redis())
            written = await self._publish_script(
                keys=PUBLISH.keys_for(
                    replica=self.keys.replica(s.replica_id),
                    replicas=self.keys.model_replicas(s.model),
                    server=self.keys.server(s.server_id),
                ),
                args=PUBLISH.argv(
                    [*replica_fields, *flat(self.server_state().to_redis())],
                    poll_started_ms=self.poll_started_ms,
                    ttl_ms=s.ttl_ms,
                    replica_id=s.replica_id,
                    replica_fields=len(replica_fields),
                ),
            )
            if not written:
                log.debug(
                    "replica %s: a fresher state is stored; this poll's kept out", s.replica_id
                )
        except (RedisError, OSError) as exc:
            self.metrics.publish_failures.inc()
            now = time.monotonic()
            if now - self._redis_error_logged_at > 5.0:  # once per interval, not per poll
                self._redis_error_logged_at = now
                log.warning("replica %s: publish to Redis failed: %s", s.replica_id, exc)
            return
        self.last_state = state
        self.last_publish_monotonic = time.monotonic()
        self.metrics.last_publish.set(time.time())
        for name in ("waiting", "active", "max_active", "kv_fraction"):
            self.metrics.published.labels(name).set(getattr(state, name))
        self.metrics.published.labels("healthy").set(1 if state.healthy else 0)
        if state.service_ms is not None:
            self.metrics.published.labels("service_ms").set(state.service_ms)

    async def run(self) -> None:
        """Poll at a fixed rate (the next poll is due one interval after the last was due)."""
        interval = self.settings.poll_interval_ms / 1000.0
        next_due = time.monotonic()
        while not cancel_requested():
            await self.poll_once()
            next_due += interval
            delay = next_due - time.monotonic()
            if delay < 0:  # fell behind: skip missed ticks instead of bursting
                next_due = time.monotonic()
                delay = 0
            await asyncio.sleep(delay)

    async def withdraw(self) -> None:
        """On a clean stop: drop the hash at once so routers see "unknown", not stale load."""
        try:
            await self.redis.delete(self.keys.replica(self.settings.replica_id))
        except (RedisError, OSError) as exc:
            log.warning(
                "replica %s: could not withdraw from Redis: %s", self.settings.replica_id, exc
            )

    def publish_age_s(self) -> float | None:
        if self.last_publish_monotonic is None:
            return None
        return time.monotonic() - self.last_publish_monotonic


def create_app(settings: SidecarSettings) -> FastAPI:
    registry = CollectorRegistry()
    metrics = SidecarMetrics(registry)
    metrics.info.labels(settings.replica_id, settings.model, settings.server_id or "").set(1)
    holder: dict[str, Sidecar] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeout = settings.poll_timeout_ms / 1000.0
        redis = redis_client(
            settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        async with httpx.AsyncClient(timeout=timeout) as http:
            sidecar = Sidecar(settings, redis, http, metrics)
            holder["sidecar"] = sidecar
            task = asyncio.create_task(sidecar.run(), name="sidecar-poll")
            log.info(
                "sidecar for replica %s polling %s every %d ms, publishing to %s",
                settings.replica_id,
                settings.metrics_url,
                settings.poll_interval_ms,
                redacted(settings.redis_url),
            )
            try:
                yield
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                await sidecar.withdraw()
                await redis.aclose()

    app = FastAPI(title="triage sidecar", lifespan=lifespan)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        sidecar = holder.get("sidecar")
        age = sidecar.publish_age_s() if sidecar else None
        fresh = age is not None and age * 1000 < settings.ttl_ms
        body = {
            "replica_id": settings.replica_id,
            "publishing": fresh,
            "publish_age_s": age,
            "replica_state": sidecar.health.state if sidecar else "unhealthy",
        }
        return JSONResponse(body, status_code=200 if fresh else 503)

    return app


def load_settings(argv: Sequence[str]) -> SidecarSettings:
    return CliApp.run(SidecarSettings, cli_args=list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
    except ValidationError as exc:
        return report_invalid("triage sidecar", exc)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every request at INFO: two lines per poll would cost the sidecar real CPU
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=2,  # keep-alive probes must not hold a SIGTERM for 10 s
    )
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
