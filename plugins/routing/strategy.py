"""The least-busy routing strategy installed on a LiteLLM ``Router``.

Per request (never per client), ``async_get_available_deployment``:

1. asks the router for the model's usable deployments (its own filters: aliases, teams, health
   checks, cooldowns, ``async_filter_deployments`` callbacks);
2. runs ``pick.lua`` over those replicas (``model_info.id`` = replica id) in one Redis round trip:
   the policy of ``policy.py`` picks the lowest expected completion time and reserves a slot;
3. records the reservation in the process's ledger under the request's ``litellm_call_id``, to be
   released by ``RoutingHook`` when the attempt or the request ends.

With the admission plugin in the same proxy, step 2 usually happened already: the admission
gate's script picks and reserves the replica in the call that admits the request (one Redis
round trip for both, see ``plan_pick`` / ``adopt``); the first attempt takes that replica when
the router's filters still allow it, and gives it back for a fresh pick otherwise.

The reservations this process holds (its ledger) have short leases that a background task
renews in one Redis call per ``renew_ms`` (``leases.py``): a dead proxy's reservations, or ones
whose release was lost, stop counting within ``lease_ms``.

Redis unreachable → the same policy over per-process in-flight counts (see ``fallback.py``).
Redis busy (no free pooled connection within the pool timeout: ``PoolExhausted``) is not an
outage: the pick fails with ``RedisBusy`` (a 503 the router may retry), no per-process counts.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from typing import Any

import litellm
from litellm import Router
from litellm.litellm_core_utils.core_helpers import get_parent_otel_span_from_kwargs
from litellm.router_utils.handle_error import async_raise_no_deployment_exception
from litellm.types.router import CustomRoutingStrategyBase
from prometheus_client import Counter, Histogram
from redis.asyncio import Redis
from redis.exceptions import RedisError

from plugins.redis_outage import RedisOutage
from plugins.routing.fallback import LocalCounts
from plugins.routing.leases import LeaseRenewer
from plugins.routing.ledger import Held, ReservationLedger
from plugins.routing.policy import choose
from plugins.routing.settings import RoutingSettings
from plugins.routing.store import MAX_TIEBREAK, PickPlan, Reservation, RoutingStore
from triage.keyschema import KeySchema
from triage.redis_client import PoolExhausted, PoolWaits, fail_fast_redis

log = logging.getLogger(__name__)

PICK_SECONDS = Histogram(
    "triage_routing_pick_seconds",
    "Time to choose and reserve a replica (Redis round trip included)",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
PICKS = Counter(
    "triage_routing_picks", "Replicas chosen", ["model", "replica", "source"]
)  # source: redis (pick.lua) | gate (picked by the admission gate's call) | local
REDIS_ERRORS = Counter("triage_routing_redis_errors", "Redis calls that failed", ["op"])


class NoEligibleReplica(litellm.ServiceUnavailableError):
    """Every candidate replica is unhealthy (a transient state: retry later)."""


class RedisBusy(litellm.ServiceUnavailableError):
    """No pooled Redis connection became free in time for the pick: this process is
    overloaded (back-pressure, a 503 to retry later), Redis is not down."""


def replica_id_of(deployment: dict[str, Any]) -> str:
    """The replica id of a LiteLLM deployment: its ``model_info.id``."""
    replica_id = (deployment.get("model_info") or {}).get("id")
    if not replica_id:
        raise ValueError(f"deployment without model_info.id: {deployment.get('model_name')!r}")
    return str(replica_id)


def installed_strategy(router: Router | None) -> LeastBusyStrategy | None:
    """The least-busy strategy choosing ``router``'s deployments, if one is installed."""
    chooser = router.__dict__.get("async_get_available_deployment") if router else None
    strategy = getattr(chooser, "__self__", None)
    return strategy if isinstance(strategy, LeastBusyStrategy) else None


