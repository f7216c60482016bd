"""Where a catalogued model can run and where a cold load goes: pure functions, no I/O.

* **Feasible**: a server is feasible for a model when its topology (published by its sidecar)
  has at least ``min_devices`` devices of at least ``min_device_memory_mb`` each.
* **Decision** for a model loaded nowhere, over the servers it may run on:

  1. no server's topology says it could ever host the model → ``Unplaceable`` (404, the reasons);
  2. the feasible servers that are healthy now and not cooling down after a failed load, in
     order: the model's ``pinned_on`` first (in its order), then least loaded, then server id
     (stable) → ``Load(first)``;
  3. none of those, but one cooling down → ``LoadFailed`` (503 with the failed load's reason);
  4. otherwise (feasible servers exist but are down, or have not reported yet) →
     ``Unavailable`` (503 + Retry-After: expected back).

* **Room**: a server's memory is ``device_count × device_memory_mb``; a loaded catalogue model
  takes ``min_devices × min_device_memory_mb``. With unloading on, a server short of room frees
  it by unloading the least recently used loaded models that have nothing in flight
  (``evictions``); without it, or if that cannot free enough, the server is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from core.keyschema import ServerState
from plugins.catalogue.settings import CatalogueModel


@dataclass(frozen=True)
class LoadedModel:
    name: str
    footprint_mb: int
    last_used_ms: int
    inflight: int


@dataclass(frozen=True)
class ServerView:
    server_id: str
    topology: ServerState | None
    """Last topology seen (cached: it does not change); None: never reported."""
    healthy: bool
    """Reported healthy recently."""
    cooldown_reason: str | None = None
    """Why the last load of this model here failed, while its cooldown lasts."""
    load: int = 0
    """Requests in flight or waiting on the server, all models."""
    loaded: tuple[LoadedModel, ...] = field(default_factory=tuple)
    """Catalogue models loaded on the server now."""


@dataclass(frozen=True)
class Load:
    server_id: str
    evict: tuple[str, ...] = ()
    """Models to unload first (least recently used, idle)."""


@dataclass(frozen=True)
class Unplaceable:
    reason: str


@dataclass(frozen=True)
class LoadFailed:
    server_id: str
    reason: str


@dataclass(frozen=True)
class Unavailable:
    reason: str


Decision = Load | Unplaceable | LoadFailed | Unavailable


def footprint_mb(model: CatalogueModel) -> int:
    return model.min_devices * model.min_device_memory_mb


def infeasibility(model: CatalogueModel, topology: ServerState) -> str | None:
    """Why ``topology`` can never host ``model``; None when it can."""
    if topology.device_count < model.min_devices:
        return f"needs {model.min_devices} devices, has {topology.device_count}"
    if topology.device_memory_mb < model.min_device_memory_mb:
        return (
            f"needs {model.min_device_memory_mb} MiB per device, "
            f"has {topology.device_memory_mb} MiB"
        )
    return None


def evictions(model: CatalogueModel, server: ServerView) -> tuple[str, ...] | None:
    """Models to unload (LRU, idle only) so ``model`` fits on ``server``; None: cannot fit."""
    assert server.topology is not None
    capacity = server.topology.device_count * server.topology.device_memory_mb
    free = capacity - sum(m.footprint_mb for m in server.loaded)
    need = footprint_mb(model)
    chosen: list[str] = []
    for victim in sorted(server.loaded, key=lambda m: (m.last_used_ms, m.name)):
        if free >= need:
            break
        if victim.inflight == 0:
            chosen.append(victim.name)
            free += victim.footprint_mb
    return tuple(chosen) if free >= need else None


def decide(model: CatalogueModel, servers: list[ServerView], unload_lru: bool = False) -> Decision:
    """Where a model that is loaded nowhere should be loaded (see the module doc)."""
    reasons: list[str] = []
    feasible: list[ServerView] = []
    unreported: list[str] = []
    for server in servers:
        if server.topology is None:
            unreported.append(server.server_id)
            continue
        why = infeasibility(model, server.topology)
        if why is None:
            feasible.append(server)
        else:
            reasons.append(f"{server.server_id}: {why}")
    if not feasible and not unreported:
        return Unplaceable("no server can host it (" + "; ".join(reasons) + ")")
    pinned = {s: i for i, s in enumerate(model.pinned_on)}
    ready = sorted(
        (s for s in feasible if s.healthy and s.cooldown_reason is None),
        key=lambda s: (pinned.get(s.server_id, len(pinned)), s.load, s.server_id),
    )
    short: list[str] = []
    for server in ready:
        evict = evictions(model, server)
        if evict is not None and (not evict or unload_lru):
            return Load(server.server_id, evict)
        short.append(server.server_id)
    cooling = [s for s in feasible if s.cooldown_reason is not None]
    if cooling and not short:
        return LoadFailed(cooling[0].server_id, cooling[0].cooldown_reason or "")
    if short:
        return Unavailable(f"no room on {', '.join(short)} (unloading is off or all are busy)")
    waiting = [s.server_id for s in feasible] + unreported
    return Unavailable(f"no feasible server is healthy now ({', '.join(waiting)})")
