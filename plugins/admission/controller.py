"""Admission decisions for one proxy process: admit, wait in the fleet-wide queue, or shed.

The fleet-wide state lives in Redis (``gate.lua``); this class runs the wait (woken by the
grant channel, with a slow fallback poll that also keeps the place alive), puts each admission
in the request's ticket (``plugins/request_ticket.py``: released once, with the routing
reservation the gate took, when the request ends), keeps the drain-rate EWMA per model and the
queue's measured rate (for the expected-wait policy, ``expected_wait.py``), sheds on its own for
``shed_memo_ms`` after Redis said a wait is too long, and fails open to a per-process bound when
Redis is unreachable.

The tickets it holds have short leases (``lease_ms``) that a background task renews in one Redis
call per ``renew_ms`` (``plugins/routing/leases.py``): a dead proxy's tickets, or ones whose
release was lost to a Redis outage, stop counting within one lease, while a live request keeps
its ticket however long it runs. A Redis command that finds no free pooled connection in time
(``PoolExhausted``) is not an outage: the request gets a 503 ``gateway_busy`` with
``Retry-After`` (a waiter keeps waiting), and nothing falls back to per-process counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from redis.exceptions import RedisError

from core.redis_client import PoolExhausted, PoolWaits
from plugins.admission import metrics
from plugins.admission.errors import GatewayError, ShedReason, overloaded
from plugins.admission.expected_wait import EarlyShed, ahead_limit, ahead_now, early_shed
from plugins.admission.gate import AdmissionGate, GateReply, Status
from plugins.admission.grants import GrantListener
from plugins.admission.retry_after import RetryPromises, retry_after_s
from plugins.admission.rules import NO_FLOW, FlowCall
from plugins.admission.settings import AdmissionSettings
from plugins.background import Background
from plugins.redis_outage import RedisOutage
from plugins.request_ticket import TICKETS, Admission, ReplicaPicker, RequestTicket, TicketBook
from plugins.routing.leases import LeaseRenewer
from plugins.tracing import annotate

log = logging.getLogger(__name__)


BUSY_CODE = ShedReason.GATEWAY_BUSY.value
"""The 503's ``code`` when this process found no free Redis connection in time."""


RATE_MIN_SAMPLES = 3
"""Granted waiters measured before the queue's rate is trusted."""
RATE_MAX_AGE_WAITS = 3.0
"""The queue's rate is forgotten after this many ``max_wait`` without a new sample."""


@dataclass
class QueueRate:
    """Requests granted per second from the queue (EWMA over this process's granted waiters:
    ``(ahead at entry + 1) / wait``)."""

    rps: float
    samples: int
    at: float


@dataclass(frozen=True)
class Memo:
    """Redis's last answer for one model, priority and flow: how many were ahead, when, the
    model's grant and enqueue numbers then, the grant listener's connection then, and the
    lowest score the flow's next request can get (enqueues below it are ahead of it)."""

    at: float
    ahead: float
    grants: int
    enqueued: int
    generation: int
    bound: float


MemoKey = tuple[str, int, str]
"""(model, priority, flow)."""


