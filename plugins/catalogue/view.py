"""The catalogue's view of the fleet, read from Redis in one pipeline per decision.

Server topology is cached per process once seen (it does not change while a server runs);
liveness, replica states, locks and cooldowns are read fresh every time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pydantic import ValidationError
from redis.asyncio import Redis

from core.keyschema import KeySchema, ReplicaState, ServerState
from plugins.catalogue.placement import LoadedModel, ServerView, footprint_mb
from plugins.catalogue.settings import Catalogue, replica_id

SERVING = frozenset({"healthy", "suspect"})


@dataclass(frozen=True)
class ModelView:
    model: str
    serving: tuple[str, ...]
    """Servers where the model is loaded and healthy (fresh replica state)."""
    loading_on: str | None
    """The server a cold load of the model is running on, if any."""
    servers: tuple[ServerView, ...]


def _decode(raw: bytes | str | None) -> str | None:
    return raw.decode() if isinstance(raw, bytes) else raw


class FleetView:
    def __init__(self, redis: Redis, keys: KeySchema, catalogue: Catalogue, stale_ms: int):
        self.redis = redis
        self.keys = keys
        self.catalogue = catalogue
        self.stale_ms = stale_ms
        self.topology: dict[str, ServerState] = {}

    def fresh(self, ts_ms: int, now_ms: int) -> bool:
        return ts_ms >= now_ms - self.stale_ms

    async def serving(self, model: str) -> list[str]:
        """The servers where ``model`` serves now: the per-request fast path (one round trip
        of ``len(servers)`` reads, against the full view's servers × models)."""
        servers = self.catalogue.servers_of(model)
        pipe = self.redis.pipeline(transaction=False)
        for server in servers:
            pipe.hgetall(self.keys.replica(replica_id(server, model)))
        now_ms = int(time.time() * 1000)
        out = []
        for server, raw in zip(servers, await pipe.execute(), strict=True):
            replica = self._replica(raw, now_ms)
            if replica is not None and replica.state in SERVING:
                out.append(server)
        return out

    async def read(self, model: str) -> ModelView:
        servers = self.catalogue.servers_of(model)
        names = list(self.catalogue.models)
        lease_now_ms = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.loading(model))
        for server in servers:
            pipe.hgetall(self.keys.server(server))
            pipe.get(self.keys.load_failed(server, model))
            for name in names:
                pipe.hgetall(self.keys.replica(replica_id(server, name)))
                # live reservations only: an entry past its lease no longer counts (leases.py)
                pipe.zcount(self.keys.inflight(replica_id(server, name)), lease_now_ms, "+inf")
        for name in names:
            pipe.hgetall(self.keys.last_used(name))
        results = iter(await pipe.execute())
        now_ms = int(time.time() * 1000)
        lock = _decode(next(results))
        per_server = []
        for server in servers:
            raw_server, failed = next(results), _decode(next(results))
            replicas = [(name, next(results), int(next(results))) for name in names]
            per_server.append((server, raw_server, failed, replicas))
        last_used = {name: next(results) for name in names}
        serving: list[str] = []
        views: list[ServerView] = []
        for server, raw_server, failed, replicas in per_server:
            healthy = False
            if raw_server:
                try:
                    state = ServerState.from_redis(raw_server)
                except ValidationError:
                    state = None
                if state is not None:
                    self.topology[server] = state
                    healthy = state.healthy and self.fresh(state.ts_ms, now_ms)
            load = 0
            loaded: list[LoadedModel] = []
            for name, raw, inflight in replicas:
                # a state older than stale_after_ms still holds memory: it counts as loaded for
                # room (its hash lives 4 polls); only a fresh one counts as serving
                replica = self._replica(raw, now_ms, fresh_only=False)
                if replica is None or replica.state not in SERVING:
                    continue
                load += replica.active + replica.waiting
                if name == model and self.fresh(replica.ts_ms, now_ms):
                    serving.append(server)
                used = last_used[name].get(server.encode()) or last_used[name].get(server)
                loaded.append(
                    LoadedModel(
                        name=name,
                        footprint_mb=footprint_mb(self.catalogue.models[name]),
                        last_used_ms=int(used or 0),
                        inflight=inflight,
                    )
                )
            views.append(
                ServerView(
                    server_id=server,
                    topology=self.topology.get(server),
                    healthy=healthy,
                    cooldown_reason=failed,
                    load=load,
                    loaded=tuple(loaded),
                )
            )
        loading_on = lock.split("/", 1)[0] if lock else None
        return ModelView(model, tuple(serving), loading_on, tuple(views))

    def _replica(
        self, raw: dict[bytes, bytes], now_ms: int, fresh_only: bool = True
    ) -> ReplicaState | None:
        if not raw:
            return None
        try:
            state = ReplicaState.from_redis(raw)  # type: ignore[arg-type]
        except ValidationError:
            return None
        return state if not fresh_only or self.fresh(state.ts_ms, now_ms) else None
