"""Cold load: the first request for a model loaded nowhere loads it on one feasible server.

``ensure_loaded(model)`` returns once the model serves somewhere, or raises the gateway's error:

* loaded and healthy somewhere → returns at once (and records the use, for LRU unloading);
* a load is running (any proxy process) → waits for it, re-reading every ``poll_ms``;
* else ``placement.decide``: ``Load`` → take the model's lock (``loading:{model}``, a redis-py
  ``Lock`` with expiry = the load deadline; one load per model across all proxies), unload the
  evicted models, ``POST /v2/repository/models/<m>/load`` (tritonclient), write the replica's
  state to Redis at once (healthy, so routers use it before the next sidecar poll), wait up to
  ``confirm_timeout_s`` for the sidecar's own report, release the lock;
  ``Unplaceable`` → 404; ``LoadFailed`` → 503 with the server's reason; ``Unavailable`` → 503 +
  Retry-After;
* a load that fails records ``loadfailed:{server}:{model}`` (the reason) for ``cooldown_s``:
  that server is not tried again for that model until it expires, so nothing loops;
* the whole wait is bounded by ``load_timeout_s`` (503 ``model_loading`` after it).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from urllib.parse import urlsplit

from prometheus_client import Counter, Histogram
from redis.asyncio import Redis
from redis.exceptions import LockError
from tritonclient.http.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from core.keyschema import KeySchema, ReplicaState
from plugins.admission.errors import ShedReason, model_unplaceable, overloaded
from plugins.catalogue.placement import Load, LoadFailed, Unavailable, Unplaceable, decide
from plugins.catalogue.settings import Catalogue, CatalogueSettings, replica_id
from plugins.catalogue.view import FleetView

log = logging.getLogger(__name__)

LOADS = Counter(
    "triage_catalogue_loads",
    "Cold loads and unloads by this proxy process",
    ["model", "server", "action", "outcome"],
)
LOAD_SECONDS = Histogram(
    "triage_catalogue_load_seconds",
    "Time from a cold load's start to the model serving",
    ["model"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
)

TOUCH_EVERY_S = 1.0
"""Resolution of "last used": finer is not needed to pick the least recently used model."""

PROVISIONAL_MAX_ACTIVE = 1
"""Slots claimed for a just-loaded replica until its sidecar reports the real ones."""


def triton_client(api_base: str, timeout_s: float) -> InferenceServerClient:
    parts = urlsplit(api_base)
    return InferenceServerClient(
        url=parts.netloc, ssl=parts.scheme == "https", conn_timeout=timeout_s
    )


class ColdLoader:
    def __init__(self, settings: CatalogueSettings, catalogue: Catalogue, redis: Redis) -> None:
        self.settings = settings
        self.catalogue = catalogue
        self.redis = redis
        self.keys = KeySchema(settings.key_prefix)
        self.view = FleetView(redis, self.keys, catalogue, settings.stale_after_ms)
        self._touched: dict[str, float] = {}
        """Per model, when this process last wrote its use (at most once per TOUCH_EVERY_S)."""

    async def ensure_loaded(self, model: str) -> None:
        serving = await self.view.serving(model)
        if serving:
            await self._touch(model, tuple(serving))
            return
        deadline = time.monotonic() + self.settings.load_timeout_s
        while True:
            view = await self.view.read(model)
            if view.serving:
                await self._touch(model, view.serving)
                return
            if view.loading_on is None:
                decision = decide(
                    self.catalogue.models[model], list(view.servers), self.settings.unload_lru
                )
                if isinstance(decision, Unplaceable):
                    raise model_unplaceable(model, decision.reason)
                if isinstance(decision, LoadFailed):
                    raise overloaded(
                        model,
                        ShedReason.LOAD_FAILED,
                        await self._cooldown_left_s(decision.server_id, model),
                        detail=f"on {decision.server_id}: {decision.reason}",
                    )
                if isinstance(decision, Unavailable):
                    raise overloaded(
                        model,
                        ShedReason.NO_HEALTHY_REPLICA,
                        self.settings.retry_after_s,
                        detail=decision.reason,
                    )
                if await self._load(model, decision, deadline):
                    continue  # loaded (or failed): the next read says which
            if time.monotonic() >= deadline:
                raise overloaded(
                    model,
                    ShedReason.MODEL_LOADING,
                    self.settings.retry_after_s,
                    wait=f"{self.settings.load_timeout_s:.0f} s",
                )
            await asyncio.sleep(self.settings.poll_ms / 1000)

    async def _load(self, model: str, decision: Load, deadline: float) -> bool:
        """Load ``model`` as decided, if this process wins the model's lock."""
        server = decision.server_id
        lock = self.redis.lock(
            self.keys.loading(model), timeout=self.settings.load_timeout_s, blocking=False
        )
        if not await lock.acquire(token=f"{server}/{uuid.uuid4().hex}"):
            return False  # another proxy is loading it: wait for that one
        entry = self.catalogue.models[model]
        api_base = self.catalogue.servers[server].api_base
        started = time.monotonic()
        try:
            remaining = max(1.0, deadline - started)
            client = triton_client(api_base, remaining)
            try:
                for victim in decision.evict:
                    await self._unload(client, server, victim)
                log.info("catalogue: loading %s on %s (%s)", model, server, entry.triton_model)
                await asyncio.wait_for(client.load_model(entry.triton_model), remaining)
            except (InferenceServerException, TimeoutError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
                LOADS.labels(model, server, "load", "failed").inc()
                log.warning("catalogue: loading %s on %s failed: %s", model, server, reason)
                await self.redis.set(
                    self.keys.load_failed(server, model),
                    reason[:500],
                    px=int(self.settings.cooldown_s * 1000),
                )
                return True
            finally:
                await client.close()
            await self._publish_loaded(model, server, api_base)
            LOADS.labels(model, server, "load", "ok").inc()
            await self._await_sidecar(model, server, deadline)
            LOAD_SECONDS.labels(model).observe(time.monotonic() - started)
            took = time.monotonic() - started
            log.info("catalogue: %s serving on %s after %.1f s", model, server, took)
            return True
        finally:
            try:
                await lock.release()
            except LockError:
                log.warning("catalogue: the load lock of %s expired during the load", model)

    async def _unload(self, client: InferenceServerClient, server: str, model: str) -> None:
        log.info("catalogue: unloading %s from %s (least recently used, idle)", model, server)
        await client.unload_model(self.catalogue.models[model].triton_model)
        await self.redis.delete(self.keys.replica(replica_id(server, model)))
        LOADS.labels(model, server, "unload", "ok").inc()

    async def _publish_loaded(self, model: str, server: str, api_base: str) -> None:
        """The Redis view changes at once: routers and other proxies use the replica now."""
        now_ms = int(time.time() * 1000)
        rid = replica_id(server, model)
        state = ReplicaState(
            replica_id=rid,
            model=self.catalogue.models[model].triton_model,
            api_base=api_base,
            waiting=0,
            active=0,
            max_active=PROVISIONAL_MAX_ACTIVE,
            kv_fraction=0.0,
            healthy=True,
            state="healthy",
            source="triton",
            ts_ms=now_ms,
            sample_ts_ms=now_ms,
        )
        ttl_ms = max(2 * self.settings.stale_after_ms, 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.replica(rid), mapping=state.to_redis())
            pipe.pexpire(self.keys.replica(rid), ttl_ms)
            pipe.hset(self.keys.last_used(model), server, now_ms)
            await pipe.execute()

    async def _await_sidecar(self, model: str, server: str, deadline: float) -> None:
        """A sidecar poll that began before the load ended may report "unloaded" after our
        write; wait (briefly) for a report of its own from after the load."""
        loaded_ms = int(time.time() * 1000)
        until = min(deadline, time.monotonic() + self.settings.confirm_timeout_s)
        key = self.keys.replica(replica_id(server, model))
        while time.monotonic() < until:
            raw = await self.redis.hgetall(key)
            if raw:
                state = ReplicaState.from_redis(raw)
                if state.sample_ts_ms > loaded_ms and state.state in ("healthy", "suspect"):
                    return
                if state.state == "unloaded":
                    await self._publish_loaded(model, server, state.api_base)
            await asyncio.sleep(self.settings.poll_ms / 1000)

    async def _touch(self, model: str, servers: tuple[str, ...]) -> None:
        """Record the model's use for LRU unloading; not a Redis write on every request."""
        now = time.monotonic()
        if now - self._touched.get(model, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
            return
        self._touched[model] = now
        now_ms = int(time.time() * 1000)
        await self.redis.hset(self.keys.last_used(model), mapping=dict.fromkeys(servers, now_ms))

    async def _cooldown_left_s(self, server: str, model: str) -> float:
        left_ms = await self.redis.pttl(self.keys.load_failed(server, model))
        return max(1.0, left_ms / 1000) if left_ms and left_ms > 0 else 1.0
