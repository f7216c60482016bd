"""The admission policy: pure functions (no I/O), mirrored by ``gate.lua``.

``gate.lua`` applies these rules inside Redis, atomically, for every proxy at once; a property
test (``tests/test_gate_parity.py``) puts the same state in Redis and here and asserts that both
decide alike: the status, the counts, the grants and the fleet's rates, compared with ``==``.
The expected-wait limit (``expected_wait.py``) and Retry-After (``retry_after.py``) are the other
two admission policies; both run in Python only.

The fleet (``fleet``), per replica of the model, as the router reads it (``ReplicaState`` is
None for a missing or invalid hash, the same hashes ``pick_lib.lua`` holds invalid)::

    fresh, healthy  -> slots max_active, counts toward the allowance and the rates
    fresh, down     -> slots 0; its reservations do not count (their requests are failing
                       and will be retried elsewhere)
    missing, invalid or stale -> unknown_slots
    capacity = Σ slots + allowance × healthy
    free     = Σ max(0, slots - reservations)  -  admitted tickets not yet routed

Grants (``grant_count``), made first on every call: queue heads move into the admitted set while
a batch slot is free somewhere (``free > 0``) and ``outstanding < capacity``: never into the
allowance, since a request that waited has used its time already.

A new request (``enter``) is admitted while nobody is queued ahead of it and
``outstanding < capacity`` (the allowance keeps every batch slot fed without a round trip between
one request's end and the next one's start); else refused with no reachable replica, a full
queue (``max_queue``, or its priority's own limit), its flow's places all taken
(``flow_limit``) or more than ``ahead_limit`` ahead; else queued. A waiter's ``poll`` claims its
grant, keeps its place, or learns that its place expired.

The queue's order (``queue_score``): strict priority between tiers, then, within a tier, fair
share between flows (a flow: a virtual key, or the tenant its metadata names), by start-time
fair queueing. A flow's requests get start tags in order; a request's tag is the later of its
flow's last finish tag and the tier's virtual time (the tag of the last request admitted from
the tier), and its finish tag is its tag + its cost (prompt + output tokens) / its flow's
weight. So under contention each flow is served in proportion to its weight, a flow's work
counts in tokens, and a flow that was idle starts at the virtual time: it banks no credit for
its idle spell (the Virtual Token Counter's rule). The tags start again from 0 whenever a
request finds the queue empty: without a queue there is nothing to share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from core.keyschema import ReplicaState


class Status(IntEnum):
    ADMITTED = 1
    WAITING = 0
    QUEUE_FULL = -1
    NO_CAPACITY = -2
    LOST = -3
    WAIT_TOO_LONG = -4
    FLOW_FULL = -5
    """The request's flow holds ``flow_limit`` places in the queue already."""
    DONE = 2


@dataclass(frozen=True)
class GateParams:
    """The gate's knobs for one call (from ``AdmissionSettings``)."""

    allowance: int
    """Per healthy replica, admitted work beyond max_active."""
    unknown_slots: int
    """Slots counted for a replica with no fresh, valid state."""
    stale_after_ms: int
    queue_limit: int
    """The most places this call's priority may hold in the queue."""
    max_queue: int
    ahead_limit: float | None = None
    """``enter``/``peek``: refuse rather than queue behind more than this many (None: no limit)."""
    flow_limit: int | None = None
    """The most places this call's flow may hold in the queue (None: no limit of its own)."""


@dataclass(frozen=True)
class FlowCall:
    """Who is asking, for the fair order: the flow, its weight and the request's cost."""

    flow: str = ""
    weight: float = 1.0
    """The flow's share relative to the others of its tier (> 0)."""
    cost: float = 1.0
    """The request's expected work in tokens (prompt + output, >= 1)."""


