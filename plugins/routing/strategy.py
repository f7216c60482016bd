"""The least-busy routing strategy installed on a LiteLLM ``Router``.

Per request (never per client), ``async_get_available_deployment``:

1. asks the router for the model's usable deployments (its own filters: aliases, teams, health
   checks, cooldowns, ``async_filter_deployments`` callbacks);
2. runs ``pick.lua`` over those replicas (``model_info.id`` = replica id) in one Redis round trip:
   the policy of ``policy.py`` picks the lowest expected completion time and reserves a slot;
3. records the reservation in the request's ticket (``plugins/request_ticket.py``, by its
   ``litellm_call_id``), given back when the attempt fails or the request ends.

With the admission plugin in the same proxy, step 2 usually happened already: the admission
gate's script picks and reserves the replica in the call that admits the request (one Redis
round trip for both, see ``plan_pick`` / ``adopt``); the first attempt takes that replica when
the router's filters still allow it, and gives it back for a fresh pick otherwise.

The reservations this process's tickets hold have short leases that a background task renews
in one Redis call per ``renew_ms`` (``leases.py``): a dead proxy's reservations, or ones whose
release was lost, stop counting within ``lease_ms``.

Redis unreachable → the same policy over per-process in-flight counts (see ``fallback.py``).
Redis busy (no free pooled connection within the pool timeout: ``PoolExhausted``) is not an
outage: the pick fails with ``RedisBusy`` (a 503 the router may retry), no per-process counts.
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections import ChainMap
from collections.abc import Mapping
from typing import Any

import litellm
from litellm import Router
from litellm.litellm_core_utils.core_helpers import get_parent_otel_span_from_kwargs
from litellm.router_utils.handle_error import async_raise_no_deployment_exception
from litellm.types.router import CustomRoutingStrategyBase
from prometheus_client import Counter, Histogram
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.keyschema import KeySchema
from core.redis_client import PoolExhausted, PoolWaits, fail_fast_redis
from plugins import tracing
from plugins.redis_outage import RedisOutage
from plugins.request_ticket import TICKETS, Held, RequestTicket, Routing, TicketBook
from plugins.routing.fallback import LocalCounts
from plugins.routing.leases import LeaseRenewer
from plugins.routing.policy import NO_SHAPE, RequestShape, choose
from plugins.routing.prefix import derive_salt, shape_of_request
from plugins.routing.settings import RoutingSettings
from plugins.routing.store import MAX_TIEBREAK, PickPlan, Reservation, RoutingStore

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
PICK_SCORE_MS = Histogram(
    "triage_routing_pick_score_ms",
    "The chosen replica's score when picked in Redis: its expected completion time for one "
    "more request, in ms (plugins/routing/policy.py)",
    ["model", "replica"],
    buckets=(50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 300_000),
)
for _op in ("pick", "release"):  # present from the start: a first error is a rate, not a new series
    REDIS_ERRORS.labels(_op)


class NoEligibleReplica(litellm.ServiceUnavailableError):
    """Every candidate replica is unhealthy (a transient state: retry later)."""


class RedisBusy(litellm.ServiceUnavailableError):
    """No pooled Redis connection became free in time for the pick: this process is
    overloaded (back-pressure, a 503 to retry later), Redis is not down."""


def prefix_salt(settings: RoutingSettings) -> bytes | None:
    """The key of the prompt-block hashes: the configured salt, else one derived from the
    proxy's master key (the same on every proxy of a deployment); None turns affinity off."""
    if not settings.prefix_affinity:
        return None
    if settings.prefix_salt is not None:
        return derive_salt(settings.prefix_salt.get_secret_value())
    master_key = os.environ.get("LITELLM_MASTER_KEY")
    if master_key:
        return derive_salt(master_key)
    log.warning(
        "routing: prefix affinity off: set TRIAGE_ROUTING_PREFIX_SALT (the same on every "
        "proxy) or LITELLM_MASTER_KEY"
    )
    return None


def replica_id_of(deployment: dict[str, Any]) -> str:
    """The replica id of a LiteLLM deployment: its ``model_info.id``."""
    replica_id = (deployment.get("model_info") or {}).get("id")
    if not replica_id:
        raise ValueError(f"deployment without model_info.id: {deployment.get('model_name')!r}")
    return str(replica_id)