class AdmissionController:
    def __init__(
        self, gate: AdmissionGate, settings: AdmissionSettings, book: TicketBook = TICKETS
    ) -> None:
        self.gate = gate
        self.settings = settings
        self.band = settings.band()
        self.book = book
        self.drain: dict[str, float] = {}
        self.capacity: dict[str, int] = {}
        self.local = Counter[str]()
        self.queue_rate: dict[str, QueueRate] = {}
        self.throughput: dict[str, float] = {}
        """Per model: the gate's last ``throughput_rps`` (the fleet's rate with every slot busy)."""
        self.promised: dict[str, RetryPromises] = {}
        """Per model: clients told to come back (Retry-After) and not back yet, by estimate."""
        self.memo: dict[MemoKey, Memo] = {}
        self.entering: dict[MemoKey, set[str]] = {}
        self.arriving: dict[str, dict[str, tuple[int, str]]] = {}
        """Per model: tickets (with their priorities and flows) the front door let in that
        have not reached ``admit`` yet: LiteLLM's per-request work lies between the two."""
        self._reached_gate: dict[str, Callable[[], None]] = {}
        """Per model and priority: tickets of this process's ``enter`` calls awaiting their
        answer."""
        self.background = Background()
        """Background Redis calls (places given back, memo renewals), kept until done."""
        self._refreshing: set[MemoKey] = set()
        self.outage = RedisOutage(
            settings.redis_retry_ms,
            settings.log_interval_s,
            owner="admission",
            fallback="admitting by a per-process bound on outstanding requests, no queue",
            unit="admissions",
        )
        self.pool_waits = PoolWaits("admission", settings.log_interval_s)
        self.grants = GrantListener(gate.client, settings.redis_retry_ms / 1000.0)
        self.renewer = LeaseRenewer(
            "admission",
            lambda: self.gate.client,
            self._held_in_redis,
            self._still_held,
            settings.lease_ms,
            settings.renew_ms,
            settings.log_interval_s,
        )

    # -- leases -----------------------------------------------------------------------------

    def admissions(self) -> list[RequestTicket]:
        """The tickets holding an admission of this controller's."""
        return [
            t for t in self.book.tickets() if t.admission is not None and t.admission.owner is self
        ]

    def holds(self, call_id: str) -> bool:
        """Whether the request ``call_id`` holds an admission of this controller's."""
        ticket = self.book.get(call_id)
        return (
            ticket is not None and ticket.admission is not None and (ticket.admission.owner is self)
        )

    def _held_in_redis(self) -> dict[str, list[str]]:
        """What the renewer renews: ``admitted:{model}`` -> the tickets this process holds
        there (after dropping the tickets held longer than ``max_hold_ms``)."""
        self.book.expire(self.settings.max_hold_ms / 1000)
        out: dict[str, list[str]] = {}
        for ticket in self.admissions():
            assert ticket.admission is not None
            if not ticket.admission.local:
                key = self.gate.keys.admitted(ticket.admission.model)
                out.setdefault(key, []).append(ticket.call_id)
        return out

    def _still_held(self, key: str, call_id: str) -> bool:
        ticket = self.book.get(call_id)
        held = ticket.admission if ticket is not None and ticket.call_id == call_id else None
        return (
            held is not None
            and held.owner is self
            and not held.local
            and self.gate.keys.admitted(held.model) == key
        )

    def _busy(self, model: str, exc: PoolExhausted, started: float) -> GatewayError:
        """The 503 for a request this process could not take to Redis in time: back-pressure
        (``Retry-After``), not a Redis outage."""
        seconds = self.retry_after(model, 1.0)
        self.pool_waits.exhausted(exc, f"admission of a {model} request", "answered 503")
        metrics.SHED.labels(model, BUSY_CODE).inc()
        annotate(admission__outcome="shed", admission__reason=BUSY_CODE)
        metrics.RETRY_AFTER.labels(model).observe(seconds)
        _decided(model, "shed", "busy", started)
        return overloaded(model, ShedReason.GATEWAY_BUSY, seconds)

    # -- policy inputs ----------------------------------------------------------------------

    def _observe(self, model: str, reply: GateReply) -> None:
        alpha = self.settings.drain_ewma_alpha
        previous = self.drain.get(model)
        self.drain[model] = (
            reply.drain_rps
            if previous is None
            else alpha * reply.drain_rps + (1 - alpha) * previous
        )
        self.capacity[model] = reply.capacity
        if reply.throughput_rps > 0:
            self.throughput[model] = reply.throughput_rps
        metrics.CAPACITY.labels(model).set(reply.capacity)
        metrics.OUTSTANDING.labels(model).set(reply.outstanding)

    def _observe_wait(self, model: str, ahead: int, waited_s: float, now: float) -> None:
        if waited_s <= 0.001:
            return
        sample = (ahead + 1) / waited_s
        rate = self.queue_rate.get(model)
        if rate is None or self._forgotten(rate, now):
            self.queue_rate[model] = QueueRate(sample, 1, now)
            return
        alpha = self.settings.drain_ewma_alpha
        rate.rps = alpha * sample + (1 - alpha) * rate.rps
        rate.samples += 1
        rate.at = now

    def _forgotten(self, rate: QueueRate, now: float) -> bool:
        return now - rate.at > RATE_MAX_AGE_WAITS * self.settings.max_wait_ms / 1000

    def _rate(self, model: str, now: float) -> float | None:
        """How fast the queue moves: measured from this process's granted waiters; before
        that (a cold fleet, a burst after an idle spell), the fleet's throughput with every
        slot busy, which is what a queue that has formed drains at."""
        rate = self.queue_rate.get(model)
        if rate is None or rate.samples < RATE_MIN_SAMPLES or self._forgotten(rate, now):
            return self.throughput.get(model)
        return rate.rps

    def ahead_limit(self, model: str, now: float) -> float | None:
        s = self.settings
        return ahead_limit(self._rate(model, now), s.max_wait_ms / 1000, s.expected_wait_fraction)

    def deadline_limit(self, model: str, now: float, deadline_s: float | None) -> float | None:
        """The most requests that may be ahead of one with a time-to-first-token deadline:
        with more, its expected wait ``(ahead + 1) / rate`` is past the deadline."""
        if deadline_s is None:
            return None
        return ahead_limit(self._rate(model, now), deadline_s, 1.0)

    def _remember(
        self, model: str, priority: int, reply: GateReply, now: float, flow: str = ""
    ) -> None:
        """What the next request of this model, priority and flow will find ahead of it."""
        key = (model, priority, flow)
        if reply.status in (Status.WAIT_TOO_LONG, Status.QUEUE_FULL):
            self.memo[key] = self._memo(now, reply.ahead, reply)
        elif reply.status == Status.WAITING:
            self.memo[key] = self._memo(now, reply.ahead + 1, reply)
        else:
            self.memo.pop(key, None)

    def _memo(self, now: float, ahead: int, reply: GateReply) -> Memo:
        return Memo(
            now,
            float(ahead),
            reply.grants,
            reply.enqueued,
            self.grants.generation,
            reply.next_score,
        )

    def _shed_from_memo(
        self,
        model: str,
        replica_ids: Sequence[str],
        priority: int,
        limit: float | None,
        now: float,
        pipeline: int = 0,
        flow: str = "",
        deadline_s: float | None = None,
    ) -> GatewayError | None:
        """The 503 for a request that Redis's recent answer already says would find the queue
        full or wait too long: for ``shed_memo_ms`` after it, with the grants and the enqueues
        (from any proxy) seen on the model's channels since that are ahead of it in the fair
        order, this process's requests of its flow on their way in, and ``pipeline`` more known
        to be ahead (not while those channels are lost, or after they were: a message could go
        uncounted)."""
        memo = self.memo.get((model, priority, flow))
        if memo is None or now - memo.at > self.settings.shed_memo_ms / 1000:
            return None
        if not self.grants.listening or memo.generation != self.grants.generation:
            return None
        entering = self.entering.get((model, priority, flow), set())
        arrived = self.grants.enqueued_since(
            self.gate.enqueues_channel(model), memo.enqueued, memo.bound, flow, entering
        )
        if arrived is None:
            return None
        granted = self.grants.granted.get(self.gate.grants_channel(model), 0) - memo.grants
        # requests of this process on their way into the queue will be ahead as well
        ahead = ahead_now(memo.ahead, granted) + arrived + len(entering) + pipeline
        # nobody queued ahead: a slot may be free, Redis decides. Otherwise the queue's own
        # bound: with max_queue ahead (this priority and better, which the memo counts) the
        # whole queue is full too; a tier's own lower limit is left to Redis
        verdict = early_shed(ahead if ahead >= 1 else -1.0, self.settings.max_queue, limit)
        if verdict is None:
            return None
        if now - memo.at > self.settings.shed_memo_ms / 2000:
            self._refresh_memo(model, replica_ids, priority, flow)
        return self._early(model, verdict, ahead + 1, deadline_s)

    def _early(
        self, model: str, verdict: EarlyShed, work_ahead: float, deadline_s: float | None = None
    ) -> GatewayError:
        """``deadline_s``: the limit was the request's deadline's (``ttft_deadline``)."""
        if verdict == "queue_full":
            return self.shed(model, ShedReason.QUEUE_FULL, work_ahead)
        if deadline_s is not None:
            return self._shed_deadline(model, work_ahead, deadline_s)
        return self._shed_expected_wait(model, work_ahead)

    def _shed_beyond_capacity(
        self, model: str, priority: int, limit: float | None, pipeline: int
    ) -> GatewayError | None:
        """A burst the gate has not answered yet: ``pipeline`` requests of this process are
        ahead of this one; even with every slot of the fleet free (``capacity``, last seen)
        it would queue behind ``pipeline - capacity`` of them."""
        capacity = self.capacity.get(model)
        if capacity is None:
            return None
        position = pipeline - capacity
        verdict = early_shed(position, self.settings.max_queue, limit)
        return None if verdict is None else self._early(model, verdict, position + 1)

    # -- the front door (plugins/front_door): before LiteLLM's per-request work -------------

    def arrive(
        self,
        model: str,
        ticket: str,
        priority: int,
        reached_gate: Callable[[], None] | None = None,
        flow: str = "",
    ) -> None:
        """The front door let ``ticket`` (of ``flow``) in: it is on its way to ``admit``,
        which calls ``reached_gate`` when it gets there."""
        self.arriving.setdefault(model, {})[ticket] = (priority, flow)
        if reached_gate is not None:
            self._reached_gate[ticket] = reached_gate

    def arrival_of(self, model: str, ticket: str) -> tuple[int, str] | None:
        """The priority and flow ``ticket`` arrived with (None: not on its way to the gate)."""
        return self.arriving.get(model, {}).get(ticket)

    def arrived(self, ticket: str, model: str | None = None) -> None:
        """``ticket`` reached ``admit`` or ended before it (idempotent)."""
        models = [model] if model is not None else list(self.arriving)
        for name in models:
            waiting = self.arriving.get(name)
            if waiting is not None and waiting.pop(ticket, None) is not None and not waiting:
                del self.arriving[name]
        callback = self._reached_gate.pop(ticket, None)
        if callback is not None:
            callback()

    def _arriving_ahead(self, model: str, priority: int, ticket: str | None) -> int:
        """Requests the front door let in before ``ticket`` (all of them when None) that have
        not reached the gate, at ``priority`` or better (they are in arrival order)."""
        ahead = 0
        for other, (p, _) in self.arriving.get(model, {}).items():
            if other == ticket:
                break
            if p <= priority:
                ahead += 1
        return ahead

    def _pipeline(self, model: str, priority: int, ticket: str | None) -> int:
        """This process's requests of ``model`` ahead of ``ticket`` (of ``priority``): let in
        by the front door before it, or entering the gate, at this priority or better."""
        arriving = self._arriving_ahead(model, priority, ticket)
        entering = sum(
            len(tickets)
            for (name, p, _), tickets in self.entering.items()
            if name == model and p <= priority
        )
        return arriving + entering

    def _refresh_memo(
        self, model: str, replica_ids: Sequence[str], priority: int, flow: str
    ) -> None:
        """Renew the memo off the request's path (``gate.peek``), so that while requests keep
        being shed it never expires into a Redis round trip for one of them."""
        key = (model, priority, flow)
        if key in self._refreshing:
            return
        self._refreshing.add(key)
        self.background.spawn(self._peek(model, list(replica_ids), priority, flow))

    async def _peek(self, model: str, replica_ids: list[str], priority: int, flow: str) -> None:
        now = time.monotonic()
        key = (model, priority, flow)
        try:
            reply = await self.gate.peek(
                model, replica_ids, priority, self.ahead_limit(model, now), FlowCall(flow)
            )
        except PoolExhausted as exc:
            self.pool_waits.exhausted(exc, f"renewing the {model} shed memo", "renewed later")
            return
        except RedisError as exc:
            self.outage.failed(exc, f"renewing the {model} shed memo")
            return
        finally:
            self._refreshing.discard(key)
        self.memo[key] = self._memo(now, reply.ahead, reply)

    def _shed_deadline(
        self, model: str, work_ahead: float, deadline_s: float | None
    ) -> GatewayError:
        return self.shed(
            model, ShedReason.TTFT_DEADLINE, work_ahead, wait=f"{(deadline_s or 0.0):.1f} s"
        )

    def _shed_expected_wait(self, model: str, work_ahead: float) -> GatewayError:
        wait = self.settings.max_wait_ms * self.settings.expected_wait_fraction / 1000
        return self.shed(model, ShedReason.EXPECTED_WAIT, work_ahead, wait=f"{wait:.1f} s")

    def retry_after(self, model: str, work_ahead: float) -> float:
        """Retry-After for one more turned-away client: behind the work ahead of it and the
        clients already told to come back (``RetryPromises``), at the fleet's full-load
        throughput (the measured drain EWMA while that is unknown)."""
        rate = self.throughput.get(model) or self.drain.get(model)
        promised = self.promised.setdefault(model, RetryPromises())
        now = time.monotonic()
        seconds = retry_after_s(work_ahead + promised.pending(now, rate), rate, self.band)
        promised.add(now, rate)
        return seconds

    def shed(
        self,
        model: str,
        reason: ShedReason,
        work_ahead: float,
        wait: str = "",
        status: int = 503,
    ) -> GatewayError:
        seconds = self.retry_after(model, work_ahead)
        metrics.SHED.labels(model, reason.value).inc()
        annotate(admission__outcome="shed", admission__reason=reason.value)
        metrics.RETRY_AFTER.labels(model).observe(seconds)
        log.info("admission: shed %s request (%s), retry after %.1f s", model, reason, seconds)
        return overloaded(model, reason, seconds, wait, status=status)

    def shed_early(
        self,
        model: str,
        replica_ids: Sequence[str],
        priority: int,
        ticket: str | None = None,
        flow: str = "",
    ) -> GatewayError | None:
        """The 503 for a request that would be shed, decided before LiteLLM's per-request work
        (the front door, ``plugins/front_door``): no await, no Redis call. From the memo (with
        this process's requests ahead in LiteLLM's pipeline), or, in a burst the gate has not
        answered yet, when even an empty fleet could not take it. None: let it in.
        ``ticket``: a request the front door let in already (judged again before it enters
        LiteLLM: only those let in before it are ahead of it); None: a new arrival. ``flow``:
        the key's flow (``identity.flow_of``), whose memo it is judged by."""
        if not self.outage.should_try():
            return None  # per-process fallback: the hook bounds it
        if not self.settings.fair_share:
            flow = ""  # the hook enters every request as one flow
        started = time.perf_counter()
        now = time.monotonic()
        limit = self.ahead_limit(model, now)
        pipeline = self._arriving_ahead(model, priority, ticket)
        shed = self._shed_from_memo(
            model, replica_ids, priority, limit, now, pipeline, flow
        ) or self._shed_beyond_capacity(
            model, priority, limit, self._pipeline(model, priority, ticket)
        )
        if shed is not None:
            _decided(model, "shed", "front_door", started)
        return shed

    # -- admission --------------------------------------------------------------------------

    async def admit(
        self,
        model: str,
        replica_ids: list[str],
        ticket: str,
        priority: int,
        picker: ReplicaPicker | None = None,
        flow: FlowCall = NO_FLOW,
        own_limit: int | None = None,
        deadline_s: float | None = None,
    ) -> None:
        """Return when admitted; raise the 503 ``ProxyException`` when shed. With ``picker``,
        the call that admits also reserves the request's replica, handed to the picker.
        ``flow``: the request's place in the fair share between flows; ``own_limit``: its
        key's own bound on the flow's places in the queue (over it: 429); ``deadline_s``: its
        time-to-first-token deadline (shed at once when its expected wait is past it, never
        granted after it)."""
        started = time.perf_counter()
        self.arrived(ticket, model)
        if not self.settings.fair_share:
            flow, own_limit = NO_FLOW, None  # one flow: first come, first served in a tier
        if not self.outage.should_try():
            self._admit_locally(model, replica_ids, ticket, started)
            return
        now = time.monotonic()
        limit = self.ahead_limit(model, now)
        by_deadline = self.deadline_limit(model, now, deadline_s)
        if by_deadline is not None and (limit is None or by_deadline < limit):
            limit = by_deadline  # the deadline is the bound that holds
        else:
            by_deadline = None
        memo_shed = self._shed_from_memo(
            model,
            replica_ids,
            priority,
            limit,
            now,
            0,
            flow.flow,
            None if by_deadline is None else deadline_s,
        )
        if memo_shed is not None:  # no await: the answer does not wait for the event loop
            _decided(model, "shed", "memo", started)
            raise memo_shed
        granted = self.grants.expect(ticket)  # before entering: a grant may come at once
        entering = self.entering.setdefault((model, priority, flow.flow), set())
        flow_limit = self.settings.flow_limit(own_limit) if self.settings.fair_share else None
        try:
            entering.add(ticket)  # may queue ahead of the next arrival
            try:
                channels = self.gate.grants_channel(model), self.gate.enqueues_channel(model)
                await self.grants.watch(*channels)
                plan = picker.plan_pick(ticket) if picker is not None else None
                reply = await self.gate.enter(
                    model,
                    replica_ids,
                    ticket,
                    priority,
                    limit,
                    plan,
                    flow,
                    flow_limit,
                    None if deadline_s is None else deadline_s * 1000.0,
                )
            except PoolExhausted as exc:
                raise self._busy(model, exc, started) from exc
            except RedisError as exc:
                self.outage.failed(exc, f"admission of a {model} request")
                self._admit_locally(model, replica_ids, ticket, started)
                return
            finally:
                entering.discard(ticket)
            self.outage.succeeded()
            self._observe(model, reply)
            self._remember(model, priority, reply, now, flow.flow)
            outcome = {Status.ADMITTED: "admitted", Status.WAITING: "queued"}
            _decided(model, outcome.get(reply.status, "shed"), "redis", started)
            if reply.status == Status.ADMITTED:
                self._hold(ticket, model, replica_ids, picker, reply, priority, flow)
                metrics.ADMITTED.labels(model, "direct").inc()
                annotate(admission__outcome="admitted")
                return
            if reply.status == Status.QUEUE_FULL:
                raise self.shed(model, ShedReason.QUEUE_FULL, reply.work_ahead)
            if reply.status == Status.WAIT_TOO_LONG:
                if by_deadline is not None:
                    raise self._shed_deadline(model, reply.work_ahead, deadline_s)
                raise self._shed_expected_wait(model, reply.work_ahead)
            if reply.status == Status.NO_CAPACITY:
                raise self.shed(model, ShedReason.NO_HEALTHY_REPLICA, reply.work_ahead)
            if reply.status == Status.FLOW_FULL:
                own = self.settings.own_flow_limit(own_limit)
                raise self.shed(
                    model, ShedReason.FLOW_QUEUE_FULL, reply.work_ahead, status=429 if own else 503
                )
            metrics.QUEUED.labels(model).inc()
            annotate(admission__outcome="queued")
            await self._wait(
                model,
                replica_ids,
                ticket,
                priority,
                reply,
                granted,
                picker,
                flow,
                flow_limit,
                deadline_s,
            )
        finally:
            self.grants.forget(ticket)

    def _hold(
        self,
        call_id: str,
        model: str,
        replica_ids: Sequence[str],
        picker: ReplicaPicker | None,
        reply: GateReply,
        priority: int = 0,
        flow: FlowCall = NO_FLOW,
    ) -> None:
        """Admitted: the request's ticket holds the admission (and the gate's pick)."""
        ticket = self.book.open(call_id)
        ticket.admission = Admission(
            self,
            model,
            tuple(replica_ids),
            local=False,
            priority=priority,
            flow=flow.flow,
            weight=flow.weight,
            cost=flow.cost,
        )
        self.renewer.wake()
        if picker is not None and reply.reservation is not None:
            picker.adopt(model, ticket, reply.reservation)

    async def _wait(
        self,
        model: str,
        replica_ids: list[str],
        ticket: str,
        priority: int,
        reply: GateReply,
        granted: asyncio.Event,
        picker: ReplicaPicker | None,
        flow: FlowCall = NO_FLOW,
        flow_limit: int | None = None,
        deadline_s: float | None = None,
    ) -> None:
        """Wait for the grant of ``ticket``: woken by its message, or finding it by a poll
        every ``poll_ms`` (which also keeps the place in the queue alive); until ``max_wait``,
        or the request's time-to-first-token deadline when that comes first."""
        s = self.settings
        started = time.monotonic()
        first_ahead = reply.ahead
        wait_s = s.max_wait_ms / 1000.0
        if deadline_s is not None and deadline_s < wait_s:
            wait_s = deadline_s
        else:
            deadline_s = None  # max_wait ends the wait first
        deadline = started + wait_s
        admitted = False
        try:
            while True:
                _raise_if_cancelled()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    metrics.QUEUE_WAIT.labels(model, "timeout").observe(time.monotonic() - started)
                    if deadline_s is not None:
                        raise self._shed_deadline(model, reply.work_ahead, deadline_s)
                    raise self.shed(
                        model,
                        ShedReason.QUEUE_TIMEOUT,
                        reply.work_ahead,
                        wait=f"{s.max_wait_ms / 1000:.1f} s",
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(granted.wait(), min(remaining, s.poll_ms / 1000.0))
                granted.clear()
                plan = picker.plan_pick(ticket) if picker is not None else None
                try:
                    # claims a grant (and then reserves the replica with the plan)
                    reply = await self.gate.poll(model, replica_ids, ticket, priority, plan)
                    if reply.status == Status.LOST and deadline_s is not None:
                        # its place ended at its deadline (the gate's clock): not again
                        raise self._shed_deadline(model, reply.work_ahead, deadline_s)
                    if reply.status == Status.LOST:  # our place expired (a long stall): again
                        reply = await self.gate.enter(
                            model,
                            replica_ids,
                            ticket,
                            priority,
                            None,
                            plan,
                            flow,
                            flow_limit,
                        )
                except PoolExhausted as exc:
                    # this process is busy, Redis is not down: keep waiting, poll again
                    self.pool_waits.exhausted(exc, f"a {model} waiter's poll", "polled again")
                    continue
                self._observe(model, reply)
                if reply.status not in (Status.ADMITTED, Status.WAITING):
                    raise self.shed(model, ShedReason.QUEUE_FULL, reply.work_ahead)
                if reply.status == Status.ADMITTED:
                    admitted = True
                    self._hold(ticket, model, replica_ids, picker, reply, priority, flow)
                    now = time.monotonic()
                    self._observe_wait(model, first_ahead, now - started, now)
                    metrics.ADMITTED.labels(model, "queued").inc()
                    annotate(admission__outcome="admitted after queueing")
                    metrics.QUEUE_WAIT.labels(model, "admitted").observe(now - started)
                    return
        except RedisError as exc:
            _raise_if_cancelled(exc)  # the client went away: nothing to admit
            # the fleet-wide queue is gone with Redis: fall back to the per-process bound
            self.outage.failed(exc, f"queue wait of a {model} request")
            self._admit_locally(model, replica_ids, ticket, time.perf_counter())
            admitted = True
        finally:
            if not admitted:
                # timeout, shed, or the client went away (cancellation): give the place (or a
                # grant not yet claimed) back, in a task of its own so that a cancellation
                # cannot cut it short
                self.background.spawn(self._leave(model, replica_ids, ticket))

    async def _leave(self, model: str, replica_ids: Sequence[str], ticket: str) -> None:
        try:
            await self.gate.leave(model, replica_ids, ticket)
        except PoolExhausted as exc:
            self.pool_waits.exhausted(exc, f"leaving the {model} queue", "the place expires")
        except RedisError as exc:
            # the place expires by itself after queue_lease_ms
            self.outage.failed(exc, f"leaving the {model} queue")

    def _admit_locally(
        self, model: str, replica_ids: list[str], ticket: str, started: float
    ) -> None:
        """Redis down: bound this process's own outstanding requests by the last known
        capacity (or ``unknown_replica_slots`` per replica); no queue."""
        capacity = self.capacity.get(model, self.settings.unknown_replica_slots * len(replica_ids))
        if self.local[model] >= capacity:
            _decided(model, "shed", "fallback", started)
            raise self.shed(model, ShedReason.QUEUE_FULL, self.local[model] - capacity + 1)
        _decided(model, "admitted", "fallback", started)
        self.local[model] += 1
        self.outage.fallbacks += 1
        self.book.open(ticket).admission = Admission(self, model, tuple(replica_ids), local=True)
        metrics.ADMITTED.labels(model, "local").inc()
        annotate(admission__outcome="admitted locally (redis unreachable)")

    async def aclose(self) -> None:
        """Stop renewing leases and listening for grants (the proxy's shutdown, tests)."""
        await self.renewer.aclose()
        await self.grants.aclose()

    # -- release ----------------------------------------------------------------------------

    async def finish(self, call_id: str) -> bool:
        """The request ``call_id`` ended (any way): its ticket is released, once
        (``TicketBook.end``). Returns whether this call released it."""
        return await self.book.end(call_id)

    async def release(self, ticket: RequestTicket) -> None:
        """``TicketOwner``: free the request's slot, with the routing reservation the gate took
        for it (``Routing.adopted``) in the same Redis call when it can."""
        held = ticket.admission
        assert held is not None
        if held.local:
            self.local[held.model] = max(0, self.local[held.model] - 1)
            return
        adopted = ticket.routing.adopted if ticket.routing is not None else None
        routed = None
        if adopted is not None and not adopted.local and adopted.replica_id in held.replica_ids:
            ticket.take(adopted)  # given back here, not by the router
            routed = (adopted.replica_id, adopted.reservation_id)
        usage = ticket.usage_tokens
        try:
            await self.gate.release(
                held.model,
                held.replica_ids,
                ticket.call_id,
                routed,
                held.priority,
                FlowCall(held.flow, held.weight, held.cost),
                float(usage) if usage is not None and self.settings.fair_share else None,
            )
        except RedisError as exc:
            if isinstance(exc, PoolExhausted):
                self.pool_waits.exhausted(
                    exc, f"release of a {held.model} admission", "retried with the renewals"
                )
            else:
                self.outage.failed(exc, f"release of a {held.model} admission")
            # no longer held, so no longer renewed; the renewer retries the release (with the
            # routing reservation), so it is gone when Redis answers again
            self.renewer.release_later(self.gate.keys.admitted(held.model), ticket.call_id)
            if routed is not None:
                self.renewer.release_later(self.gate.keys.inflight(routed[0]), routed[1])

    def dropped(self, ticket: RequestTicket) -> None:
        """``TicketOwner``: held longer than ``max_hold_ms``, taken for a lost release."""
        held = ticket.admission
        assert held is not None
        log.warning(
            "admission: %s ticket held for more than %d ms without a release: taken for a "
            "lost release, no longer renewed",
            held.model,
            self.settings.max_hold_ms,
        )
        if held.local:
            self.local[held.model] = max(0, self.local[held.model] - 1)


def _raise_if_cancelled(cause: BaseException | None = None) -> None:
    """A waiter whose task was cancelled (its client went away) stops here, even where the
    cancellation did not reach it as ``CancelledError``: Python 3.11's ``asyncio.wait_for`` may
    swallow one that arrives as its inner wait ends, and a Redis error may race it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError() from cause


def _decided(model: str, outcome: str, source: str, started: float) -> None:
    metrics.DECISION.labels(model, outcome, source).observe(time.perf_counter() - started)