NO_FLOW = FlowCall()
"""Every request of one flow (the gate's callers that know of no flow): first come, first
served within a tier."""


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica as the gate reads it: its state (None: missing or invalid) and its live
    routing reservations."""

    state: ReplicaState | None
    reservations: int = 0


@dataclass(frozen=True)
class Fleet:
    slots: int
    healthy: int
    unknown: int
    capacity: int
    free: int
    """Σ over replicas of their batch slots not reserved by the router."""
    reserved: int
    """Reservations that count (a down replica's do not)."""
    drain_rps: float
    """Σ of the healthy replicas' published completions/s."""
    throughput_rps: float
    """Σ over healthy replicas of max_active × 1000 / request_ms: the completions/s with every
    batch slot busy (0 while none is measured)."""

    @property
    def reachable(self) -> bool:
        """Some replica may take work (healthy, or unknown: its sidecar may just be down)."""
        return self.healthy + self.unknown > 0


def fleet(replicas: Sequence[ReplicaLoad], p: GateParams, now_ms: int) -> Fleet:
    slots = healthy = unknown = free = reserved = 0
    drain = throughput = 0.0
    for replica in replicas:  # in order: the float sums are the same as gate.lua's
        s = replica.state
        own = 0
        down = False
        if s is None or s.ts_ms < now_ms - p.stale_after_ms:
            own = p.unknown_slots
            unknown += 1
        elif not s.healthy:
            down = True
        else:
            own = s.max_active
            healthy += 1
            if s.drain_rps is not None and s.drain_rps > 0:
                drain = drain + s.drain_rps
            if s.request_ms is not None and s.request_ms > 0:
                throughput = throughput + own * 1000 / s.request_ms
        slots += own
        taken = 0 if down else replica.reservations
        reserved += taken
        free += max(0, own - taken)
    return Fleet(
        slots=slots,
        healthy=healthy,
        unknown=unknown,
        capacity=slots + p.allowance * healthy,
        free=free,
        reserved=reserved,
        drain_rps=drain,
        throughput_rps=throughput,
    )


def free_slots(f: Fleet, outstanding: int) -> int:
    """Batch slots free for a waiter: the unreserved ones less the admitted tickets not yet
    routed (without the routing plugin nothing is reserved: slots - outstanding)."""
    return f.free - max(0, outstanding - f.reserved)


def grant_count(f: Fleet, outstanding: int, queued: int) -> int:
    """How many queue heads the gate grants before it answers."""
    return max(0, min(queued, free_slots(f, outstanding), f.capacity - outstanding))


def too_long(ahead: int, ahead_limit: float | None) -> bool:
    return ahead_limit is not None and ahead > ahead_limit


def enter(
    f: Fleet,
    outstanding: int,
    queued: int,
    ahead: int,
    same_priority: int,
    p: GateParams,
    same_flow: int = 0,
) -> Status:
    """A new request (after the grants): ``ahead`` queued before it in the fair order,
    ``same_priority`` queued at its priority, ``same_flow`` queued of its flow."""
    if ahead == 0 and outstanding < f.capacity:
        return Status.ADMITTED
    if not f.reachable:
        return Status.NO_CAPACITY
    if p.flow_limit is not None and same_flow >= p.flow_limit:
        return Status.FLOW_FULL
    if queued >= p.max_queue or same_priority >= p.queue_limit:
        return Status.QUEUE_FULL
    if too_long(ahead, p.ahead_limit):
        return Status.WAIT_TOO_LONG
    return Status.WAITING


def push_out(
    queue: Sequence[Queued],
    score: float,
    priority: int,
    mine: int,
    counts: dict[str, int],
    whole_queue: bool,
) -> Queued | None:
    """The place a request of ``score`` takes when the queue is full for it (the whole queue,
    or its tier's limit): the last place in the fair order (of the queue, or of its tier) when
    it comes after this request and its flow holds more places than this request's flow will
    (``mine`` + 1). So one flow's flood cannot keep the others out of a full queue, and flows
    of equal backlog do not take places from each other. None: it is refused."""
    candidates = [q for q in queue if whole_queue or score_priority(q.score) == priority]
    if not candidates:
        return None
    last = max(candidates, key=lambda q: (q.score, q.ticket.encode()))
    if last.score > score and counts.get(last.flow, 0) > mine + 1:
        return last
    return None


def peek(ahead: int, p: GateParams) -> Status:
    """What a new request would find with ``ahead`` queued at its priority or better."""
    return Status.WAIT_TOO_LONG if too_long(ahead, p.ahead_limit) else Status.WAITING


def poll(granted: bool, in_queue: bool) -> Status:
    """A waiter: its grant came (claim it), it still has its place, or the place expired."""
    if granted:
        return Status.ADMITTED
    return Status.WAITING if in_queue else Status.LOST


PRIORITY_UNIT = 2**40
"""Queue order: priority × 2^40 + the request's start tag (lower first; equal scores by
ticket, as Redis orders a sorted set's ties)."""


def queue_score(priority: int, tag: float) -> float:
    return priority * PRIORITY_UNIT + tag


def score_priority(score: float) -> int:
    return math.floor(score / PRIORITY_UNIT)


@dataclass
class Fair:
    """The fair order's state: each tier's virtual time and each flow's last finish tag."""

    virtual: dict[int, float] = field(default_factory=dict)
    finish: dict[tuple[int, str], float] = field(default_factory=dict)

    def start_tag(self, priority: int, flow: str) -> float:
        return max(self.virtual.get(priority, 0.0), self.finish.get((priority, flow), 0.0))

    def charge(self, priority: int, flow: FlowCall, tag: float) -> None:
        """A request of ``flow`` took its place (admitted or queued) at ``tag``."""
        self.finish[(priority, flow.flow)] = tag + flow.cost / flow.weight

    def correct(self, priority: int, flow: FlowCall, usage: float) -> None:
        """A request of ``flow`` charged ``flow.cost`` ended having used ``usage`` tokens: its
        flow's finish tag moves by the difference (while the contention it was charged in
        lasts: after the tags restarted there is nothing to correct)."""
        key = (priority, flow.flow)
        if key in self.finish:
            self.finish[key] = self.finish[key] + (usage - flow.cost) / flow.weight

    def served(self, score: float) -> None:
        """A request left the queue for a batch slot (or went straight in): the virtual time
        of its tier moves up to its tag."""
        priority = score_priority(score)
        tag = score - priority * PRIORITY_UNIT
        if tag > self.virtual.get(priority, 0.0):
            self.virtual[priority] = tag


@dataclass(frozen=True)
class Queued:
    ticket: str
    score: float
    flow: str
    deadline_ms: float | None = None
    """When its place ends, whatever its waiter does (a time-to-first-token deadline): it is
    never granted after it."""


@dataclass
class GateView:
    """The live part of one model's gate state (after the expired entries are dropped):
    admitted tickets, the queue in order, and the fair order's state."""

    admitted: set[str] = field(default_factory=set)
    queue: list[Queued] = field(default_factory=list)
    fair: Fair = field(default_factory=Fair)

    def sort(self) -> None:
        self.queue.sort(key=lambda q: (q.score, q.ticket.encode()))

    def flow_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for q in self.queue:
            counts[q.flow] = counts.get(q.flow, 0) + 1
        return counts


@dataclass(frozen=True)
class Decision:
    status: Status
    fleet: Fleet
    outstanding: int
    queued: int
    ahead: int
    granted: tuple[str, ...]
    """Queue heads granted by this call, in order."""
    next_score: float = 0.0
    """``enter``/``peek``: the lowest score the next request of the caller's flow and priority
    can get (the memo counts the enqueues below it as ahead of that request)."""


def gate_call(
    view: GateView,
    op: str,
    ticket: str,
    priority: int,
    replicas: Sequence[ReplicaLoad],
    p: GateParams,
    now_ms: int,
    flow: FlowCall = NO_FLOW,
    usage: float | None = None,
    deadline_ms: float | None = None,
) -> Decision:
    """One gate call on ``view`` (changed in place), as ``gate.lua`` makes it: ``enter``,
    ``poll``, ``peek``, ``leave`` or ``release``. ``replicas`` are read after a release's routing
    reservation is given back. ``usage``: a release's tokens as the response reported them
    (its flow was charged ``flow.cost``: the difference is made good). ``deadline_ms``: an
    ``enter``'s time-to-first-token deadline from now; a place past its deadline is gone."""
    view.sort()
    view.queue = [q for q in view.queue if q.deadline_ms is None or q.deadline_ms > now_ms]
    if op in ("release", "leave"):
        view.admitted.discard(ticket)
        view.queue = [q for q in view.queue if q.ticket != ticket]
    if op == "release" and usage is not None:
        view.fair.correct(priority, flow, usage)
    f = fleet(replicas, p, now_ms)
    outstanding = len(view.admitted)
    count = grant_count(f, outstanding, len(view.queue))
    granted = tuple(q.ticket for q in view.queue[:count])
    for q in view.queue[:count]:
        view.fair.served(q.score)
    view.queue = view.queue[count:]
    view.admitted.update(granted)
    outstanding += count
    queued = len(view.queue)

    def decided(
        status: Status,
        out: int = outstanding,
        waiting: int = queued,
        ahead: int = 0,
        next_score: float = 0.0,
    ) -> Decision:
        return Decision(status, f, out, waiting, ahead, granted, next_score)

    if op in ("release", "leave"):
        return decided(Status.DONE)
    if op == "peek":
        score = queue_score(priority, view.fair.start_tag(priority, flow.flow))
        ahead = sum(1 for q in view.queue if q.score < score)
        return decided(peek(ahead, p), ahead=ahead, next_score=score)
    if op == "enter":
        if ticket in view.admitted:
            return decided(Status.ADMITTED)
        if not view.queue:
            view.fair = Fair()  # nothing to share: the tags start again
        tag = view.fair.start_tag(priority, flow.flow)
        score = queue_score(priority, tag)
        ahead = sum(1 for q in view.queue if q.score < score)
        same = sum(1 for q in view.queue if score_priority(q.score) == priority)
        mine = sum(1 for q in view.queue if q.flow == flow.flow)
        status = enter(f, outstanding, queued, ahead, same, p, mine)
        if status == Status.QUEUE_FULL and not too_long(ahead, p.ahead_limit):
            whole = queued >= p.max_queue
            victim = push_out(view.queue, score, priority, mine, view.flow_counts(), whole)
            if victim is not None:
                fewer = same - (1 if score_priority(victim.score) == priority else 0)
                if enter(f, outstanding, queued - 1, ahead, fewer, p, mine) == Status.WAITING:
                    view.queue.remove(victim)  # its waiter finds its place gone (LOST)
                    queued, status = queued - 1, Status.WAITING
        if status == Status.ADMITTED:
            view.admitted.add(ticket)
            view.fair.charge(priority, flow, tag)
            view.fair.served(score)
            return decided(status, out=outstanding + 1, next_score=_next(view, priority, flow))
        if status == Status.WAITING:
            view.fair.charge(priority, flow, tag)
            until = None if deadline_ms is None else now_ms + deadline_ms
            view.queue.append(Queued(ticket, score, flow.flow, until))
            view.sort()
            return decided(
                status, waiting=queued + 1, ahead=ahead, next_score=_next(view, priority, flow)
            )
        return decided(status, ahead=ahead, next_score=score)
    if op == "poll":
        rank = next((i for i, q in enumerate(view.queue) if q.ticket == ticket), None)
        status = poll(ticket in view.admitted, rank is not None)
        return decided(status, ahead=rank or 0)
    raise ValueError(f"unknown gate op {op!r}")


def _next(view: GateView, priority: int, flow: FlowCall) -> float:
    return queue_score(priority, view.fair.start_tag(priority, flow.flow))