class LeastBusyStrategy(CustomRoutingStrategyBase):
    def __init__(self, settings: RoutingSettings, router: Router | None = None) -> None:
        self.settings = settings
        self.params = settings.policy()
        self._router = router
        self._redis: Redis | None = None
        self._store: RoutingStore | None = None
        self.ledger = ReservationLedger(max_age_s=settings.max_hold_ms / 1000.0)
        self.local = LocalCounts()
        self.outage = RedisOutage(
            settings.redis_retry_ms,
            settings.log_interval_s,
            owner="routing",
            fallback="routing by per-process in-flight counts",
            unit="picks",
        )
        self.pool_waits = PoolWaits("routing", settings.log_interval_s)
        self._inflight_prefix = KeySchema(settings.key_prefix).inflight("")
        self.renewer = LeaseRenewer(
            "routing",
            lambda: self.store.client,
            self._held_in_redis,
            self._still_held,
            settings.lease_ms,
            settings.renew_ms,
            settings.log_interval_s,
        )
        self._next_expiry = 0.0
        self.failed: dict[str, tuple[float, set[str]]] = {}
        """Per request: replicas an attempt failed on (overflow...), avoided by its retries."""
        self.prepicked: dict[str, tuple[float, str]] = {}
        """Per request: the replica the admission gate reserved for it, not yet routed to."""
        self.adopted: dict[str, tuple[float, str]] = {}
        """Per request: the replica of the reservation the admission gate took, until the
        admission plugin releases it with the request's admission (``take_adopted``)."""

    # -- installation ----------------------------------------------------------------------

    def install(self, router: Router) -> None:
        """Make this strategy ``router``'s deployment chooser (again, after a re-init)."""
        self._router = router
        router.set_custom_routing_strategy(self)
        log.info("routing: least-busy strategy installed on router %#x", id(router))

    def installed_on(self, router: Router) -> bool:
        return installed_strategy(router) is self

    @property
    def store(self) -> RoutingStore:
        if self._store is None:
            self._redis = fail_fast_redis(
                str(self.settings.redis_url), self.settings.redis_timeout_ms
            )
            self._store = RoutingStore(self._redis, KeySchema(self.settings.key_prefix))
        return self._store

    async def aclose(self) -> None:
        await self.renewer.aclose()
        if self._redis is not None:
            await self._redis.aclose()
        self._redis, self._store = None, None

    # -- leases ------------------------------------------------------------------------------

    def _hold(self, call_id: str, held: Held) -> None:
        """``held`` is this request's now: in the ledger, its lease renewed while there."""
        self.ledger.add(call_id, held)
        if not held.local:
            self.renewer.wake()

    def _held_in_redis(self) -> dict[str, list[str]]:
        """What the renewer renews: every reservation in the ledger (after dropping the ones
        held longer than ``max_hold_ms``)."""
        self._expire_ledger()
        return {self._inflight_prefix + r: ids for r, ids in self.ledger.in_redis().items()}

    def _still_held(self, key: str, reservation_id: str) -> bool:
        return self.ledger.holds(key.removeprefix(self._inflight_prefix), reservation_id)

    # -- CustomRoutingStrategyBase ---------------------------------------------------------

    async def async_get_available_deployment(  # type: ignore[override]
        self,
        model: str,
        messages: list[dict[str, str]] | None = None,
        input: str | list[Any] | None = None,
        specific_deployment: bool | None = False,
        request_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        router = self._router
        if router is None:
            raise RuntimeError("LeastBusyStrategy used before install(router)")
        kwargs = request_kwargs if request_kwargs is not None else {}
        span = get_parent_otel_span_from_kwargs(kwargs)
        healthy = await router.async_get_healthy_deployments(
            model=model,
            request_kwargs=kwargs,
            messages=messages,
            input=input,
            specific_deployment=specific_deployment,
            parent_otel_span=span,
        )
        deployments = [healthy] if isinstance(healthy, dict) else list(healthy)
        if not deployments:
            raise await async_raise_no_deployment_exception(router, model, span)
        call_id = kwargs.get("litellm_call_id")
        if not call_id:
            call_id = kwargs["litellm_call_id"] = str(uuid.uuid4())
        return await self.choose_deployment(model, deployments, str(call_id))

    def get_available_deployment(  # type: ignore[override]
        self,
        model: str,
        messages: list[dict[str, str]] | None = None,
        input: str | list[Any] | None = None,
        specific_deployment: bool | None = False,
        request_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        raise NotImplementedError(
            "the least-busy strategy is async only: use router.acompletion (the proxy does)"
        )

    # -- the pick made with the admission ----------------------------------------------------

    def plan_pick(self, call_id: str) -> PickPlan | None:
        """The pick the admission gate may make for ``call_id`` in the call that admits it
        (None while Redis is out: the router picks by local counts then)."""
        return self._plan(call_id) if self.outage.should_try() else None

    def _plan(self, call_id: str) -> PickPlan:
        reservation_id = f"{call_id}:{uuid.uuid4().hex[:8]}"  # unique per attempt
        return PickPlan(self.params, random.getrandbits(32), reservation_id, self.settings.lease_ms)

    def adopt(self, model: str, call_id: str, reservation: Reservation) -> None:
        """``reservation`` was taken for ``call_id`` by the admission gate (with a ``plan_pick``
        plan): its first attempt goes there; released like any other reservation."""
        self._hold(call_id, Held(reservation.replica_id, reservation.reservation_id, False))
        self.prepicked[call_id] = self.adopted[call_id] = (time.monotonic(), reservation.replica_id)
        PICKS.labels(model, reservation.replica_id, "gate").inc()

    def released_with_admission(self, call_id: str, replica_id: str | None) -> bool:
        """Whether the reservation of ``call_id``'s attempt on ``replica_id`` (a success) is
        left to the admission plugin, to be given back with the request's admission."""
        return replica_id is not None and self.adopted.get(call_id, (0.0, ""))[1] == replica_id

    def take_adopted(self, call_id: str, replica_id: str | None) -> Held | None:
        """The reservation adopted for ``call_id``, if its attempt on ``replica_id`` just
        succeeded: the caller gives it back (``give_back`` when it cannot itself)."""
        if not self.released_with_admission(call_id, replica_id):
            return None
        del self.adopted[call_id]
        return self.ledger.take_one(call_id, replica_id)

    async def give_back(self, held: Held) -> None:
        """Release one reservation taken out of the ledger (``take_adopted``)."""
        await self._give_back(held)

    # -- the decision ----------------------------------------------------------------------

    async def choose_deployment(
        self, model: str, deployments: list[dict[str, Any]], call_id: str
    ) -> dict[str, Any]:
        """Pick and reserve one of ``deployments`` for the request ``call_id``."""
        started = time.perf_counter()
        by_id = {replica_id_of(d): d for d in deployments}
        tried = self.failed.get(call_id, (0.0, set()))[1]
        # a retry goes to a replica this request has not failed on, while there is one
        ids = [r for r in by_id if r not in tried] or list(by_id)
        self._expire_ledger()
        prepicked = self.prepicked.pop(call_id, None)
        if prepicked is not None:
            if prepicked[1] in ids:
                return by_id[prepicked[1]]
            # the router's filters (cooldown...) dropped it since: give it back, pick anew
            held = self.ledger.take_one(call_id, prepicked[1])
            if held is not None:
                await self._give_back(held)
        if self.outage.should_try():
            try:
                reservation = await self.store.pick_planned(ids, self._plan(call_id))
            except PoolExhausted as exc:
                # Redis is fine, this process has more commands in flight than connections:
                # back-pressure (503, retryable), not per-process counts
                self.pool_waits.exhausted(exc, f"a pick for model {model}", "answered 503")
                raise RedisBusy(
                    message=f"the gateway is too busy to route a {model!r} request right now "
                    f"({exc}); retry shortly",
                    model=model,
                    llm_provider="triage",
                ) from exc
            except RedisError as exc:
                REDIS_ERRORS.labels("pick").inc()
                self.outage.failed(exc, f"pick for model {model}")
            else:
                self.outage.succeeded()
                PICK_SECONDS.observe(time.perf_counter() - started)
                if reservation is None:
                    raise NoEligibleReplica(
                        message=(
                            f"no healthy replica for model {model!r} among {ids}: all are "
                            "reported unhealthy by their sidecars; retry later"
                        ),
                        model=model,
                        llm_provider="triage",
                    )
                self._hold(call_id, Held(reservation.replica_id, reservation.reservation_id, False))
                PICKS.labels(model, reservation.replica_id, "redis").inc()
                log.debug(
                    "routing: %s -> %s (score %.3f, inflight %d)",
                    model,
                    reservation.replica_id,
                    reservation.score,
                    reservation.inflight,
                )
                return by_id[reservation.replica_id]
        return self._choose_locally(model, ids, by_id, call_id, started)

    def _choose_locally(
        self,
        model: str,
        ids: list[str],
        by_id: dict[str, dict[str, Any]],
        call_id: str,
        started: float,
    ) -> dict[str, Any]:
        candidates = [(r, None, self.local.get(r)) for r in ids]
        chosen = choose(candidates, self.params, 0, random.randrange(MAX_TIEBREAK))
        assert chosen is not None  # unknown replicas are always eligible
        self.local.take(chosen)
        self.outage.fallbacks += 1
        self.ledger.add(call_id, Held(chosen, "", True))
        PICKS.labels(model, chosen, "local").inc()
        PICK_SECONDS.observe(time.perf_counter() - started)
        return by_id[chosen]

    # -- releases --------------------------------------------------------------------------

    async def release_attempt(
        self, call_id: str, replica_id: str | None, failed: bool = False
    ) -> None:
        """One attempt of ``call_id`` on ``replica_id`` ended (success or failure)."""
        if failed and replica_id is not None:
            self.failed.setdefault(call_id, (time.monotonic(), set()))[1].add(replica_id)
        held = self.ledger.take_one(call_id, replica_id)
        if held is not None:
            await self._give_back(held)

    def avoid(self, call_id: str, replica_ids: set[str]) -> None:
        """Make ``call_id`` avoid ``replica_ids`` (a restarted stream's failed replicas)."""
        self.failed.setdefault(call_id, (time.monotonic(), set()))[1].update(replica_ids)

    def note_failed(self, call_id: str, replica_id: str) -> None:
        """An attempt of ``call_id`` failed on ``replica_id``: avoided by its retries, if the
        request is still going (its failures known); an ended request's stays forgotten."""
        entry = self.failed.get(call_id)
        if entry is not None:
            entry[1].add(replica_id)

    def failed_replicas(self, call_id: str) -> set[str]:
        return set(self.failed.get(call_id, (0.0, set()))[1])

    async def release_request(self, call_id: str) -> None:
        """The request ``call_id`` ended: give back whatever it still holds."""
        self.failed.pop(call_id, None)
        self.prepicked.pop(call_id, None)
        self.adopted.pop(call_id, None)
        for held in self.ledger.take_all(call_id):
            await self._give_back(held)

    async def _give_back(self, held: Held) -> None:
        if held.local:
            self.local.give_back(held.replica_id)
            return
        try:
            await self.store.release(held.replica_id, held.reservation_id)
        except PoolExhausted as exc:
            self.pool_waits.exhausted(
                exc, f"a release on replica {held.replica_id}", "retried with the renewals"
            )
            self.release_later(held)
        except RedisError as exc:
            REDIS_ERRORS.labels("release").inc()
            self.outage.failed(exc, f"release on replica {held.replica_id}")
            self.release_later(held)

    def release_later(self, held: Held) -> None:
        """A release of ``held`` (out of the ledger: no longer renewed) failed: the renewer
        retries it, so it is gone when Redis answers again (else its lease ends it)."""
        if not held.local:
            self.renewer.release_later(self._inflight_prefix + held.replica_id, held.reservation_id)

    def _expire_ledger(self) -> None:
        now = time.monotonic()
        if now < self._next_expiry:
            return
        self._next_expiry = now + 1.0
        limit = now - self.settings.max_hold_ms / 1000.0
        for call_id in [c for c, (t, _) in self.failed.items() if t < limit]:
            del self.failed[call_id]
        for table in (self.prepicked, self.adopted):
            for call_id in [c for c, (t, _) in table.items() if t < limit]:
                del table[call_id]
        for held in self.ledger.expire(now):
            log.warning(
                "routing: reservation %s on %s held for more than %d ms without a release: "
                "taken for a lost release, no longer renewed",
                held.reservation_id or "(local)",
                held.replica_id,
                self.settings.max_hold_ms,
            )
            if held.local:
                self.local.give_back(held.replica_id)