class LeastBusyStrategy(CustomRoutingStrategyBase):
    def __init__(
        self,
        settings: RoutingSettings,
        router: Router | None = None,
        book: TicketBook = TICKETS,
    ) -> None:
        self.settings = settings
        self.params = settings.policy()
        self._router = router
        self._redis: Redis | None = None
        self._store: RoutingStore | None = None
        self.book = book
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
        self.salt = prefix_salt(settings)

    # -- installation ----------------------------------------------------------------------

    def install(self, router: Router) -> None:
        """Make this strategy ``router``'s deployment chooser (again, after a re-init), and
        this process's replica picker (``TicketBook.picker``)."""
        self._router = router
        router.set_custom_routing_strategy(self)
        self.book.picker = self
        log.info("routing: least-busy strategy installed on router %#x", id(router))

    def installed_on(self, router: Router | None) -> bool:
        """Whether ``router`` chooses its deployments with this strategy (LiteLLM's
        ``set_custom_routing_strategy`` binds our method on the router instance; a re-init
        drops it)."""
        chooser = router.__dict__.get("async_get_available_deployment") if router else None
        return getattr(chooser, "__self__", None) is self

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

    def _routing(self, ticket: RequestTicket) -> Routing:
        if ticket.routing is None:
            ticket.routing = Routing(self)
        return ticket.routing

    def _hold(self, ticket: RequestTicket, held: Held) -> None:
        """``held`` is this request's now: in its ticket, its lease renewed while there."""
        self._routing(ticket).reservations.append(held)
        if not held.local:
            self.renewer.wake()

    def held(self) -> list[Held]:
        """Every reservation this strategy's tickets hold (diagnostics, tests)."""
        return [
            h
            for t in self.book.tickets()
            if t.routing is not None and t.routing.owner is self
            for h in t.routing.reservations
        ]

    def _held_in_redis(self) -> dict[str, list[str]]:
        """What the renewer renews: every reservation the tickets hold in Redis (after dropping
        the tickets held longer than ``max_hold_ms``)."""
        self._expire()
        out: dict[str, list[str]] = {}
        for held in self.held():
            if not held.local:
                out.setdefault(self._inflight_prefix + held.replica_id, []).append(
                    held.reservation_id
                )
        return out

    def _still_held(self, key: str, reservation_id: str) -> bool:
        """Asked per member after Redis lost them (a restart without its data): found through
        the member's ticket (``_plan`` names a reservation ``<call id>:<8 hex>``), not by a scan
        of every ticket per member."""
        replica_id = key.removeprefix(self._inflight_prefix)
        ticket = self.book.get(reservation_id.rpartition(":")[0])
        routing = ticket.routing if ticket is not None else None
        return (
            routing is not None
            and routing.owner is self
            and any(
                h.replica_id == replica_id and h.reservation_id == reservation_id
                for h in routing.reservations
            )
        )

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
        self.describe(str(call_id), ChainMap({"messages": messages, "input": input}, kwargs))
        with tracing.span("triage.pick", span or tracing.parent_span(kwargs), model=model):
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

    def describe(self, call_id: str, request: Mapping[str, Any]) -> None:
        """Note the request's shape for its picks (once: retries and restarts keep it)."""
        routing = self._routing(self.book.open(call_id))
        if routing.shape is None:
            s = self.settings
            routing.shape = shape_of_request(
                request,
                self.salt,
                s.prefix_block_chars,
                s.prefix_max_blocks,
                s.expected_output_tokens,
            )

    def shape(self, call_id: str) -> RequestShape:
        ticket = self.book.get(call_id)
        routing = ticket.routing if ticket is not None else None
        return routing.shape if routing is not None and routing.shape is not None else NO_SHAPE

    def plan_pick(self, call_id: str) -> PickPlan | None:
        """The pick the admission gate may make for ``call_id`` in the call that admits it
        (None while Redis is out: the router picks by local counts then)."""
        return self._plan(call_id) if self.outage.should_try() else None

    def _plan(self, call_id: str) -> PickPlan:
        reservation_id = f"{call_id}:{uuid.uuid4().hex[:8]}"  # unique per attempt
        return PickPlan(
            self.params,
            random.getrandbits(32),
            reservation_id,
            self.settings.lease_ms,
            self.shape(call_id),
        )

    def adopt(self, model: str, ticket: RequestTicket, reservation: Reservation) -> None:
        """``reservation`` was taken for ``ticket`` by the admission gate (with a
        ``plan_pick`` plan): its first attempt goes there; the admission's release gives it
        back in the same Redis call (``Routing.adopted``)."""
        held = Held(reservation.replica_id, reservation.reservation_id, False)
        self._hold(ticket, held)
        routing = self._routing(ticket)
        routing.prepicked, routing.adopted = reservation.replica_id, held
        PICKS.labels(model, reservation.replica_id, "gate").inc()
        PICK_SCORE_MS.labels(model, reservation.replica_id).observe(reservation.score)

    # -- the decision ----------------------------------------------------------------------

    async def choose_deployment(
        self, model: str, deployments: list[dict[str, Any]], call_id: str
    ) -> dict[str, Any]:
        """Pick and reserve one of ``deployments`` for the request ``call_id``."""
        started = time.perf_counter()
        by_id = {replica_id_of(d): d for d in deployments}
        self._expire()
        ticket = self.book.open(call_id)
        routing = self._routing(ticket)
        # a retry goes to a replica this request has not failed on, while there is one
        ids = [r for r in by_id if r not in ticket.failed] or list(by_id)
        tracing.annotate(retry=bool(ticket.failed), candidates=len(ids))
        prepicked, routing.prepicked = routing.prepicked, None
        if prepicked is not None:
            if prepicked in ids:
                tracing.annotate(replica=prepicked, pick__source="gate")
                return by_id[prepicked]
            # the router's filters (cooldown...) dropped it since: give it back, pick anew
            held = ticket.take_reservation(prepicked)
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
                self._hold(ticket, Held(reservation.replica_id, reservation.reservation_id, False))
                PICKS.labels(model, reservation.replica_id, "redis").inc()
                PICK_SCORE_MS.labels(model, reservation.replica_id).observe(reservation.score)
                tracing.annotate(
                    replica=reservation.replica_id,
                    score=reservation.score,
                    pick__source="redis",
                    inflight=reservation.inflight,
                )
                log.debug(
                    "routing: %s -> %s (score %.3f, inflight %d)",
                    model,
                    reservation.replica_id,
                    reservation.score,
                    reservation.inflight,
                )
                return by_id[reservation.replica_id]
        return self._choose_locally(model, ids, by_id, ticket, started)

    def _choose_locally(
        self,
        model: str,
        ids: list[str],
        by_id: dict[str, dict[str, Any]],
        ticket: RequestTicket,
        started: float,
    ) -> dict[str, Any]:
        candidates = [(r, None, self.local.get(r)) for r in ids]
        chosen = choose(candidates, self.params, 0, random.randrange(MAX_TIEBREAK))
        assert chosen is not None  # unknown replicas are always eligible
        self.local.take(chosen)
        self.outage.fallbacks += 1
        self._hold(ticket, Held(chosen, "", True))
        PICKS.labels(model, chosen, "local").inc()
        PICK_SECONDS.observe(time.perf_counter() - started)
        tracing.annotate(replica=chosen, pick__source="local")
        return by_id[chosen]

    # -- releases --------------------------------------------------------------------------

    async def release_attempt(
        self, call_id: str, replica_id: str | None, failed: bool = False
    ) -> None:
        """One attempt of ``call_id`` on ``replica_id`` ended; ``failed``: it failed there (the
        request's retries avoid that replica). The request goes on: its ticket stays."""
        ticket = self.book.get(call_id)
        if ticket is None:
            return
        if failed and replica_id is not None:
            ticket.failed.add(replica_id)
        held = ticket.take_reservation(replica_id)
        if held is not None:
            await self._give_back(held)

    def note_failed(self, call_id: str, replica_id: str) -> None:
        """An attempt of ``call_id`` failed on ``replica_id``: avoided by its retries, if the
        request is still going; an ended request's ticket is gone and stays so."""
        ticket = self.book.get(call_id)
        if ticket is not None:
            ticket.failed.add(replica_id)

    def failed_replicas(self, call_id: str) -> set[str]:
        ticket = self.book.get(call_id)
        return set(ticket.failed) if ticket is not None else set()

    async def release_request(self, call_id: str) -> None:
        """The request ``call_id`` ended: its ticket is released (``TicketBook.end``)."""
        await self.book.end(call_id)

    # -- TicketOwner -----------------------------------------------------------------------

    async def release(self, ticket: RequestTicket) -> None:
        """Give back every reservation ``ticket`` still holds (the admission's release took the
        gate's reservation already, when it could)."""
        for held in ticket.take_reservations():
            await self._give_back(held)

    def dropped(self, ticket: RequestTicket) -> None:
        for held in ticket.take_reservations():
            log.warning(
                "routing: reservation %s on %s held for more than %d ms without a release: "
                "taken for a lost release, no longer renewed",
                held.reservation_id or "(local)",
                held.replica_id,
                self.settings.max_hold_ms,
            )
            if held.local:
                self.local.give_back(held.replica_id)

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
        """A release of ``held`` (out of its ticket: no longer renewed) failed: the renewer
        retries it, so it is gone when Redis answers again (else its lease ends it)."""
        if not held.local:
            self.renewer.release_later(self._inflight_prefix + held.replica_id, held.reservation_id)

    def _expire(self) -> None:
        """Drop the tickets held longer than ``max_hold_ms`` (at most once a second)."""
        now = time.monotonic()
        if now < self._next_expiry:
            return
        self._next_expiry = now + 1.0
        self.book.expire(self.settings.max_hold_ms / 1000.0, now)
